"""GRPO against HCA and its ablations over several seeds: how many RL samples (and generated tokens,
prover rollouts included) each needs to reach a target held-out pass@1, and where each ends.

    python -m hca.experiment                                   # 4 methods x 3 seeds, after make quickstart
    python -m hca.experiment --methods grpo hca --seeds 0 1 2 3 4 --target 0.30

Every run is ``configs/rl/arithmetic_<method>.yaml`` with the quickstart's RL budget
(:data:`hca.pipeline.QUICKSTART_RL`) and the seed set in all three places it lives (the module's
sampling seed, ``seed_everything`` and the problem order), so seed ``s`` of every method sees the
same problems in the same order and starts from the same SFT policy; runs go side by side, one
thread each, and a rerun skips finished runs. Needs the quickstart's SFT policy and PRM.

Sample efficiency. A run "reaches" the target at the first validation whose pass@1 is at least
the target; its cost is the RL responses sampled until then (validation points are every
``val_check_interval`` RL steps, so the cost is resolved to that grid). A run that never reaches it
is counted as not reaching it (the table says how many did) and left out of the mean cost --
never given a made-up cost. Tokens: the policy's response tokens during RL, plus, for the methods
that use step progress, every token generated to collect the PRM's training data (policy samples
and prover rollouts), paid once per method and charged in full to each run.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from hca.pipeline import QUICKSTART_RL, Stage, derived_config, fit_from_config, run_stages

METHODS = ("grpo", "hca", "progress_only", "entropy_only")
"""The default methods; any ``configs/rl/arithmetic_<method>.yaml`` runs, e.g. the token variants
``hca_progress`` (``credit.modulate: progress``) and ``hca_inverse`` (``credit.sign:
inverse_on_negative``), or ``hca_current`` (Monte Carlo step values from the current policy)."""
USES_PROGRESS = {"hca", "progress_only", "hca_progress", "hca_inverse"}  # the PRM's collection is their cost too
# (hca_mc and hca_current pay their prover rollouts in val/tokens, step by step)


def run_dir(out: str, method: str, seed: int) -> str:
    return f"{out}/{method}/seed{seed}"


def run_overrides(seed: int, overrides: dict | None = None) -> dict:
    """The config overrides of one run: the quickstart budget, extra ``overrides``, and ``seed`` in
    all three places it lives (sampling and mini-batch seeds, global seeding, problem order)."""
    return {**QUICKSTART_RL, **(overrides or {}), "seed_everything": seed, "model.init_args.seed": seed,
            "data.init_args.seed": seed}


def experiment_stages(out: str = "runs/experiment", methods: list[str] | tuple[str, ...] = METHODS,
                      seeds: list[int] | tuple[int, ...] = (0, 1, 2), overrides: dict | None = None) -> list[Stage]:
    stages = []
    for seed in seeds:
        for m in methods:
            d = run_dir(out, m, seed)
            values = run_overrides(seed, overrides)
            stages.append(Stage(
                name=f"{m}-seed{seed}", title=f"{m}, seed {seed}", outputs=[f"{d}/model/config.json"], group="rl",
                run=lambda m=m, d=d, values=values: fit_from_config(
                    derived_config(f"configs/rl/arithmetic_{m}.yaml", d, values), f"{d}/model", f"{d}/checkpoints")))
    return stages


def first_reaching(curve: list[dict], target: float) -> dict | None:
    """The first validation point with ``pass@1 >= target`` (None: never)."""
    return next((p for p in curve if p["pass@1"] >= target - 1e-12), None)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(curves: dict[str, dict[int, list[dict]]], target: float, collection_tokens: int,
              baseline: str = "grpo") -> list[dict]:
    """One row per method: reached (count), RL samples and tokens to target (mean, std over the
    runs that reached it), final and best pass@1 (mean, std over all runs), and 95% bootstrap
    intervals over seeds (:mod:`hca.bootstrap`): of the samples to target (a run that never reached
    it counts as ``inf``, so such an interval is open above), of the final pass@1, and of the
    paired ratio ``samples to target / the baseline's`` (``samples_ratio``: point, lo, hi; NaN for
    the baseline itself or when it is absent)."""
    from hca.bootstrap import bootstrap_ci, paired_ratio_ci

    def cost_by_seed(by_seed: dict[int, list[dict]]) -> dict[int, float]:
        out = {}
        for s, c in by_seed.items():
            if c:
                hit = first_reaching(c, target)
                out[s] = math.inf if hit is None else float(hit["samples"])
        return out

    base = cost_by_seed(curves[baseline]) if baseline in curves else {}
    rows = []
    for m, by_seed in curves.items():
        hits = [first_reaching(c, target) for c in by_seed.values() if c]
        extra = collection_tokens if m in USES_PROGRESS else 0
        reached = [h for h in hits if h is not None]
        finals = [c[-1]["pass@1"] for c in by_seed.values() if c]
        costs = cost_by_seed(by_seed)
        rows.append({"method": m, "runs": len(finals), "reached": len(reached),
                     "samples_to_target": _mean_std([h["samples"] for h in reached]),
                     "samples_to_target_ci": bootstrap_ci(list(costs.values())),
                     "tokens_to_target": _mean_std([h["tokens"] + extra for h in reached]),
                     "final_pass@1": _mean_std(finals), "final_pass@1_ci": bootstrap_ci(finals),
                     "samples_ratio": (paired_ratio_ci(costs, base) if m != baseline and base else
                                       (math.nan, math.nan, math.nan)),
                     "start_pass@1": _mean_std([c[0]["pass@1"] for c in by_seed.values() if c]),
                     "best_pass@1": _mean_std([max(p["pass@1"] for p in c) for c in by_seed.values() if c])})
    return rows


def _ci(lo_hi: tuple[float, ...], fmt: str = ".3f") -> str:
    lo, hi = lo_hi[-2], lo_hi[-1]
    if math.isnan(lo):
        return "n/a"
    return f"[{lo:{fmt}}, {'∞' if math.isinf(hi) else format(hi, fmt)}]"


def _pm(ms: tuple[float, float], fmt: str = ".3f") -> str:
    return "n/a" if math.isnan(ms[0]) else f"{ms[0]:{fmt}} ± {ms[1]:{fmt}}"


def markdown(rows: list[dict], target: float) -> str:
    from hca.report import md_table

    header = ["method", "runs reaching target", "RL samples to target", "95% CI", "samples vs GRPO (95% CI)",
              "tokens to target (M)", "start pass@1", "final pass@1", "95% CI", "best pass@1"]

    def ratio(r):
        point = r["samples_ratio"][0]
        if math.isnan(point):
            return "n/a"
        return f"{'∞' if math.isinf(point) else format(point, '.2f')} {_ci(r['samples_ratio'], '.2f')}"

    table = md_table(header, [[r["method"], f"{r['reached']}/{r['runs']}", _pm(r["samples_to_target"], ".0f"),
                               _ci(r["samples_to_target_ci"], ".0f"), ratio(r),
                               _pm(tuple(x / 1e6 for x in r["tokens_to_target"]), ".2f"), _pm(r["start_pass@1"]),
                               _pm(r["final_pass@1"]), _ci(r["final_pass@1_ci"]), _pm(r["best_pass@1"])] for r in rows])
    return (f"Target held-out pass@1: {target:.3f}. Mean ± std over seeds (samples and tokens: over the runs that "
            "reached it); 95% percentile-bootstrap intervals over seeds (samples: a run that never reached the "
            "target counts as ∞; samples vs GRPO: the paired ratio of mean samples to target).\n\n" + table)


def plot(curves: dict[str, dict[int, list[dict]]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (m, by_seed) in enumerate(curves.items()):
        runs = [c for c in by_seed.values() if c]
        if not runs:
            continue
        xs = sorted({p["samples"] for c in runs for p in c})
        pts = [[p["pass@1"] for c in runs for p in c if p["samples"] == x] for x in xs]
        mean = [statistics.fmean(v) for v in pts]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in pts]
        color = f"C{i}"
        ax.plot(xs, mean, "o-", color=color, label=f"{m} ({len(runs)} seeds)")
        ax.fill_between(xs, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)], color=color, alpha=0.15)
    ax.axhline(target, color="gray", ls="--", lw=1, label="target")
    ax.set_xlabel("RL responses sampled")
    ax.set_ylabel("held-out pass@1 (validation), mean ± std")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect_results(out: str, methods, seeds) -> dict[str, dict[int, list[dict]]]:
    from hca.report import read_metrics, validation_curve

    return {m: {s: validation_curve(read_metrics(run_dir(out, m, s))) for s in seeds} for m in methods}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/experiment", help="where the runs and the results go")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="configs/rl/arithmetic_<method>.yaml")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="RL seeds")
    ap.add_argument("--target", type=float, default=None,
                    help="held-out pass@1 to reach (default: start pass@1 + 0.10)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML",
                    help="extra overrides of every run's config, e.g. trainer.max_steps=120")
    ap.add_argument("--max-parallel", type=int, default=None, help="runs side by side (default: the CPUs available)")
    ap.add_argument("--summary-only", action="store_true", help="only summarize runs that exist")
    a = ap.parse_args(argv)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    plan_args = {"out": a.out, "methods": a.methods, "seeds": a.seeds, "overrides": overrides}
    if not a.summary_only:
        run_stages(experiment_stages(**plan_args), plan="hca.experiment:experiment_stages", plan_args=plan_args,
                   log_dir=f"{a.out}/logs", max_parallel=a.max_parallel)
    from hca.report import collection_tokens

    curves = collect_results(a.out, a.methods, a.seeds)
    starts = [c[0]["pass@1"] for by in curves.values() for c in by.values() if c]
    target = a.target if a.target is not None else round(statistics.fmean(starts) + 0.10, 3)
    try:
        ctok = collection_tokens()
    except (OSError, KeyError, ValueError):
        ctok = 0
    rows = summarize(curves, target, ctok)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, target)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"target": target, "collection_tokens": ctok, "rows": rows,
                                                  "curves": {m: {str(s): c for s, c in by.items()} for m, by in curves.items()}},
                                                 indent=1))
    plot(curves, target, out / "curves.png")
    print(md)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return {"target": target, "rows": rows}


if __name__ == "__main__":
    main()
