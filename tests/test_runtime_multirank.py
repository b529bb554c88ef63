"""Several ranks for real: two CPU processes (gloo, DeepSpeed ZeRO-2 via CPUDeepSpeedStrategy), RL
(HCAPolicyModule) and the PRM (PRMModule), launched once as ``tests/builders/multirank.py``
(Lightning's launcher starts rank 1). What each rank saw is in JSON lines; these tests check that

* ranks train on different examples: disjoint within an epoch, every training problem once in a
  complete epoch (RL) / every kept batch once (PRM);
* the weights are bit-for-bit the same on both ranks (sha256 of the full state dict) when training
  starts and after every optimizer update, and they changed;
* each validation covers every validation problem (response, for the PRM) exactly once over the
  ranks, and the ``val/*`` both ranks log equal what one process computes over all of them with
  the same weights (rank 0 recomputes it), including the RL at-start validation -- which is also
  the same, to float64 rounding, as a one-process run's (seeds do not depend on the rank count);
* a run resumed from the mid-way checkpoint (fresh objects, other ambient seed) restores the
  weights, then trains on the same examples and reaches the same weights after every update as
  the uninterrupted run.

The launch is killed (its whole process group) after ``LAUNCH_TIMEOUT`` seconds.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.timeout(600)  # backstop (pytest-timeout); the launch itself is killed sooner

from builders import write_collection  # noqa: E402
from builders.policy import write_problems  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve().parent / "builders" / "multirank.py"
LAUNCH_TIMEOUT = 300  # s; measured 19-25 s on 2 shared cores
NUM_TRAIN, NUM_VAL = 12, 5  # RL problems: 3 RL steps x 2 ranks x 2 problems = one epoch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(data: Path, out: Path) -> str:
    env = {k: v for k, v in os.environ.items()  # a DeepSpeed run in this process leaves its rank variables here
           if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")
           and not k.startswith("PL_")}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "rl,prm", str(data), str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)  # EOF once both ranks have exited
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"two-rank launch did not finish in {LAUNCH_TIMEOUT} s:\n{log[-6000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any stray rank
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, log[-6000:]
    return log


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    data, out = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("out")
    write_problems(data / "train.jsonl", NUM_TRAIN)
    write_problems(data / "val.jsonl", NUM_VAL, offset=100)
    (data / "coll").mkdir()
    write_collection(data / "coll", num_problems=24)
    _launch(data, out)
    return {(kind, run, r): [json.loads(line) for line in open(out / f"{kind}-{run}-rank{r}.jsonl")]
            for kind in ("rl", "prm") for run in ("full", "resume") for r in (0, 1)}


def by(events, ev, **match):
    return [e for e in events if e["ev"] == ev and all(e.get(k) == v for k, v in match.items())]


def val_logs(events, at_start=None):
    """The logged validations (with ``at_start``: only those of the at-start validation, or none of them)."""
    out = [e for e in by(events, "log") if any(k.startswith("val/") for k in e["metrics"])]
    if at_start is not None:
        out = [e for e in out if (e["metrics"].get("val/samples", 1) == 0) == at_start]
    return out


def plain(events):
    return [{k: v for k, v in e.items() if k != "t"} for e in events]


def check_weights(runs, kind, updates, resume_from):
    """Same start and same weights after every update on both ranks; changed; resume reproduces."""
    f0, f1 = runs[kind, "full", 0], runs[kind, "full", 1]
    start = by(f0, "start")[0]["sha"]
    assert by(f1, "start")[0]["sha"] == start
    shas = [u["sha"] for u in by(f0, "update")]
    assert [u["n"] for u in by(f0, "update")] == list(range(1, updates + 1))
    assert [u["sha"] for u in by(f1, "update")] == shas, "ranks disagree on the weights after some update"
    assert shas[-1] != start and len(set(shas)) > updates // 2
    for r in (0, 1):
        res = runs[kind, "resume", r]
        assert by(res, "start")[0]["sha"] == shas[resume_from - 1], "the checkpoint did not restore the weights"
        assert [u["sha"] for u in by(res, "update")] == shas[resume_from:]
        assert [b["ids"] for b in by(res, "batch")] == [b["ids"] for b in by(runs[kind, "full", r], "batch")
                                                        if b["step"] > resume_from]


def check_val_logs(runs, kind, rel):
    """Both ranks log the same val/*; each periodic validation equals rank 0's one-process ref."""
    f0, f1 = runs[kind, "full", 0], runs[kind, "full", 1]
    assert plain(val_logs(f0)) == plain(val_logs(f1))
    refs, logged = by(f0, "ref", when="val"), val_logs(f0, at_start=False)
    assert len(refs) == 2 and len(logged) == 2
    for ref, log in zip(refs, logged):
        for k, v in ref["metrics"].items():
            assert log["metrics"][k] == pytest.approx(v, rel=rel, abs=rel), (kind, ref["step"], k)
    res = val_logs(runs[kind, "resume", 0])[-1]["metrics"]
    per_rank = {"val/tokens"}  # see test_rl_resume_restores_each_ranks_counters
    assert {k: v for k, v in res.items() if k not in per_rank} == pytest.approx(
        {k: v for k, v in logged[-1]["metrics"].items() if k not in per_rank}, rel=1e-6)


def test_rl_two_ranks_zero2(runs, tmp_path):
    f0, f1 = runs["rl", "full", 0], runs["rl", "full", 1]
    # problems: 4 RL steps per rank, 2 problems each; steps 1-3 are epoch 0
    steps = [[b["ids"] for b in by(f, "batch")] for f in (f0, f1)]
    assert [len(s) for s in steps] == [4, 4] and all(len(ids) == 2 for s in steps for ids in s)
    epoch0 = [i for s in steps for ids in s[:3] for i in ids]
    assert sorted(epoch0) == sorted(f"q{i}" for i in range(NUM_TRAIN))  # disjoint, all of them
    assert not set(steps[0][3]) & set(steps[1][3])
    check_weights(runs, "rl", updates=8, resume_from=4)  # 2 updates per RL step, checkpoint after RL step 2
    # validation: at RL steps 2 and 4 (updates 4 and 8), every val problem exactly once over the ranks
    for step in (4, 8):
        ids = [i for f in (f0, f1) for v in by(f, "val", step=step) for i in v["ids"]]
        assert sorted(ids) == [f"q{100 + i}" for i in range(NUM_VAL)], step
    check_val_logs(runs, "rl", rel=1e-6)  # periodic values go through Lightning's float32 logging
    at_start = val_logs(f0, at_start=True)
    assert len(at_start) == 1 and at_start[0]["step"] == 0
    ref = by(f0, "ref", when="start")[0]["metrics"]
    assert {k: at_start[0]["metrics"][k] for k in ref} == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert val_logs(f0, at_start=False)[0]["metrics"]["val/samples"] == 2 * 2 * 2 * 4  # ranks x RL steps x B x G
    assert not val_logs(runs["rl", "resume", 0], at_start=True)  # a resumed run skips it
    # one process, same seeds: the same at-start validation (the samples do not depend on the rank count)
    assert one_process_at_start(tmp_path, f0) == pytest.approx(at_start[0]["metrics"], rel=1e-12, abs=1e-12)


def test_rl_resume_restores_each_ranks_counters(runs):
    """Each rank's own counters come back (the checkpoint keeps them per rank): val/tokens, a sum over
    ranks, equals the uninterrupted run's."""
    full, res = val_logs(runs["rl", "full", 0])[-1]["metrics"], val_logs(runs["rl", "resume", 0])[-1]["metrics"]
    assert res["val/tokens"] == full["val/tokens"]


def one_process_at_start(tmp_path, f0):
    import lightning as L

    from builders.multirank import Probe, Recorder, rl_build

    data = tmp_path / "data"
    data.mkdir()
    write_problems(data / "train.jsonl", NUM_TRAIN)
    write_problems(data / "val.jsonl", NUM_VAL, offset=100)
    events = []

    def record(**e):
        events.append(e)

    L.seed_everything(0)
    module, dm = rl_build(data)
    probe = Probe(record, lambda m: m.model, lambda b: [q.id for q in b], lambda b: ([q.id for q in b], False))
    L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=Recorder(record), enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0, callbacks=[probe],
              default_root_dir=str(tmp_path)).fit(module, dm)
    assert by(events, "start")[0]["sha"] == by(f0, "start")[0]["sha"], "not the same initial weights"
    return val_logs(events, at_start=True)[0]["metrics"]


def test_prm_two_ranks_zero2(runs):
    f0, f1 = runs["prm", "full", 0], runs["prm", "full", 1]
    # training: 72 responses in 9 bucketed batches of 8 per epoch; 8 kept, 4 per rank; 6 steps
    steps = [[tuple(map(tuple, b["ids"])) for b in by(f, "batch")] for f in (f0, f1)]
    assert [len(s) for s in steps] == [6, 6]
    epoch0 = [x for s in steps for ids in s[:4] for x in ids]
    assert len(epoch0) == 64 and len(set(epoch0)) == 64  # disjoint over ranks and steps
    assert not set(x for ids in steps[0][4:] for x in ids) & set(x for ids in steps[1][4:] for x in ids)
    check_weights(runs, "prm", updates=6, resume_from=3)
    # validation at steps 3 and 6: 24 responses in 5 batches; rank 1 runs a flagged copy as its third
    for step in (3, 6):
        real = [tuple(x) for f in (f0, f1) for v in by(f, "val", step=step) if not v["padding"] for x in v["ids"]]
        assert len(real) == 24 and len(set(real)) == 24, step
        assert [v["padding"] for v in by(f1, "val", step=step)] == [False, False, True]
    check_val_logs(runs, "prm", rel=1e-5)  # float32 metric states, summed in another order
    keys = {"val/loss", "val/value_mse", "val/progress_mse", "val/progress_spearman", "val/harmful_auroc",
            "val/harmful_f1", "val/ece", "val/outcome_auroc", "val/outcome_pair_acc", "val/first_error_f1_value",
            "val/first_error_f1_progress"}
    assert keys <= set(val_logs(f0)[-1]["metrics"]) and keys <= set(by(f0, "ref")[-1]["metrics"])
