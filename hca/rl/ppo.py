"""The policy update of one RL step (METHOD.md section 7): settings, mini-batches and the loss.

Lightning-free; :class:`hca.modules.policy.HCAPolicyModule` owns backward, clipping and stepping.

* ``ppo_epochs`` passes over the step's ``N`` responses, each cut into shuffled mini-batches of
  ``mini_batch_size`` responses (``None``: all ``N``, one update per epoch); every mini-batch is one
  optimizer update, so a step makes ``updates_per_step(N) = ppo_epochs * ceil(N / mini_batch_size)``.
  The shuffle comes from a generator the caller seeds (the module: from ``(seed, rl_step)``).
  ``micro_batch_size`` responses go through each forward/backward; their gradients accumulate,
  weighted by :func:`micro_batch_weights`, into the mini-batch's gradient (memory, not math: TRL's
  gradient accumulation, verl's ``ppo_micro_batch_size``).
* :func:`ppo_loss` recomputes the current log-probs by teacher forcing
  (:func:`hca.rl.logprobs.sequence_logprobs`, same temperature as sampling; the LM head applied
  ``logprob_chunk_size`` scored tokens at a time, so no ``[N, T, V]`` fp32 logits) and returns the clipped
  surrogate :func:`hca.credit.policy_loss` plus ``kl_coef * aggregate(kl_k3(logp, ref_logp))`` when
  the batch carries reference log-probs (the same aggregation as the surrogate).
* ``recompute_old_logp``: by default the behaviour log-probs are the ones recorded while sampling
  (incremental decode with a KV cache); teacher forcing the same weights agrees with them to float
  rounding in fp32, but not in bf16, where the first update would already see ratios != 1. Setting
  it recomputes ``old_logp`` with one no-grad forward pass per mini-batch before the first update.
* ``share_prompt_forward``: the ``G`` responses of a problem share its prompt, so teacher forcing
  runs each distinct prompt once and the responses with its KV cache (the same log-probs; the
  prompt's FLOPs ``G`` times fewer; micro-batches are cut along groups to keep them together).
* ``fuse_logprob_pass``: samples of an engine with its own weights (vLLM) need the trainer's
  log-probs as ``old_logp``. When a step makes one update (``updates_per_step(N) == 1``) and the
  credit needs no entropies, the update's forward gives them (``ppo_loss(on_policy=True)``, ratio 1,
  as TRL does at ``num_iterations = 1``) instead of a separate teacher-forced pass before it: one
  forward less per RL step. The module decides when it applies (docs/rl.md "Speed at a real shape").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hca.credit import AGGREGATIONS, aggregate, kl_k3, policy_loss
from hca.rl.batch import TRUNCATION, RLBatch
from hca.rl.logprobs import DEFAULT_CHUNK_TOKENS, sequence_logprobs


@dataclass(frozen=True)
class PPOConfig:
    """Sampling group size and the clipped-surrogate update."""

    group_size: int = 8  # G: responses sampled per problem
    ppo_epochs: int = 1  # passes over each step's responses
    mini_batch_size: int | None = None  # responses per optimizer update; None: all of the step's responses
    micro_batch_size: int | None = None  # responses per forward/backward; gradients accumulate over a mini-batch's; None: all at once
    clip_low: float = 0.2  # eps_low: ratio clipped below at 1 - clip_low
    clip_high: float = 0.2  # eps_high: ratio clipped above at 1 + clip_high (DAPO's clip-higher: 0.28)
    agg: str = "token_mean"  # loss aggregation: token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    kl_coef: float = 0.0  # weight of the k3 KL to the reference policy (needs a reference)
    max_grad_norm: float | None = 1.0  # clip the global gradient norm (None: no clipping)
    truncation: str = "zero_reward"  # responses cut at the token budget: "zero_reward" | "mask" (see rl_batch)
    recompute_old_logp: bool = False  # recompute behaviour log-probs by teacher forcing before updating
    logprob_chunk_size: int | None = DEFAULT_CHUNK_TOKENS  # scored tokens per LM-head chunk (hca.rl.logprobs); None: full logits
    tis_cap: float | None = None  # engine samples (vLLM): weight tokens by min(pi_old / pi_engine, cap); None: off
    fuse_logprob_pass: bool = True  # engine samples (vLLM), one update per step, no entropy credit: old_logp from the update's own forward
    share_prompt_forward: bool = True  # teacher forcing runs each distinct prompt once, its KV cache shared by the group's responses

    def __post_init__(self):
        for name in ("group_size", "ppo_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("mini_batch_size", "micro_batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"unknown agg {self.agg!r}; valid: {sorted(AGGREGATIONS)}")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"unknown truncation {self.truncation!r}; valid: {sorted(TRUNCATION)}")
        if self.logprob_chunk_size is not None and (not isinstance(self.logprob_chunk_size, int)
                                                    or self.logprob_chunk_size < 1):
            raise ValueError(f"logprob_chunk_size must be None or an int >= 1, got {self.logprob_chunk_size!r}")
        if self.tis_cap is not None and not self.tis_cap >= 1:
            raise ValueError(f"tis_cap must be None or >= 1 (a cap below 1 down-weights every token), got {self.tis_cap!r}")
        if self.clip_low < 0 or self.clip_high < 0 or self.kl_coef < 0:
            raise ValueError("clip_low, clip_high and kl_coef must be >= 0")

    def updates_per_step(self, num_responses: int) -> int:
        return self.ppo_epochs * math.ceil(num_responses / (self.mini_batch_size or num_responses))

    def minibatches(self, num_responses: int, generator: torch.Generator) -> list[Tensor]:
        """Row indices of every update of a step: ``ppo_epochs`` shuffled partitions of ``range(N)``."""
        size = self.mini_batch_size or num_responses
        return [rows for _ in range(self.ppo_epochs)
                for rows in torch.randperm(num_responses, generator=generator).split(size)]


def micro_batches(num_rows: int, cfg: PPOConfig) -> list[Tensor]:
    """Row indices of the forward/backward passes of one mini-batch of ``num_rows`` responses, in order."""
    return list(torch.arange(num_rows).split(cfg.micro_batch_size or max(num_rows, 1)))


def micro_batch_weights(response_mask: Tensor, loss_mask: Tensor, parts: list[Tensor], agg: str,
                        max_len: int | None = None) -> list[float]:
    """Weights ``w_j`` such that ``sum_j w_j * aggregate(part j) == aggregate(mini-batch)`` for the
    aggregation ``agg`` (gradient accumulation over micro-batches gives the mini-batch's gradient).

    ``response_mask, loss_mask [n, T]`` of the mini-batch; ``parts``: its row indices per micro-batch.
    token_mean: the part's share of the loss tokens; seq_mean_token_mean: its share of the rows that
    have loss tokens; seq_mean_token_sum_norm: ``n_j L_j / (n L)`` with ``L = max_len``, else each
    batch's longest response (:meth:`RLBatch.select` cuts a part's columns to its own longest)."""
    m = loss_mask.bool()
    if agg == "token_mean":
        total = max(int(m.sum()), 1)
        return [int(m[p].sum()) / total for p in parts]
    if agg == "seq_mean_token_mean":
        has = m.any(-1)
        total = max(int(has.sum()), 1)
        return [int(has[p].sum()) / total for p in parts]
    if agg != "seq_mean_token_sum_norm":
        raise ValueError(f"unknown agg {agg!r}; valid: {sorted(AGGREGATIONS)}")
    longest = lambda rows: max(1, int(response_mask[rows].sum(-1).max())) if len(rows) else 1  # noqa: E731
    full = len(m) * (max_len or longest(torch.arange(len(m))))
    return [len(p) * (max_len or longest(p)) / max(full, 1) for p in parts]


def rollout_logp_gap(logp: Tensor, engine_logp: Tensor, response_mask: Tensor) -> dict[str, Tensor]:
    """``rollout_logp_gap`` / ``_max``: mean and largest ``|logp - engine_logp|`` over the response
    tokens (``[N, T]`` each), how far a sampling engine's log-probs (vLLM) are from the trainer's; 0
    without response tokens."""
    gap = (logp - engine_logp).abs()[response_mask]
    zero = logp.new_zeros(())
    return {"rollout_logp_gap": gap.mean() if gap.numel() else zero,
            "rollout_logp_gap_max": gap.max() if gap.numel() else zero}


def ppo_loss(model, batch: RLBatch, cfg: PPOConfig, temperature: float, max_len: int | None = None,
             on_policy: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one mini-batch (with a graph) and detached metrics: those of ``policy_loss``,
    ``pg_loss``, ``loss`` and, with reference log-probs, ``kl``.

    ``on_policy``: the ratio is taken against this forward's own detached log-probs (ratio 1, the
    gradient of the log-probs: what a separate teacher-forced pass of the same weights would give as
    ``old_logp``, without that pass; only right for the one update of a step). ``batch.old_logp``
    then holds the sampling engine's log-probs, which give ``rollout_logp_gap`` / ``_max``; the
    metrics add ``entropy`` (mean over the response tokens, no gradient)."""
    logp, ent = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_start, temperature,
                                  chunk_size=cfg.logprob_chunk_size, with_entropy=on_policy,
                                  group=batch.group if cfg.share_prompt_forward else None)
    old = logp.detach() if on_policy else batch.old_logp
    loss, metrics = policy_loss(logp, old, batch.advantages, batch.loss_mask, cfg.clip_low,
                                cfg.clip_high, cfg.agg, max_len, token_weight=batch.is_weight)
    if on_policy:
        mask = batch.response_mask
        metrics |= rollout_logp_gap(logp.detach(), batch.old_logp, mask)
        metrics["entropy"] = ent[mask].mean() if mask.any() else logp.new_zeros(())
    metrics["pg_loss"] = loss.detach()
    if batch.ref_logp is not None:
        kl = aggregate(kl_k3(logp, batch.ref_logp, batch.loss_mask), batch.loss_mask, cfg.agg, max_len)
        loss = loss + cfg.kl_coef * kl
        metrics["kl"] = kl.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


@torch.no_grad()
def teacher_forced(model, input_ids: Tensor, attention_mask: Tensor, response_start: int, response_mask: Tensor,
                   rows_per_pass: int, temperature: float, logprob_chunk_size: int | None = DEFAULT_CHUNK_TOKENS,
                   with_entropy: bool = False, group: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``(logp [N, T], entropy [N, T] or None)`` of the responses under ``model``, no gradient,
    ``rows_per_pass`` rows per forward pass, ``logprob_chunk_size`` scored tokens per LM-head chunk
    (None: full logits); 0 on padding (``response_mask`` False). ``group [N]``: rows sharing a
    prompt, whose prompt then runs once per pass (:func:`hca.rl.logprobs.sequence_logprobs`)."""
    lps, ents = [], []
    for rows in torch.arange(input_ids.shape[0], device=input_ids.device).split(max(1, rows_per_pass)):
        lp, ent = sequence_logprobs(model, input_ids[rows], attention_mask[rows], response_start, temperature,
                                    chunk_size=logprob_chunk_size, with_entropy=with_entropy,
                                    group=None if group is None else group[rows])
        lps.append(lp)
        ents.append(ent)
    zero = torch.zeros((), device=response_mask.device)
    logp = torch.where(response_mask, torch.cat(lps), zero)
    return logp, (torch.where(response_mask, torch.cat(ents), zero) if with_entropy else None)


def frozen_logprobs(model, batch: RLBatch, chunk_size: int, temperature: float,
                    logprob_chunk_size: int | None = DEFAULT_CHUNK_TOKENS, share_prompts: bool = True) -> Tensor:
    """``[N, T]`` teacher-forced log-probs of the batch's responses under ``model`` (:func:`teacher_forced`)."""
    return teacher_forced(model, batch.input_ids, batch.attention_mask, batch.response_start, batch.response_mask,
                          chunk_size, temperature, logprob_chunk_size, group=batch.group if share_prompts else None)[0]
