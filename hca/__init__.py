"""hca: hierarchical credit assignment for RL of LLM reasoning, on PyTorch Lightning.

``import hca`` is light: it loads no lightning, transformers, deepspeed or wandb. Import the
submodules you need (``hca.credit``, ``hca.steps``, ``hca.verify``, ``hca.modules.…``).
"""
__version__ = "0.1.0"
