"""Rollout engines: one protocol, one module per engine (verl's ``workers/rollout/{hf,vllm}_rollout``).

* :mod:`hca.rollout.base` -- :class:`SamplingParams` (the one sampling settings type: every stage's
  ``sampling`` keys), :class:`RolloutBatch` (what an engine returns) and the :class:`RolloutEngine`
  protocol (``generate(prompts, params) -> RolloutBatch``); callers depend on these only.
* :mod:`hca.rollout.hf` -- :class:`HFRolloutEngine`, a decode loop over any torch causal LM.
* :mod:`hca.rollout.vllm` -- :class:`VLLMRolloutEngine` (imported on first use: ``import hca.rollout``
  never imports vLLM).
* :mod:`hca.rollout.engines` -- :class:`EngineConfig` (``engine: hf | vllm | auto`` and its
  settings, one key in every stage) and :func:`build_engine`.
* :mod:`hca.rollout.sizing` -- a checkpoint's size and context, and the context a stage needs.
* :mod:`hca.rollout.seeds` -- every sampling seed as a function of ``(seed, index, stream)``.

Training-side log-probs (teacher forcing, with gradients) are :mod:`hca.rl.logprobs`, not here.
"""
from hca.rollout.base import FINISH_REASONS, RolloutBatch, RolloutEngine, SamplingParams
from hca.rollout.hf import HFRolloutEngine

__all__ = ["FINISH_REASONS", "HFRolloutEngine", "RolloutBatch", "RolloutEngine", "SamplingParams",
           "VLLMRolloutEngine", "EngineConfig", "build_engine"]


def __getattr__(name):  # the vLLM engine and the factory load on first use
    if name == "VLLMRolloutEngine":
        from hca.rollout.vllm import VLLMRolloutEngine

        return VLLMRolloutEngine
    if name in ("EngineConfig", "build_engine"):
        from hca.rollout import engines

        return getattr(engines, name)
    raise AttributeError(f"module 'hca.rollout' has no attribute {name!r}")
