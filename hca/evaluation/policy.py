"""Evaluation of a policy on held-out problems: pass@1, unbiased pass@k, maj@k.

Every figure is computed from ``n`` samples per problem drawn with the rollout engine:

- ``pass@1`` is the mean correctness over all samples (at the given temperature; greedy decoding
  when ``greedy`` is set, then ``n`` is forced to 1);
- ``pass@k`` is the unbiased estimator of Chen et al. 2021, ``1 − C(n−c, k) / C(n, k)`` per problem;
- ``maj@k`` takes the majority answer (by :func:`hca.verify.extract_answer`, ties broken by first
  appearance) among the first ``k`` samples and scores it. A response cut at ``max_new_tokens``
  is scored 0 and votes for nothing.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from hca.data.problems import Problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for ``c`` correct among ``n`` samples (requires ``k <= n``)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """Whether the most frequent non-None answer is a correct one (ties: first seen wins)."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    best = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == best)
    return any(c for a, c in zip(answers, correct) if a == winner)


def weighted_majority_correct(answers: list[str | None], correct: list[bool], weights: list[float]) -> bool:
    """Whether the answer with the largest summed weight is a correct one (weights must be >= 0,
    e.g. PRM scores in [0, 1]; ties: first seen wins). Equal weights reduce it to
    :func:`majority_correct`."""
    if len(answers) != len(correct) or len(answers) != len(weights):
        raise ValueError("answers, correct and weights need the same length")
    if any(not w >= 0 for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    totals: dict[str, float] = {}
    for a, w in zip(answers, weights):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + w
    if not totals:
        return False
    best = max(totals.values())
    winner = next(a for a in answers if a is not None and totals[a] == best)
    return any(c for a, c in zip(answers, correct) if a == winner)


@dataclass
class EvalResult:
    metrics: dict[str, float]  # "pass@1", "pass@k", "maj@k", "mean_response_tokens", "truncated_frac"
    correct: list[list[bool]]  # [P][n] per-problem, per-sample correctness
    texts: list[list[str]]  # [P][n] responses


def evaluate_policy(engine, problems: list[Problem], n: int = 4, ks: tuple[int, ...] = (1,), max_new_tokens: int = 64,
                    temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, seed: int = 0,
                    stop: tuple[str, ...] = ()) -> EvalResult:
    from hca.rollout import SamplingParams
    from hca.verify import extract_answer, is_correct

    if greedy:
        n = 1
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed,
                            greedy=greedy, stop=tuple(stop))
    batch = engine.generate([p.prompt for p in problems], params)
    correct: list[list[bool]] = [[] for _ in problems]
    answers: list[list[str | None]] = [[] for _ in problems]
    texts: list[list[str]] = [[] for _ in problems]
    for i, (pi, text, why) in enumerate(zip(batch.prompt_index.tolist(), batch.texts, batch.finish_reason)):
        p = problems[pi]
        ok = why != "length" and is_correct(text, p.answer, p.task)
        correct[pi].append(ok)
        answers[pi].append(extract_answer(text, p.task) if why != "length" else None)
        texts[pi].append(text)
    metrics = {"pass@1": sum(map(sum, correct)) / max(1, sum(map(len, correct)))}
    for k in ks:
        if k > 1 and k <= n:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, sum(c), k) for c in correct) / len(problems)
            metrics[f"maj@{k}"] = sum(majority_correct(a[:k], c[:k]) for a, c in zip(answers, correct)) / len(problems)
    metrics["mean_response_tokens"] = float(batch.response_mask.sum()) / max(1, len(batch.texts))
    metrics["truncated_frac"] = sum(w == "length" for w in batch.finish_reason) / max(1, len(batch.texts))
    return EvalResult(metrics=metrics, correct=correct, texts=texts)
