"""The recipes' stage configs (hca.workflows.recipes): every derived config of both recipes, at both scales,
instantiates through the CLI; the MATH split; the SFT step format; clear errors for bad flags."""
import json
from pathlib import Path

import pytest

from hca.evaluation.processbench import data_dir
from hca.workflows.recipes import TINY, math_split, recipe_stages, stage_configs

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("recipe", ["gsm8k", "gsm8k_easy", "math"])
@pytest.mark.parametrize("scale", ["full", "tiny", "smol"])
def test_every_stage_config_instantiates(recipe, scale, tmp_path, monkeypatch):
    from hca.workflows.cli import main
    from hca.workflows.pipeline import derived_config

    monkeypatch.chdir(ROOT)  # the configs name repo-relative data paths
    out = tmp_path / recipe
    cfg = stage_configs(recipe, "runs/tiny/policy", "runs/tiny/prover", "runs/tiny/prm_backbone", str(out), scale)
    assert set(cfg) == {"collect", "prm", "rl-grpo", "rl-hca", "eval"}
    for name, (base, folder, values) in cfg.items():
        path = derived_config(base, folder, values)
        text = Path(path).read_text()
        assert str(out) in text and f"runs/{recipe}/" not in text.split("\n", 1)[1]  # every output under --out
        cli = main(args=["--config", path], run=False)
        if name.startswith("rl") or name == "eval":
            assert cli.model.hparams.policy == "runs/tiny/policy"
            assert cli.datamodule.hparams.task == ("gsm8k" if recipe == "gsm8k_easy" else recipe)
            if scale == "tiny":
                assert cli.trainer.max_steps in (2, -1)
            if scale == "smol" and name.startswith("rl"):
                assert cli.trainer.max_steps == 6 and cli.model.sampling.temperature == 0.7
        if name == "collect" and scale == "smol":
            assert cli.model.cfg.best_of_k == 4 and cli.model.cfg.policy.temperature == 0.7
    if scale == "tiny":
        assert set(TINY) == {"collect", "prm", "rl", "eval"}


def test_engine_flag_sets_every_sampling_stage(tmp_path, monkeypatch):
    from hca.workflows.cli import main
    from hca.workflows.pipeline import derived_config

    monkeypatch.chdir(ROOT)
    cfg = stage_configs("gsm8k", "runs/tiny/policy", "runs/tiny/prover", "runs/tiny/prm_backbone", str(tmp_path), "tiny",
                        engine="hf")
    assert "model.init_args.engine.engine" not in cfg["prm"][2]  # the PRM does not sample
    for name in ("collect", "rl-grpo", "rl-hca", "eval"):
        base, folder, values = cfg[name]
        assert values["model.init_args.engine.engine"] == "hf" and values["model.init_args.engine.kv_cache_gb"] == 0.25
        cli = main(args=["--config", derived_config(base, folder, values)], run=False)
        assert cli.model.engine_config.engine == "hf" and cli.model.engine_config.kv_cache_gb == 0.25
    collect = main(args=["--config", derived_config(*cfg["collect"][:2], cfg["collect"][2])], run=False).model.cfg
    assert collect.policy.max_new_tokens == collect.prover.max_new_tokens == 48  # the TINY budgets, nested keys
    with pytest.raises(ValueError, match="--engine 'sglang'"):
        stage_configs("gsm8k", "p", "q", "r", str(tmp_path), engine="sglang")


def test_math_split_is_disjoint_deterministic_and_complete(tmp_path):
    if not (data_dir() / "math500" / "test.jsonl").exists():
        pytest.skip("shared MATH-500 absent")
    train, test = math_split(str(tmp_path / "a"))
    train2, test2 = math_split(str(tmp_path / "b"))
    ids = {f: [json.loads(x)["unique_id"] for x in Path(f).read_text().splitlines()] for f in (train, test, train2, test2)}
    assert len(ids[train]) == 400 and len(ids[test]) == 100 and not set(ids[train]) & set(ids[test])
    assert ids[train] == ids[train2] and ids[test] == ids[test2]


def test_step_solution_format():
    from hca.datamodules.sft import step_solution

    sol = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\nShe sold 48+24 = <<48+24=72>>72 clips."
    assert step_solution(sol, "72") == ("Natalia sold 48/2 = 24 clips in May.\n\nShe sold 48+24 = 72 clips.\n\n"
                                        "The final answer is \\boxed{72}.")
    assert step_solution("a\nb", "3", "\n") == "a\nb\nThe final answer is \\boxed{3}."


def test_bad_recipe_flags(tmp_path):
    with pytest.raises(ValueError, match="needs --prover, --prm-backbone"):
        recipe_stages("gsm8k", policy=str(tmp_path))
    with pytest.raises(ValueError, match="unknown"):
        recipe_stages("aime", policy="p", prover="q", prm_backbone="r")
    with pytest.raises(FileNotFoundError, match="--policy .*no such folder"):
        recipe_stages("gsm8k", policy=str(tmp_path / "none"), prover="q", prm_backbone="r")


def test_pipeline_cli_reports_bad_flags_without_a_traceback(tmp_path, capsys):
    from hca.workflows.pipeline import main

    with pytest.raises(SystemExit, match="error: --policy .*no such folder"):
        main(["--recipe", "gsm8k", "--policy", str(tmp_path / "x"), "--prover", "y", "--prm-backbone", "z"])


def test_gsm8k_easy_split_keeps_short_solutions_in_order(tmp_path):
    from hca.workflows.recipes import gsm8k_easy_split, solution_lines

    if not (data_dir() / "gsm8k" / "test.jsonl").exists():
        pytest.skip("shared GSM8K absent")
    assert solution_lines("a = <<1+1=2>>2\n\nb = 3\n#### 3") == 2
    train, test = gsm8k_easy_split(str(tmp_path / "easy"))
    rows = [json.loads(line) for line in Path(test).read_text().splitlines()]
    full = [json.loads(line) for line in (data_dir() / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert rows == [r for r in full if solution_lines(r["answer"]) <= 2] and len(rows) == 326
    assert len(Path(train).read_text().splitlines()) == 1961


def test_recipe_flags_accept_a_gguf_file_and_name_a_bad_one(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        recipe_stages("gsm8k", policy=str(tmp_path / "absent.gguf"), prover="runs/tiny/prover",
                      prm_backbone="runs/tiny/prm_backbone", out=str(tmp_path / "out"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a GGUF file"):
        recipe_stages("gsm8k", policy=str(bad), prover=str(bad), prm_backbone=str(bad), out=str(tmp_path / "out"))
