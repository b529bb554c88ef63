"""GRPO against HCA and its ablations over several seeds: how many RL samples (and generated tokens,
prover rollouts included) each needs to reach a target held-out pass@1, and where each ends.

    python -m hca.workflows.experiment                         # 6 methods x 5 seeds, after make quickstart
    python -m hca.workflows.experiment --methods grpo hca_progress --seeds 0 1 2 3 4 --target 0.30
    python -m hca.workflows.experiment --regime sparse         # after make quickstart REGIME=sparse

Every run is ``configs/rl/arithmetic_<method>.yaml`` with the quickstart's RL budget
(:data:`hca.workflows.pipeline.QUICKSTART_RL`) and the seed set in all three places it lives (the module's
sampling seed, ``seed_everything`` and the problem order), so seed ``s`` of every method sees the
same problems in the same order and starts from the same SFT policy; runs go side by side, one
thread each, and a rerun skips finished runs. Needs the quickstart's SFT policy and PRM.

Sample efficiency. A run "reaches" the target (default: GRPO's mean final pass@1) at the first
validation whose pass@1 is at least the target; its cost is the RL responses sampled until then
(validation points are every ``val_check_interval`` RL steps, so the cost is resolved to that grid).
A run that never reaches it is counted as not reaching it (the table says how many did), left out
of the mean cost, and counted as ``inf`` in the bootstrap intervals -- never given a made-up cost.
Tokens: the policy's response tokens during RL and the Monte Carlo prover rollouts of the scorers
that sample (``val/tokens``), plus, for the methods that use the learned PRM, every token generated
to collect its training data (policy samples and prover rollouts): charged in full to each run, and
separately amortised over the runs of the experiment that reuse the PRM.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from hca.workflows.methods import METHODS, USES_PROGRESS, VARIANTS, method_config, uses_prm  # noqa: F401 (re-exported)
from hca.workflows.pipeline import QUICKSTART_RL, Stage, derived_config, fit_from_config, run_stages

def run_dir(out: str, method: str, seed: int) -> str:
    return f"{out}/{method}/seed{seed}"


def finished_marker(d: str) -> str:
    """The file a finished run has (its exported model): the stage's output, and what the summary counts."""
    return f"{d}/model/config.json"


def run_overrides(seed: int, overrides: dict | None = None) -> dict:
    """The config overrides of one run: the quickstart budget, extra ``overrides``, and ``seed`` in
    all three places it lives (sampling and mini-batch seeds, global seeding, problem order)."""
    return {**QUICKSTART_RL, **(overrides or {}), "seed_everything": seed, "model.init_args.seed": seed,
            "data.init_args.seed": seed}


def experiment_stages(out: str = "runs/experiment", methods: list[str] | tuple[str, ...] = METHODS,
                      seeds: list[int] | tuple[int, ...] = (0, 1, 2), overrides: dict | None = None,
                      regime: str = "default") -> list[Stage]:
    """One RL run per (seed, method), in the task ``regime`` (:mod:`hca.data.regimes`), seeds outermost
    (a partial experiment has every method on its first seeds)."""
    stages = []
    configs = {m: method_config(m) for m in methods}  # an unknown method fails here, before any run
    for seed in seeds:
        for m in methods:
            d = run_dir(out, m, seed)
            path, extra = configs[m]
            values = run_overrides(seed, {**extra, **(overrides or {})})
            stages.append(Stage(
                name=f"{m}-seed{seed}", title=f"{m}, seed {seed}", outputs=[finished_marker(d)], group="rl",
                run=lambda path=path, d=d, values=values: fit_from_config(
                    derived_config(path, d, values, regime), f"{d}/model", f"{d}/checkpoints")))
    return stages


def final_pass(curve: list[dict], points: int = 1) -> float:
    """A run's final pass@1: the mean of its last ``points`` validation points (1: the last one). With
    2, a run's end is less a single noisy validation, so seeds below the mean can still reach it."""
    tail = curve[-max(1, points):]
    return statistics.fmean(p["pass@1"] for p in tail)


def first_reaching(curve: list[dict], target: float) -> dict | None:
    """The first validation point with ``pass@1 >= target`` (None: never)."""
    return next((p for p in curve if p["pass@1"] >= target - 1e-12), None)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(curves: dict[str, dict[int, list[dict]]], target: float, collection_tokens: int,
              baseline: str = "grpo", final_points: int = 1) -> list[dict]:
    """One row per method: reached (count), RL samples and tokens to target (mean, std over the
    runs that reached it; tokens with the PRM's collection charged in full to each run, and
    amortised over the runs of this experiment that reuse the PRM), final and best pass@1 (mean,
    std over all runs), and 95% bootstrap intervals over seeds (:mod:`hca.workflows.bootstrap`): of the samples
    to target (a run that never reached it counts as ``inf``, so such an interval is open above), of
    the final pass@1, of the paired ratio ``samples to target / the baseline's`` (``samples_ratio``:
    point, lo, hi), and of ``budget_ratio``: the samples to reach the baseline's own final pass@1 as
    a fraction of the baseline's budget (the issue's "GRPO's final pass@1 with <= 1/2 of its samples";
    the target redrawn in every resample), and ``final_vs_baseline``: final pass@1 minus the
    baseline's, paired by seed (mean, lo, hi). NaN where the baseline is absent. "Final" is
    :func:`final_pass` over the last ``final_points`` validation points."""
    from hca.workflows.bootstrap import bootstrap_ci, budget_ratio_ci, paired_ratio_ci

    def cost_by_seed(by_seed: dict[int, list[dict]]) -> dict[int, float]:
        out = {}
        for s, c in by_seed.items():
            if c:
                hit = first_reaching(c, target)
                out[s] = math.inf if hit is None else float(hit["samples"])
        return out

    base_runs = {s: c for s, c in curves.get(baseline, {}).items() if c}
    base = cost_by_seed(base_runs)
    base_final = {s: final_pass(c, final_points) for s, c in base_runs.items()}
    budget = statistics.fmean(c[-1]["samples"] for c in base_runs.values()) if base_runs else math.nan
    prm_runs = sum(1 for m, by in curves.items() if uses_prm(m) for c in by.values() if c)
    rows = []
    for m, by_seed in curves.items():
        runs = {s: c for s, c in by_seed.items() if c}
        hits = [first_reaching(c, target) for c in runs.values()]
        full, amortised = (collection_tokens, collection_tokens / max(prm_runs, 1)) if uses_prm(m) else (0, 0)
        reached = [h for h in hits if h is not None]
        finals = [final_pass(c, final_points) for c in runs.values()]
        costs = cost_by_seed(runs)
        pairs = {s: [(p["samples"], p["pass@1"]) for p in c] for s, c in runs.items()}
        rows.append({"method": m, "runs": len(finals), "reached": len(reached),
                     "samples_to_target": _mean_std([h["samples"] for h in reached]),
                     "samples_to_target_ci": bootstrap_ci(list(costs.values())),
                     "tokens_to_target": _mean_std([h["tokens"] + full for h in reached]),
                     "tokens_to_target_amortised": _mean_std([h["tokens"] + amortised for h in reached]),
                     "collection_tokens_charged": [full, amortised],
                     "final_pass@1": _mean_std(finals), "final_pass@1_ci": bootstrap_ci(finals),
                     "final_vs_baseline": (_paired_diff(runs, base_final, final_points) if m != baseline else
                                           (math.nan,) * 3),
                     "samples_ratio": (paired_ratio_ci(costs, base) if m != baseline and base else
                                       (math.nan, math.nan, math.nan)),
                     "budget_ratio": (budget_ratio_ci(pairs, base_final, budget) if base_final else
                                      (math.nan, math.nan, math.nan)),
                     "start_pass@1": _mean_std([c[0]["pass@1"] for c in runs.values()]),
                     "best_pass@1": _mean_std([max(p["pass@1"] for p in c) for c in runs.values()])})
    return rows


def _paired_diff(runs: dict[int, list[dict]], base_final: dict[int, float], final_points: int = 1
                 ) -> tuple[float, float, float]:
    """``(mean, lo, hi)`` of final pass@1 minus the baseline's, paired by seed (NaN: no shared seed)."""
    from hca.workflows.bootstrap import bootstrap_ci

    diffs = [final_pass(runs[s], final_points) - base_final[s] for s in sorted(set(runs) & set(base_final))]
    return (statistics.fmean(diffs), *bootstrap_ci(diffs)) if diffs else (math.nan,) * 3


def _ci(lo_hi: tuple[float, ...], fmt: str = ".3f") -> str:
    lo, hi = lo_hi[-2], lo_hi[-1]
    if math.isnan(lo):
        return "n/a"
    def f(x: float) -> str:
        return "∞" if math.isinf(x) else format(x, fmt)

    return f"[{f(lo)}, {f(hi)}]"


def _pm(ms: tuple[float, float], fmt: str = ".3f") -> str:
    return "n/a" if math.isnan(ms[0]) else f"{ms[0]:{fmt}} ± {ms[1]:{fmt}}"


def _ratio(r: tuple[float, float, float]) -> str:
    point = r[0]
    if math.isnan(point):
        return "n/a"
    return f"{'∞' if math.isinf(point) else format(point, '.2f')} {_ci(r, '.2f')}"


def _diff(r: tuple[float, float, float]) -> str:
    return "n/a" if math.isnan(r[0]) else f"{r[0]:+.3f} [{r[1]:+.3f}, {r[2]:+.3f}]"


def markdown(rows: list[dict], target: float, baseline: str = "grpo") -> str:
    from hca.workflows.report import md_table

    header = ["method", "runs reaching target", "RL samples to target", "95% CI", f"samples vs {baseline} (95% CI)",
              f"samples to {baseline}'s final / its budget (95% CI)", "tokens to target (M): PRM data in full",
              "amortised", "start pass@1", "final pass@1", "95% CI", f"final - {baseline}'s, paired (95% CI)",
              "best pass@1"]
    table = md_table(header, [[r["method"], f"{r['reached']}/{r['runs']}", _pm(r["samples_to_target"], ".0f"),
                               _ci(r["samples_to_target_ci"], ".0f"), _ratio(r["samples_ratio"]),
                               _ratio(r["budget_ratio"]),
                               _pm(tuple(x / 1e6 for x in r["tokens_to_target"]), ".2f"),
                               _pm(tuple(x / 1e6 for x in r["tokens_to_target_amortised"]), ".2f"),
                               _pm(r["start_pass@1"]), _pm(r["final_pass@1"]), _ci(r["final_pass@1_ci"]),
                               _diff(r["final_vs_baseline"]), _pm(r["best_pass@1"])] for r in rows])
    return (f"Target held-out pass@1: {target:.3f}. Mean ± std over seeds (samples and tokens: over the runs that "
            "reached it); 95% percentile-bootstrap intervals over seeds (samples: a run that never reached the "
            f"target counts as ∞; samples vs {baseline}: the paired ratio of mean samples to target; samples to "
            f"{baseline}'s final: the samples to reach {baseline}'s mean final pass@1 over its whole budget, the "
            "target redrawn in each resample). Tokens: every generated token (policy responses during RL, Monte "
            "Carlo prover rollouts, and for the PRM methods the PRM's collection: charged in full to each run, or "
            "amortised over this experiment's runs that reuse the PRM).\n\n" + table)


def plot(curves: dict[str, dict[int, list[dict]]], target: float, path: Path, rows: list[dict] | None = None) -> None:
    """Mean ± std over seeds of held-out pass@1 against RL samples, and against all generated tokens
    with the PRM's collection charged in full and amortised (``rows`` give each method's charge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charge = {r["method"]: r["collection_tokens_charged"] for r in rows or []}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), sharey=True)
    xlabels = ["RL responses sampled", "all generated tokens (M): PRM collection in full",
               "all generated tokens (M): PRM collection amortised"]
    for i, (m, by_seed) in enumerate(curves.items()):
        runs = [c for c in by_seed.values() if c]
        if not runs:
            continue
        xs = sorted({p["samples"] for c in runs for p in c})
        pts = [[p for c in runs for p in c if p["samples"] == x] for x in xs]
        mean = [statistics.fmean(p["pass@1"] for p in v) for v in pts]
        sd = [statistics.stdev([p["pass@1"] for p in v]) if len(v) > 1 else 0.0 for v in pts]
        toks = [statistics.fmean(p["tokens"] for p in v) for v in pts]
        full, amortised = charge.get(m, (0, 0))
        for ax, x in zip(axes, [xs, [(t + full) / 1e6 for t in toks], [(t + amortised) / 1e6 for t in toks]]):
            ax.plot(x, mean, "o-", ms=3, color=f"C{i}", label=f"{m} ({len(runs)} seeds)")
            ax.fill_between(x, [a - b for a, b in zip(mean, sd)], [a + b for a, b in zip(mean, sd)], color=f"C{i}",
                            alpha=0.12)
    for ax, xl in zip(axes, xlabels):
        ax.axhline(target, color="gray", ls="--", lw=1)
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out pass@1 (validation), mean ± std")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect_results(out: str, methods, seeds, rl_steps: int | None = None) -> dict[str, dict[int, list[dict]]]:
    """Each finished run's validation curve (a run still going, or killed, has ``[]``: it is not
    counted), up to ``rl_steps`` RL steps (None: all). The learning rate is constant and nothing
    else depends on the run's length, so a longer run cut at ``rl_steps`` is the run of that length."""
    from hca.workflows.report import read_metrics, validation_curve

    def curve(d: str) -> list[dict]:
        if not Path(finished_marker(d)).exists():
            return []
        return [p for p in validation_curve(read_metrics(d)) if rl_steps is None or p.get("rl_step", 0) <= rl_steps]

    return {m: {s: curve(run_dir(out, m, s)) for s in seeds} for m in methods}


def default_target(curves: dict[str, dict[int, list[dict]]], baseline: str = "grpo", final_points: int = 1) -> float:
    """The baseline's mean final pass@1 (what "reaching GRPO's final pass@1" means), or, without a
    baseline run, the mean start pass@1 + 0.10."""
    finals = [final_pass(c, final_points) for c in curves.get(baseline, {}).values() if c]
    if finals:
        return round(statistics.fmean(finals), 4)
    starts = [c[0]["pass@1"] for by in curves.values() for c in by.values() if c]
    return round(statistics.fmean(starts) + 0.10, 3) if starts else math.nan


DIAGNOSTICS = {
    "reward": "train reward",
    "zero_var_groups": "groups with no outcome signal",
    "adv_std": "token advantage std",
    "progress_abs_mean": "|step progress|",
    "weight_max": "largest entropy weight",
    "time_step": "seconds per RL step",
}
"""The ``train/`` figures :func:`training_diagnostics` averages over RL steps (why a method learns
as it does: how many groups carry no outcome signal, how large and noisy the credit is)."""


def training_diagnostics(out: str, methods, seeds, rl_steps: int | None = None) -> dict[str, dict[str, float]]:
    """Per method, the mean over RL steps (up to ``rl_steps``) and finished seeds of each
    :data:`DIAGNOSTICS` figure (NaN where a method does not log it, e.g. progress under GRPO)."""
    from hca.workflows.report import read_metrics

    res = {}
    for m in methods:
        done = [d for s in seeds if Path(finished_marker(d := run_dir(out, m, s))).exists()]
        rows = [r for d in done for r in read_metrics(d) if "train/reward" in r
                and (rl_steps is None or r.get("train/rl_step", 0) <= rl_steps)]
        res[m] = {k: (statistics.fmean(v) if (v := [r[f"train/{k}"] for r in rows if f"train/{k}" in r]) else math.nan)
                  for k in DIAGNOSTICS}
    return res


def diagnostics_markdown(diag: dict[str, dict[str, float]]) -> str:
    from hca.workflows.report import md_table

    return ("Training diagnostics, mean over RL steps and seeds:\n\n"
            + md_table(["method", *DIAGNOSTICS.values()],
                       [[m, *("n/a" if math.isnan(d[k]) else f"{d[k]:.3f}" for k in DIAGNOSTICS)]
                        for m, d in diag.items()]))


def main(argv=None) -> dict:
    from hca.data.regimes import REGIMES, get_regime

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regime", default="default", choices=sorted(REGIMES), help="task regime (hca.data.regimes)")
    ap.add_argument("--out", default=None, help="where the runs and the results go (default: <regime root>/experiment)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help="configs/rl/arithmetic_<method>.yaml or a variant of hca.workflows.experiment.VARIANTS")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="RL seeds")
    ap.add_argument("--target", type=float, default=None,
                    help="held-out pass@1 to reach (default: GRPO's mean final pass@1; without GRPO, start + 0.10)")
    ap.add_argument("--rl-steps", type=int, default=None,
                    help="RL steps per run (default: the regime's experiment_rl_steps); longer runs are cut there")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=YAML",
                    help="extra overrides of every run's config, e.g. trainer.max_steps=120")
    ap.add_argument("--final-points", type=int, default=2,
                    help="a run's final pass@1 is the mean of its last this many validation points (1: the last)")
    ap.add_argument("--max-parallel", type=int, default=None, help="runs side by side (default: the CPUs available)")
    ap.add_argument("--summary-only", action="store_true", help="only summarize runs that exist")
    ap.add_argument("--results-dir", default=None, help="where results.{md,json} and curves.png go (default: --out)")
    a = ap.parse_args(argv)
    import yaml

    reg = get_regime(a.regime)
    out_dir = a.out or f"{reg.root}/experiment"
    rl_steps = a.rl_steps or reg.experiment_rl_steps
    # two optimizer updates per RL step in the arithmetic configs (ppo_epochs 1 x 128 responses / mini-batches of 64)
    overrides = {"trainer.max_steps": 2 * rl_steps,
                 **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)}}
    plan_args = {"out": out_dir, "methods": a.methods, "seeds": a.seeds, "overrides": overrides, "regime": reg.name}
    if not a.summary_only:
        run_stages(experiment_stages(**plan_args), plan="hca.workflows.experiment:experiment_stages", plan_args=plan_args,
                   log_dir=f"{out_dir}/logs", max_parallel=a.max_parallel)
    from hca.workflows.report import collection_tokens

    curves = collect_results(out_dir, a.methods, a.seeds, rl_steps)
    target = a.target if a.target is not None else default_target(curves, final_points=a.final_points)
    try:
        ctok = collection_tokens(f"{reg.root}/collect/arithmetic")
    except (OSError, KeyError, ValueError):
        ctok = 0
    rows = summarize(curves, target, ctok, final_points=a.final_points)
    out = Path(a.results_dir or out_dir)
    out.mkdir(parents=True, exist_ok=True)
    diag = training_diagnostics(out_dir, a.methods, a.seeds, rl_steps)
    md = (f"Regime: {reg.name} ({reg.description}); {rl_steps} RL steps per run; final pass@1 = the mean of the last "
          f"{a.final_points} validation points.\n\n" + markdown(rows, target)) + "\n\n" + diagnostics_markdown(diag)
    from hca.data.trajectories import write_bytes_atomic

    write_bytes_atomic(out / "results.md", md.encode())
    write_bytes_atomic(out / "results.json", json.dumps({"regime": reg.name, "rl_steps": rl_steps, "final_points": a.final_points, "target": target, "collection_tokens": ctok,
                                                  "rows": rows, "diagnostics": diag, "curves": {m: {str(s): c for s, c in by.items()}
                                                                           for m, by in curves.items()}}, indent=1).encode())
    plot(curves, target, out / "curves.png", rows)
    print(md)
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'curves.png'}")
    return {"target": target, "rows": rows}


if __name__ == "__main__":
    main()
