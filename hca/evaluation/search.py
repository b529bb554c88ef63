"""Test-time use of a PRM: best-of-N answer selection and PRM-guided step-level beam search.

    python -m hca.evaluation.search --prm runs/prm/arithmetic/model --policy runs/sft/policy/model \\
        --problems runs/data/arithmetic/test.jsonl --limit 128 --n 1 4 16 --out runs/prm/search

Best-of-N (:func:`best_of_n`)
    ``max(n)`` responses are sampled per problem once; for each ``N`` they are cut into
    ``max(n) // N`` disjoint groups of ``N`` and every figure is averaged over the groups (so N = 1
    averages over all samples). In each group a method picks one response and scores its
    correctness (a response cut at its token budget is wrong):

    * ``prm_min`` / ``prm_last`` / ``prm_prod``: the highest PRM score, the score aggregating the
      step values ``f(h_1) .. f(h_K)`` by min, last (``f(h_K)``, the PRM's verdict on the finished
      response) or product (``[f(h_0)]`` for an empty response); ties: the first;
    * ``prm_vote_min`` / ``_last`` / ``_prod``: PRM-weighted majority vote -- each final answer
      collects the sum of its responses' scores and the heaviest answer wins
      (:func:`hca.evaluation.policy.weighted_majority_correct`; Uesato et al. 2022, Math-Shepherd). A
      noisy PRM that picks one response can lose to plain voting when the correct responses are
      many near-identical texts and the wrong ones diverse (the top of N noisy scores is then
      usually a wrong one); voting pools the evidence per answer instead;
    * ``majority``: the most frequent final answer (:func:`hca.evaluation.policy.majority_correct`);
    * ``random``: the expected accuracy of a uniformly random pick (the group's mean correctness);
    * ``oracle``: any response of the group is correct (pass@N).

Beam search (:func:`beam_search`)
    ``N`` candidate next steps per round and problem: the round's budget is spread over the
    problem's unfinished beams (``N // beams`` each, at least 1), each sampled from
    ``prompt + beam`` with the delimiter as stop string; every candidate is scored with the PRM at
    its last boundary (``f(h_k)``; ``f(h_K)`` once finished), and the best ``B = max(1, N // expand)``
    of the finished beams and new candidates are kept. A beam finishes on EOS, at its token budget,
    or after ``max_steps`` rounds. The answer is the best-scored beam. Compute per round ~ ``N``
    step samples, comparable to best-of-N with ``N`` responses.

Output (``--out``): ``results.json``, ``results.md`` (a table) and ``best_of_n.png`` (accuracy against N).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Sequence

from hca.data.problems import Problem
from hca.evaluation.policy import majority_correct, weighted_majority_correct

AGGREGATIONS = ("min", "last", "prod")
METHODS = ("prm_min", "prm_last", "prm_prod", "prm_vote_min", "prm_vote_last", "prm_vote_prod", "majority", "random",
           "oracle")


def aggregate(values: Sequence[float], how: str) -> float:
    """One score from ``[f(h_0) .. f(h_K)]``: min / last / product of the step values ``f(h_1..h_K)``."""
    steps = list(values[1:]) or list(values[:1])
    if how == "min":
        return min(steps)
    if how == "last":
        return steps[-1]
    if how == "prod":
        return math.prod(steps)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {how!r}")


def best_of_n(correct: list[list[bool]], answers: list[list[str | None]], scores: dict[str, list[list[float]]],
              ns: Sequence[int]) -> dict[str, dict[int, float]]:
    """Accuracy ``{method: {N: acc}}`` from per-problem samples ``[P][M]`` (module docstring)."""
    M = {len(c) for c in correct}
    if len(M) != 1:
        raise ValueError("every problem needs the same number of samples")
    M = M.pop()
    out: dict[str, dict[int, float]] = {m: {} for m in METHODS}
    for N in ns:
        if not 1 <= N <= M:
            raise ValueError(f"N={N} needs 1 <= N <= {M} samples")
        acc = {m: 0.0 for m in METHODS}
        G = M // N
        for p in range(len(correct)):
            for g in range(G):
                sl = slice(g * N, (g + 1) * N)
                c = correct[p][sl]
                for agg in AGGREGATIONS:
                    s = scores[agg][p][sl]
                    acc[f"prm_{agg}"] += c[max(range(N), key=lambda i: (s[i], -i))] / G
                    acc[f"prm_vote_{agg}"] += weighted_majority_correct(answers[p][sl], c, s) / G
                acc["majority"] += majority_correct(answers[p][sl], c) / G
                acc["random"] += sum(c) / N / G
                acc["oracle"] += any(c) / G
        for m in METHODS:
            out[m][N] = acc[m] / len(correct)
    return out


def first_error_report(problems: list[Problem], texts: list[str], values: list[list[float]], delimiter: str,
                       threshold: float = 0.5) -> dict | None:
    """ProcessBench-style first-error F1 of the PRM on sampled responses against ground-truth step
    correctness (arithmetic problems with ``meta``; None otherwise). Rules as :mod:`hca.prm.metrics`:
    ``value`` (first step with ``f(h_k) < threshold``) and ``progress`` (first ``P̂_k <= -threshold``)."""
    import torch

    from hca.prm.metrics import f1_from_counts, first_error_counts
    from hca.steps import step_texts
    from hca.data.arithmetic import ArithmeticProblem

    if not problems or any(p.task != "arithmetic" or "ops" not in p.meta for p in problems):
        return None
    truth, pred = [], {"value": [], "progress": []}
    for p, text, v in zip(problems, texts, values):
        steps = step_texts(text, delimiter)
        if not steps:
            continue
        truth.append(ArithmeticProblem.from_record(p.to_record()).first_error(steps))
        pred["value"].append(next((k for k in range(len(steps)) if v[k + 1] < threshold), -1))
        pred["progress"].append(next((k for k in range(len(steps)) if v[k + 1] - v[k] <= -threshold), -1))
    t = torch.tensor([-1 if e is None else e for e in truth])
    return {rule: f1_from_counts(first_error_counts(torch.tensor(pr), t).tolist()) | {"responses": len(truth)}
            for rule, pr in pred.items()}


def sample_and_score(engine, scorer, problems: list[Problem], n: int, max_new_tokens: int, temperature: float,
                     delimiter: str, seed: int):
    """``n`` responses per problem: ``(correct [P][n], answers [P][n], scores {agg: [P][n]}, first-error report)``."""
    from hca.rollout import SamplingParams
    from hca.verify import extract_answer, is_correct

    batch = engine.generate([p.prompt for p in problems], SamplingParams(max_new_tokens=max_new_tokens,
                                                                         temperature=temperature, n=n, seed=seed))
    pidx = batch.prompt_index.tolist()
    values = scorer.values([problems[i].prompt for i in pidx], batch.texts, delimiter)
    correct = [[] for _ in problems]
    answers = [[] for _ in problems]
    scores = {a: [[] for _ in problems] for a in AGGREGATIONS}
    for i, text, why, v in zip(pidx, batch.texts, batch.finish_reason, values):
        p = problems[i]
        correct[i].append(why != "length" and is_correct(text, p.answer, p.task))
        answers[i].append(extract_answer(text, p.task) if why != "length" else None)
        for a in AGGREGATIONS:
            scores[a][i].append(aggregate(v, a))
    report = first_error_report([problems[i] for i in pidx], batch.texts, values, delimiter)
    return correct, answers, scores, report


def beam_search(engine, scorer, problems: list[Problem], n: int, expand: int, delimiter: str, max_steps: int,
                step_tokens: int, temperature: float, seed: int) -> list[tuple[str, bool]]:
    """``(text, finished_normally)`` per problem: the best beam (module docstring)."""
    from hca.rollout import SamplingParams

    width = max(1, n // expand)
    beams: list[list[tuple[str, float, str | None]]] = [[("", 0.0, None)] for _ in problems]  # (text, score, end)
    for rnd in range(max_steps):
        jobs: dict[int, list[tuple[int, str]]] = {}  # samples per beam -> [(problem, beam text)]
        for pi, bs in enumerate(beams):
            open_ = [b for b in bs if b[2] is None]
            for text, _, _ in open_:
                jobs.setdefault(max(1, n // len(open_)), []).append((pi, text))
        if not jobs:
            break
        cands: list[list[tuple[str, float, str | None]]] = [[b for b in bs if b[2] is not None] for bs in beams]
        new: list[tuple[int, str, str | None]] = []
        for k, items in sorted(jobs.items()):
            params = SamplingParams(max_new_tokens=step_tokens, temperature=temperature, n=k, stop=(delimiter,),
                                    seed=seed * 1_000_003 + rnd * 1009 + k)
            out = engine.generate([problems[pi].prompt + text for pi, text in items], params)
            for j, piece, why in zip(out.prompt_index.tolist(), out.texts, out.finish_reason):
                pi, text = items[j]
                last = rnd == max_steps - 1
                new.append((pi, text + piece, None if (why == "stop" and not last) else ("max_steps" if why == "stop" else why)))
        vals = scorer.values([problems[pi].prompt for pi, _, _ in new], [t for _, t, _ in new], delimiter)
        for (pi, text, end), v in zip(new, vals):
            cands[pi].append((text, v[-1], end))
        beams = [sorted(c, key=lambda b: -b[1])[:width] for c in cands]
    out = []
    for bs in beams:
        done = [b for b in bs if b[2] is not None] or bs
        text, _, end = max(done, key=lambda b: b[1])
        out.append((text, end in ("eos", "max_steps")))
    return out


def plot(results: dict[str, dict[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_n in results.items():
        ns = sorted(by_n)
        ax.plot(ns, [by_n[k] for k in ns], marker="o", label=method, linestyle="--" if method == "oracle" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({k for v in results.values() for k in v}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("N (responses, or candidate steps per round for beam search)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(results: dict[str, dict[int, float]]) -> str:
    ns = sorted({k for v in results.values() for k in v})
    lines = ["| method | " + " | ".join(f"N = {k}" for k in ns) + " |", "| --- |" + " --- |" * len(ns)]
    for method, by_n in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{by_n[k]:.3f}" if k in by_n else "" for k in ns) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    import torch

    from hca.models.loading import load_causal_lm, load_tokenizer
    from hca.prm.scorer import PRMScorer
    from hca.data.problems import load_problems
    from hca.data.prompts import PromptFormat, check_same_format, context_length, render_problems
    from hca.rollout import HFRolloutEngine
    from hca.verify import is_correct

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    problems, _ = load_problems(args.problems, args.task, limit=args.limit)
    tok = load_tokenizer(args.tokenizer or args.policy)
    model = load_causal_lm(args.policy, tokenizer=tok).requires_grad_(False).eval().to(device)
    engine = HFRolloutEngine(model, tok, max_batch_size=args.max_batch_size)
    scorer = PRMScorer(args.prm, device=device, batch_size=args.batch_size)
    fmt = PromptFormat(**({"instruction": args.instruction} if args.instruction is not None else {}))
    if not args.allow_prompt_format_mismatch:
        check_same_format(fmt.describe(tok), scorer.prompt_format, f"the PRM at {args.prm!r}",
                          "--allow-prompt-format-mismatch")
    problems, _ = render_problems(problems, fmt, tok, context_length(model))
    ns = sorted(set(args.n))
    correct, answers, scores, first_error = sample_and_score(engine, scorer, problems, max(ns), args.max_new_tokens,
                                                args.temperature, args.delimiter, args.seed)
    results = best_of_n(correct, answers, scores, ns)
    if args.beam:
        results["prm_beam"] = {}
        for N in ns:
            picks = beam_search(engine, scorer, problems, N, args.beam_expand, args.delimiter, args.beam_max_steps,
                                args.step_tokens, args.temperature, args.seed)
            results["prm_beam"][N] = sum(ok and is_correct(t, p.answer, p.task)
                                         for (t, ok), p in zip(picks, problems)) / len(problems)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"config": {k: v for k, v in vars(args).items()}, "num_problems": len(problems),
              "samples_per_problem": max(ns), "first_error_f1": first_error, "results": {m: {str(k): v for k, v in r.items()} for m, r in results.items()}}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    fe = "" if first_error is None else "\nFirst-error F1 on the sampled responses (ground truth): " + ", ".join(
        f"{rule}: {r['f1']:.3f} (acc erroneous {r['acc_erroneous']:.3f}, acc correct {r['acc_correct']:.3f})"
        for rule, r in first_error.items()) + "\n"
    (out / "results.md").write_text(f"{len(problems)} problems from {args.problems}, {max(ns)} samples each\n\n"
                                    + markdown_table(results) + fe)
    plot(results, out / "best_of_n.png", f"{len(problems)} held-out problems")
    return report


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prm", required=True, help="PRM export folder")
    ap.add_argument("--policy", required=True, help="policy: HF folder, hub name or tiny-llama spec")
    ap.add_argument("--tokenizer", default=None, help="policy tokenizer (default: --policy)")
    ap.add_argument("--problems", required=True, help="JSONL problem file")
    ap.add_argument("--task", default="arithmetic", help="verifier for lines that do not name theirs")
    ap.add_argument("--limit", type=int, default=128, help="first problems of the file")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 16], help="N values (the largest is sampled)")
    ap.add_argument("--out", default="runs/prm/search", help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--temperature", type=float, default=1.0, help="policy sampling temperature")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="response budget")
    ap.add_argument("--delimiter", default="\\n", help="step delimiter (backslash escapes allowed)")
    ap.add_argument("--beam", action=argparse.BooleanOptionalAction, default=True, help="also run beam search")
    ap.add_argument("--beam-expand", type=int, default=4, help="beam width B = max(1, N // beam_expand)")
    ap.add_argument("--beam-max-steps", type=int, default=12, help="rounds of beam search")
    ap.add_argument("--step-tokens", type=int, default=32, help="token budget of one step")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--batch-size", type=int, default=128, help="PRM sequences per forward pass")
    ap.add_argument("--max-batch-size", type=int, default=256, help="policy samples per engine sub-batch")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--instruction", default=None, help="prompt instruction for native GSM8K/MATH lines (hca.data.prompts)")
    ap.add_argument("--allow-prompt-format-mismatch", action="store_true",
                    help="search with a PRM trained on prompts of another format anyway")
    args = ap.parse_args(argv)
    args.delimiter = args.delimiter.encode().decode("unicode_escape")
    if not args.delimiter:
        ap.error("--delimiter must be non-empty")
    return args


if __name__ == "__main__":
    rep = run(parse_args())
    print(markdown_table({m: {int(k): v for k, v in r.items()} for m, r in rep["results"].items()}))
