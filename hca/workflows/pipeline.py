"""The whole method as plain Python: a list of stages, each a Lightning run driven by its YAML
config, each skipped when its output already exists, and resumed from its last checkpoint when it
was killed midway.

    python -m hca.workflows.pipeline       # what `make quickstart` runs
    python -m hca.workflows.pipeline --regime sparse # the same on 5-7 operation chains (runs/sparse; hca.data.regimes)
    python -m hca.workflows.pipeline --only sft-policy --force
    python -m hca.workflows.pipeline --recipe gsm8k --policy PATH --prover PATH --prm-backbone PATH  # real models (hca.workflows.recipes)
    python -m hca.workflows.pipeline --recipe gsm8k --tiny                                  # tiny real-format models, CPU
    python -m hca.workflows.pipeline --recipe gsm8k_easy --policy M --prover M --prm-backbone M --scale smol --engine vllm  # make recipe-smol

From a notebook::

    from hca.workflows.pipeline import quickstart_stages, run_stages
    run_stages(quickstart_stages())
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Stage:
    name: str  # short id, e.g. "sft-policy"
    title: str  # what the banner says
    outputs: list[str]  # paths that exist once the stage has finished
    run: Callable[[], None]  # does the work (resuming where it can)
    group: str | None = None  # consecutive stages of one group run side by side, one subprocess and thread each
    threads: int | None = None  # torch threads when it runs alone in this process (None: the process's)
    notes: list[str] = field(default_factory=list)

    def done(self) -> bool:
        return all(Path(p).exists() for p in self.outputs)


def banner(text: str) -> None:
    line = "=" * max(60, len(text) + 8)
    print(f"\n{line}\n==  {text}\n{line}", flush=True)


def derived_config(base: str, out_dir: str, values: dict[str, Any] | None = None, regime: str = "default") -> str:
    """Write ``out_dir/config.yaml``: the YAML ``base`` in the task ``regime`` (:mod:`hca.data.regimes`:
    every ``runs/`` path moved under the regime's root, its keys set), with its output folder (its
    ``trainer.default_root_dir``) replaced by ``out_dir`` in every value that names it (loggers,
    checkpoints, export), then the dotted keys of ``values`` set (``"model.init_args.seed": 3``).
    The written file is the run's exact recipe (``python train.py fit --config out_dir/config.yaml``)."""
    import yaml

    from hca.data.regimes import get_regime, move_root, regime_values

    reg = get_regime(regime)
    text = move_root(Path(base).read_text(), reg.root)
    cfg = yaml.safe_load(text)
    old = cfg.get("trainer", {}).get("default_root_dir")
    if not old:
        raise ValueError(f"{base}: trainer.default_root_dir is not set, so its output folder is unknown")
    cfg = yaml.safe_load(text.replace(old, out_dir))
    values = {**regime_values(reg, cfg), **(values or {})}
    for key, value in values.items():
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            index = int(part) if isinstance(node, list) and part.isdigit() else part
            if isinstance(node, list) and not (isinstance(index, int) and index < len(node)):
                raise KeyError(f"{base}: {key!r}: {part!r} is not an index of the list there")
            if isinstance(node, dict) and i < len(parts) - 1 and not isinstance(node.get(index), (dict, list)):
                raise KeyError(f"{base}: {key!r}: {part!r} is not a mapping or list in the config")
            if not isinstance(node, (dict, list)):
                raise KeyError(f"{base}: {key!r}: cannot descend into {part!r}")
            if i == len(parts) - 1:
                node[index] = value
            else:
                node = node[index]
    out = Path(out_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(f"# Derived from {base} by hca.workflows.pipeline.derived_config; regime {reg.name}; "
                   f"overrides: {json.dumps(values)}\n"
                   + yaml.safe_dump(cfg, sort_keys=False))
    tmp.replace(out)
    return str(out)


def fit_from_config(config: str, export_dir: str, ckpt_dir: str, overrides: list[str] | None = None) -> None:
    """``python train.py fit --config CONFIG [overrides]`` in this process, resuming from
    ``ckpt_dir/last.ckpt`` when a previous run was killed before exporting."""
    from hca.workflows.cli import main

    args = ["fit", "--config", config, *(overrides or [])]
    last = Path(ckpt_dir) / "last.ckpt"
    if last.exists() and not Path(export_dir).exists():
        print(f"resuming from {last}", flush=True)
        args += ["--ckpt_path", str(last)]
    main(args=args)


def predict_from_config(config: str, ranks: int = 1) -> None:
    """``python train.py predict --config CONFIG`` (collection resumes by itself: finished shards are
    skipped): in this process, or with ``ranks > 1`` as that many DDP ranks of one torch thread each
    in a subprocess (``--trainer.devices ranks --trainer.strategy ddp``; chunk ``i`` goes to rank
    ``i % ranks`` and its records do not depend on the rank count, tests/test_modules_collector.py), which
    on CPU puts every core to work on the tiny models' one-thread collection."""
    script = Path(__file__).resolve().parents[2] / "train.py"  # hca/workflows/ -> the repo
    if ranks <= 1 or not script.exists():  # an installed package without the repository's train.py: one rank
        from hca.workflows.cli import main

        main(args=["predict", "--config", config])
        return
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), "predict", "--config", config, "--trainer.devices", str(ranks),
           "--trainer.strategy", "ddp"]
    print(f"{ranks} ranks: {' '.join(cmd[1:])}", flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"collection with {ranks} ranks exited with {rc} ({config}); rerun to resume")


def evaluate_checkpoints(models: dict[str, str], problems_file: str, out_json: str, n: int = 8,
                         max_new_tokens: int = 64, limit: int | None = None) -> dict:
    """Held-out pass@1 (greedy and sampled), pass@k and maj@k for each named checkpoint."""
    import torch

    from hca.evaluation.policy import evaluate_policy
    from hca.models.loading import load_causal_lm, load_tokenizer
    from hca.data.problems import load_problems
    from hca.rollout import HFRolloutEngine

    problems, _ = load_problems(problems_file, limit=limit)
    results = {}
    for name, path in models.items():
        tok, model = load_tokenizer(path), load_causal_lm(path)
        engine = HFRolloutEngine(model, tok)
        t0 = time.time()
        greedy = evaluate_policy(engine, problems, greedy=True, max_new_tokens=max_new_tokens)
        sampled = evaluate_policy(engine, problems, n=n, ks=(1, 4, n), max_new_tokens=max_new_tokens, seed=0)
        results[name] = {"checkpoint": path, "problems": len(problems), "greedy_pass@1": greedy.metrics["pass@1"],
                         **{k: v for k, v in sampled.metrics.items()}, "eval_seconds": round(time.time() - t0, 1)}
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out_json).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out_json)
    print(f"\n{'checkpoint':<10} {'greedy':>7} {'pass@1':>7} {'pass@4':>7} {'maj@4':>7} {f'pass@{n}':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['greedy_pass@1']:7.3f} {r['pass@1']:7.3f} {r.get('pass@4', float('nan')):7.3f} "
              f"{r.get('maj@4', float('nan')):7.3f} {r.get(f'pass@{n}', float('nan')):7.3f}")
    print(f"(held-out {problems_file}, {n} samples/problem at T=1; written to {out_json})")
    return results


QUICKSTART_METHODS = ("grpo", "progress_only")
"""The RL methods the quickstart trains side by side (configs/rl/arithmetic_<method>.yaml): GRPO and
the best-measured hierarchical credit, outcome + step progress (docs/experiment.md: over 5 seeds
full HCA with the entropy weights ended 0.030 below GRPO; progress only ended level with it)."""

QUICKSTART_RL: dict[str, Any] = {
    "trainer.max_steps": 200,  # 100 RL steps (2 optimizer updates each) x 128 responses = 12,800 RL samples per run
    "trainer.val_check_interval": 10,  # held-out pass@1 every 10 RL steps (plus the start): the learning curves
    "data.init_args.num_val": 512,  # on 512 validation problems (a curve point's standard error about 0.02)
    "model.init_args.validation.n": 1,  # one sample each at the policy's temperature (pass@1 is unbiased with n = 1)
    "model.init_args.validation.ks": [1],  # pass@1 (and maj@1 = pass@1)
    "trainer.callbacks.0.init_args.every_n_train_steps": 40,  # last.ckpt every 20 RL steps: a killed run resumes
}
"""What the quickstart (and :mod:`hca.workflows.experiment`) changes in ``configs/rl/arithmetic_*.yaml``: a
shorter run, validated more often and on more problems (one sample each: the curve's resolution in
RL steps and problems buys more than samples per problem), checkpointed more often."""


def quickstart_stages(regime: str = "default") -> list[Stage]:
    """The stages of `make quickstart`. Paths are those the YAML configs name (under ``runs/``);
    the RL runs and everything the quickstart adds land in ``runs/quickstart``. Another task
    ``regime`` (:mod:`hca.data.regimes`, e.g. ``sparse``) runs the same stages with every path under its
    root (``runs/sparse/...``), each stage from a derived config written next to its outputs."""
    from hca.data.regimes import get_regime

    reg = get_regime(regime)
    root, qs = reg.root, f"{reg.root}/quickstart"

    def config(base: str, out: str, values: dict | None = None) -> str:
        return base if reg.name == "default" and not values else derived_config(base, out, values, reg.name)

    sft = {
        "policy": ("configs/sft/arithmetic.yaml", f"{root}/sft/policy"),
        "prover": ("configs/sft/arithmetic_prover.yaml", f"{root}/sft/prover"),
    }
    stages = []
    for who, (cfg, out) in sft.items():
        stages.append(Stage(
            name=f"sft-{who}", title=f"SFT of the {who} ({cfg}{_regime_tag(reg)})", outputs=[f"{out}/model/config.json"],
            group="sft", run=lambda cfg=cfg, out=out: fit_from_config(config(cfg, out), f"{out}/model", f"{out}/checkpoints")))
    collect_dir, prm_dir = f"{root}/collect/arithmetic", f"{root}/prm/arithmetic"
    stages.append(Stage(
        name="collect", title=f"Prover-labeled trajectories (configs/collect/arithmetic.yaml{_regime_tag(reg)})",
        outputs=[f"{collect_dir}/manifest.json"],
        run=lambda: predict_from_config(config("configs/collect/arithmetic.yaml", collect_dir), ranks=_pool_size())))
    stages.append(Stage(
        name="prm", title=f"Progress PRM (configs/prm/arithmetic.yaml{_regime_tag(reg)})",
        outputs=[f"{prm_dir}/model/prm_config.json"], group="prm",
        run=lambda: fit_from_config(config("configs/prm/arithmetic.yaml", prm_dir), f"{prm_dir}/model",
                                    f"{prm_dir}/checkpoints")))
    # RL methods that need no PRM (GRPO) train side by side with the PRM; the others after it. One torch thread
    # even alone: with two, a run's weights differed bit-wise between repeats (docs/quickstart.md)
    from hca.workflows.methods import uses_prm

    rl = {m: (f"configs/rl/arithmetic_{m}.yaml", f"{qs}/rl/{m}")
          for m in sorted(QUICKSTART_METHODS, key=uses_prm)}
    for m, (cfg, out) in rl.items():
        stages.append(Stage(
            name=f"rl-{m}", title=f"RL with {m.upper()} from the SFT policy ({cfg}{_regime_tag(reg)})",
            outputs=[f"{out}/model/config.json"], group="rl" if uses_prm(m) else "prm", threads=1,
            run=lambda cfg=cfg, out=out: fit_from_config(config(cfg, out, QUICKSTART_RL), f"{out}/model",
                                                         f"{out}/checkpoints")))
    models = {"sft": f"{root}/sft/policy/model", **{m: f"{out}/model" for m, (_, out) in rl.items()}}
    test_file = f"{root}/data/arithmetic/test.jsonl"
    stages.append(Stage(
        name="eval", title=f"Held-out test evaluation: {', '.join(n.upper() for n in models)}", outputs=[f"{qs}/eval.json"],
        run=lambda: evaluate_checkpoints(models, test_file, f"{qs}/eval.json", n=8,
                                         max_new_tokens=reg.eval_max_new_tokens)))
    stages.append(Stage(
        name="report", title=f"Report: {qs}/report.{{md,html}}", outputs=[f"{qs}/report.html"],
        run=lambda: _report(qs, tuple(rl), collect_dir, prm_dir, models["sft"], test_file)))
    return stages


def _regime_tag(reg) -> str:
    return "" if reg.name == "default" else f", {reg.name} regime"


def _report(out_dir: str, methods: tuple[str, ...], collect_dir: str, prm_dir: str, policy: str, test_file: str) -> None:
    from hca.workflows.report import write_report

    paths = write_report(out_dir, methods, collect_dir, prm_dir, policy, test_file)
    print("\n".join(f"  {k}: {v}" for k, v in paths.items()))


def _pool_size() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def run_side_by_side(stages: list[Stage], plan: str, plan_args: dict, log_dir: Path, max_parallel: int | None = None,
                     poll_s: float = 15.0) -> dict[str, float]:
    """Run ``stages`` as subprocesses (``python -m hca.workflows.pipeline --only NAME``), at most
    ``max_parallel`` at a time (default: the CPUs this process may use), one torch thread each:
    tiny models use one thread far better than two, so two runs side by side on two cores finish
    well before the same two runs one after the other. Consoles go to ``log_dir/NAME.log``; one
    status line per poll shows where each run is. A failed run stops the pipeline (the others
    finish first) with the tail of its log. Returns each run's wall time in seconds."""
    import subprocess
    import sys

    from hca.runtime.status_file import ENV, read_status

    log_dir.mkdir(parents=True, exist_ok=True)
    pending, running, failed, seconds = list(stages), [], [], {}
    width = max_parallel or _pool_size()
    last_print = time.time()
    print(f"running {', '.join(s.name for s in stages)} side by side ({width} at a time); logs in {log_dir}/", flush=True)
    try:
        while pending or running:
            while pending and len(running) < width:
                st = pending.pop(0)
                status = log_dir / f"{st.name}.status"
                status.unlink(missing_ok=True)
                env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", ENV: str(status)}
                cmd = [sys.executable, "-m", "hca.workflows.pipeline", "--plan", plan, "--plan-args", json.dumps(plan_args),
                       "--only", st.name, "--threads", "1"]
                log = open(log_dir / f"{st.name}.log", "w")
                running.append((st, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log,
                                status, time.time()))
            time.sleep(0.5 if running else 0)
            finished = [item for item in running if item[1].poll() is not None]
            if not finished and time.time() - last_print < poll_s:
                continue
            last_print = time.time()
            line = []
            for item in list(running):
                st, proc, log, status, t0 = item
                if item not in finished:
                    line.append(f"{st.name}: {read_status(status)}")
                    continue
                log.close()
                running.remove(item)
                ok = proc.returncode == 0
                seconds[st.name] = time.time() - t0
                line.append(f"{st.name}: {'finished' if ok else f'FAILED (exit {proc.returncode})'} in {time.time() - t0:.0f}s")
                if not ok:
                    failed.append(st.name)
            print("  " + " | ".join(line), flush=True)
    except KeyboardInterrupt:
        for _, proc, *_ in running:
            proc.terminate()
        raise
    if failed:
        tails = "\n".join(f"--- {n} ({log_dir / (n + '.log')}):\n" + _tail(log_dir / f"{n}.log") for n in failed)
        raise RuntimeError(f"stage(s) {', '.join(failed)} failed; rerun to resume.\n{tails}")
    return seconds


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` for the block (None: unchanged); through
    :func:`hca.rollout.vllm.set_torch_threads`, which still works after a vLLM engine in this process
    has made ``torch.set_num_threads`` a no-op."""
    if not n:
        yield
        return
    import torch

    from hca.rollout.vllm import set_torch_threads

    before = torch.get_num_threads()
    set_torch_threads(n)
    try:
        yield
    finally:
        set_torch_threads(before)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").replace("\r", "\n").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def load_plan(plan: str, plan_args: dict | None = None) -> list[Stage]:
    """``"module:function"`` called with ``plan_args`` -> the stage list."""
    import importlib

    module, _, fn = plan.partition(":")
    return getattr(importlib.import_module(module), fn)(**(plan_args or {}))


def run_stages(stages: list[Stage], only: list[str] | None = None, force: bool = False,
               plan: str = "hca.workflows.pipeline:quickstart_stages", plan_args: dict | None = None,
               log_dir: str = "runs/quickstart/logs", max_parallel: int | None = None) -> None:
    """Run the stages in order, skipping finished ones (unless ``force``). Consecutive unfinished
    stages of one ``group`` run side by side (:func:`run_side_by_side`); ``plan``/``plan_args``
    name the function that rebuilds this stage list in those subprocesses."""
    t_start = time.time()
    timings = []
    todo = [(i, st) for i, st in enumerate(stages, 1) if not only or st.name in only]
    k = 0
    while k < len(todo):
        i, st = todo[k]
        if st.done() and not force:
            banner(f"[{i}/{len(stages)}] {st.title}: already done, skipped")
            timings.append((st.name, "skipped"))
            k += 1
            continue
        batch = [st]
        while (st.group and k + len(batch) < len(todo) and todo[k + len(batch)][1].group == st.group):
            nxt = todo[k + len(batch)][1]
            if nxt.done() and not force:
                break
            batch.append(nxt)
        t0 = time.time()
        if len(batch) > 1 and (max_parallel or _pool_size()) > 1:
            banner(f"[{i}-{i + len(batch) - 1}/{len(stages)}] " + " + ".join(b.title for b in batch))
            seconds = run_side_by_side(batch, plan, plan_args or {}, Path(log_dir), max_parallel)
            timings += [(b.name, f"{seconds[b.name]:.0f}s (side by side; group {time.time() - t0:.0f}s)") for b in batch]
        else:
            for j, b in enumerate(batch):
                banner(f"[{i + j}/{len(stages)}] {b.title}")
                t1 = time.time()
                with _torch_threads(b.threads):
                    b.run()
                timings.append((b.name, f"{time.time() - t1:.0f}s"))
        k += len(batch)
    banner(f"pipeline finished in {time.time() - t_start:.0f}s")
    for name, t in timings:
        print(f"  {name:<16} {t}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these stages")
    ap.add_argument("--force", action="store_true", help="rerun stages even when their outputs exist")
    ap.add_argument("--plan", default="hca.workflows.pipeline:quickstart_stages", help="module:function returning the stages")
    ap.add_argument("--plan-args", default="{}", help="JSON keyword arguments of the plan function")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in this process (0: torch's default)")
    ap.add_argument("--max-parallel", type=int, default=None, help="runs side by side (default: the CPUs available)")
    ap.add_argument("--regime", default=None, help="the embedded task's regime (hca.data.regimes): default | sparse")
    ap.add_argument("--recipe", choices=("gsm8k", "gsm8k_easy", "math"), help="a real-data recipe (hca.workflows.recipes) instead of the quickstart")
    ap.add_argument("--policy", help="recipe: the policy's local model folder (a chat model)")
    ap.add_argument("--prover", help="recipe: the prover's local model folder")
    ap.add_argument("--prm-backbone", help="recipe: the PRM backbone's local model folder (its own tokenizer)")
    ap.add_argument("--out", help="recipe: output folder (default runs/<recipe>)")
    ap.add_argument("--scale", choices=("full", "tiny", "smol"), default="full",
                    help="recipe: the YAML sizes, CPU smoke sizes (tiny), or ~135M-model CPU sizes (smol)")
    ap.add_argument("--tiny", action="store_true", help="recipe: build and use tiny real-format models (hca.workflows.tiny_models)")
    ap.add_argument("--engine", choices=("hf", "vllm", "auto"), help="recipe: rollout engine of collection, RL and "
                    "evaluation (default: the YAMLs' engine.engine)")
    a = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    from hca.runtime.console import quiet_console

    quiet_console()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    plan, plan_args, log_dir = a.plan, json.loads(a.plan_args), "runs/quickstart/logs"
    if a.regime is not None:
        from hca.data.regimes import get_regime

        try:
            reg = get_regime(a.regime)
        except ValueError as e:
            raise SystemExit(f"error: --regime: {e}")
        plan_args = {**plan_args, "regime": reg.name}
        log_dir = f"{reg.root}/quickstart/logs"
    if a.recipe:
        plan = "hca.workflows.recipes:recipe_stages"
        plan_args = {"recipe": a.recipe, "policy": a.policy, "prover": a.prover, "prm_backbone": a.prm_backbone,
                     "out": a.out, "scale": a.scale, "tiny": a.tiny, "engine": a.engine}
        log_dir = f"{a.out or 'runs/' + a.recipe}/logs"
    try:
        stages = load_plan(plan, plan_args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    run_stages(stages, a.only, a.force, plan, plan_args, log_dir=log_dir, max_parallel=a.max_parallel)


if __name__ == "__main__":
    main()
