"""Per-step statistics of an :class:`~hca.rl.batch.RLBatch` (what the RL module logs as ``train/...``).

Every figure is a float over one RL step's batch; token statistics are over the response tokens of
the rows that are trained on (``loss_mask``) unless said otherwise. Keys (without ``train/``):

* ``reward``           -- mean verified outcome over all responses (truncated ones count as 0);
* ``pass_at_group``    -- fraction of problems with at least one correct response among their G;
* ``truncated_frac``   -- responses cut at the token budget; ``included_frac`` -- rows trained on;
* ``response_length`` / ``response_length_max`` -- tokens per response (EOS included);
* ``num_steps``        -- mean steps K per response;
* ``entropy``          -- mean behaviour entropy over all response tokens;
  ``entropy_step_k``   -- the same over tokens of step k, for k < ``entropy_steps`` (only when some exist);
* ``adv_mean`` / ``adv_std`` / ``adv_abs_mean`` -- token advantages A_t;
* ``outcome_adv_abs_mean`` -- |A_i| over included responses;
* ``zero_var_groups``  -- fraction of groups whose included outcomes are all equal (or < 2 included):
  their outcome advantage is 0;
* ``weight_max``       -- largest entropy weight (1 when beta = 0);
* with progress (alpha != 0): ``progress_mean`` / ``progress_std`` / ``progress_abs_mean`` over the
  valid steps of included responses, ``value_h0`` (mean f(h_0)), ``progress_total`` (the mean over
  included responses of their summed step credit: what a farmed PRM lets a response collect).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hca.rl.batch import RLBatch


def _masked_stats(x: Tensor, mask: Tensor, prefix: str) -> dict[str, Tensor]:
    count = mask.sum().clamp_min(1)
    v = torch.where(mask, x, torch.zeros_like(x))
    mean = v.sum() / count
    var = torch.where(mask, (x - mean) ** 2, torch.zeros_like(x)).sum() / count
    return {f"{prefix}_mean": mean, f"{prefix}_std": var.sqrt(), f"{prefix}_abs_mean": v.abs().sum() / count}


def batch_metrics(batch: RLBatch, entropy_steps: int = 4) -> dict[str, float]:
    """The statistics listed in the module docstring, as Python floats (meant for the CPU batch)."""
    b = batch
    mask, lengths = b.response_mask, b.response_mask.sum(-1).float()
    groups = int(b.group.max()) + 1 if len(b) else 0
    out: dict[str, Tensor] = {
        "reward": b.outcome.mean(),
        "truncated_frac": b.truncated.float().mean(),
        "included_frac": b.included.float().mean(),
        "response_length": lengths.mean(),
        "response_length_max": lengths.max(),
        "num_steps": b.num_steps.float().mean(),
        "entropy": torch.where(mask, b.entropy, 0.0).sum() / mask.sum().clamp_min(1),
        "outcome_adv_abs_mean": torch.where(b.included, b.outcome_adv.abs(), 0.0).sum() / b.included.sum().clamp_min(1),
        "weight_max": b.weights.max(),
    }
    if groups:
        def per_group(fill: float, x: Tensor, reduce: str) -> Tensor:
            return torch.full((groups,), fill, device=b.device).scatter_reduce_(0, b.group, x, reduce)

        inc = b.included
        out["pass_at_group"] = per_group(0.0, b.outcome, "amax").mean()
        # zero variance: the included outcomes are all equal (max == min), or fewer than 2 are included
        hi = per_group(-1.0, torch.where(inc, b.outcome, -1.0), "amax")
        lo = per_group(2.0, torch.where(inc, b.outcome, 2.0), "amin")
        out["zero_var_groups"] = ((hi == lo) | (per_group(0.0, inc.float(), "sum") < 2)).float().mean()
    out |= _masked_stats(b.advantages, b.loss_mask, "adv")
    for k in range(entropy_steps):
        in_step = mask & (b.step_index == k)
        if bool(in_step.any()):
            out[f"entropy_step_{k}"] = torch.where(in_step, b.entropy, 0.0).sum() / in_step.sum()
    if b.progress is not None:
        slots = torch.arange(b.progress.shape[-1], device=b.device)
        valid = (slots < b.num_steps.unsqueeze(-1)) & b.included.unsqueeze(-1)
        out |= _masked_stats(b.progress, valid, "progress")
        out["value_h0"] = b.values[:, 0].nanmean()
        totals = torch.where(valid, b.progress, 0.0).sum(-1)
        out["progress_total"] = torch.where(b.included, totals, 0.0).sum() / b.included.sum().clamp_min(1)
    keys = list(out)
    return dict(zip(keys, torch.stack([out[k].float().cpu() for k in keys]).tolist()))
