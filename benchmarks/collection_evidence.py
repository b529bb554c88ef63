"""Evidence from a collected dataset (not a test): do prover progress labels find the first wrong
step, and how is V̂(h_0) distributed? Figures for docs/collection.md.

Reads a collection folder (default runs/collect/arithmetic, written by
``python train.py predict --config configs/collect/arithmetic.yaml``), validates it, and prints:

* the dataset: identity (policy, prover, settings), responses, accuracy, truncation, steps;
* V̂(h_0) over problems (raw MC ratio of ``h0_count``): mean, share at 0 and at 1, histogram;
* progress by ground-truth step class (arithmetic task: ``step_correct``): correct steps before the
  first error, the first wrong step, steps after it;
* first-error detection, per fully labeled response: the first step with ``P_k <= threshold`` is
  "flagged"; it is a hit when it is the first wrong step. Precision = hits / responses with a flag,
  recall = hits / responses with a wrong step; for several thresholds;
* writes ``evidence.json`` next to the manifest.

Run: ``python benchmarks/collection_evidence.py [--dir runs/collect/arithmetic]``.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from hca.collection.report import first_error_evidence, h0_values, text_histogram
from hca.data.trajectories import read_dataset, write_json_atomic

THRESHOLDS = (-0.25, -0.5, -0.75)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def step_classes(records) -> dict[str, list[float]]:
    """Progress values by ground-truth class: before the first error, at it, after it."""
    out = {"correct (before first error)": [], "first wrong step": [], "after first error": []}
    for r in records:
        if r.step_correct is None:
            continue
        err = next((k for k, ok in enumerate(r.step_correct) if not ok), None)
        for k, p in enumerate(r.progress):
            if p is None:
                continue
            key = ("correct (before first error)" if err is None or k < err else
                   "first wrong step" if k == err else "after first error")
            out[key].append(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="runs/collect/arithmetic", help="collection folder")
    args = ap.parse_args()
    m, recs = read_dataset(args.dir)
    ident = m["identity"]["module"]
    c = ident["collection"]
    n = len(recs)
    print(f"dataset {args.dir}: policy {ident['policy']['name']} ({ident['policy']['sha256'][:12]}), "
          f"prover {ident['prover']['name']} ({(ident['prover']['sha256'] or '')[:12]})")
    print(f"N={c['num_responses']} M={c['num_rollouts']} M_h0={c['num_rollouts_h0'] or c['num_rollouts']} "
          f"best_of_k={c['best_of_k']} first_pit={c['first_pit']} seed={ident['seed']}")
    print(f"{m['totals']['problems']} problems, {n} responses, outcome mean {sum(r.outcome for r in recs) / n:.3f}, "
          f"truncated {sum(r.truncated for r in recs)}, mean steps {sum(r.num_steps for r in recs) / n:.2f}, "
          f"fully labeled {sum(r.labeled_steps == r.num_steps for r in recs)}")

    h0 = h0_values(recs)
    h0_stats = {"problems": len(h0), "mean": statistics.fmean(h0), "median": statistics.median(h0),
                "frac_zero": sum(v == 0 for v in h0) / len(h0), "frac_one": sum(v == 1 for v in h0) / len(h0)}
    print(f"\nV̂(h_0) over {len(h0)} problems: mean {h0_stats['mean']:.3f}, median {h0_stats['median']:.3f}, "
          f"= 0: {h0_stats['frac_zero']:.3f}, = 1: {h0_stats['frac_one']:.3f}")
    print(text_histogram(h0, 0.0, 1.0, bins=10))

    classes = step_classes(recs)
    print("\nprogress P_k by ground-truth step class:")
    print(f"  {'class':<30} {'steps':>7} {'mean':>7} {'P<=-0.5':>8} {'P>=0':>7}")
    class_stats = {}
    for name, vals in classes.items():
        if not vals:
            continue
        s = {"steps": len(vals), "mean": statistics.fmean(vals), "frac_le_-0.5": sum(v <= -0.5 for v in vals) / len(vals),
             "frac_ge_0": sum(v >= 0 for v in vals) / len(vals)}
        class_stats[name] = s
        print(f"  {name:<30} {s['steps']:7d} {s['mean']:+7.3f} {s['frac_le_-0.5']:8.3f} {s['frac_ge_0']:7.3f}")

    print("\nfirst clearly negative progress step vs first wrong step (fully labeled responses):")
    print(f"  {'threshold':>9} {'resp':>6} {'w/ error':>8} {'flagged':>8} {'hits':>6} {'precision':>9} {'recall':>7} "
          f"{'early':>6} {'late':>6} {'missed':>6} {'detectable':>10} {'recall(det)':>11}")
    detect = {}
    for t in THRESHOLDS:
        ev = first_error_evidence(recs, t)
        detect[str(t)] = {**ev.__dict__, "precision": ev.precision, "recall": ev.recall,
                          "recall_detectable": ev.recall_detectable}
        print(f"  {t:9.2f} {ev.responses:6d} {ev.with_error:8d} {ev.flagged:8d} {ev.exact:6d} {_f(ev.precision):>9} "
              f"{_f(ev.recall):>7} {ev.flag_before_error:6d} {ev.flag_after_error:6d} {ev.error_unflagged:6d} "
              f"{ev.detectable:10d} {_f(ev.recall_detectable):>11}")
    print("  (early: the flag precedes the first error or there is none; late: it follows it; missed: an error, no flag;\n"
          "   detectable: errors whose prefix value V(h) before them is >= -threshold, so a drop to the threshold was possible)")
    out = Path(args.dir) / "evidence.json"
    write_json_atomic(out, {"dataset": args.dir, "responses": n, "h0": h0_stats, "progress_by_class": class_stats,
                            "first_error_detection": detect})
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
