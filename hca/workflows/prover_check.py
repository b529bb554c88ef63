"""Prover diagnostics before training: which prover's progress can help RL of this policy?

    python -m hca.workflows.prover_check                          # the embedded task's candidates
    python -m hca.workflows.prover_check --regime sparse          # the same under runs/sparse
    python -m hca.workflows.prover_check --problems 128 --responses 8 --rollouts 16 \
        --candidate careful=runs/sft/prover/model --candidate bo4=policy@4 --candidate weak=runs/sft/policy_early/model

Setlur et al. (2024, "Rewarding Progress", Theorem 3.1) bound the improvement of one policy step
under the effective reward ``Q^pi + alpha A^mu`` by two quantities of the prover ``mu``:

* **distinguishability** ``E_s Var_{a ~ pi}[A^mu(s, a)]``: does the prover's advantage vary across the
  steps the *policy* takes from one state? (A prover that solves everything, or nothing, gives
  ``A^mu = 0`` everywhere.)
* **alignment** ``E_{s, a ~ pi}[A^mu(s, a) A^pi(s, a)]``: does it agree with the policy's own
  advantage? (A prover rewarding steps the policy cannot follow up misleads it.)

Here a state is a prefix ``h_{k-1}`` (the prompt for ``k = 1``) and an action the next step; the
prover's advantage of step ``k`` is its progress ``A^mu = V^mu(h_k) - V^mu(h_{k-1})`` (METHOD.md
section 3, last step grounded: ``V(h_K) = R``). Everything is Monte Carlo on the policy's own
responses to ``--problems`` training problems (``--responses`` each):

* ``V^mu`` of every distinct prefix from ``--rollouts`` completions of each candidate checkpoint;
* ``A^pi`` from the policy's own completions, **one** set of rollouts; the candidates ``policy`` and
  ``policy@K`` (best-of-K of the policy, ``1 - (1 - V^pi)^K``, the analytic transform: no new model)
  use a **second, independent** set, so that the alignment of the policy with itself is not inflated
  by shared sampling noise.
* Distinguishability is estimated where it is defined: over states that at least two of the
  policy's responses pass through (every problem's prompt; shared first lines), as the unbiased
  variance of ``A^mu`` across the responses leaving the state, averaged with the states' visit
  counts. Its ``noise`` column is the mean Monte Carlo variance of ``V^mu(h_k)`` at those visits
  (``p(1-p)/(M-1)``, through the best-of-K transform by the delta method): an upper bound on how
  much of the variance is label noise rather than signal.
* Alignment is the mean of ``A^mu A^pi`` over every step of every response, and ``corr`` its
  normalised form (Pearson, so that provers of different scales compare). Both include the grounded
  last step, whose ``R - V(h_{K-1})`` shares ``R`` with ``A^pi``'s; "steps before the last" is the
  alignment without it: what a prover's progress says beyond the verified outcome.

Departure from PAV: PAV measured these quantities on states from the base policy with 20 rollouts
per prefix; here ``--rollouts`` (default 16) is the budget, and deeper states are seen only where
responses share a prefix (the policy is not re-sampled from each state).

Writes ``--out`` (JSON, every figure) and prints one markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

POLICY = "policy"  # a candidate path meaning: the policy itself (second, independent rollouts)


@dataclass(frozen=True)
class Candidate:
    name: str  # row label
    path: str  # checkpoint folder, or "policy"
    best_of_k: int = 1  # prover transform 1 - (1 - V)^K on the Monte Carlo value

    @classmethod
    def parse(cls, spec: str) -> "Candidate":
        """``name=path`` or ``name=path@K`` (``path`` may be ``policy``)."""
        if "=" not in spec:
            raise ValueError(f"--candidate {spec!r}: expected NAME=PATH or NAME=PATH@K")
        name, rest = spec.split("=", 1)
        path, k = (rest.rsplit("@", 1) + ["1"])[:2] if "@" in rest else (rest, "1")
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"--candidate {spec!r}: best-of-K must be an integer >= 1, got {k!r}")
        if path != POLICY and not Path(path).exists():
            raise ValueError(f"--candidate {spec!r}: no checkpoint at {path}")
        return cls(name, path, int(k))


def transform(c: int, t: int, k: int) -> float:
    """The candidate's value from Monte Carlo counts ``(c, t)`` under best-of-``k``."""
    from hca.collection.labelling import best_of_k_value

    return best_of_k_value(c / t, k)


def noise_var(c: int, t: int, k: int) -> float:
    """Monte Carlo variance of ``transform(c, t, k)``: ``p(1-p)/(t-1)``, times ``(dV/dp)^2`` for best-of-K."""
    if t < 2:
        return 0.0
    p = c / t
    var = p * (1 - p) / (t - 1)
    return var if k == 1 else var * (k * (1 - p) ** (k - 1)) ** 2


@dataclass
class Response:
    problem: int  # index into the problems
    keys: list  # [K] prefix keys of h_0 .. h_{K-1} (h_0: (problem, ""))
    outcome: int  # verified R


def advantages(resp: list[Response], counts: dict, k: int) -> tuple[list[list[float]], list[list[float]]]:
    """Per response, ``A^mu`` of each step (``V(h_k) - V(h_{k-1})``, ``V(h_K) = R``) and the MC noise
    variance of ``V(h_k)`` (0 for the grounded last step)."""
    adv, noise = [], []
    for r in resp:
        vals = [transform(*counts[key], k) for key in r.keys] + [float(r.outcome)]
        adv.append([vals[j + 1] - vals[j] for j in range(len(r.keys))])
        noise.append([noise_var(*counts[key], k) for key in r.keys[1:]] + [0.0])
    return adv, noise


def diagnostics(resp: list[Response], a_mu: list[list[float]], noise: list[list[float]], a_pi: list[list[float]]
                ) -> dict:
    """PAV's two quantities (module docstring) plus mean |A^mu|, for one candidate."""
    by_state: dict = {}
    for r, am, nz in zip(resp, a_mu, noise):
        for j, key in enumerate(r.keys):  # step j+1 leaves state h_j
            by_state.setdefault(key, []).append((am[j], nz[j]))
    num = den = noise_sum = 0.0
    for visits in by_state.values():
        if len(visits) >= 2:
            xs = [a for a, _ in visits]
            num += len(xs) * statistics.variance(xs)
            noise_sum += sum(n for _, n in visits)
            den += len(xs)
    flat_mu = [a for row in a_mu for a in row]
    flat_pi = [a for row in a_pi for a in row]
    prod = [a * b for a, b in zip(flat_mu, flat_pi)]
    # the grounded last step (R - V(h_{K-1})) shares R with A^pi's: the steps before it show what progress adds
    inner = [a * b for am, ap in zip(a_mu, a_pi) for a, b in zip(am[:-1], ap[:-1])]
    corr = (statistics.correlation(flat_mu, flat_pi)
            if len(flat_mu) > 2 and statistics.pstdev(flat_mu) > 0 and statistics.pstdev(flat_pi) > 0 else math.nan)
    return {"distinguishability": num / den if den else math.nan, "noise": noise_sum / den if den else math.nan,
            "alignment": statistics.fmean(prod) if prod else math.nan, "corr": corr,
            "alignment_inner": statistics.fmean(inner) if inner else math.nan,
            "mean_abs_progress": statistics.fmean(abs(a) for a in flat_mu) if flat_mu else math.nan,
            "shared_state_visits": int(den), "steps": len(flat_mu)}


def run(policy: str, candidates: list[Candidate], problems_file: str, num_problems: int, num_responses: int,
        rollouts: int, max_new_tokens: int, delimiter: str, seed: int, engine: str = "hf") -> dict:
    from hca.collection.labelling import ChunkStats, CollectionConfig, estimate_prefix_values
    from hca.workflows.pipeline import banner
    from hca.data.problems import load_problems
    from hca.rollout import SamplingParams
    from hca.rl.scoring import MonteCarloScorer
    from hca.rollout.seeds import derive_seed
    from hca.steps import prefix_text, split_steps
    from hca.verify import verify_responses

    problems, _ = load_problems(problems_file, limit=num_problems)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    cfg = CollectionConfig(num_responses=num_responses, num_rollouts=rollouts, policy=sampling, delimiter=delimiter)
    engines: dict[str, object] = {}

    def engine_of(path: str):
        if path not in engines:
            engines[path] = MonteCarloScorer(path, engine={"engine": engine}).engine()
        return engines[path]

    banner(f"Prover check: {len(problems)} problems x {num_responses} responses of {policy}, "
           f"{rollouts} rollouts per prefix")
    pol = engine_of(policy).generate([p.prompt for p in problems], cfg.policy_params(derive_seed(seed, 0, "policy")),
                                     progress=True)
    ok = verify_responses(pol.texts, [problems[i] for i in pol.prompt_index.tolist()])
    resp = []
    for pi, text, good, why in zip(pol.prompt_index.tolist(), pol.texts, ok, pol.finish_reason):
        spans = split_steps(text, delimiter)
        resp.append(Response(pi, [(pi, prefix_text(text, spans, k), None) for k in range(max(len(spans), 1))],
                             int(good and why != "length")))
    keys = list(dict.fromkeys(k for r in resp for k in r.keys))
    print(f"  {len(resp)} responses, pass@1 {statistics.fmean(r.outcome for r in resp):.3f}, "
          f"{len(keys)} distinct prefixes", flush=True)

    def estimate(path: str, stream: str) -> tuple[dict, ChunkStats]:
        stats = ChunkStats()
        counts = estimate_prefix_values(keys, problems, engine_of(path), cfg, derive_seed(seed, 0, stream), stats, True)
        return counts, stats

    own, _ = estimate(policy, "policy/A_pi")  # A^pi: the policy's own rollouts, set 1
    a_pi, _ = advantages(resp, own, 1)
    rows, cost = [], {}
    for c in candidates:
        path = policy if c.path == POLICY else c.path
        if path not in cost:
            print(f"  rollouts of {path}", flush=True)
            # seeded by position, not path (a moved checkpoint gives the same figures); the policy's set 2
            # is independent of set 1
            counts, stats = estimate(path, "policy/set2" if path == policy else f"candidate/{len(cost)}")
            cost[path] = (counts, stats)
        counts, stats = cost[path]
        a_mu, noise = advantages(resp, counts, c.best_of_k)
        h0 = [transform(*counts[(i, "", None)], c.best_of_k) for i in range(len(problems))]
        rows.append({"candidate": c.name, "path": c.path, "best_of_k": c.best_of_k,
                     "value_h0": statistics.fmean(h0), **diagnostics(resp, a_mu, noise, a_pi),
                     "prover_tokens": stats.prover_tokens})
    return {"policy": policy, "problems_file": problems_file, "problems": len(problems), "responses": len(resp),
            "rollouts": rollouts, "policy_pass@1": statistics.fmean(r.outcome for r in resp),
            "distinct_prefixes": len(keys), "policy_value_h0": statistics.fmean(
                transform(*own[(i, "", None)], 1) for i in range(len(problems))),
            "rows": rows}


def markdown(res: dict) -> str:
    from hca.workflows.report import md_table

    def f(x, fmt=".4f"):
        return "n/a" if isinstance(x, float) and math.isnan(x) else format(x, fmt)

    head = (f"{res['problems']} problems x {res['responses'] // max(res['problems'], 1)} responses of the policy "
            f"(pass@1 {res['policy_pass@1']:.3f}), {res['rollouts']} rollouts per prefix, "
            f"{res['distinct_prefixes']} distinct prefixes.\n\n")
    return head + md_table(
        ["prover", "V(h_0)", "distinguishability E Var[A^mu]", "of which noise (bound)", "alignment E[A^mu A^pi]",
         "corr(A^mu, A^pi)", "alignment, steps before the last", "mean abs(A^mu)", "prover tokens (k)"],
        [[r["candidate"], f(r["value_h0"], ".3f"), f(r["distinguishability"]), f(r["noise"]), f(r["alignment"]),
          f(r["corr"], ".3f"), f(r["alignment_inner"]), f(r["mean_abs_progress"], ".3f"),
          f(r["prover_tokens"] / 1e3, ".0f")]
         for r in res["rows"]])


DEFAULT_CANDIDATES = ["careful=runs/sft/prover/model", "policy=policy", "bo2=policy@2", "bo4=policy@4",
                      "bo8=policy@8", "early=runs/sft/policy_early/model"]


def main(argv=None) -> dict:
    from hca.runtime.console import quiet_console

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="runs/sft/policy/model", help="the policy whose responses are judged")
    ap.add_argument("--candidate", action="append", default=None, metavar="NAME=PATH[@K]",
                    help=f"a prover (repeat); PATH 'policy' is the policy itself; default: {DEFAULT_CANDIDATES} "
                         "(those whose checkpoint exists)")
    ap.add_argument("--problems-file", default="runs/data/arithmetic/train.jsonl")
    ap.add_argument("--problems", type=int, default=128, help="problems (the file's first)")
    ap.add_argument("--responses", type=int, default=8, help="policy responses per problem")
    ap.add_argument("--rollouts", type=int, default=16, help="Monte Carlo completions per prefix, every candidate")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="budget of responses and completions (default: the regime's, 64 on the default task)")
    ap.add_argument("--delimiter", default="\n")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm", "auto"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/prover_check.json", help="the JSON of every figure (moved with --regime)")
    ap.add_argument("--regime", default="default", help="the embedded task's regime (hca.data.regimes): moves every "
                    "default runs/ path (policy, candidates, problems, output) under its root")
    a = ap.parse_args(argv)
    quiet_console()
    from hca.data.regimes import get_regime, move_root

    reg = get_regime(a.regime)
    budget = reg.eval_max_new_tokens if a.max_new_tokens is None else a.max_new_tokens
    moved = {k: move_root(v, reg.root) if isinstance(v, str) and ap.get_default(k) == v else v
             for k, v in vars(a).items()}
    a = argparse.Namespace(**{**moved, "max_new_tokens": budget})
    defaults = [move_root(s, reg.root) for s in DEFAULT_CANDIDATES]
    specs = a.candidate or [s for s in defaults
                            if s.split("=", 1)[1].split("@")[0] == POLICY or Path(s.split("=", 1)[1]).exists()]
    if not Path(a.policy).exists():
        raise SystemExit(f"--policy {a.policy}: no such checkpoint (run the quickstart's SFT first)")
    res = run(a.policy, [Candidate.parse(s) for s in specs], a.problems_file, a.problems, a.responses, a.rollouts,
              a.max_new_tokens, a.delimiter, a.seed, a.engine)
    from hca.data.trajectories import write_bytes_atomic

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(Path(a.out), json.dumps(res, indent=1).encode())
    print(markdown(res))
    print(f"written: {a.out}")
    return res


if __name__ == "__main__":
    main()
