"""End-to-end collection through ``python train.py predict --config configs/collect/arithmetic.yaml``
with tiny random checkpoints: the real config file, SIGKILL + resume, settings pinned on resume, and
(slow) two DDP ranks on CPU giving the same records as one process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from hca.data.trajectories import list_shards, read_dataset

ROOT = Path(__file__).resolve().parents[1]
NUM_PROBLEMS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny policy and (distinct) prover checkpoints and a problem file."""
    from hca.models.loading import char_tokenizer, save_checkpoint, tiny_llama
    from hca.data.arithmetic import generate_problems

    d = tmp_path_factory.mktemp("collect")
    tok = char_tokenizer()
    for name, seed in (("policy", 0), ("prover", 1)):
        m = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, seed=seed)
        save_checkpoint(m, tok, d / name)
    with open(d / "problems.jsonl", "w") as f:
        for p in generate_problems(NUM_PROBLEMS, seed=5):
            f.write(json.dumps(p.to_record()) + "\n")
    return d


def args(d: Path, out: str, *extra: str) -> list[str]:
    return ["predict", "--config", str(ROOT / "configs/collect/arithmetic.yaml"),
            "--model.init_args.policy", str(d / "policy"), "--model.init_args.prover", str(d / "prover"),
            "--model.init_args.collection.policy.max_new_tokens", "40",
            "--model.init_args.collection.prover.max_new_tokens", "12",
            "--model.init_args.collection.num_rollouts_h0", "4", "--model.init_args.collection.num_responses", "3",
            "--model.init_args.collection.num_rollouts", "2",
            "--data.init_args.problems_file", str(d / "problems.jsonl"), "--data.init_args.out_dir", str(d / out),
            "--data.init_args.chunk_size", "1", "--data.init_args.limit", "null", "--data.init_args.arithmetic", "null",
            "--trainer.default_root_dir", str(d / f"{out}_root"), *extra]


def cmd(d: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *args(d, out, *extra)]


ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def records(out: Path) -> list[dict]:
    _, recs = read_dataset(out)
    return sorted((r.to_dict() for r in recs), key=lambda r: (r["problem_id"], r["response_index"]))


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted collection, run in this process through the same CLI."""
    from hca.workflows.cli import main

    with mock.patch.object(sys, "argv", ["train.py"]):
        cli = main(args=args(setup, "ref"))
    assert cli.trainer.predict_loop.return_predictions is False  # records live on disk, not in memory
    return setup / "ref"


def test_uninterrupted_run_writes_a_complete_manifest(reference):
    m, recs = read_dataset(reference)
    assert m["complete"] and m["totals"]["problems"] == NUM_PROBLEMS and len(recs) == 3 * NUM_PROBLEMS
    assert len(m["shards"]) == NUM_PROBLEMS and all(s["stats"] is not None for s in m["shards"])
    assert m["identity"]["module"]["collection"]["delimiter"] == "\n"  # the config file's value
    assert m["totals"]["collection_stats"]["prover_generations"] >= 4 * NUM_PROBLEMS
    assert (reference / "progress_hist.png").stat().st_size > 0


def test_sigkill_then_rerun_finishes_without_redoing_or_losing_anything(setup, reference):
    out = setup / "killed"
    log = open(setup / "killed.log", "w")
    proc = subprocess.Popen(cmd(setup, "killed"), cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    try:
        while not list_shards(out):
            assert proc.poll() is None, f"collection exited early (rc {proc.returncode}): {(setup / 'killed.log').read_text()[-3000:]}"
            assert time.time() < deadline, "no shard within 120 s"
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = list_shards(out)
    assert 1 <= len(done) < NUM_PROBLEMS, f"the kill came too late to test resuming ({len(done)} shards)"
    assert not (out / "manifest.json").exists()
    before = {cid: (p.stat().st_mtime_ns, p.stat().st_ino) for cid, p in done.items()}
    rerun = subprocess.run(cmd(setup, "killed"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    after = list_shards(out)
    assert all((after[c].stat().st_mtime_ns, after[c].stat().st_ino) == before[c] for c in before), "finished shards were redone"
    assert records(out) == records(reference)  # nothing lost, nothing duplicated, same seeds
    for cid, p in after.items():
        assert p.read_bytes() == (reference / p.name).read_bytes()
    assert not [p for p in out.iterdir() if ".tmp." in p.name]


def test_resume_with_other_settings_is_refused(setup, reference):
    from hca.workflows.cli import main

    with pytest.raises(ValueError, match="other settings.*seed"), mock.patch.object(sys, "argv", ["train.py"]):
        main(args=args(setup, "ref", "--model.init_args.seed", "1"))


def test_resume_on_another_engine_is_refused(setup, reference):
    """A folder begun with the HF engine does not resume on vLLM (its samples would differ): the
    identity holds the resolved engine of each model. The engine kind is faked (no vLLM run here)."""
    from hca.workflows.cli import main
    from hca.modules.collector import CollectorModule

    m = json.loads((reference / "collection.json").read_text())
    assert m["identity"]["module"]["engine"] == {"policy": "hf", "prover": "hf", "max_batch_size": 256}
    vllm = mock.patch.object(CollectorModule, "engine_kinds", lambda self: {"policy": "vllm", "prover": "vllm"})
    with pytest.raises(ValueError, match="other settings.*engine"), vllm, mock.patch.object(sys, "argv", ["train.py"]):
        main(args=args(setup, "ref"))
    with pytest.raises(ValueError, match="other settings.*max_batch_size"), mock.patch.object(sys, "argv", ["train.py"]):
        main(args=args(setup, "ref", "--model.init_args.engine.max_batch_size", "64"))


def test_two_ddp_ranks_write_the_same_records(setup, reference):
    out = setup / "ddp"
    run = subprocess.run(cmd(setup, "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp"), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert records(out) == records(reference)
