"""Prover-labeled trajectory collection (METHOD.md sections 2, 3 and 8.1) as plain Python.

:func:`label_chunk` labels one chunk of problems:

1. ``N`` responses per problem from the policy, in one engine call;
2. each response is cut into steps (:func:`hca.steps.split_steps`) and verified (a response cut at
   the token budget is kept, marked truncated, outcome 0);
3. prefixes ``h_k = prompt + prefix_text(response, spans, k)`` for ``0 < k < K``, plus ``h_0`` (the
   prompt) once per problem, go to the prover: ``M`` completions each (``num_rollouts_h0`` for
   ``h_0``), all prefixes of all problems of the chunk in **one** engine call (the engine sorts them
   by length and batches them); each full response (prefix's response part + completion) is
   verified, a completion cut at its budget counting as wrong, giving counts ``(correct, total)``;
4. ``V(h_k) = T(correct / total)`` with the prover transform ``T`` (identity, or best-of-K
   ``1 - (1 - v)^K``); ``V(h_K) = outcome`` with no rollouts; progress from
   :func:`hca.credit.step_progress`, grounded in the outcome, so it telescopes to ``R - V(h_0)``.

Options. ``dedupe``: identical prefix texts of one problem (responses often share first steps)
are estimated once and share their counts. ``first_pit``: sequential rounds, round ``r`` labels
``h_r`` of every response still alive (one engine call per round, ``h_0`` joins round 1); a
response whose ``V̂(h_r)`` is 0 (no prover completion correct) gets no further prover rollouts, so
``h_{r+1} .. h_{K-1}`` stay unlabeled (``None``), and so does the progress that needs them.
``h_0`` is not a step: ``V̂(h_0) = 0`` stops nothing (a step can unlock an unsolved problem).

Seeds: every engine call of a chunk is seeded by :func:`hca.rollout.seeds.derive_seed` from ``(seed, chunk_id,
stream)``, so a chunk's records depend neither on the rank that labels it nor on restarts (given
the same engine kind and settings -- for HF, ``engine.max_batch_size`` -- and device).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch

from hca.credit import step_progress
from hca.data.problems import Problem
from hca.data.trajectories import FORMAT_VERSION, Trajectory
from hca.rollout import SamplingParams
from hca.rollout.seeds import derive_seed
from hca.steps import prefix_text, split_steps, step_texts
from hca.verify import verify_responses


def best_of_k_value(v: float, k: int) -> float:
    """The best-of-K transform of a prover value: ``1 - (1 - v)^K`` (METHOD.md section 3); ``v`` for K = 1."""
    return v if k == 1 else 1.0 - (1.0 - v) ** k


@dataclass(frozen=True)
class CollectionConfig:
    """What to sample and how to label it."""

    num_responses: int = 4  # N: policy responses per problem
    num_rollouts: int = 4  # M: prover completions per prefix h_k, 0 < k < K
    num_rollouts_h0: int | None = None  # prover completions of h_0 (once per problem); None: M
    policy: SamplingParams | None = None  # the policy's responses (a response cut at its budget is kept, outcome 0); None: defaults
    prover: SamplingParams | None = None  # the prover's completions (one cut at its budget counts as wrong); None: as policy
    delimiter: str = "\n\n"  # step delimiter (the arithmetic task uses "\n")
    best_of_k: int = 1  # prover transform V = 1 - (1 - V_mc)^K on the MC estimate (1: none); counts stay raw
    first_pit: bool = False  # stop labelling a response after its first step with V̂ = 0
    dedupe: bool = True  # estimate identical prefix texts of one problem once

    def __post_init__(self):
        for name in ("num_responses", "num_rollouts", "best_of_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        v = self.num_rollouts_h0
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"num_rollouts_h0 must be None or an int >= 1, got {v!r}")
        if not isinstance(self.delimiter, str) or not self.delimiter:
            raise ValueError("delimiter must be a non-empty string")
        policy = SamplingParams.coerce(self.policy, "collection.policy")
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "prover", policy if self.prover is None else
                           SamplingParams.coerce(self.prover, "collection.prover"))

    @property
    def rollouts_h0(self) -> int:
        return self.num_rollouts if self.num_rollouts_h0 is None else self.num_rollouts_h0

    def policy_params(self, seed: int) -> SamplingParams:
        return self.policy.call(self.num_responses, seed)

    def prover_params(self, seed: int, n: int) -> SamplingParams:
        return self.prover.call(n, seed)

    def transform(self, correct: int, total: int) -> float:
        """The prover value from MC counts: ``1 - (1 - c/t)^best_of_k`` (``c/t`` when ``best_of_k = 1``)."""
        return best_of_k_value(correct / total, self.best_of_k)

    def to_dict(self) -> dict:
        """Plain JSON types (stop strings as lists), as the manifest stores them."""
        return json.loads(json.dumps(asdict(self)))


@dataclass
class ChunkStats:
    """Counters of one or more chunks (added with ``+``)."""

    problems: int = 0  # problems labeled
    prompts_skipped: int = 0  # problems dropped for a prompt longer than the context (prompt.long_prompts: skip)
    responses: int = 0  # policy responses (N per problem)
    correct: int = 0  # responses with outcome 1
    truncated: int = 0  # responses cut at max_new_tokens
    steps: int = 0  # total steps K over responses
    prefixes_labeled: int = 0  # labels attached: one h_0 per problem + every labeled h_k (0<k<K) of every response
    prefixes_unique: int = 0  # prefixes actually sent to the prover (h_0s included)
    prefixes_deduped: int = 0  # h_k labels served by an identical prefix of the same problem (dedupe)
    prefixes_skipped_first_pit: int = 0  # h_k (0<k<K) left unlabeled by first pit
    prover_calls: int = 0  # engine calls to the prover (1 per chunk; rounds with first_pit)
    prover_generations: int = 0  # prover completions sampled
    policy_tokens: int = 0  # tokens generated by the policy (incl. EOS)
    prover_tokens: int = 0  # tokens generated by the prover (incl. EOS)
    seconds_policy: float = 0.0  # wall time in policy generation
    seconds_prover: float = 0.0  # wall time in prover generation
    seconds: float = 0.0  # wall time of label_chunk in total

    def __add__(self, other: "ChunkStats") -> "ChunkStats":
        return ChunkStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ChunkStats":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _step_correct(problem: Problem, response: str, delimiter: str) -> list[bool] | None:
    """Ground-truth step correctness for the embedded arithmetic task (None for other tasks)."""
    if problem.task != "arithmetic" or "ops" not in problem.meta or "start" not in problem.meta:
        return None
    from hca.data.arithmetic import ArithmeticProblem

    return ArithmeticProblem.from_record(problem.to_record()).step_correct(step_texts(response, delimiter))


@dataclass
class _Response:
    pi: int  # problem index in the chunk
    j: int  # response index within the problem
    text: str  # decoded response
    ids: list[int]  # [T] policy token ids incl. EOS
    finish: str  # finish reason
    spans: list  # [K] StepSpan
    outcome: int  # 0/1
    keys: list  # [K] prefix key of h_0..h_{K-1} (h_0 key shared by the problem)


def estimate_prefix_values(keys: list[tuple], problems: Sequence[Problem], prover_engine, cfg: CollectionConfig, seed: int,
                           stats: ChunkStats, progress: bool) -> dict[tuple, tuple[int, int]]:
    """One prover engine call: MC counts for each prefix key ``(problem index, response prefix, owner)``.
    ``h_0`` keys (empty prefix) get ``rollouts_h0`` completions, others ``num_rollouts``; both are
    served by one call with ``n = gcd`` and each prompt repeated ``rollouts / n`` times."""
    want = [cfg.rollouts_h0 if k[1] == "" else cfg.num_rollouts for k in keys]
    n = math.gcd(*want)
    prompts, owner = [], []
    for i, (key, w) in enumerate(zip(keys, want)):
        for _ in range(w // n):
            prompts.append(problems[key[0]].prompt + key[1])
            owner.append(i)
    t0 = time.perf_counter()
    batch = prover_engine.generate(prompts, cfg.prover_params(seed, n), progress=progress)
    stats.seconds_prover += time.perf_counter() - t0
    stats.prover_calls += 1
    stats.prover_generations += len(batch)
    stats.prover_tokens += batch.num_generated_tokens
    rows = [owner[int(q)] for q in batch.prompt_index.tolist()]  # key index of every completion
    full = [keys[i][1] + text for i, text in zip(rows, batch.texts)]
    ok = verify_responses(full, [problems[keys[i][0]] for i in rows])
    counts = [[0, 0] for _ in keys]
    for i, good, why in zip(rows, ok, batch.finish_reason):
        counts[i][0] += int(good and why != "length")
        counts[i][1] += 1
    return {k: (c, t) for k, (c, t) in zip(keys, counts)}


def label_chunk(problems: Sequence[Problem], policy_engine, prover_engine, cfg: CollectionConfig, seed: int,
                chunk_id: int = 0, progress: bool = False) -> tuple[list[Trajectory], ChunkStats]:
    """Sample, segment, verify and prover-label ``N`` responses for each problem of one chunk.
    Returns the records (problem-major, response order) and the chunk's :class:`ChunkStats`."""
    t_start = time.perf_counter()
    stats = ChunkStats(problems=len(problems))
    if not problems:
        return [], stats
    t0 = time.perf_counter()
    pol = policy_engine.generate([p.prompt for p in problems], cfg.policy_params(derive_seed(seed, chunk_id, "policy")),
                                 progress=progress)
    stats.seconds_policy = time.perf_counter() - t0
    stats.policy_tokens = pol.num_generated_tokens
    pis = pol.prompt_index.tolist()
    ok = verify_responses(pol.texts, [problems[i] for i in pis])
    lengths = pol.response_mask.sum(-1).tolist()
    resp: list[_Response] = []
    seen_per_problem = [0] * len(problems)
    for r, (pi, text, why) in enumerate(zip(pis, pol.texts, pol.finish_reason)):
        spans = split_steps(text, cfg.delimiter)
        # key of h_k: (problem, response part of h_k, owner); owner None when identical texts share a label
        keys = [(pi, prefix_text(text, spans, k), None if (cfg.dedupe or k == 0) else r) for k in range(len(spans))]
        resp.append(_Response(pi, seen_per_problem[pi], text, pol.response_ids[r, :lengths[r]].tolist(), why, spans,
                              int(ok[r] and why != "length"), keys))
        seen_per_problem[pi] += 1
    h0_keys = [(pi, "", None) for pi in range(len(problems))]
    counts: dict[tuple, tuple[int, int]] = {}
    prover_seed = lambda rnd: derive_seed(seed, chunk_id, f"prover/{rnd}")  # noqa: E731
    if not cfg.first_pit:
        todo = list(dict.fromkeys(h0_keys + [k for x in resp for k in x.keys[1:]]))
        counts.update(estimate_prefix_values(todo, problems, prover_engine, cfg, prover_seed(1), stats, progress))
        labeled_upto = [len(x.spans) for x in resp]  # h_0..h_{K-1} all labeled
    else:
        alive = [True] * len(resp)
        labeled_upto = [min(1, len(x.spans)) for x in resp]
        max_k = max((len(x.spans) for x in resp), default=0)
        for rnd in range(1, max(2, max_k)):
            todo = h0_keys if rnd == 1 else []
            todo = list(dict.fromkeys(todo + [x.keys[rnd] for x, a in zip(resp, alive) if a and rnd < len(x.spans)]))
            todo = [k for k in todo if k not in counts]
            if todo:
                counts.update(estimate_prefix_values(todo, problems, prover_engine, cfg, prover_seed(rnd), stats, progress))
            for i, x in enumerate(resp):
                if alive[i] and rnd < len(x.spans):
                    labeled_upto[i] = rnd + 1
                    alive[i] = counts[x.keys[rnd]][0] > 0
    stats.prefixes_unique = len(counts)
    # values [R, S+1] (NaN: unlabeled), progress via hca.credit.step_progress (float64, grounded in the outcome)
    S = max((len(x.spans) for x in resp), default=0)
    nan = float("nan")
    rows = []
    for i, x in enumerate(resp):
        row = [cfg.transform(*counts[x.keys[k]]) if k < labeled_upto[i] else nan for k in range(len(x.spans))]
        rows.append(row + [float(x.outcome)] + [nan] * (S - len(x.spans)))
    values = torch.tensor(rows, dtype=torch.float64).reshape(len(resp), S + 1)
    num_steps = torch.tensor([len(x.spans) for x in resp], dtype=torch.long)
    outcome = torch.tensor([x.outcome for x in resp], dtype=torch.float64)
    prog = step_progress(values, num_steps, outcome)
    out = []
    for i, x in enumerate(resp):
        p, K = problems[x.pi], len(x.spans)
        h0 = counts[(x.pi, "", None)]
        vals = [None if math.isnan(v) else float(v) for v in values[i, :K + 1].tolist()]
        prg = [None if math.isnan(v) else float(v) for v in prog[i, :K].tolist()]
        labeled = next((k for k, v in enumerate(prg) if v is None), K)
        out.append(Trajectory(
            format=FORMAT_VERSION, problem_id=p.id, task=p.task, prompt=p.prompt, answer=p.answer, response_index=x.j,
            response=x.text, response_token_ids=x.ids, finish_reason=x.finish, truncated=x.finish == "length",
            outcome=x.outcome, delimiter=cfg.delimiter, step_spans=[[a, b] for a, b in x.spans], h0_count=list(h0),
            counts=[list(counts[x.keys[k]]) if k < labeled_upto[i] else None for k in range(K)], values=vals,
            progress=prg, labeled_steps=labeled, step_correct=_step_correct(p, x.text, cfg.delimiter), seed=seed,
            chunk_id=chunk_id))
        stats.steps += K
        stats.prefixes_labeled += max(0, labeled_upto[i] - 1)
        stats.prefixes_skipped_first_pit += max(0, K - max(labeled_upto[i], 1))
    stats.prefixes_labeled += len(problems)
    stats.prefixes_deduped = stats.prefixes_labeled - stats.prefixes_unique
    stats.responses = len(resp)
    stats.correct = sum(x.outcome for x in resp)
    stats.truncated = sum(x.finish == "length" for x in resp)
    stats.seconds = time.perf_counter() - t_start
    return out, stats
