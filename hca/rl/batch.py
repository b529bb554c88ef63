"""One RL step's training batch: sampled responses with their token advantages (METHOD.md sections 5-7).

:func:`build_rl_batch` is the only place where outcomes, step progress and entropy weights meet; it
turns a :class:`~hca.rollout.RolloutBatch` (``G`` contiguous samples per problem) plus verified
outcomes into an :class:`RLBatch`, by calling :mod:`hca.credit`:

1. steps: every response is aligned with its steps by :func:`hca.steps.align_tokens` on the sampled
   ids (the decoded text, not a re-tokenization); a response without a delimiter is one step. A
   response whose text is empty (e.g. EOS first) is one step holding its tokens, so a premature
   EOS still gets its (negative) outcome credit; it asks the scorer for nothing and has 0 progress.
2. outcome ``R``: 1 iff the verifier accepts the response and it was not cut at the token budget.
3. truncation (``finish_reason == "length"``), two modes:
   ``"zero_reward"`` -- ``R = 0`` and the response is trained on like any other (the common choice);
   ``"mask"``        -- the response is left out of the loss **and** of its group's statistics (its
   outcome is unknown, not wrong: counting it as 0 in the baseline would shift every other
   response's advantage). A group keeps the estimator over its remaining responses (RLOO's
   leave-one-out mean over ``G' - 1``, GRPO's std over ``G'``); with fewer than 2 left it gives 0.
   Masked responses are still scored (harmless) but their token advantages are 0.
4. outcome advantage ``A_i`` per group (:func:`hca.credit.outcome_advantages`; all-equal groups: 0).
5. progress, only when ``progress_coef != 0``: ``scorer.score`` gives ``f(h_0) .. f(h_{K-1})``,
   the last step is grounded in ``R`` (:func:`hca.credit.step_progress`). Guards (each off by
   default): ``credit.answer_guard`` grounds at the step that fixes the final answer
   (:func:`answer_steps`), gives the steps after it no progress and a truncated response no positive
   progress (:func:`hca.credit.cap_truncated`); ``credit.progress_form`` ``min`` / ``clip`` bounds what
   a response's steps can collect (:func:`hca.credit.min_form_progress`, :func:`hca.credit.clip_progress`).
   Optionally whitened over the included responses. With ``progress_coef = 0`` the scorer is never called.
6. token weights from the behaviour entropies (:func:`hca.credit.entropy_weights`; ``beta = 0``: 1).
7. ``A_t = w_t (A_i + alpha P_{i,k(t)})`` (:func:`hca.credit.token_advantages`; ``credit.modulate:
   progress`` gives ``A_i + alpha w_t P_{i,k(t)}``, ``credit.sign: inverse_on_negative`` weights a step
   whose modulated term is negative by ``(H_t / mean H)^-beta``). With ``alpha = 0`` and ``beta = 0``
   every variant is exactly ``A_i`` on every response token (GRPO / RLOO / Dr. GRPO).
8. ``credit.entropy_bonus = c > 0`` adds ``min(c H_t, |A_t| / kappa)`` to every token advantage
   (:func:`hca.credit.entropy_bonus`, the additive token variant; never flips a sign).

Note that with ``alpha > 0`` an all-equal group still gets progress credit (METHOD.md section 5:
``A = A_i + alpha P``, and ``A_i = 0``): this is the point of process rewards when every sample fails.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
from torch import Tensor

from hca.credit import (MODULATE, OUTCOME_ESTIMATORS, SIGN_RULES, cap_truncated, clip_progress, entropy_bonus,
                        entropy_weights, min_form_progress, outcome_advantages, step_progress, token_advantages,
                        whiten_progress)
from hca.data.problems import Problem
from hca.rollout import RolloutBatch
from hca.steps import align_tokens, prefix_text, split_steps


PROGRESS_FORMS = ("step", "min", "clip")  # CreditConfig.progress_form


@dataclass(frozen=True)
class CreditConfig:
    """How credit is assigned (METHOD.md sections 5, 6); ``progress_coef = entropy_beta = 0`` is the baseline.

    The defaults are the best-measured variant (docs/experiment.md, 5 seeds on the embedded task):
    step progress on (alpha = 1) and the entropy token weights off (beta = 0). With beta = 1 the
    weights cost 0.030 [0.015, 0.044] of final pass@1 against GRPO under the ``same`` sign rule;
    ``inverse_on_negative`` brought that to 0.004 [-0.004, 0.013], so it is the rule a beta > 0
    gets by default. The guards and the additive entropy term are off by default: on the default
    and middle tasks the min-form guard gave back progress' gain (+0.012 / +0.010 over GRPO for
    progress only, about 0 with the guard) where no run was farmed, and the additive term added
    nothing on top of progress (docs/experiment.md, "The anchors' way")."""

    estimator: str = "grpo"  # outcome advantage: "grpo" | "rloo" | "dr_grpo"
    progress_coef: float = 1.0  # alpha: weight of predicted step progress (0: outcome only, scorer unused)
    entropy_beta: float = 0.0  # beta: exponent of the within-step entropy ratio (0: uniform token weights)
    w_min: float = 0.1  # lower clip of the entropy ratio (before the per-step rescale)
    w_max: float = 5.0  # upper clip of the entropy ratio (before the per-step rescale)
    whiten_progress: bool = False  # whiten progress over the batch's valid steps
    whiten_center: bool = False  # also subtract the mean when whitening (breaks telescoping; see credit.py)
    modulate: str = "advantage"  # what the entropy weights multiply: "advantage" (A_i + alpha P_k) | "progress" (alpha P_k only)
    sign: str = "inverse_on_negative"  # "same" | "inverse_on_negative": a step whose modulated term is < 0 weights by (H / mean H)^-beta
    # guards against a farmed PRM (METHOD.md section 10); each off by default, off = the credit above exactly
    answer_guard: bool = False  # progress grounded at the step that fixes the final answer, 0 after it; <= 0 on truncated responses
    progress_form: str = "step"  # "step": P_k | "min": soft minimum of P_k..P_K (PURE) | "clip": min(P_k - clip_eta, 0) but the last step
    min_temperature: float = 0.1  # T of the min form's softmax(-P / T) (PURE's 0.1; -> 0: the hard minimum)
    clip_eta: float = 0.0  # eta of the clip form (Gao et al.): intermediate steps get min(P_k - eta, 0)
    # additive token term (arXiv 2506.14758): A_t + min(c H_t, |A_t| / kappa); a third token variant beside the weights
    entropy_bonus: float = 0.0  # c (0: off; the paper's 0.4 under GRPO)
    entropy_bonus_kappa: float = 2.0  # kappa > 1: the term is at most |A_t| / kappa, so it never flips a sign

    def __post_init__(self):
        if self.estimator not in OUTCOME_ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; valid: {sorted(OUTCOME_ESTIMATORS)}")
        if not 0.0 <= self.w_min <= 1.0 <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= 1 <= w_max, got {self.w_min}, {self.w_max}")
        if self.entropy_beta < 0:
            raise ValueError(f"entropy_beta must be >= 0, got {self.entropy_beta}")
        if self.modulate not in MODULATE:
            raise ValueError(f"unknown modulate {self.modulate!r}; valid: {list(MODULATE)}")
        if self.sign not in SIGN_RULES:
            raise ValueError(f"unknown sign {self.sign!r}; valid: {list(SIGN_RULES)}")
        if self.progress_form not in PROGRESS_FORMS:
            raise ValueError(f"unknown progress_form {self.progress_form!r}; valid: {list(PROGRESS_FORMS)}")
        if not self.min_temperature > 0:
            raise ValueError(f"min_temperature must be > 0, got {self.min_temperature}")
        if self.clip_eta < 0:
            raise ValueError(f"clip_eta must be >= 0, got {self.clip_eta}")
        if self.entropy_bonus < 0 or not self.entropy_bonus_kappa > 1:
            raise ValueError(f"need entropy_bonus >= 0 and entropy_bonus_kappa > 1, got {self.entropy_bonus}, "
                             f"{self.entropy_bonus_kappa}")


def _train_on_all(truncated: Tensor) -> Tensor:
    return torch.ones_like(truncated)


def _drop_truncated(truncated: Tensor) -> Tensor:
    return ~truncated


TRUNCATION: dict[str, Callable[[Tensor], Tensor]] = {
    "zero_reward": _train_on_all,  # a cut response has R = 0 and is trained on
    "mask": _drop_truncated,  # a cut response is out of the loss and of its group's statistics
}
"""``truncated [N] bool -> included [N] bool`` per truncation mode."""


@dataclass(frozen=True)
class RLBatch:
    """The ``N = B * G`` responses of one RL step, right-padded to ``T`` tokens, ``S`` step slots."""

    input_ids: Tensor  # [N, L] long: prompt left-padded to P, then the response right-padded (L = P + T)
    attention_mask: Tensor  # [N, L] long: 1 on prompt and response tokens
    response_start: int  # P: column of input_ids where every response starts
    response_mask: Tensor  # [N, T] bool: sampled tokens, EOS included
    loss_mask: Tensor  # [N, T] bool: response_mask of the included rows (what the loss sees)
    old_logp: Tensor  # [N, T] float32: behaviour log-probs at the sampling temperature (0 on padding)
    entropy: Tensor  # [N, T] float32: behaviour entropies H_t (0 on padding)
    step_index: Tensor  # [N, T] long: step of each token in [0, num_steps), -1 on padding
    num_steps: Tensor  # [N] long: K, steps per response (>= 1 for a non-empty response)
    group: Tensor  # [N] long: problem index within the step (the G responses of a problem share it)
    truncated: Tensor  # [N] bool: cut at the token budget
    included: Tensor  # [N] bool: trained on and counted in group statistics (truncation mode)
    outcome: Tensor  # [N] float32: verified outcome R in {0, 1} (0 when truncated)
    outcome_adv: Tensor  # [N] float32: group-relative outcome advantage A_i (0 for excluded rows)
    values: Tensor | None  # [N, S+1] float32: f(h_0)..f(h_{K-1}), R at column K, NaN beyond; None if alpha = 0
    progress: Tensor | None  # [N, S] float32: P_k (grounded, maybe whitened), 0 beyond K; None if alpha = 0
    weights: Tensor  # [N, T] float32: entropy weights w_t (mean 1 per step), 0 on padding
    advantages: Tensor  # [N, T] float32: token advantages A_t, 0 on padding and excluded rows
    ref_logp: Tensor | None = None  # [N, T] float32: reference log-probs (for the KL term); None: no reference
    is_weight: Tensor | None = None  # [N, T] float32: truncated importance weights (engine vs trainer); None: 1
    scoring_seconds: float = 0.0  # wall time spent in scorer.score

    def __len__(self) -> int:
        return self.response_mask.shape[0]

    @property
    def device(self) -> torch.device:
        return self.response_mask.device

    def to(self, device: torch.device | str) -> "RLBatch":
        return RLBatch(**{f.name: _map(getattr(self, f.name), lambda t: t.to(device)) for f in fields(self)})

    def select(self, rows: Tensor) -> "RLBatch":
        """The rows ``rows`` (a mini-batch), token columns cut to their longest response."""
        t = max(1, int(self.response_mask[rows].sum(-1).max())) if len(rows) else 1
        cut = {**{k: t for k in _TOKEN_FIELDS}, "input_ids": self.response_start + t,
               "attention_mask": self.response_start + t}
        out = {}
        for f in fields(self):
            v = _map(getattr(self, f.name), lambda x: x[rows])
            out[f.name] = _map(v, lambda x: x[:, :cut[f.name]]) if f.name in cut else v
        return RLBatch(**out)


_TOKEN_FIELDS = ("response_mask", "loss_mask", "old_logp", "entropy", "step_index", "weights", "advantages", "ref_logp",
                 "is_weight")


def _map(v, fn):
    return fn(v) if isinstance(v, Tensor) else v


def group_advantages(rewards: Tensor, included: Tensor, estimator: str) -> Tensor:
    """``outcome_advantages`` over the included responses of each group: ``[B, G] -> [B, G]``, 0 where
    excluded. With everything included this is exactly ``outcome_advantages(rewards, estimator)``."""
    if bool(included.all()):
        return outcome_advantages(rewards, estimator)
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        keep = included[b]
        out[b, keep] = outcome_advantages(rewards[b, keep].unsqueeze(0), estimator)[0]
    return out


def _values(scores: list[list[float]], text_steps: list[int], outcome: Tensor) -> Tensor:
    """``[N, S+1]``: the scorer's ``f(h_0..h_{K-1})``, then ``R`` at column ``K``, NaN beyond. A response
    with no text (0 text steps, 1 token step) gets ``f(h_0) := R``, i.e. zero progress."""
    if len(scores) != len(text_steps):
        raise ValueError(f"the scorer returned {len(scores)} rows for {len(text_steps)} responses")
    s = max([max(k, 1) for k in text_steps], default=1)
    values = torch.full((len(scores), s + 1), float("nan"))
    for i, (row, k) in enumerate(zip(scores, text_steps)):
        if len(row) != k:
            raise ValueError(f"the scorer returned {len(row)} values for response {i}, which has {k} steps")
        values[i, :k] = torch.tensor(row, dtype=torch.float32).reshape(-1)
        values[i, k] = outcome[i]  # read by nothing for k >= 1 (the last step is grounded in R)
    return values


def answer_steps(texts: Sequence[str], problems: Sequence[Problem], delimiter: str) -> list[int]:
    """Per response, the number of steps up to and including the one that fixes its final answer:
    the smallest ``k`` such that every prefix ``steps 1..j`` with ``j >= k`` already reads (by the
    task's verifier, :func:`hca.verify.extract_answer`) the answer the whole response reads. Steps
    after it (a restated answer, chatter after a box) cannot change the outcome. ``K`` when the
    verifier finds no answer in the response; ``0`` for a response without steps."""
    from hca.verify import extract_answer

    out = []
    for text, problem in zip(texts, problems, strict=True):
        spans = split_steps(text, delimiter)
        k = len(spans)
        final = extract_answer(text, problem.task) if k else None
        if final is not None:
            while k > 1 and extract_answer(prefix_text(text, spans, k - 1), problem.task) == final:
                k -= 1
        out.append(k)
    return out


def build_rl_batch(rollout: RolloutBatch, problems: Sequence[Problem], correct: Sequence[bool], tokenizer,
                   credit: CreditConfig, delimiter: str, scorer=None, truncation: str = "zero_reward") -> RLBatch:
    """The training batch of one RL step (see the module docstring for every rule).

    ``rollout`` holds ``G`` contiguous samples of each of ``problems`` (``prompt_index`` =
    ``0,..,0,1,..``); ``correct [N]`` is the verifier's verdict on ``rollout.texts``; ``scorer`` is a
    :class:`hca.rl.scoring.StepScorer` (required when ``credit.progress_coef != 0``). CPU tensors out.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"unknown truncation {truncation!r}; valid: {sorted(TRUNCATION)}")
    n, t = rollout.response_ids.shape
    b = len(problems)
    if b == 0 or n % b or not torch.equal(rollout.prompt_index.cpu(), torch.arange(b).repeat_interleave(n // b)):
        raise ValueError("the rollout must hold the same number of contiguous samples of every problem, in order")
    if len(correct) != n:
        raise ValueError(f"got {len(correct)} verdicts for {n} responses")
    g = n // b
    response_mask = rollout.response_mask.cpu()
    step_index = torch.full((n, t), -1, dtype=torch.long)
    texts, text_steps, token_steps = [], [], []
    for i, length in enumerate(response_mask.sum(-1).tolist()):
        al = align_tokens(tokenizer, rollout.response_ids[i, :length].cpu(), delimiter)
        step_index[i, :length] = al.step_index if al.num_steps else 0  # no text: one step holding the tokens
        texts.append(al.text)
        text_steps.append(al.num_steps)
        token_steps.append(max(al.num_steps, int(length > 0)))
    num_steps = torch.tensor(token_steps, dtype=torch.long).reshape(n)

    truncated = torch.tensor([r == "length" for r in rollout.finish_reason], dtype=torch.bool).reshape(n)
    outcome = (torch.tensor(list(correct), dtype=torch.bool).reshape(n) & ~truncated).float()
    included = TRUNCATION[truncation](truncated)
    outcome_adv = group_advantages(outcome.view(b, g), included.view(b, g), credit.estimator).reshape(n)

    values = progress = None
    start = time.perf_counter()
    if credit.progress_coef != 0:
        if scorer is None:
            raise ValueError("progress_coef != 0 needs a StepScorer")
        rows = [problems[i] for i in rollout.prompt_index.tolist()]
        scores = scorer.score([p.prompt for p in rows], texts, delimiter, rows)
        values = _values(scores, text_steps, outcome)
        credited = num_steps  # [N]: steps that carry progress (the answer guard stops at the answer's step)
        if credit.answer_guard:
            fixed = answer_steps(texts, rows, delimiter)
            credited = torch.where(torch.tensor(text_steps) > 0, torch.tensor(fixed, dtype=torch.long), num_steps)
        progress = step_progress(values, credited, outcome)
        if credit.answer_guard:
            progress = cap_truncated(progress, truncated)
        if credit.progress_form == "min":
            progress = min_form_progress(progress, credited, credit.min_temperature)
        elif credit.progress_form == "clip":
            progress = clip_progress(progress, credited, credit.clip_eta)
        if credit.whiten_progress:
            progress = whiten_progress(progress, torch.where(included, credited, 0), center=credit.whiten_center)
    scoring_seconds = time.perf_counter() - start

    if rollout.entropy is None:
        raise ValueError("the rollout has no entropies (the vLLM engine records none): compute them by teacher "
                         "forcing first (RolloutBatch.with_entropy)")
    entropy = rollout.entropy.cpu().float()
    weights = entropy_weights(entropy, step_index, credit.entropy_beta, credit.w_min, credit.w_max)
    inverse = (entropy_weights(entropy, step_index, -credit.entropy_beta, credit.w_min, credit.w_max)
               if credit.sign == "inverse_on_negative" and credit.entropy_beta != 0 else None)
    adv, weights = token_advantages(outcome_adv, progress if progress is not None else torch.zeros(n, 1), step_index,
                                    weights, credit.progress_coef, credit.modulate, inverse)
    if credit.entropy_bonus:
        adv, _ = entropy_bonus(adv, entropy, step_index >= 0, credit.entropy_bonus, credit.entropy_bonus_kappa)
    adv = torch.where(included.unsqueeze(-1), adv, torch.zeros_like(adv))
    input_ids, attention_mask, start_col = rollout.model_inputs()
    return RLBatch(
        input_ids=input_ids.cpu(), attention_mask=attention_mask.cpu(), response_start=start_col,
        response_mask=response_mask, loss_mask=response_mask & included.unsqueeze(-1),
        old_logp=rollout.logprobs.cpu().float(), entropy=entropy, step_index=step_index, num_steps=num_steps,
        group=rollout.prompt_index.cpu().long(), truncated=truncated, included=included, outcome=outcome,
        outcome_adv=outcome_adv, values=values, progress=progress, weights=weights, advantages=adv,
        scoring_seconds=scoring_seconds,
    )
