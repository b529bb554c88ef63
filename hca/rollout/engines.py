"""Which engine samples: one ``engine`` settings block in every stage, and :func:`build_engine`.

``engine: hf`` -- :class:`~hca.rollout.hf.HFRolloutEngine` over the stage's torch model (the tiny
CPU default; the only engine with entropies; samples from the live training weights).
``engine: vllm`` -- :class:`~hca.rollout.vllm.VLLMRolloutEngine` over the checkpoint folder (a clear
error when vLLM is not installed or cannot load the model). ``engine: auto`` -- vLLM when it is
installed and the model is a checkpoint folder of at least ``auto_min_params`` parameters, else HF.

vLLM's context (``max_model_len``) is what the stage needs unless set: the stage passes
``context_need = (longest prompt, response budget)`` in tokens and :func:`stage_context_len` sizes
the context from it, so that vLLM does not reserve a KV cache for the model's whole declared context
(32k positions for Qwen2.5) that the stage never uses.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from hca.rollout.sizing import (MAX_LEN_KEYS, checkpoint_num_params, checkpoint_shapes,  # noqa: F401 (here before sizing.py)
                                continuation_need, model_context_len, prompt_lengths, sampling_need, stage_context_len)

ENGINES = ("hf", "vllm", "auto")


@dataclass(frozen=True)
class EngineConfig:
    """The rollout engine of a stage and its settings (HF ones apply to ``hf``, vLLM ones to ``vllm``)."""

    engine: str = "auto"  # hf | vllm | auto (vLLM when installed and the model is not tiny)
    max_batch_size: int = 256  # HF: samples per sub-batch (part of what fixes the HF random streams)
    auto_min_params: int = 1_000_000  # auto: models with fewer parameters (and tiny-llama specs) use HF (docs/engines.md: the measured crossover)
    dtype: str | None = None  # vLLM parameter dtype; None: the stage's dtype
    max_model_len: int | None = None  # vLLM context length (prompt + response); None: what the stage needs (longest prompt + response budget, in KV blocks, at most the model's)
    enable_prefix_caching: bool = True  # vLLM: share the KV of common prefixes (Monte Carlo completions)
    gpu_memory_utilization: float = 0.5  # vLLM on CUDA: fraction of GPU memory the engine takes
    kv_cache_gb: float | None = None  # vLLM KV-cache GiB; None: 1 on CPU, from gpu_memory_utilization on CUDA
    enforce_eager: bool | None = None  # vLLM without CUDA graphs; None: on CPU only
    sleep_mode: bool | None = None  # vLLM on CUDA: free engine memory during RL updates; None: on with CUDA
    max_num_seqs: int = 256  # vLLM: sequences scheduled at once
    block_size: int | None = None  # vLLM KV block (prefix caching shares whole blocks); None: 32 on CPU, vLLM's on CUDA

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if not isinstance(self.max_batch_size, int) or isinstance(self.max_batch_size, bool) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")

    @classmethod
    def coerce(cls, value, where: str = "engine") -> "EngineConfig":
        """From a mapping, an engine name (``"vllm"``), an instance or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, str):
            return cls(engine=value)
        if isinstance(value, dict):
            try:
                return cls(**value)
            except TypeError as e:
                raise ValueError(f"{where}: {e}") from e
        if not isinstance(value, cls):
            raise TypeError(f"{where} must be an EngineConfig, an engine name or a mapping, got {type(value).__name__}")
        return value

    def vllm_settings(self, dtype: str) -> dict:
        return {"dtype": self.dtype or dtype, "max_model_len": self.max_model_len,
                "enable_prefix_caching": self.enable_prefix_caching,
                "gpu_memory_utilization": self.gpu_memory_utilization, "kv_cache_gb": self.kv_cache_gb,
                "enforce_eager": self.enforce_eager, "sleep_mode": self.sleep_mode, "max_num_seqs": self.max_num_seqs,
                "block_size": self.block_size}

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_engine(cfg: EngineConfig, model_ref: str, setting: str = "engine") -> str:
    """``"hf"`` or ``"vllm"`` for a model reference (a checkpoint folder, hub name or tiny spec)."""
    from hca.models.loading import is_tiny_spec
    from hca.rollout.vllm import import_vllm, vllm_available

    if cfg.engine == "hf":
        return "hf"
    if cfg.engine == "vllm":
        if is_tiny_spec(model_ref):
            raise ValueError(f"{setting}: vllm cannot load {model_ref!r} (a tiny-llama spec built in memory); "
                             f"use {setting}: hf, or save it to a folder first")
        import_vllm(setting)  # a clear error when it is missing
        return "vllm"
    if not vllm_available() or is_tiny_spec(model_ref):
        return "hf"
    from hca.models.gguf import resolve_model_ref

    n = checkpoint_num_params(resolve_model_ref(model_ref))
    return "vllm" if n is not None and n >= cfg.auto_min_params else "hf"


def build_engine(cfg: EngineConfig, model_ref: str, tokenizer, *, model=None, dtype: str = "float32",
                 owner: str | None = None, setting: str = "engine", context_need: tuple[int, int] | None = None):
    """The stage's engine. HF needs the loaded torch ``model``; vLLM loads ``model_ref`` itself (one
    engine per process and settings, :func:`hca.rollout.vllm.engine_for`; ``owner``: an engine of
    its own for a caller that syncs weights into it). ``context_need``: ``(longest prompt, response
    budget)`` in tokens, which sizes vLLM's context when ``cfg.max_model_len`` is None
    (:func:`stage_context_len`); None: the model's whole context. The HF engine ignores it."""
    if resolve_engine(cfg, model_ref, setting) == "vllm":
        from hca.rollout.vllm import engine_for

        return engine_for(model_ref, tokenizer, owner=owner, setting=setting, context_need=context_need,
                          **cfg.vllm_settings(dtype))
    if model is None:
        raise ValueError(f"{setting}: the HF engine needs the loaded model of {model_ref!r}")
    from hca.rollout.hf import HFRolloutEngine

    return HFRolloutEngine(model, tokenizer, max_batch_size=cfg.max_batch_size)
