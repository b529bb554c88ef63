"""The pipeline runs stages in order, skips finished ones, and lists what make quickstart does."""
from hca.pipeline import Stage, quickstart_stages, run_stages


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


def test_quickstart_stage_order():
    names = [s.name for s in quickstart_stages()]
    assert names[:3] == ["sft-policy", "sft-prover", "collect"]
    assert all(s.outputs for s in quickstart_stages())
