"""The RL methods the quickstart and the experiment compare: a method is a config
``configs/rl/arithmetic_<method>.yaml`` or a variant of one (:data:`VARIANTS`: a config and overrides);
:func:`uses_prm` says whether its credit comes from the learned PRM (whose collection it then pays).
"""
from __future__ import annotations

from pathlib import Path

METHODS = ("grpo", "progress_only", "hca", "hca_progress", "hca_inverse", "hca_current")
"""The default methods (docs/experiment.md): GRPO, step progress only, full HCA under each token
variant (``hca``: the entropy weights modulate the whole advantage; ``hca_progress``: only the
progress term, ``credit.modulate: progress``; ``hca_inverse``: ``credit.sign:
inverse_on_negative``), and ``hca_current`` (Monte Carlo step values from the current policy).
Any ``configs/rl/arithmetic_<method>.yaml`` runs, e.g. ``entropy_only`` or ``rloo``."""
_CREDIT = "model.init_args.credit."
_MC = "model.init_args.scorer.init_args."
VARIANTS: dict[str, tuple[str, dict]] = {
    # progress at PAV's scale (alpha 3-5), and on PAV's 0/1 outcome scale (Dr. GRPO: R - mean, no std division)
    "progress_a3": ("progress_only", {_CREDIT + "progress_coef": 3.0}),
    "progress_a5": ("progress_only", {_CREDIT + "progress_coef": 5.0}),
    "progress_dr": ("progress_only", {_CREDIT + "estimator": "dr_grpo"}),
    "progress_dr_a3": ("progress_only", {_CREDIT + "progress_coef": 3.0, _CREDIT + "estimator": "dr_grpo"}),
    # guards against a farmed PRM (CreditConfig: answer_guard, progress_form)
    "progress_guard": ("progress_only", {_CREDIT + "answer_guard": True}),
    "progress_min": ("progress_only", {_CREDIT + "answer_guard": True, _CREDIT + "progress_form": "min"}),
    "progress_clip": ("progress_only", {_CREDIT + "answer_guard": True, _CREDIT + "progress_form": "clip"}),
    # the additive, capped entropy term (arXiv 2506.14758's c = 0.4, kappa = 2) under GRPO and under progress
    "grpo_bonus": ("grpo", {_CREDIT + "entropy_bonus": 0.4}),
    "progress_bonus": ("progress_only", {_CREDIT + "entropy_bonus": 0.4}),
    # the oracle bound: Monte Carlo progress of the careful prover online, M = 16 per prefix, no token weights
    "oracle": ("hca_mc", {_CREDIT + "entropy_beta": 0.0, _MC + "num_rollouts": 16, _MC + "num_rollouts_h0": 16}),
}
"""Named variants of the configs: ``name -> (configs/rl/arithmetic_<base>.yaml, dotted overrides)``, so
an ablation is one line here rather than a copied YAML (docs/experiment.md)."""
USES_PROGRESS = {"hca", "progress_only", "hca_progress", "hca_inverse"}  # the PRM's collection is their cost too
# (hca_mc and hca_current pay their prover rollouts in val/tokens, step by step)


def method_config(method: str) -> tuple[str, dict]:
    """``(config path, overrides)`` of a method: a variant of :data:`VARIANTS`, or a config's name."""
    base, extra = VARIANTS.get(method, (method, {}))
    path = f"configs/rl/arithmetic_{base}.yaml"
    if not Path(path).exists():
        raise ValueError(f"unknown method {method!r}: no {path} and no such variant (hca.workflows.experiment.VARIANTS: "
                         f"{sorted(VARIANTS)})")
    return path, dict(extra)


def uses_prm(method: str) -> bool:
    """Whether a method's credit comes from the learned PRM (its collection is then part of its cost)."""
    return VARIANTS.get(method, (method, {}))[0] in USES_PROGRESS
