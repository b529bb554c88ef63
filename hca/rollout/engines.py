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
from typing import Sequence

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


def checkpoint_shapes(folder: str) -> dict[str, list[int]] | None:
    """``{tensor name: shape}`` of a checkpoint folder, from its safetensors headers (no tensor is
    read); None when it is not a folder or holds no safetensors file."""
    root = Path(folder)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        shapes |= {name: meta["shape"] for name, meta in header.items() if name != "__metadata__"}
    return shapes


def checkpoint_num_params(folder: str) -> int | None:
    """Parameter count of a checkpoint folder (:func:`checkpoint_shapes`); None when it has none."""
    shapes = checkpoint_shapes(folder)
    return None if shapes is None else sum(math.prod(shape) for shape in shapes.values())


def resolve_engine(cfg: EngineConfig, model_ref: str, setting: str = "engine") -> str:
    """``"hf"`` or ``"vllm"`` for a model reference (a checkpoint folder, hub name or tiny spec)."""
    from hca.models import is_tiny_spec
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
    from hca.gguf import resolve_model_ref

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


# ---------------------------------------------------------------------------------------- context sizing
def stage_context_len(longest_prompt: int, response_budget: int, block_size: int, model_max: int | None) -> int:
    """vLLM's context for a stage: ``longest_prompt + response_budget`` tokens rounded up to whole KV
    blocks of ``block_size``, at most ``model_max`` (the model's ``max_position_embeddings``; None:
    no cap)."""
    if longest_prompt < 0 or response_budget < 0 or block_size < 1:
        raise ValueError(f"stage_context_len: bad arguments ({longest_prompt}, {response_budget}, {block_size})")
    need = max(1, longest_prompt + response_budget)
    n = -(-need // block_size) * block_size
    return n if model_max is None else min(n, int(model_max))


MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")  # vLLM's, smallest wins


def model_context_len(folder: str) -> int | None:
    """The context a checkpoint folder declares (the smallest of the ``config.json`` keys vLLM
    reads, of the text config when there is one); None when it says none or is not a folder."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config") or config
    found = [int(config[k]) for k in MAX_LEN_KEYS if isinstance(config.get(k), (int, float)) and config[k] > 0]
    return min(found) if found else None


def prompt_lengths(prompts: Sequence[str], tokenizer) -> list[int]:
    """Tokens of each prompt as the engines encode it (``add_special_tokens=True``)."""
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        return []
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]


def sampling_need(prompts: Sequence[str], tokenizer, response_budget: int) -> tuple[int, int]:
    """``context_need`` of an engine that samples ``response_budget`` tokens after ``prompts``."""
    return max(prompt_lengths(prompts, tokenizer), default=0), int(response_budget)


def continuation_need(prompts: Sequence[str], policy_tokenizer, policy_budget: int, prover_tokenizer,
                      prover_budget: int) -> tuple[int, int]:
    """``context_need`` of a prover that completes ``prompt + a prefix of a policy response``
    (:func:`hca.collect.estimate_prefix_values`): the longest prompt in the prover's tokens, and the
    policy's budget plus the prover's. The prefix is text of at most ``policy_budget`` policy tokens;
    with another tokenizer it counts as ``policy_budget`` times the largest ratio of prover to policy
    tokens over the prompts (at least 1)."""
    prompts = list(dict.fromkeys(prompts))
    mine = prompt_lengths(prompts, prover_tokenizer)
    budget = int(policy_budget)
    if prover_tokenizer is not policy_tokenizer and prompts:
        theirs = prompt_lengths(prompts, policy_tokenizer)
        ratio = max((a / b for a, b in zip(mine, theirs) if b), default=1.0)
        budget = math.ceil(policy_budget * max(1.0, ratio))
    return max(mine, default=0), budget + int(prover_budget)
