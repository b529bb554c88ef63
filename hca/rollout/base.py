"""The rollout protocol and its records: what every engine takes and returns.

Callers (collection, Monte Carlo scoring, evaluation, RL) depend only on :class:`RolloutEngine`
(``generate(prompts, params) -> RolloutBatch``) and never know which engine sampled:
:class:`hca.rollout.hf.HFRolloutEngine` (a hand-written decode loop over any torch causal LM: the
tiny CPU default, and the only engine that records entropies) or
:class:`hca.rollout.vllm.VLLMRolloutEngine` (vLLM, for real model sizes). :func:`hca.rollout.engines.build_engine`
picks one from an :class:`~hca.rollout.engines.EngineConfig`.

Contract of every engine: the ``n`` samples of a prompt are contiguous, in prompt order; the same
prompts and params (with a seed) give the same samples from the same engine and settings; a
sample finishes on EOS (``"eos"``: the EOS token is kept in ``response_ids`` / ``response_mask``
but not in ``texts``), on a stop string (``"stop"``: cut after the token that completed it, the
text cut right after the stop string, which is kept) or on its token budget (``"length"``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields, replace
from typing import Protocol, Sequence, runtime_checkable

import torch

FINISH_REASONS = ("eos", "stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: the one sampling settings type of every stage (RL's ``sampling``, collection's
    ``collection.policy`` / ``collection.prover``, the Monte Carlo scorer's ``sampling``).

    ``temperature`` also defines the distribution whose log-probs (and, HF engine, entropies) are
    recorded; ``top_p`` truncates what is sampled from. In stage configs ``n`` and ``seed`` stay at
    their defaults: the stage sets them per call (:meth:`call`) from its group size / rollout count
    and its seed streams (:mod:`hca.rollout.seeds`)."""

    max_new_tokens: int = 64  # token budget per sample; a sample cut here finishes with "length"
    temperature: float = 1.0  # sampling temperature (> 0); log-probs are those of softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling (1: off)
    stop: tuple[str, ...] = ()  # stop strings; a sample stops once its text contains one
    n: int = 1  # samples per prompt (set by the stage)
    seed: int | None = None  # None: drawn from torch's global RNG (set by the stage)
    greedy: bool = False  # argmax decoding (``n`` samples are then identical)

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0 (greedy=True for argmax), got {t!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    def call(self, n: int, seed: int | None) -> "SamplingParams":
        """These settings with the per-call ``n`` and ``seed`` a stage fills in."""
        return replace(self, n=n, seed=seed)

    def check_stage_settings(self, where: str) -> "SamplingParams":
        """Refuse ``n`` / ``seed`` in a stage's settings (the stage sets them); returns ``self``."""
        if self.n != 1 or self.seed is not None:
            raise ValueError(f"{where}: n and seed are set by the stage (group size / rollout count and its seed "
                             f"streams); leave them out (got n={self.n!r}, seed={self.seed!r})")
        return self

    @classmethod
    def coerce(cls, value, where: str = "sampling", **defaults) -> "SamplingParams":
        """A :class:`SamplingParams` from a settings mapping (``defaults`` fill keys it lacks), an
        instance, or None (``defaults`` alone); ``n`` / ``seed`` refused (:meth:`check_stage_settings`)."""
        if value is None:
            value = cls(**defaults)
        elif isinstance(value, dict):
            unknown = set(value) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"{where}: unknown sampling settings {sorted(unknown)}; known: "
                                 f"{[f.name for f in fields(cls)]}")
            value = cls(**(defaults | value))
        elif not isinstance(value, cls):
            raise TypeError(f"{where} must be a SamplingParams or a mapping, got {type(value).__name__}")
        return value.check_stage_settings(where)


@dataclass
class RolloutBatch:
    """``N = num_prompts * n`` samples; the ``n`` samples of a prompt are contiguous, in prompt order.
    Tensors are right-padded to ``T`` = the longest response; padding has mask False, id ``pad_token_id``
    and log-prob / entropy 0."""

    prompt_index: torch.Tensor  # [N] long: index of the input prompt of each sample
    prompt_ids: list[list[int]]  # N lists (per sample; the n samples of a prompt share one list object)
    response_ids: torch.Tensor  # [N, T] long, right-padded with pad_token_id
    response_mask: torch.Tensor  # [N, T] bool: generated tokens, including the EOS token if emitted
    logprobs: torch.Tensor  # [N, T] float32: the sampling engine's log_softmax(logits / temperature)[token] (HF: before top-p)
    entropy: torch.Tensor | None  # [N, T] float32: entropy (nats) of softmax(logits / temperature); None: not computed (vLLM)
    finish_reason: list[str]  # N, each in FINISH_REASONS
    texts: list[str]  # N decoded responses (special tokens skipped; cut right after a stop string)
    pad_token_id: int = 0

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def num_generated_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def response_lengths(self) -> torch.Tensor:  # [N] long
        return self.response_mask.sum(-1)

    def with_entropy(self, entropy: torch.Tensor) -> "RolloutBatch":
        """A copy with ``entropy`` [N, T] (e.g. from the trainer's teacher-forced pass), zero on padding."""
        if entropy.shape != self.response_ids.shape:
            raise ValueError(f"entropy of shape {tuple(entropy.shape)} for responses {tuple(self.response_ids.shape)}")
        return replace(self, entropy=entropy.float().masked_fill(~self.response_mask.to(entropy.device), 0.0))

    def to(self, device: torch.device | str) -> "RolloutBatch":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return RolloutBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

    def model_inputs(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(input_ids [N, P+T], attention_mask [N, P+T], response_start=P)``: prompts left-padded
        to ``P``, then the responses, ready for :func:`sequence_logprobs`."""
        N, T = self.response_ids.shape
        P = max((len(p) for p in self.prompt_ids), default=0)
        prompt = torch.full((N, P), self.pad_token_id, dtype=torch.long)
        pmask = torch.zeros((N, P), dtype=torch.bool)
        for i, p in enumerate(self.prompt_ids):
            if p:
                prompt[i, P - len(p):] = torch.tensor(p)
                pmask[i, P - len(p):] = True
        dev = self.response_ids.device
        ids = torch.cat([prompt.to(dev), self.response_ids], 1)
        return ids, torch.cat([pmask.to(dev), self.response_mask], 1).long(), P


@runtime_checkable
class RolloutEngine(Protocol):
    """What callers use: :class:`~hca.rollout.hf.HFRolloutEngine` and
    :class:`~hca.rollout.vllm.VLLMRolloutEngine` implement it.

    ``records_entropy``: whether :attr:`RolloutBatch.entropy` is filled. ``samples_live_weights``:
    whether the engine samples from the training module itself (HF), or from a copy that must be
    synced after each update (vLLM: :meth:`sync_weights`)."""

    records_entropy: bool
    samples_live_weights: bool

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams, *,
                 progress: bool = False) -> RolloutBatch: ...


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt: strings are tokenized with ``add_special_tokens=True`` (every engine
    tokenizes alike, so both engines see the same ids); lists of ints pass through."""
    if isinstance(prompts, (str, torch.Tensor)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of strings or a list of token-id lists")
    if all(isinstance(p, str) for p in prompts):
        if not prompts:
            return []
        return [list(x) for x in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    if all(isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) for p in prompts):
        if any(len(p) == 0 for p in prompts):
            raise ValueError("token-id prompts must hold at least one token")
        return [list(p) for p in prompts]
    raise TypeError("prompts must be all strings or all lists of ints")


def token_budgets(prompt_ids: list[list[int]], max_new: int, max_positions: int | None, limit_name: str) -> list[int]:
    """``max_new`` per prompt, clamped to ``max_positions - len(prompt)`` (with a warning; an error
    when a prompt leaves no room)."""
    if max_positions is None or not prompt_ids:
        return [max_new] * len(prompt_ids)
    budgets = [min(max_new, max_positions - len(p)) for p in prompt_ids]
    if any(b < 1 for b in budgets):
        raise ValueError(f"a prompt of {max(map(len, prompt_ids))} tokens leaves no room to generate within the "
                         f"model's {limit_name}={max_positions}")
    if min(budgets) < max_new:
        warnings.warn(f"max_new_tokens={max_new} clamped per prompt to {limit_name}={max_positions} - prompt "
                      f"length (down to {min(budgets)}); those samples finish with 'length'", stacklevel=3)
    return budgets
