"""What a collected dataset says: the end-of-collection summary, histograms (text and PNG), and
the first-error evidence of docs/collection.md (do labeled progress drops find the first wrong step?).

All figures are computed from the records; nothing here samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from hca.collection.labelling import ChunkStats
from hca.data.trajectories import Trajectory


def h0_values(records: Iterable[Trajectory]) -> list[float]:
    """V̂(h_0) once per problem (raw MC ratio from ``h0_count``, before any prover transform)."""
    seen: dict[str, float] = {}
    for r in records:
        seen.setdefault(r.problem_id, r.h0_count[0] / r.h0_count[1])
    return list(seen.values())


def progress_values(records: Iterable[Trajectory]) -> list[float]:
    """Every defined progress value ``P_k`` of every record."""
    return [p for r in records for p in r.progress if p is not None]


def text_histogram(values: Sequence[float], lo: float, hi: float, bins: int = 10, width: int = 40) -> str:
    """A fixed-range text histogram, one line per bin: ``[lo, hi)  count  ####``."""
    if not values:
        return "  (no values)"
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
    top = max(counts)
    lines = []
    for b, c in enumerate(counts):
        a, z = lo + (hi - lo) * b / bins, lo + (hi - lo) * (b + 1) / bins
        bar = "#" * (round(width * c / top) if top else 0)
        lines.append(f"  [{a:+.2f}, {z:+.2f}{']' if b == bins - 1 else ')'} {c:8d}  {bar}")
    return "\n".join(lines)


def save_histograms_png(path, progress: Sequence[float], h0: Sequence[float], title: str = "") -> None:
    """Two panels (progress P_k over all steps, V̂(h_0) over problems) into a PNG (Agg backend),
    written atomically."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].hist(progress, bins=21, range=(-1.05, 1.05), color="tab:blue")
    axes[0].set(title=f"progress P_k ({len(progress)} steps)", xlabel="P_k", ylabel="steps")
    axes[1].hist(h0, bins=11, range=(-0.05, 1.05), color="tab:green")
    axes[1].set(title=f"V̂(h_0) ({len(h0)} problems)", xlabel="V̂(h_0)", ylabel="problems")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = f"{path}.tmp.{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def summarize(records: Sequence[Trajectory]) -> dict:
    """Headline figures of a collection (None where undefined, e.g. a mean over nothing)."""
    h0, prog = h0_values(records), progress_values(records)
    return {
        "problems": len(h0), "responses": len(records), "outcome_mean": _mean([r.outcome for r in records]),
        "truncated": sum(r.truncated for r in records), "steps": sum(r.num_steps for r in records),
        "steps_mean": _mean([r.num_steps for r in records]),
        "fully_labeled_responses": sum(r.labeled_steps == r.num_steps for r in records),
        "progress_values": len(prog), "v_h0_mean": _mean(h0), "progress_mean": _mean(prog),
        "progress_negative_frac": _mean([float(p < 0) for p in prog]),
    }


def format_summary(s: dict, stats: ChunkStats | None, run_stats: ChunkStats | None, records: Sequence[Trajectory]) -> str:
    lines = [f"problems {s['problems']}  responses {s['responses']}  steps {s['steps']} "
             f"(mean {_fmt(s['steps_mean'], '.2f')})  outcome mean {_fmt(s['outcome_mean'])}  truncated {s['truncated']}",
             f"fully labeled responses {s['fully_labeled_responses']}  mean V̂(h_0) {_fmt(s['v_h0_mean'])}  "
             f"mean progress {_fmt(s['progress_mean'], '+.3f')}  negative progress {_fmt(s['progress_negative_frac'])}"]
    for name, st in (("all shards", stats), ("this run", run_stats)):
        if st is None:
            continue
        rate = _fmt(st.prefixes_labeled / st.seconds if st.seconds else None, ".1f")
        lines.append(f"{name}: prefixes labeled {st.prefixes_labeled} (unique {st.prefixes_unique}, deduped "
                     f"{st.prefixes_deduped}, skipped by first pit {st.prefixes_skipped_first_pit}); prover "
                     f"generations {st.prover_generations}; tokens policy {st.policy_tokens} prover {st.prover_tokens}; "
                     f"{st.seconds:.1f} s in label_chunk ({rate} labeled prefixes/s)")
        if st.prompts_skipped:
            lines.append(f"{name}: {st.prompts_skipped} problems skipped: prompt longer than the context "
                         "(prompt.long_prompts: skip)")
    lines.append("progress P_k over all labeled steps:")
    lines.append(text_histogram(progress_values(records), -1.0, 1.0, bins=10))
    lines.append("V̂(h_0) over problems:")
    lines.append(text_histogram(h0_values(records), 0.0, 1.0, bins=5))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ evidence
@dataclass
class FirstErrorEvidence:
    """Does the first clearly negative progress step coincide with the first wrong step?"""

    threshold: float  # a step is flagged when P_k <= threshold
    responses: int  # fully labeled responses with ground truth (step_correct) considered
    with_error: int  # responses with a wrong step (ground truth)
    flagged: int  # responses with a flagged step
    exact: int  # flagged, and the first flagged step is the first wrong step
    flag_before_error: int  # first flag precedes the first wrong step (or there is no wrong step)
    flag_after_error: int  # first flag comes after the first wrong step
    error_unflagged: int  # a wrong step, but no step flagged
    detectable: int = 0  # responses with a wrong step whose prefix before it has V >= -threshold (a drop that deep was possible)
    detectable_exact: int = 0  # ... of which the first flag is the first wrong step

    @property
    def precision(self) -> float | None:  # P(first flag == first error | flagged); None: nothing flagged
        return self.exact / self.flagged if self.flagged else None

    @property
    def recall(self) -> float | None:  # P(first flag == first error | an error exists); None: no error
        return self.exact / self.with_error if self.with_error else None

    @property
    def recall_detectable(self) -> float | None:  # recall where the value before the error allowed the drop
        return self.detectable_exact / self.detectable if self.detectable else None


def first_error_evidence(records: Iterable[Trajectory], threshold: float = -0.5) -> FirstErrorEvidence:
    """Compare, per response, the first step with ``P_k <= threshold`` to the first step with
    ``step_correct == False``. Only fully labeled responses with ground truth count."""
    ev = FirstErrorEvidence(threshold, 0, 0, 0, 0, 0, 0, 0)
    for r in records:
        if r.step_correct is None or r.labeled_steps != r.num_steps or r.num_steps == 0:
            continue
        ev.responses += 1
        err = next((k for k, ok in enumerate(r.step_correct) if not ok), None)
        flag = next((k for k, p in enumerate(r.progress) if p <= threshold), None)
        ev.with_error += err is not None
        ev.flagged += flag is not None
        if err is not None and r.values[err] >= -threshold:
            ev.detectable += 1
            ev.detectable_exact += flag == err
        if flag is not None and flag == err:
            ev.exact += 1
        elif flag is not None and (err is None or flag < err):
            ev.flag_before_error += 1
        elif flag is not None:
            ev.flag_after_error += 1
        elif err is not None:
            ev.error_unflagged += 1
    return ev
