"""The credit view shows the very advantages an RL step trains on (uniform per response under GRPO,
moving with progress and entropy under HCA); the report renders tables, curves and an HTML page."""
import csv
import json

import torch

from hca.workflows.credit_view import credit_html, credit_png, sample_credit
from hca.models.loading import char_tokenizer, load_causal_lm
from hca.data.problems import Problem
from hca.workflows.report import validation_curve, read_metrics, write_report
from hca.rl.batch import CreditConfig
from hca.rollout import HFRolloutEngine
from hca.rl.scoring import CallableScorer

TINY = ("tiny-llama:hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
        "num_key_value_heads=1,max_position_embeddings=64")


def test_credit_view_shows_training_advantages(tmp_path):
    torch.manual_seed(0)
    tok = char_tokenizer(list("12\n"))
    engine = HFRolloutEngine(load_causal_lm(TINY, tokenizer=tok).eval(), tok)
    problems = [Problem(id=f"q{i}", prompt=f"Q:{1 + i % 2}\n", answer=str(1 + i % 2), task="arithmetic") for i in range(6)]
    credits = {"grpo": CreditConfig("grpo", 0.0, 0.0), "hca": CreditConfig("grpo", 1.0, 1.0)}
    scorer = CallableScorer(lambda prompt, prefix: 0.2 + 0.1 * prefix.count("1") % 0.6)
    rows = sample_credit(engine, tok, problems, credits, scorer, "\n", group_size=8, max_new_tokens=6, seed=0)
    assert rows and any(r.correct for r in rows) and any(not r.correct for r in rows)
    for r in rows:
        g, h = r.advantages["grpo"], r.advantages["hca"]
        assert len(g) == len(h) == len(r.tokens) == len(r.step_index) == len(r.entropy)
        assert max(g) - min(g) < 1e-6 and (g[0] > 0) == r.correct  # GRPO: one advantage per response, its sign = outcome
        assert len(r.progress) == len(r.values) == max(r.step_index) + 1
        assert abs(sum(r.progress) - ((1.0 if r.correct else 0.0) - r.values[0])) < 1e-5  # telescopes to R - f(h_0)
    assert any(max(r.advantages["hca"]) - min(r.advantages["hca"]) > 1e-4 for r in rows)  # HCA moves credit within
    page = credit_html(rows)
    assert page.count('class="resp"') == len(rows) and "P=" in page and "title=\"A=" in page
    credit_png(rows, str(tmp_path / "credit.png"))
    assert (tmp_path / "credit.png").stat().st_size > 1000


def _write_run(run_dir, points):
    path = run_dir / "logs" / "version_0"
    path.mkdir(parents=True)
    keys = ["epoch", "step", "train/reward", "val/pass@1", "val/samples", "val/tokens"]
    with open(path / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        for step, (samples, p1) in enumerate(points):
            w.writerow({"epoch": 0, "step": step, "train/reward": 0.5})
            w.writerow({"epoch": 0, "step": step, "val/pass@1": p1, "val/samples": samples, "val/tokens": samples * 30})


def test_report_renders_tables_and_curves(tmp_path):
    out = tmp_path / "qs"
    _write_run(out / "rl" / "grpo", [(0, 0.40), (256, 0.45), (512, 0.50)])
    _write_run(out / "rl" / "hca", [(0, 0.40), (256, 0.50), (512, 0.55)])
    ev = {name: {"checkpoint": name, "problems": 16, "greedy_pass@1": 0.5, "pass@1": p, "pass@4": 0.7, "maj@4": 0.6,
                 "pass@8": 0.8} for name, p in [("sft", 0.4), ("grpo", 0.5), ("hca", 0.55)]}
    (out / "eval.json").write_text(json.dumps(ev))
    assert [p["samples"] for p in validation_curve(read_metrics(out / "rl" / "hca"))] == [0, 256, 512]
    paths = write_report(str(out), collect_dir=str(tmp_path / "none"), prm_dir=str(tmp_path / "none"))
    md = open(paths["markdown"]).read()
    assert "| hca | 0.500 | 0.550 |" in md and "| grpo | 0.400 | 0.500 | 0.500 | 512 |" in md
    assert (out / "curves.png").stat().st_size > 1000 and "![Learning curves](curves.png)" in md
    page = open(paths["html"]).read()
    assert "<table>" in page and "data:image/png;base64," in page


def test_read_metrics_joins_resumed_versions(tmp_path):
    """A resumed run logs a new version per segment: joined in order, the later segment's rows
    replacing the steps the killed one logged after its last checkpoint; a fresh rerun replaces all."""
    import csv

    def version(i, rows):
        d = tmp_path / "logs" / f"version_{i}"
        d.mkdir(parents=True)
        with open(d / "metrics.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, ["step", "val/pass@1", "val/samples"])
            w.writeheader()
            w.writerows(rows)

    version(0, [{"step": 0, "val/pass@1": .1, "val/samples": 0}, {"step": 20, "val/pass@1": .2, "val/samples": 1280},
                {"step": 40, "val/pass@1": .9, "val/samples": 2560}])  # killed after step 40; checkpoint at 20
    version(1, [{"step": 40, "val/pass@1": .3, "val/samples": 2560}, {"step": 60, "val/pass@1": .4, "val/samples": 3840}])
    assert [(p["samples"], p["pass@1"]) for p in validation_curve(read_metrics(tmp_path))] == [
        (0, .1), (1280, .2), (2560, .3), (3840, .4)]
    version(2, [{"step": 0, "val/pass@1": .5, "val/samples": 0}])  # a fresh run of the same folder
    assert [(p["samples"], p["pass@1"]) for p in validation_curve(read_metrics(tmp_path))] == [(0, .5)]
