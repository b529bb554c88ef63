"""The pipeline runs stages in order, skips finished ones, runs a group side by side in
subprocesses (and resumes after a failure), derives run configs, and lists what make quickstart does."""
import json
import os
from pathlib import Path

import pytest
import yaml

from hca.workflows.pipeline import Stage, derived_config, quickstart_stages, run_stages


def test_stages_skip_when_outputs_exist(tmp_path, capsys):
    calls = []

    def make(name):
        out = tmp_path / f"{name}.done"
        return Stage(name=name, title=name, outputs=[str(out)], run=lambda: (calls.append(name), out.write_text("x")))

    stages = [make("a"), make("b")]
    (tmp_path / "a.done").write_text("x")  # "a" finished in an earlier run
    run_stages(stages)
    assert calls == ["b"]
    assert "already done, skipped" in capsys.readouterr().out
    run_stages(stages)
    assert calls == ["b"]  # nothing left to do
    run_stages(stages, only=["a"], force=True)
    assert calls == ["b", "a"]


def plan(root: str, fail: str = "") -> list[Stage]:
    """Stages for the side-by-side test (rebuilt in each subprocess from these arguments)."""
    def make(name, group):
        out = Path(root) / f"{name}.done"

        def run():
            if name == fail:
                raise RuntimeError(f"stage {name} fails on purpose")
            out.write_text(f"{os.getpid()} {os.environ.get('OMP_NUM_THREADS')}")
        return Stage(name=name, title=name, outputs=[str(out)], run=run, group=group)

    return [make("prep", None), make("a", "g"), make("b", "g"), make("c", "g"), make("last", None)]


def test_group_runs_side_by_side_and_resumes_after_a_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = {"root": str(tmp_path), "fail": "b"}
    kw = dict(plan="test_workflows_pipeline:plan", log_dir=str(tmp_path / "logs"), max_parallel=2)
    with pytest.raises(RuntimeError, match="stage\\(s\\) b failed") as err:
        run_stages(plan(**args), plan_args=args, **kw)
    assert "fails on purpose" in str(err.value)  # the tail of the failed run's log
    assert {p.name for p in tmp_path.glob("*.done")} == {"prep.done", "a.done", "c.done"}  # the others finished
    pids = {(tmp_path / f"{n}.done").read_text().split()[0] for n in "ac"}
    assert str(os.getpid()) not in pids and len(pids) == 2  # subprocesses, one per stage
    assert all((tmp_path / f"{n}.done").read_text().split()[1] == "1" for n in "ac")  # one thread each
    args["fail"] = ""
    capsys.readouterr()
    run_stages(plan(**args), plan_args=args, **kw)  # rerun: only b, then last
    out = capsys.readouterr().out
    assert out.count("already done, skipped") == 3 and (tmp_path / "last.done").exists()


def test_derived_config_moves_outputs_and_sets_keys(tmp_path):
    path = derived_config("configs/rl/arithmetic_grpo.yaml", str(tmp_path / "run"),
                          {"trainer.max_steps": 10, "model.init_args.seed": 3,
                           "trainer.callbacks.0.init_args.every_n_train_steps": 5})
    text = Path(path).read_text()
    assert "runs/rl/grpo" not in text
    cfg = yaml.safe_load(text)
    assert cfg["trainer"]["max_steps"] == 10 and cfg["model"]["init_args"]["seed"] == 3
    assert cfg["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] == 5
    assert cfg["model"]["init_args"]["export_dir"] == str(tmp_path / "run" / "model")
    assert cfg["trainer"]["logger"][0]["init_args"]["save_dir"] == str(tmp_path / "run")
    assert json.loads(text.splitlines()[0].split("overrides: ")[1])["trainer.max_steps"] == 10
    for bad in ["trainer.nope.deeper", "trainer.callbacks.7.init_args", "trainer.max_steps.x"]:
        with pytest.raises(KeyError):
            derived_config("configs/rl/arithmetic_grpo.yaml", str(tmp_path / "x"), {bad: 1})


def test_quickstart_stage_order():
    stages = quickstart_stages()
    names = [s.name for s in stages]
    assert names == ["sft-policy", "sft-prover", "collect", "prm", "rl-grpo", "rl-progress_only", "eval", "report"]
    assert all(s.outputs for s in stages)
    assert [s.group for s in stages[:2]] == ["sft", "sft"]
    # GRPO needs no PRM: it trains side by side with the PRM, the PRM's method after both
    assert [s.group for s in stages[3:6]] == ["prm", "prm", "rl"]


def test_a_stage_alone_runs_with_its_threads_then_restores_them(tmp_path):
    import torch

    seen = []
    before = torch.get_num_threads()
    st = Stage(name="one", title="one", outputs=[str(tmp_path / "never")], run=lambda: seen.append(torch.get_num_threads()),
               threads=1)
    run_stages([st], log_dir=str(tmp_path / "logs"))
    assert seen == [1] and torch.get_num_threads() == before
    assert all(s.threads == 1 for s in quickstart_stages() if s.name.startswith("rl-"))
