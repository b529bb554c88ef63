"""How a PRM is judged (METHOD.md section 4): definitions shared by the PRM module's validation,
the ProcessBench evaluator and the docs (``docs/prm.md``).

Boundaries ``h_0 .. h_J`` of a response carry labels ``V̂(h_j)`` (``V(h_K) = R``) and predictions
``f(h_j)``. The progress of step ``j`` (1-based) is ``P_j = V(h_j) - V(h_{j-1})``; the predicted one
``P̂_j = f(h_j) - f(h_{j-1})`` uses the PRM alone, also for the last step (``f(h_K)`` is the PRM's
own verdict on the finished response; no outcome is given to it here, unlike at RL time).

* **First harmful step** (MC labels): the first step with ``P_j <= -harmful_threshold``. Detection
  is scored over the steps up to and including it (all labeled steps of a response without one):
  positives are first harmful steps, negatives the steps before them; the score is ``-P̂_j``
  (AUROC) and the prediction ``P̂_j <= -harmful_threshold`` (F1). Steps after the first harmful
  one are left out: once the response is lost, what follows is not "the first" anything.
* **First error** (ground truth, e.g. ``Trajectory.step_correct`` or ProcessBench labels): the
  0-based index of the first wrong step, ``-1`` when none is wrong. The predicted first error is
  the first step ``j`` whose predicted value ``f(h_j) < threshold`` (rule ``"value"``, ProcessBench's
  convention) or whose predicted progress ``P̂_j <= -threshold`` (rule ``"progress"``), ``-1`` if none.
  **F1** as in ProcessBench: the harmonic mean of the accuracy on erroneous responses (predicted
  index == true index) and the accuracy on correct responses (predicted ``-1``).
* **Within-problem ranking** (:class:`PairwiseRankAccuracy`): over all pairs (correct, wrong) of
  responses *to the same problem*, the fraction where the correct one scores higher (ties count
  1/2; 0.5 is chance). Best-of-N selection needs exactly this; a pooled AUROC can be high from
  problem difficulty alone.
* **Calibration** (:class:`SoftCalibrationError`): expected calibration error against the soft MC
  labels: predictions binned into ``bins`` equal-width bins, ``sum_b (n_b / N) |mean f - mean V̂|``.
  (Against hard labels ``1[V̂ >= 0.5]`` a perfectly calibrated soft predictor would look miscalibrated.)
"""
from __future__ import annotations

import torch
from torchmetrics import Metric


def first_flag(flags: torch.Tensor) -> torch.Tensor:
    """Index ``[B]`` of the first True of each row of ``flags [B, S]``, ``-1`` when none."""
    if flags.shape[-1] == 0:
        return torch.full(flags.shape[:-1], -1, dtype=torch.long, device=flags.device)
    any_ = flags.any(-1)
    first = flags.long().argmax(-1)
    return torch.where(any_, first, torch.full_like(first, -1))


def predicted_first_error(values: torch.Tensor, step_mask: torch.Tensor, rule: str, threshold: float) -> torch.Tensor:
    """Predicted first wrong step ``[B]`` (0-based, ``-1``: none) from values ``[B, S+1]`` of
    ``h_0 .. h_S``; ``step_mask [B, S]`` marks the steps that exist."""
    if rule == "value":
        flags = values[:, 1:] < threshold
    elif rule == "progress":
        flags = (values[:, 1:] - values[:, :-1]) <= -threshold
    else:
        raise ValueError(f"first-error rule must be 'value' or 'progress', got {rule!r}")
    return first_flag(flags & step_mask)


def first_error_counts(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``[erroneous, erroneous hit, correct, correct hit]`` over responses (``truth == -1``: correct)."""
    err = truth >= 0
    return torch.stack([err.sum(), (err & (pred == truth)).sum(), (~err).sum(), (~err & (pred == -1)).sum()])


def f1_from_counts(counts) -> dict[str, float]:
    """ProcessBench F1 from ``[erroneous, hit, correct, hit]``: ``acc_erroneous``, ``acc_correct``, ``f1``
    (an empty class gives accuracy NaN and F1 NaN: there is nothing to measure)."""
    e, eh, c, ch = (float(x) for x in counts)
    acc_e = eh / e if e else float("nan")
    acc_c = ch / c if c else float("nan")
    f1 = 2 * acc_e * acc_c / (acc_e + acc_c) if (acc_e + acc_c) > 0 else 0.0
    return {"acc_erroneous": acc_e, "acc_correct": acc_c, "f1": f1 if e and c else float("nan")}


def harmful_step_targets(label_values: torch.Tensor, label_mask: torch.Tensor, threshold: float):
    """``(include [B, S], positive [B, S])`` over steps ``1..S`` (see the module docstring) from
    labels ``[B, S+1]`` and their mask ``[B, S+1]``."""
    progress = label_values[:, 1:] - label_values[:, :-1]
    valid = label_mask[:, 1:] & label_mask[:, :-1]
    harmful = valid & (progress <= -threshold)
    before = (torch.cumsum(harmful.long(), 1) - harmful.long()) == 0  # no harmful step strictly before
    include = valid & before
    return include, harmful & include


class FirstErrorF1(Metric):
    """Accumulates :func:`first_error_counts`; ``compute()`` is ProcessBench F1 (NaN if a class is empty)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("counts", default=torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, truth: torch.Tensor) -> None:
        self.counts += first_error_counts(pred, truth).to(self.counts.device)

    def compute(self) -> torch.Tensor:
        return torch.tensor(f1_from_counts(self.counts.tolist())["f1"])


class SoftCalibrationError(Metric):
    """Expected calibration error of probabilities against soft targets (module docstring)."""

    full_state_update = False

    def __init__(self, bins: int = 10):
        super().__init__()
        self.bins = bins
        for name in ("n", "pred", "target"):
            self.add_state(name, default=torch.zeros(bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.detach().double().flatten(), target.detach().double().flatten()
        b = (pred * self.bins).long().clamp(0, self.bins - 1)
        self.n += torch.bincount(b, minlength=self.bins).double()
        self.pred += torch.bincount(b, weights=pred, minlength=self.bins)
        self.target += torch.bincount(b, weights=target, minlength=self.bins)

    def compute(self) -> torch.Tensor:
        N = self.n.sum()
        if N == 0:
            return torch.tensor(float("nan"))
        gap = (self.pred - self.target).abs()  # = n_b |mean pred - mean target|
        return (gap.sum() / N).float()


class PairwiseRankAccuracy(Metric):
    """Within-problem ranking accuracy of scores against binary outcomes (module docstring)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        for name in ("group", "score", "label"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, group: torch.Tensor, score: torch.Tensor, label: torch.Tensor) -> None:
        self.group.append(group.detach().long().flatten())
        self.score.append(score.detach().float().flatten())
        self.label.append(label.detach().bool().flatten())

    def compute(self) -> torch.Tensor:
        def cat(x):
            return torch.cat(x) if isinstance(x, list) else x

        g, s, y = cat(self.group), cat(self.score), cat(self.label)
        order = torch.argsort(g, stable=True)
        g, s, y = g[order], s[order], y[order]
        wins, n = torch.zeros((), dtype=torch.float64), 0
        for a, b in zip(*_runs(g)):  # one problem at a time: memory O(responses per problem ^ 2)
            pos, neg = s[a:b][y[a:b]], s[a:b][~y[a:b]]
            wins += ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).sum()
            n += len(pos) * len(neg)
        return (wins / n).float() if n else torch.tensor(float("nan"))


def _runs(sorted_keys: torch.Tensor) -> tuple[list[int], list[int]]:
    """Start and end indices of the runs of equal values in a sorted 1-d tensor."""
    if sorted_keys.numel() == 0:
        return [], []
    cuts = (torch.nonzero(sorted_keys[1:] != sorted_keys[:-1]).flatten() + 1).tolist()
    return [0, *cuts], [*cuts, sorted_keys.numel()]
