"""hca: hierarchical credit assignment for RL of LLM reasoning, on PyTorch Lightning.

The method's math is :mod:`hca.credit`, its unit of credit :mod:`hca.steps`; the packages follow its
stages: :mod:`hca.data` -> :mod:`hca.collection` -> :mod:`hca.prm` -> :mod:`hca.rl` -> :mod:`hca.evaluation`,
over :mod:`hca.verify`, :mod:`hca.rollout` and :mod:`hca.models`, run as LightningModules
(:mod:`hca.modules`, :mod:`hca.datamodules`) in :mod:`hca.runtime`, driven by :mod:`hca.workflows`
(``docs/layout.md``).

``import hca`` is light: it loads no torch, lightning, transformers, deepspeed or wandb. Import the
submodules you need. Module paths from before the layout by stage (``hca.rl_batch``,
``hca.pipeline``, ...) still import, as the same modules (:mod:`hca._legacy_paths`).
"""
from hca import _legacy_paths

_legacy_paths.install()

__version__ = "0.1.0"
