"""ProcessBench (Zheng et al. 2024; Qwen): find the earliest wrong step of a solution.

Data: ``<shared data>/processbench/{gsm8k,math,olympiadbench,omnimath}.json`` (one JSON array per
split; see ``../shared/data/README.md``), where ``<shared data>`` is ``$HCA_SHARED_DATA`` or
``<repo>/../shared/data`` (``<repo>`` holds ``hca/``). Each item has ``id``, ``generator``,
``problem``, ``steps`` (list of paragraphs), ``final_answer_correct`` and ``label`` (0-based index of
the earliest wrong step, ``-1`` when every step is right).

Evaluation of a PRM (:func:`evaluate_prm`): the response is the steps joined with ``"\\n\\n"``; the
steps are scored exactly as given (as character spans, each non-last step including its
``"\\n\\n"``, even when a step itself contains a blank line), the prompt is the problem in the
format the PRM was trained on (the export's ``prompt_format``: its placeholder question replaced,
:func:`hca.data.prompts.render_like`), or in ``template`` when given, or in the plain default format
when the export records none. The predicted earliest error is the first step ``k`` whose value
``f(h_{k+1}) < threshold`` (``-1`` if none). The score is ProcessBench's F1: the harmonic mean of
the accuracy on erroneous samples (predicted index == label) and on correct samples (predicted
``-1``) (:func:`hca.prm.metrics.f1_from_counts`).

    python -m hca.evaluation.processbench --prm runs/prm/arithmetic/model --split gsm8k --threshold 0.5 --limit 100
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")
JOIN = "\n\n"


@dataclass(frozen=True)
class ProcessBenchItem:
    id: str  # e.g. "gsm8k-0"
    generator: str  # model that wrote the solution
    problem: str  # problem statement
    steps: tuple[str, ...]  # [K] solution paragraphs
    final_answer_correct: bool  # the solution's final answer is right
    label: int  # 0-based index of the earliest wrong step, -1: none


def data_dir() -> Path:
    """The shared data folder (``$HCA_SHARED_DATA`` overrides the repo-relative default)."""
    env = os.environ.get("HCA_SHARED_DATA")
    # hca/evaluation/processbench.py -> the repository -> its sibling shared/data
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def load_processbench(split: str, root: str | os.PathLike | None = None) -> list[ProcessBenchItem]:
    """All items of a split; a malformed item raises ``ValueError`` naming the file and the item index."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(root) if root is not None else data_dir()
    path = path / "processbench" / f"{split}.json"
    if not path.exists():
        raise FileNotFoundError(f"ProcessBench file not found: {path} (set HCA_SHARED_DATA to the shared data folder)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON array of items, got {type(raw).__name__}")
    out = []
    for i, r in enumerate(raw):
        try:
            steps = r["steps"]
            if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps):
                raise ValueError("steps must be a non-empty list of non-empty strings")
            label = r["label"]
            if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < len(steps):
                raise ValueError(f"label {label!r} is not -1 or a step index below {len(steps)}")
            out.append(ProcessBenchItem(str(r["id"]), str(r.get("generator", "")), str(r["problem"]), tuple(steps),
                                        bool(r["final_answer_correct"]), label))
        except (KeyError, TypeError, ValueError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{path}: item {i}: {what}") from None
    return out


def response_and_spans(steps: tuple[str, ...] | list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The steps joined with ``"\\n\\n"`` and each step's span (non-last steps include the join)."""
    spans, at = [], 0
    for k, s in enumerate(steps):
        end = at + len(s) + (len(JOIN) if k < len(steps) - 1 else 0)
        spans.append((at, end))
        at = end
    return JOIN.join(steps), spans


def predicted_errors(step_values: list[list[float]], threshold: float) -> list[int]:
    """First step whose value is below ``threshold`` (``-1``: none), per item (values of h_1..h_K)."""
    return [next((k for k, v in enumerate(vals) if v < threshold), -1) for vals in step_values]


def evaluate_prm(scorer, split: str, threshold: float = 0.5, limit: int | None = None, template: str | None = None,
                 root: str | os.PathLike | None = None) -> dict:
    """ProcessBench F1 of a :class:`hca.prm.scorer.PRMScorer` on one split (module docstring)."""
    items, values = score_items(scorer, split, limit, template, root)
    return f1_at(items, values, threshold, split)


def score_items(scorer, split: str, limit: int | None = None, template: str | None = None,
                root: str | os.PathLike | None = None) -> tuple[list[ProcessBenchItem], list[list[float]]]:
    """``(items, values)``: the first ``limit`` items of ``split`` and the PRM's values of
    ``h_0 .. h_K`` for each (one scoring pass; :func:`f1_at` then reads any threshold)."""
    from hca.data.prompts import render_like

    items = load_processbench(split, root)[:limit]
    if template is not None:
        prompts = [template.format(question=it.problem) for it in items]
    else:
        fmt = getattr(scorer, "prompt_format", None)
        prompts = [render_like(fmt, it.problem) for it in items]
    pairs = [response_and_spans(it.steps) for it in items]
    return items, scorer.values_at_spans(prompts, [r for r, _ in pairs], [s for _, s in pairs])


def f1_at(items: list[ProcessBenchItem], values: list[list[float]], threshold: float, split: str = "") -> dict:
    """ProcessBench's F1 of values from :func:`score_items` at ``threshold``."""
    from hca.prm.metrics import f1_from_counts, first_error_counts

    pred = predicted_errors([v[1:] for v in values], threshold)
    truth = [it.label for it in items]
    counts = first_error_counts(torch.tensor(pred), torch.tensor(truth)).tolist()
    return {"split": split, "threshold": threshold, "items": len(items), **f1_from_counts(counts),
            "counts": dict(zip(("erroneous", "erroneous_hit", "correct", "correct_hit"), counts))}


def main(argv=None) -> None:
    from hca.prm.scorer import PRMScorer

    ap = argparse.ArgumentParser(description="ProcessBench F1 of a PRM export folder")
    ap.add_argument("--prm", required=True, help="PRM export folder")
    ap.add_argument("--split", nargs="+", default=list(SPLITS), choices=SPLITS, help="splits to evaluate")
    ap.add_argument("--threshold", type=float, default=0.5, help="a step with value below this is the predicted error")
    ap.add_argument("--limit", type=int, default=None, help="first items of each split")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    scorer = PRMScorer(args.prm, device=args.device, batch_size=args.batch_size)
    res = [evaluate_prm(scorer, s, args.threshold, args.limit) for s in args.split]
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
