"""Task regimes (hca.data.regimes): one setting moves every output under the regime's root and sets its
keys in each config that has them; every derived config still instantiates."""
from pathlib import Path

import pytest
import yaml

from hca.workflows.pipeline import derived_config, quickstart_stages
from hca.data.regimes import REGIMES, applicable, check_regime, get_regime, move_root, regime_values

ROOT = Path(__file__).parents[1]
ARITH = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*/arithmetic*.yaml"))


def test_every_regime_key_reaches_a_config():
    for name in REGIMES:
        check_regime(name, [str(ROOT / c) for c in ARITH])
    with pytest.raises(ValueError, match="misspelled"):
        check_regime(get_regime("sparse").__class__("x", "runs/x", "", {"model.init_args.nope.max": 1}),
                     [str(ROOT / c) for c in ARITH])
    with pytest.raises(ValueError, match="unknown regime"):
        get_regime("dense")


def test_applicable_needs_the_key_and_keeps_mappings():
    cfg = {"a": {"b": {"c": 1}, "d": None}}
    assert applicable(cfg, "a.b.c") and applicable(cfg, "a.d")
    assert not applicable(cfg, "a.b.new") and not applicable(cfg, "a.d.c") and not applicable(cfg, "x.y")
    assert not applicable(cfg, "a.b")  # a mapping is not replaced by a value
    assert move_root("p: runs/sft/x\nq: runs/data", "runs") == "p: runs/sft/x\nq: runs/data"
    assert move_root("p: runs/sft/x\nq: runs/data", "runs/sparse/") == "p: runs/sparse/sft/x\nq: runs/sparse/data"


@pytest.mark.parametrize("config", ARITH)
def test_sparse_configs_move_every_path_and_instantiate(config, tmp_path, monkeypatch):
    from hca.workflows.cli import main

    base = yaml.safe_load((ROOT / config).read_text())
    out = yaml.safe_load((ROOT / config).read_text().replace("runs/", "runs/sparse/"))["trainer"]["default_root_dir"]
    monkeypatch.chdir(ROOT)
    path = derived_config(config, str(tmp_path / "cfg"), {}, regime="sparse")
    text = Path(path).read_text()
    body = text.split("\n", 1)[1]
    assert "runs/" not in body.replace("runs/sparse/", ""), f"{config}: a path stayed outside runs/sparse"
    cfg = yaml.safe_load(body)
    applied = regime_values("sparse", base)
    assert applied, f"{config}: the sparse regime changes nothing in it"
    for key, value in applied.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value, (config, key)
    assert "regime sparse" in text.splitlines()[0]
    assert out  # the regime moved the output folder too (then derived_config moved it to tmp_path)
    monkeypatch.chdir(tmp_path)
    cli = main(args=["--config", path], run=False)
    assert cli.model is not None


def test_sparse_regime_is_longer_and_lives_apart():
    sft = yaml.safe_load((ROOT / "configs/sft/arithmetic.yaml").read_text())
    values = regime_values("sparse", sft)
    base = sft["data"]["init_args"]["arithmetic"]["difficulty"]
    assert values["data.init_args.arithmetic.difficulty.min_steps"] > base["min_steps"]
    assert values["data.init_args.arithmetic.difficulty.max_steps"] > base["max_steps"]
    rl = yaml.safe_load((ROOT / "configs/rl/arithmetic_hca_current.yaml").read_text())
    assert regime_values("sparse", rl)["model.init_args.scorer.init_args.sampling.max_new_tokens"] == 128
    assert "model.init_args.scorer.init_args.sampling.max_new_tokens" not in regime_values(
        "sparse", yaml.safe_load((ROOT / "configs/rl/arithmetic_hca.yaml").read_text()))  # the PRM scorer samples nothing
    stages = quickstart_stages("sparse")
    assert all(o.startswith("runs/sparse/") for s in stages for o in s.outputs)
    assert [s.name for s in stages] == [s.name for s in quickstart_stages()]
    assert all(o.startswith("runs/") and not o.startswith("runs/sparse") for s in quickstart_stages() for o in s.outputs)


def test_pipeline_refuses_an_unknown_regime():
    from hca.workflows.pipeline import main

    with pytest.raises(SystemExit, match="unknown regime 'dense'"):
        main(["--regime", "dense", "--only", "nothing"])
