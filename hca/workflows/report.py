"""The quickstart report: what the pipeline measured, in one Markdown file, PNG plots and one
self-contained HTML page (plots embedded).

    python -m hca.workflows.report runs/quickstart  # rebuild from what the stages wrote

Reads (paths of the quickstart layout): ``eval.json`` (held-out test evaluation), ``rl/<method>/logs``
(CSV metrics of each RL run), the collection manifest, the PRM's CSV metrics; samples a few
responses from the SFT policy to show the credit (:mod:`hca.workflows.credit_view`). Writes ``report.md``,
``report.html``, ``curves.png``, ``credit.png`` and ``credit.html``.
"""
from __future__ import annotations

import base64
import csv
import glob
import json
from pathlib import Path

from hca.workflows.credit_view import CSS, credit_html, credit_png, sample_credit

COLLECT_DIR = "runs/collect/arithmetic"
PRM_DIR = "runs/prm/arithmetic"
POLICY = "runs/sft/policy/model"
TEST_FILE = "runs/data/arithmetic/test.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Rows of the run's ``logs/version_*/metrics.csv``, empty cells dropped. A run resumed from a
    checkpoint logs each segment in a new version: the versions are joined in order, a row of a
    later version replacing the earlier rows of the same step (the steps a killed segment logged
    after its last checkpoint are redone by the next). A version that starts where the first one
    did (or before) is a fresh run: the versions before it are dropped."""
    files = sorted(glob.glob(str(Path(run_dir) / "logs" / "version_*" / "metrics.csv")),
                   key=lambda f: int(Path(f).parent.name.split("_")[-1]))
    rows: list[dict[str, float]] = []
    for f in files:
        with open(f) as fh:
            seg = [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(fh)]
        steps = [r["step"] for r in seg if "step" in r]
        if not steps:
            continue
        first, start = min(steps), min((r["step"] for r in rows if "step" in r), default=None)
        rows = [] if start is None or first <= start else [r for r in rows if r.get("step", -1) < first]
        rows += seg
    return rows


def validation_curve(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    """Validation points in order of RL samples: ``samples``, ``tokens``, ``pass@1`` (and the rest);
    one point per sample count (the last logged)."""
    pts = [{k.removeprefix("val/"): v for k, v in r.items() if k.startswith("val/")} for r in rows if "val/pass@1" in r]
    by_samples = {p["samples"]: p for p in pts if "samples" in p}
    return [by_samples[k] for k in sorted(by_samples)]


def collection_tokens(collect_dir: str = COLLECT_DIR) -> int:
    """Tokens generated to collect the PRM's training data (policy samples + prover rollouts)."""
    m = json.loads((Path(collect_dir) / "manifest.json").read_text())
    st = m["totals"]["collection_stats"]
    return int(st["policy_tokens"]) + int(st["prover_tokens"])


def plot_curves(curves: dict[str, list[dict]], offsets: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in curves.items():
        if not pts:
            continue
        axes[0].plot([p["samples"] for p in pts], [p["pass@1"] for p in pts], "o-", label=name)
        axes[1].plot([(p["tokens"] + offsets.get(name, 0)) / 1e6 for p in pts], [p["pass@1"] for p in pts], "o-",
                     label=name)
    for ax, xl in zip(axes, ["RL responses sampled", "all generated tokens (millions), prover rollouts included"]):
        ax.set_xlabel(xl)
        ax.set_ylabel("held-out pass@1 (validation)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("sample efficiency")
    axes[1].set_title("token cost (HCA pays for its labels)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; floats with 3 decimals, anything else as ``str``."""
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                     + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]) + "\n"


def _md_to_html_table(md: str) -> str:
    lines = [ln for ln in md.strip().splitlines() if not ln.startswith("| ---") and not ln.startswith("|---")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def credit_rows(prm_dir: str, policy: str, test_file: str, rl_config: str, num_problems: int = 24, seed: int = 0,
                name: str = "hca"):
    """Responses of the SFT policy with their GRPO credit and the credit of ``rl_config`` (shown as ``name``)."""
    import yaml

    from hca.models.loading import load_causal_lm, load_tokenizer
    from hca.prm.scorer import PRMScorer
    from hca.data.problems import load_problems
    from hca.rl.batch import CreditConfig
    from hca.rollout import HFRolloutEngine

    cfg = yaml.safe_load(Path(rl_config).read_text())["model"]["init_args"]
    credits = {"grpo": CreditConfig(cfg["credit"]["estimator"], 0.0, 0.0), name: CreditConfig(**cfg["credit"])}
    problems, _ = load_problems(test_file, limit=num_problems)
    tok = load_tokenizer(policy)
    engine = HFRolloutEngine(load_causal_lm(policy, tokenizer=tok).requires_grad_(False).eval(), tok)
    return sample_credit(engine, tok, problems, credits, PRMScorer(prm_dir, device="cpu"), cfg.get("delimiter", "\n"),
                         group_size=cfg["ppo"]["group_size"], seed=seed)


def write_report(out_dir: str = "runs/quickstart", methods: tuple[str, ...] = ("grpo", "progress_only"),
                 collect_dir: str = COLLECT_DIR, prm_dir: str = PRM_DIR, policy: str = POLICY,
                 test_file: str = TEST_FILE) -> dict[str, str]:
    out = Path(out_dir)
    sections: list[tuple[str, str, str | None]] = []  # (title, markdown body, png path)
    ev = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else {}
    if ev:
        n = max(int(k.split("@")[1]) for r in ev.values() for k in r if k.startswith("pass@"))
        ks = sorted({4, n})
        rows = [[name, r["greedy_pass@1"], r["pass@1"], *[r.get(f"pass@{k}", float("nan")) for k in ks],
                 r.get("maj@4", float("nan"))] for name, r in ev.items()]
        first = next(iter(ev.values()))
        sections.append(("Held-out test accuracy", f"{first['problems']} test problems, {n} samples each at T = 1 "
                         "(pass@k unbiased; greedy is one deterministic answer).\n\n"
                         + md_table(["checkpoint", "greedy", "pass@1", *[f"pass@{k}" for k in ks], "maj@4"], rows), None))

    curves = {m: validation_curve(read_metrics(out / "rl" / m)) for m in methods}
    try:
        ctok = collection_tokens(collect_dir)
    except (OSError, KeyError, ValueError):
        ctok = 0
    offsets = {m: (ctok if m != "grpo" and "entropy" not in m else 0) for m in methods}
    if any(curves.values()):
        png = out / "curves.png"
        plot_curves(curves, offsets, png)
        rows = [[m, pts[0]["pass@1"], pts[-1]["pass@1"], max(p["pass@1"] for p in pts), int(pts[-1]["samples"]),
                 f"{(pts[-1]['tokens'] + offsets[m]) / 1e6:.2f}M"] for m, pts in curves.items() if pts]
        sections.append(("Learning curves", "Held-out validation pass@1 during RL, against RL responses sampled and "
                         f"against all generated tokens; the first point of each curve is the SFT policy (the step-progress methods pay {ctok / 1e6:.2f}M tokens of "
                         "policy samples and prover rollouts for the PRM's training data).\n\n"
                         + md_table(["method", "start", "final", "best", "RL responses", "all tokens"], rows), str(png)))

    prm = [r for r in read_metrics(prm_dir) if "val/value_mse" in r]
    if prm:
        last = prm[-1]
        keys = ["value_mse", "progress_mse", "progress_spearman", "harmful_auroc", "outcome_auroc", "outcome_pair_acc",
                "first_error_f1_value", "first_error_f1_progress", "ece"]
        sections.append(("Progress PRM (validation)", md_table(["metric", "value"], [[k, last[f"val/{k}"]] for k in keys
                                                                                     if f"val/{k}" in last]), None))
    try:
        tot = json.loads((Path(collect_dir) / "manifest.json").read_text())["totals"]
        sections.append(("Collection", md_table(["figure", "value"], [
            ["problems", int(tot["problems"])], ["responses", int(tot["responses"])], ["steps labeled", int(tot["steps"])],
            ["mean V(h_0)", tot["v_h0_mean"]], ["mean progress", tot["progress_mean"]],
            ["negative-progress steps", tot["progress_negative_frac"]], ["seconds", tot["collection_stats"]["seconds"]]]),
            None))
    except (OSError, KeyError, ValueError):
        pass

    credit_section = None
    if Path(prm_dir, "model", "prm_config.json").exists() and Path(policy).exists():
        name = next((m for m in reversed(methods) if m != "grpo"), "hca")  # the hierarchical method shown
        rl_cfg = out / "rl" / name / "config.yaml"
        rows = credit_rows(f"{prm_dir}/model", policy, test_file,
                           str(rl_cfg if rl_cfg.exists() else f"configs/rl/arithmetic_{name}.yaml"), name=name)
        if rows:
            credit_png(rows, str(out / "credit.png"))
            frag = credit_html(rows)
            (out / "credit.html").write_text(f"<!doctype html><meta charset='utf-8'><style>{CSS}</style>{frag}")
            credit_section = frag
            sections.append(("Where the credit goes", "Responses of the SFT policy to test problems (one right, one "
                             "wrong per problem), with the advantage every token would get in one RL step under GRPO "
                             f"and under {name}. Full page with hover details: `credit.html`.", str(out / "credit.png")))

    md = ["# hca quickstart report", ""]
    for title, body, png in sections:
        md += [f"## {title}", "", body, ""] + ([f"![{title}]({Path(png).name})", ""] if png else [])
    (out / "report.md").write_text("\n".join(md))
    body = ["<h1>hca quickstart report</h1>"]
    for title, text, png in sections:
        body.append(f"<h2>{title}</h2>")
        for para in text.split("\n\n"):
            body.append(_md_to_html_table(para) if para.lstrip().startswith("|") else f"<p>{para}</p>")
        if title == "Where the credit goes" and credit_section:
            body.append(credit_section)
        elif png:
            body.append(_img(Path(png)))
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>hca report</title>"
                                     f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html")}


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m hca.workflows.report",
                                 description="Rebuild a quickstart's report from what its stages wrote.")
    ap.add_argument("out_dir", nargs="?", default="runs/quickstart", help="the quickstart's folder (default: %(default)s)")
    print(write_report(ap.parse_args(argv).out_dir))


if __name__ == "__main__":
    main()
