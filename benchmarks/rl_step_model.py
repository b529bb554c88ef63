"""RL steps on a real model beside TRL: hca (GRPO, HCA; HF engine, vLLM) and TRL's GRPOTrainer (not a test).

The comparison a user cares about: the same model folder (``--model``, e.g. SmolLM2-135M-Instruct from
``make models``), the same GSM8K prompts, group size and budget (default 8 problems x 8 samples, 256 new
tokens, temperature 1, fp32 on CPU, one optimizer update per RL step over ``--micro-batch`` responses per
forward/backward with gradient accumulation in both (8: a whole step's backward at once passed 16 GiB of RSS on this
24 GiB machine and was stopped), lr 1e-6, grad clip 1, no reference model). Contenders:

* ``hca-hf-grpo`` / ``hca-vllm-grpo``: :class:`hca.modules.policy.HCAPolicyModule` with outcome credit only
  (alpha = beta = 0), sampling with the HF engine or vLLM (weights synced into vLLM every step);
* ``hca-hf-hca`` / ``hca-vllm-hca``: the GSM8K recipe's HCA credit (alpha 1, beta ``--entropy-beta``,
  default 0 as in ``configs/rl/gsm8k_hca.yaml``) scored by a **learned PRM** (``--prm``, default
  ``runs/smol/prm/model`` from ``make recipe-smol``; without it a PRM with a random head on ``--model``'s
  backbone, which costs the same);
* ``trl``: ``benchmarks/trl_grpo_model.py`` in TRL's own venv (``--trl-python``), HF generate;
* ``hca-vllm-hca-separate`` (on request): ``hca-vllm-hca`` with ``ppo.fuse_logprob_pass: false``, i.e. the
  teacher-forced log-prob pass before the update that the fused path saves.

Every contender runs the module's (or TRL's) real training loop in its own process (so the peak RSS is its
own: the largest RSS of the process and its children, sampled every 0.2 s); they alternate over ``--rounds``
rounds, so that load from other processes hits all alike; each run makes ``--warmup`` untimed RL steps, then
``--steps`` timed ones. samples/s = responses sampled and trained on / wall seconds of the timed steps,
summed over rounds; generated tok/s counts response tokens (up to EOS or the budget).

For hca, the timed steps' ``train/time_*`` metrics give where a step goes (weight sync, sampling, PRM scoring,
log-prob recompute, verify + credit, update forward, backward, clip + optimizer): the table of docs/rl.md.

Run (after ``make models`` and a TRL venv, docs/rl.md "Speed at a real shape")::

    python benchmarks/rl_step_model.py --model runs/models/smollm2-135m-instruct --trl-python /tmp/trlvenv/bin/python

Writes ``--out`` (JSON, atomically). Last line: ``hca_vllm_vs_trl=R hca_hf_vs_trl=R grpo_vllm_vs_trl=R
grpo_hf_vs_trl=R`` (samples/s over TRL's; ``hca_*`` are the HCA credit variants).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
CONTENDERS = ("hca-hf-grpo", "hca-hf-hca", "hca-vllm-grpo", "hca-vllm-hca", "trl")
EXTRA = ("hca-vllm-hca-separate",)  # vLLM + HCA with the teacher-forced pass before the update (fuse_logprob_pass false)
PHASES = ("time_sync", "time_generation", "time_scoring", "time_recompute", "time_credit", "time_forward",
          "time_backward", "time_optimizer", "time_step")


def write_problems(model: str, path: Path, n: int) -> None:
    """The first ``n`` GSM8K train problems with their prompts rendered by hca's default PromptFormat."""
    from hca.models.loading import load_tokenizer
    from hca.data.prompts import PromptFormat

    tok, fmt = load_tokenizer(model), PromptFormat()
    with open(GSM8K) as f, open(path, "w") as out:
        for i, line in zip(range(n), f):
            row = json.loads(line)
            out.write(json.dumps({"id": f"gsm8k-train-{i}", "prompt": fmt.render(row["question"], tok),
                                  "answer": row["answer"], "task": "gsm8k"}) + "\n")


def random_head_prm(model: str, folder: Path) -> str:
    """A PRM export with ``model``'s backbone and a random value head (same cost as a learned one)."""
    from hca.models.loading import load_tokenizer
    from hca.prm.model import ProgressRewardModel, hidden_size_of, load_backbone, save_prm

    tok = load_tokenizer(model)
    backbone = load_backbone(model, tokenizer=tok)
    prm = ProgressRewardModel(backbone, hidden_size_of(backbone), head_seed=0)
    save_prm(prm.backbone, prm.head, tok, folder, {"max_length": 1024})
    return str(folder)


# ---------------------------------------------------------------------------------------------- hca worker
def hca_worker(args) -> dict:
    """One hca contender: ``--warmup + --steps`` RL steps through a Lightning Trainer; per-step metrics."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    import warnings

    import lightning as L
    import torch

    from hca.runtime.console import quiet_console
    from hca.datamodules.rl_problems import ProblemDataModule
    from hca.modules.policy import HCAPolicyModule
    from hca.rl.ppo import PPOConfig
    from hca.rl.batch import CreditConfig
    from hca.rollout.engines import EngineConfig

    quiet_console()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, engine, variant, *rest = args.worker.split("-")
    separate = args.separate_logprob_pass or rest == ["separate"]
    hca = variant == "hca"
    scorer = None
    if hca:
        from hca.prm.scorer import PRMScorer

        scorer = PRMScorer(args.prm, device="cpu", batch_size=args.problems * args.samples, dtype="float32")
    n = args.problems * args.samples
    module = HCAPolicyModule(
        policy=args.model, scorer=scorer, dtype="float32",
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6, weight_decay=0.0),
        credit=CreditConfig("grpo", progress_coef=1.0 if hca else 0.0, entropy_beta=args.entropy_beta if hca else 0.0),
        ppo=PPOConfig(group_size=args.samples, ppo_epochs=1, mini_batch_size=n, micro_batch_size=args.micro_batch,
                      max_grad_norm=1.0, clip_high=0.28, recompute_old_logp=args.recompute_old_logp,
                      fuse_logprob_pass=not separate),
        sampling={"max_new_tokens": args.max_new_tokens, "temperature": 1.0},
        engine=EngineConfig(engine=engine, max_batch_size=n, kv_cache_gb=args.kv_cache_gb),
        validation=None, seed=0)
    dm = ProblemDataModule(train_file=args.problems_file, val_file=args.problems_file, task="gsm8k",
                           problems_per_step=args.problems, seed=0)
    rows: list[dict] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = {k.removeprefix("train/"): float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("train/")}
            rows.append({"end": time.perf_counter(), **m})

    trainer = L.Trainer(max_steps=args.warmup + args.steps, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1, callbacks=[Record()],
                        default_root_dir=args.work)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dm)
    ends = [t0] + [r["end"] for r in rows]
    steps = [{"seconds": b - a, "samples": n, "tokens": r["response_tokens"] - (rows[i - 1]["response_tokens"] if i else 0),
              "truncated": r.get("truncated_frac", float("nan")), "rollout_logp_gap": r.get("rollout_logp_gap"),
              **{k: r[k] for k in PHASES if k in r}}
             for i, (a, b, r) in enumerate(zip(ends, ends[1:], rows))]
    timed = steps[args.warmup:]
    return {"contender": args.worker, "threads": torch.get_num_threads(), "steps": steps, "warmup": args.warmup,
            "seconds": sum(s["seconds"] for s in timed), "samples": sum(s["samples"] for s in timed),
            "tokens": sum(s["tokens"] for s in timed)}


# ---------------------------------------------------------------------------------------------- orchestration
def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_contender(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """Run ``cmd``; returns (exit code, wall seconds, peak RSS in bytes of its process tree)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT))
        peak = [0]

        def watch():
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.2)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        rc = proc.wait()
        th.join()
    return rc, time.perf_counter() - t0, peak[0]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/models/smollm2-135m-instruct", help="HF model folder")
    ap.add_argument("--prm", default=None, help="PRM export for the HCA variants (default: runs/smol/prm/model "
                                                "if present, else a random head on --model)")
    ap.add_argument("--problems", type=int, default=8, help="problems per RL step")
    ap.add_argument("--samples", type=int, default=8, help="samples per problem (G)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed RL steps per contender and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed RL steps first")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS + EXTRA,
                    help=f"default: all but {', '.join(EXTRA)}")
    ap.add_argument("--entropy-beta", type=float, default=0.0, help="beta of the HCA variants (recipe: 0)")
    ap.add_argument("--micro-batch", type=int, default=8, help="responses per forward/backward (hca: "
                    "ppo.micro_batch_size; TRL: per_device_train_batch_size with gradient accumulation)")
    ap.add_argument("--recompute-old-logp", action="store_true", help="hca: ppo.recompute_old_logp (off: fp32)")
    ap.add_argument("--separate-logprob-pass", action="store_true",
                    help="hca with vLLM: ppo.fuse_logprob_pass false (the teacher-forced pass before the update)")
    ap.add_argument("--kv-cache-gb", type=float, default=2.0, help="vLLM KV cache (64 x 456 tokens need ~1.3 GiB)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every contender (default: torch's)")
    ap.add_argument("--trl-python", default="/tmp/trlvenv/bin/python", help="python of a venv with trl")
    ap.add_argument("--out", default="runs/bench/rl_step_model.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--problems-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def summarize(name: str, runs: list[dict], peak: int) -> dict:
    secs = sum(r["seconds"] for r in runs)
    samples, tokens = sum(r["samples"] for r in runs), sum(r["tokens"] for r in runs)
    timed = [s for r in runs for s in r["steps"][r["warmup"]:]]
    out = {"samples_per_s": samples / secs, "tokens_per_s": tokens / secs, "mean_response_tokens": tokens / samples,
           "step_s": statistics.median(s["seconds"] for s in timed), "peak_rss_gib": peak / 2**30,
           "timed_steps": len(timed)}
    phases = [k for k in PHASES if any(k in s for s in timed)]  # TRL: time_generation (its model.generate) only
    out["phases_s"] = {k.removeprefix("time_"): statistics.median(s.get(k, 0.0) for s in timed) for k in phases}
    if name != "trl":
        out["phases_s"]["step"] = statistics.median(s["seconds"] for s in timed)
    else:
        out["phases_s"]["rest"] = statistics.median(s["seconds"] - s["time_generation"] for s in timed)
    if name.startswith("hca"):
        out["truncated"] = statistics.mean(s["truncated"] for s in timed)
        gaps = [s["rollout_logp_gap"] for s in timed if s.get("rollout_logp_gap") is not None]
        if gaps:
            out["rollout_logp_gap"] = statistics.mean(gaps)
    return out


def save(args, results: dict[str, list[dict]], peaks: dict[str, int]) -> dict[str, dict]:
    """Write ``--out`` atomically: the arguments, the summary of the runs so far, every run; returns the summary."""
    summary = {c: summarize(c, runs, peaks[c]) for c, runs in results.items() if runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: v for k, v in vars(args).items() if v is not None}, "summary": summary, "runs": results}
    out.with_suffix(".tmp").write_text(json.dumps(record, indent=1))
    os.replace(out.with_suffix(".tmp"), out)
    return summary


def main(argv=None):
    args = parse(argv)
    if args.worker:
        res = hca_worker(args)
        with open(args.result + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(args.result + ".tmp", args.result)
        return
    model = str(Path(args.model).resolve())
    if args.prm is None:
        default = ROOT / "runs" / "smol" / "prm" / "model"
        args.prm = str(default) if (default / "prm_config.json").exists() else None
    contenders = list(args.contenders)
    if "trl" in contenders and not Path(args.trl_python).exists():
        print(f"no TRL venv at {args.trl_python} (--trl-python; docs/rl.md says how to make one): TRL skipped")
        contenders.remove("trl")
    results: dict[str, list[dict]] = {c: [] for c in contenders}
    peaks: dict[str, int] = {c: 0 for c in contenders}
    with tempfile.TemporaryDirectory(prefix="rl_step_model_") as tmp:
        tmp = Path(tmp)
        problems = tmp / "problems.jsonl"
        write_problems(model, problems, args.problems * (args.warmup + args.steps) * 2)
        if args.prm is None and any(c.endswith("-hca") for c in contenders):
            args.prm = random_head_prm(model, tmp / "prm")
            prm_note = "random value head on the policy's backbone"
        else:
            prm_note = "learned"
        print(f"shape: {args.problems} problems x {args.samples} samples per RL step, <= {args.max_new_tokens} new "
              f"tokens, fp32, 1 update per step; model {args.model}; PRM {args.prm} ({prm_note}); "
              f"{args.rounds} round(s) of {args.warmup} warm-up + {args.steps} timed steps", flush=True)
        common = ["--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens), "--steps",
                  str(args.steps), "--warmup", str(args.warmup), "--micro-batch", str(args.micro_batch)]
        if args.threads:
            common += ["--threads", str(args.threads)]
        for r in range(args.rounds):
            for c in contenders:
                result = tmp / f"{c}-{r}.json"
                if c == "trl":
                    cmd = [args.trl_python, str(ROOT / "benchmarks" / "trl_grpo_model.py"), "--model", model,
                           "--problems-file", str(problems), "--problems-per-step", str(args.problems),
                           "--out", str(result), *common]
                else:
                    work = tmp / f"{c}-{r}"
                    work.mkdir()
                    cmd = [sys.executable, __file__, "--worker", c, "--model", model, "--prm", str(args.prm),
                           "--problems-file", str(problems), "--work", str(work), "--result", str(result),
                           "--problems", str(args.problems), "--entropy-beta", str(args.entropy_beta),
                           "--kv-cache-gb", str(args.kv_cache_gb), *common]
                    cmd += ["--recompute-old-logp"] * args.recompute_old_logp
                    cmd += ["--separate-logprob-pass"] * args.separate_logprob_pass
                log = tmp / f"{c}-{r}.log"
                rc, wall, peak = run_contender(cmd, log)
                if rc != 0:
                    print(log.read_text()[-4000:])
                    raise SystemExit(f"{c} (round {r}) exited with {rc}; its log is above")
                res = json.loads(result.read_text())
                results[c].append(res)
                peaks[c] = max(peaks[c], peak)
                save(args, results, peaks)  # after every run: an interrupted benchmark keeps what it measured
                print(f"round {r} {c}: {res['samples']} samples in {res['seconds']:.1f} s = "
                      f"{res['samples'] / res['seconds']:.2f} samples/s, {res['tokens'] / res['seconds']:.1f} tok/s, "
                      f"peak RSS {peak / 2**30:.2f} GiB (process wall {wall:.0f} s)", flush=True)
    summary = save(args, results, peaks)
    print(f"{'contender':<15} {'samples/s':>9} {'tok/s':>7} {'resp tok':>8} {'step s':>7} {'peak GiB':>8}")
    for c, s in summary.items():
        print(f"{c:<15} {s['samples_per_s']:>9.2f} {s['tokens_per_s']:>7.1f} {s['mean_response_tokens']:>8.1f} "
              f"{s['step_s']:>7.1f} {s['peak_rss_gib']:>8.2f}")
    for c, s in summary.items():
        if "phases_s" in s:
            print(f"{c} median s per step: " + " ".join(f"{k}={v:.2f}" for k, v in s["phases_s"].items()))
    ratios = []
    if "trl" in summary:
        trl = summary["trl"]["samples_per_s"]
        for name, c in (("hca_vllm", "hca-vllm-hca"), ("hca_hf", "hca-hf-hca"), ("grpo_vllm", "hca-vllm-grpo"),
                        ("grpo_hf", "hca-hf-grpo")):
            if c in summary:
                ratios.append(f"{name}_vs_trl={summary[c]['samples_per_s'] / trl:.2f}")
    print(" ".join(ratios) if ratios else "no TRL run: no ratios")


if __name__ == "__main__":
    main()
