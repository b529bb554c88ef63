"""The multi-seed experiment: one run per (method, seed) with the seed everywhere it lives, and an
honest summary (runs that never reach the target are counted, not given a cost)."""
import math

import pytest
import yaml

from hca.workflows.experiment import experiment_stages, first_reaching, markdown, summarize


def curve(points, tokens_per_sample=30):
    return [{"samples": s, "tokens": s * tokens_per_sample, "pass@1": p} for s, p in points]


def test_summary_by_hand():
    curves = {
        "grpo": {0: curve([(0, .2), (100, .25), (200, .31)]), 1: curve([(0, .2), (100, .22), (200, .24)])},
        "hca": {0: curve([(0, .2), (100, .32), (200, .35)]), 1: curve([(0, .2), (100, .30), (200, .40)])},
    }
    assert first_reaching(curves["grpo"][0], 0.30)["samples"] == 200 and first_reaching(curves["grpo"][1], 0.30) is None
    rows = {r["method"]: r for r in summarize(curves, target=0.30, collection_tokens=1000)}
    g, h = rows["grpo"], rows["hca"]
    assert (g["reached"], g["runs"]) == (1, 2) and g["samples_to_target"] == (200, 0.0)  # the miss gets no cost
    assert g["tokens_to_target"] == (6000, 0.0)  # no collection cost for GRPO
    assert (h["reached"], h["samples_to_target"]) == (2, (100, 0.0)) and h["tokens_to_target"] == (3000 + 1000, 0.0)
    assert h["final_pass@1"][0] == pytest.approx(0.375) and h["final_pass@1"][1] == pytest.approx(math.sqrt(2 * .025 ** 2))
    md = markdown(list(rows.values()), 0.30)
    assert "| grpo | 1/2 | 200 ± 0 | [200, ∞] | n/a |" in md and "| hca | 2/2 | 100 ± 0 | [100, 100] |" in md
    assert g["samples_to_target_ci"] == (200, math.inf)  # one seed missed: open above
    # hca vs grpo, paired by seed: grpo's mean cost is inf (seed 1 missed), so there is no ratio to show
    assert all(math.isnan(x) for x in h["samples_ratio"]) and "| hca | 2/2 | 100 ± 0 | [100, 100] | n/a |" in md
    both = {"grpo": {0: curve([(0, .2), (200, .31)]), 1: curve([(0, .2), (200, .30)])}, "hca": curves["hca"]}
    hb = {r["method"]: r for r in summarize(both, 0.30, 0)}["hca"]
    assert hb["samples_ratio"] == (0.5, 0.5, 0.5) and "| 0.50 [0.50, 0.50] |" in markdown([hb], 0.30)
    lo, hi = h["final_pass@1_ci"]
    assert lo <= h["final_pass@1"][0] <= hi
    none = summarize({"x": {0: curve([(0, .1), (10, .1)])}}, 0.5, 0)[0]
    assert none["reached"] == 0 and math.isnan(none["samples_to_target"][0]) and "n/a" in markdown([none], 0.5)


def test_stages_put_the_seed_everywhere(tmp_path):
    stages = experiment_stages(out=str(tmp_path), methods=["grpo", "hca"], seeds=[3])
    assert [s.name for s in stages] == ["grpo-seed3", "hca-seed3"] and {s.group for s in stages} == {"rl"}
    from hca.workflows.experiment import run_dir, run_overrides
    from hca.workflows.pipeline import derived_config

    d = run_dir(str(tmp_path), "hca", 3)
    cfg = yaml.safe_load(open(derived_config("configs/rl/arithmetic_hca.yaml", d, run_overrides(3))))
    assert cfg["seed_everything"] == cfg["model"]["init_args"]["seed"] == cfg["data"]["init_args"]["seed"] == 3
    assert cfg["model"]["init_args"]["export_dir"] == f"{d}/model"


def test_amortised_collection_budget_ratio_and_default_target():
    from hca.workflows.experiment import default_target

    curves = {
        "grpo": {0: curve([(0, .2), (100, .25), (200, .30)]), 1: curve([(0, .2), (100, .28), (200, .30)])},
        "hca": {0: curve([(0, .2), (100, .32), (200, .35)]), 1: curve([(0, .2), (100, .30), (200, .40)])},
        "progress_only": {0: curve([(0, .2), (100, .30), (200, .31)]), 1: []},  # seed 1 not run yet
    }
    assert default_target(curves) == pytest.approx(0.30)  # GRPO's mean final pass@1
    assert default_target({"hca": curves["hca"]}) == pytest.approx(0.30)  # no GRPO: start 0.2 + 0.10
    rows = {r["method"]: r for r in summarize(curves, target=0.30, collection_tokens=3000)}
    h, p, g = rows["hca"], rows["progress_only"], rows["grpo"]
    # 3 runs reuse the PRM (hca x 2, progress_only x 1): 1000 tokens each when amortised, 3000 in full
    assert h["tokens_to_target"] == (3000 + 3000, 0.0) and h["tokens_to_target_amortised"] == (3000 + 1000, 0.0)
    assert p["tokens_to_target_amortised"] == (3000 + 1000, 0.0) and g["tokens_to_target_amortised"] == (6000, 0.0)
    assert h["budget_ratio"] == (0.5, 0.5, 0.5)  # both seeds reach GRPO's final 0.30 at half its 200 samples
    assert h["final_vs_baseline"] == pytest.approx((0.075, 0.05, 0.10))  # seeds: +0.05, +0.10
    assert math.isnan(g["final_vs_baseline"][0]) and p["final_vs_baseline"][0] == pytest.approx(0.01)  # seed 0 only
    assert g["budget_ratio"] == (1.0, 1.0, 1.0)  # GRPO reaches its own final at the end
    md = markdown(list(rows.values()), 0.30)
    assert "| hca | 2/2 | 100 ± 0 | [100, 100] | 0.50 [0.50, 0.50] | 0.50 [0.50, 0.50] | 0.01 ± 0.00 | 0.00 ± 0.00 |" in md
    assert "| +0.075 [+0.050, +0.100] |" in md


def test_experiment_stages_take_the_regime(tmp_path):
    from hca.workflows.experiment import run_dir, run_overrides

    stages = experiment_stages(out=str(tmp_path), methods=["grpo"], seeds=[0], regime="sparse")
    assert len(stages) == 1
    from hca.workflows.pipeline import derived_config

    cfg = yaml.safe_load(open(derived_config("configs/rl/arithmetic_grpo.yaml", run_dir(str(tmp_path), "grpo", 0),
                                             run_overrides(0), "sparse")))
    assert cfg["model"]["init_args"]["policy"] == "runs/sparse/sft/policy/model"
    assert cfg["model"]["init_args"]["sampling"]["max_new_tokens"] == 128
    assert cfg["data"]["init_args"]["num_val"] == 512 and cfg["trainer"]["val_check_interval"] == 10


def test_summary_only_writes_tables_diagnostics_and_plot(tmp_path):
    """The experiment's own output path on written metrics (two methods, two seeds, CSVs as the
    RL module logs them): results.md with both tables, results.json, the three-panel plot."""
    import csv
    import json

    from hca.workflows.experiment import main

    def write(method, seed, finals):
        d = tmp_path / method / f"seed{seed}" / "logs" / "version_0"
        d.mkdir(parents=True)
        rows = []
        for step, p in enumerate(finals):
            rows.append({"step": step, "val/pass@1": p, "val/samples": step * 128, "val/tokens": step * 128 * 30})
            rows.append({"step": step, "train/reward": 0.2 + 0.01 * step, "train/zero_var_groups": 0.5,
                         "train/adv_std": 1.0, "train/weight_max": 1.0, "train/time_step": 1.0,
                         **({"train/progress_abs_mean": 0.1} if method == "hca" else {})})
        (d.parents[1] / "model").mkdir()
        (d.parents[1] / "model" / "config.json").write_text("{}")  # finished: exported
        keys = sorted({k for r in rows for k in r})
        with open(d / "metrics.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, keys)
            w.writeheader()
            w.writerows(rows)

    for s in (0, 1):
        write("grpo", s, [0.2, 0.25, 0.3])
        write("hca", s, [0.2, 0.3, 0.35])
    write("hca", 2, [0.2, 0.1])
    (tmp_path / "hca" / "seed2" / "model" / "config.json").unlink()  # still running: not counted
    res = main(["--out", str(tmp_path), "--methods", "grpo", "hca", "--seeds", "0", "1", "2", "--summary-only",
                "--final-points", "1"])
    assert res["target"] == pytest.approx(0.3)
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["hca"]["runs"] == 2
    assert rows["hca"]["budget_ratio"] == (0.5, 0.5, 0.5) and rows["hca"]["samples_ratio"][0] == pytest.approx(0.5)
    md = (tmp_path / "results.md").read_text()
    assert "Regime: default" in md and "groups with no outcome signal" in md
    assert "| grpo | 0.210 | 0.500 | 1.000 | n/a |" in md and "| hca | 0.210 | 0.500 | 1.000 | 0.100 |" in md
    assert json.loads((tmp_path / "results.json").read_text())["diagnostics"]["hca"]["progress_abs_mean"] == pytest.approx(0.1)
    assert (tmp_path / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("variant", sorted(__import__("hca.workflows.experiment", fromlist=["VARIANTS"]).VARIANTS))
def test_every_variant_instantiates_with_its_settings(variant, tmp_path, monkeypatch):
    """A variant is its base config plus its overrides: every key exists where it is set, and the
    RL module gets exactly those credit / scorer settings."""
    from pathlib import Path

    from hca.workflows.cli import main
    from hca.workflows.experiment import VARIANTS, method_config, run_overrides, uses_prm
    from hca.workflows.pipeline import derived_config

    path, extra = method_config(variant)
    assert path == f"configs/rl/arithmetic_{VARIANTS[variant][0]}.yaml" and extra == VARIANTS[variant][1]
    cfg = str(Path(derived_config(path, str(tmp_path / "run"), run_overrides(0, extra))).resolve())
    monkeypatch.chdir(tmp_path)
    model = main(args=["--config", cfg], run=False).model
    for key, value in extra.items():
        *_, group, name = key.split(".")
        holder = model.credit if group == "credit" else model.scorer.config if name.startswith("num_rollouts") else None
        assert holder is not None and getattr(holder, name) == value, key
    assert uses_prm(variant) == (VARIANTS[variant][0] in {"progress_only", "hca", "hca_progress", "hca_inverse"})


def test_unknown_method_fails_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'progress_a7'"):
        experiment_stages(out=str(tmp_path), methods=["grpo", "progress_a7"], seeds=[0])


def test_final_is_the_mean_of_the_last_points():
    from hca.workflows.experiment import default_target, final_pass

    c = curve([(0, .2), (100, .30), (200, .34)])
    assert final_pass(c) == .34 and final_pass(c, 2) == pytest.approx(.32) and final_pass(c, 9) == pytest.approx(.28)
    curves = {"grpo": {0: c, 1: curve([(0, .2), (100, .26), (200, .30)])},
              "hca": {0: curve([(0, .2), (100, .36), (200, .32)]), 1: curve([(0, .2), (100, .30), (200, .30)])}}
    assert default_target(curves, final_points=2) == pytest.approx((.32 + .28) / 2)
    rows = {r["method"]: r for r in summarize(curves, 0.30, 0, final_points=2)}
    assert rows["hca"]["final_pass@1"][0] == pytest.approx((.34 + .30) / 2)
    # paired by seed: (0.34 - 0.32) and (0.30 - 0.28)
    assert rows["hca"]["final_vs_baseline"][0] == pytest.approx(0.02)
