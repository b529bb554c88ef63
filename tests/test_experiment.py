"""The multi-seed experiment: one run per (method, seed) with the seed everywhere it lives, and an
honest summary (runs that never reach the target are counted, not given a cost)."""
import math

import pytest
import yaml

from hca.experiment import experiment_stages, first_reaching, markdown, summarize


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
    from hca.experiment import run_dir, run_overrides
    from hca.pipeline import derived_config

    d = run_dir(str(tmp_path), "hca", 3)
    cfg = yaml.safe_load(open(derived_config("configs/rl/arithmetic_hca.yaml", d, run_overrides(3))))
    assert cfg["seed_everything"] == cfg["model"]["init_args"]["seed"] == cfg["data"]["init_args"]["seed"] == 3
    assert cfg["model"]["init_args"]["export_dir"] == f"{d}/model"
