"""GSM8K and MATH recipes on any local causal LM folders: collection -> PRM -> RL (GRPO and HCA) ->
held-out evaluation, each stage a Lightning run over its YAML config, skipped when done and resumed
when killed, like the quickstart (:mod:`hca.workflows.pipeline`).

    python -m hca.workflows.pipeline --recipe gsm8k --policy PATH --prover PATH --prm-backbone PATH
    python -m hca.workflows.pipeline --recipe gsm8k --tiny  # tiny real-format models built here, CPU-sized run
    make recipe-smol    # gsm8k_easy on SmolLM2-135M-Instruct at CPU sizes (--scale smol; docs/recipes.md)

From Python::

    from hca.workflows.recipes import recipe_stages
    from hca.workflows.pipeline import run_stages
    run_stages(recipe_stages("gsm8k", policy="...", prover="...", prm_backbone="..."))

Every stage writes its exact recipe (``<out>/<stage>/config.yaml``, :func:`hca.workflows.pipeline.derived_config`):
the base YAML (``configs/{collect,prm,rl,eval}/<recipe>*.yaml``) with the model folders, the output
folder and, with ``scale="tiny"`` or ``"smol"``, the CPU sizes of :data:`TINY` / :data:`SMOL` set.

Data. GSM8K: the shared ``train.jsonl`` (collection and RL) and ``test.jsonl`` (evaluation). MATH:
only MATH-500 is shipped, so :func:`math_split` cuts it by a hash of ``unique_id`` into 400
training and 100 test problems (``runs/data/math``); figures on that test split are not comparable
with published MATH-500 numbers. ``gsm8k_easy``: the GSM8K problems whose reference solution has at
most two lines before ``####`` (:func:`gsm8k_easy_split`: 1,961 train, 326 test), for models so weak
that nearly every RL group fails on the full set; it runs the GSM8K configs.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hca.workflows.pipeline import Stage, derived_config, fit_from_config, predict_from_config


@dataclass(frozen=True)
class Recipe:
    name: str  # "gsm8k" | "math"
    task: str  # verifier
    train_file: str  # problems for collection and RL
    test_file: str  # held-out problems for evaluation
    configs: str = ""  # stem of its configs/{collect,prm,rl,eval} YAMLs ("": the recipe's name)
    split: str | None = None  # name of the data stage that writes train_file / test_file (None: shipped files)

    @property
    def config_stem(self) -> str:
        return self.configs or self.name


def _shared(*parts: str) -> str:
    from hca.evaluation.processbench import data_dir

    return str(Path(data_dir(), *parts))


def recipes() -> dict[str, Recipe]:
    return {"gsm8k": Recipe("gsm8k", "gsm8k", _shared("gsm8k", "train.jsonl"), _shared("gsm8k", "test.jsonl")),
            "gsm8k_easy": Recipe("gsm8k_easy", "gsm8k", "runs/data/gsm8k_easy/train.jsonl",
                                 "runs/data/gsm8k_easy/test.jsonl", configs="gsm8k", split="gsm8k_easy"),
            "math": Recipe("math", "math", "runs/data/math/train.jsonl", "runs/data/math/test.jsonl", split="math")}


def solution_lines(answer: str) -> int:
    """Lines of a GSM8K reference solution before its ``#### N`` line (blank lines not counted)."""
    return sum(1 for line in answer.split("####")[0].splitlines() if line.strip())


def gsm8k_easy_split(out_dir: str = "runs/data/gsm8k_easy", max_lines: int = 2) -> tuple[str, str]:
    """``out_dir/{train,test}.jsonl``: the shared GSM8K train / test problems whose reference solution
    has at most ``max_lines`` lines (:func:`solution_lines`), in their original order (written once,
    atomically)."""
    from hca.data.problems import write_jsonl_atomic

    train, test = Path(out_dir) / "train.jsonl", Path(out_dir) / "test.jsonl"
    if train.exists() and test.exists():
        return str(train), str(test)
    for split, dst in (("train", train), ("test", test)):
        src = Path(_shared("gsm8k", f"{split}.jsonl"))
        if not src.exists():
            raise FileNotFoundError(f"GSM8K not found at {src} (set HCA_SHARED_DATA to the shared data folder)")
        rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
        write_jsonl_atomic(dst, [r for r in rows if solution_lines(str(r.get("answer", ""))) <= max_lines])
    return str(train), str(test)


SPLITS = {"math": "MATH-500 split into train/test (runs/data/math)",
          "gsm8k_easy": "GSM8K problems with at most two solution lines (runs/data/gsm8k_easy)"}


def math_split(out_dir: str = "runs/data/math", test_fraction: float = 0.2) -> tuple[str, str]:
    """``out_dir/{train,test}.jsonl`` from MATH-500, split by ``sha256(unique_id)`` (written once, atomically)."""
    from hca.data.problems import write_jsonl_atomic

    train, test = Path(out_dir) / "train.jsonl", Path(out_dir) / "test.jsonl"
    if train.exists() and test.exists():
        return str(train), str(test)
    src = Path(_shared("math500", "test.jsonl"))
    if not src.exists():
        raise FileNotFoundError(f"MATH-500 not found at {src} (set HCA_SHARED_DATA to the shared data folder)")
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    rank = sorted(rows, key=lambda r: hashlib.sha256(r["unique_id"].encode()).hexdigest())
    k = round(test_fraction * len(rank))
    write_jsonl_atomic(test, rank[:k])
    write_jsonl_atomic(train, rank[k:])
    return str(train), str(test)


TINY: dict[str, dict[str, Any]] = {
    "collect": {"trainer.accelerator": "cpu", "model.init_args.dtype": "float32", "model.init_args.num_threads": None,
                "model.init_args.collection.num_responses": 2, "model.init_args.collection.num_rollouts": 2,
                "model.init_args.collection.num_rollouts_h0": 2, "model.init_args.collection.policy.max_new_tokens": 48,
                "model.init_args.collection.prover.max_new_tokens": 48, "data.init_args.limit": 8,
                "data.init_args.chunk_size": 4},
    "prm": {"trainer.accelerator": "cpu", "trainer.devices": 1, "trainer.precision": "32-true", "trainer.max_steps": 6,
            "trainer.val_check_interval": 3, "trainer.accumulate_grad_batches": 1, "trainer.log_every_n_steps": 1,
            "trainer.callbacks.0.init_args.every_n_train_steps": 3, "model.init_args.gradient_checkpointing": False,
            "model.init_args.optimizer.init_args.lr": 1e-3, "model.init_args.scheduler": None,
            "data.init_args.val_fraction": 0.25, "data.init_args.batch_size": 4, "data.init_args.val_batch_size": 8,
            "data.init_args.num_workers": 0},
    "rl": {"trainer.accelerator": "cpu", "trainer.devices": 1, "trainer.precision": "32-true", "trainer.max_steps": 2,
           "trainer.val_check_interval": 1, "trainer.callbacks.0.init_args.every_n_train_steps": 1,
           "model.init_args.optimizer.init_args.lr": 1e-3, "model.init_args.ppo.group_size": 4,
           "model.init_args.ppo.mini_batch_size": 8, "model.init_args.ppo.recompute_old_logp": False,
           "model.init_args.sampling.max_new_tokens": 48, "model.init_args.validation.n": 2,
           "model.init_args.validation.ks": [1, 2], "model.init_args.validation.max_new_tokens": 48,
           "data.init_args.problems_per_step": 2, "data.init_args.num_val": 4, "data.init_args.val_batch_size": 4},
    "eval": {"trainer.accelerator": "cpu", "trainer.precision": "32-true", "model.init_args.validation.n": 2,
             "model.init_args.validation.ks": [1, 2], "model.init_args.validation.max_new_tokens": 48,
             "data.init_args.num_val": 4, "data.init_args.val_batch_size": 4},
}
"""The ``scale="tiny"`` sizes: 8 collection problems, 6 PRM updates, 2 RL steps of 2 x 4 responses,
4 evaluation problems, fp32 on CPU (minutes; the plumbing, not learning)."""
TINY_HCA_SCORER = {"model.init_args.scorer.init_args.dtype": "float32", "model.init_args.scorer.init_args.device": "cpu"}

_SMOL_T = 0.7  # SmolLM2-135M writes noise at T = 1 (docs/recipes.md); 0.7 reads as text
SMOL: dict[str, dict[str, Any]] = {  # TINY's CPU settings, with a 135M model's sizes
    "collect": {**TINY["collect"], "model.init_args.collection.num_rollouts": 4,
                "model.init_args.collection.num_rollouts_h0": 4, "model.init_args.collection.best_of_k": 4,
                **{f"model.init_args.collection.{who}.{k}": v for who in ("policy", "prover")
                   for k, v in (("max_new_tokens", 128), ("temperature", _SMOL_T))},
                "data.init_args.limit": 32, "data.init_args.chunk_size": 8},
    "prm": {**TINY["prm"], "trainer.max_steps": 16, "trainer.val_check_interval": 8,
            "trainer.callbacks.0.init_args.every_n_train_steps": 8, "model.init_args.optimizer.init_args.lr": 1e-5},
    "rl": {**TINY["rl"], "trainer.max_steps": 6, "trainer.val_check_interval": 3,
           "model.init_args.optimizer.init_args.lr": 5e-6, "model.init_args.ppo.mini_batch_size": 16,
           "model.init_args.ppo.recompute_old_logp": True, "model.init_args.sampling.max_new_tokens": 128,
           "model.init_args.sampling.temperature": _SMOL_T, "model.init_args.validation.max_new_tokens": 128,
           "model.init_args.validation.temperature": _SMOL_T, "model.init_args.engine.dtype": "float32",
           "model.init_args.engine.kv_cache_gb": 0.5, "data.init_args.problems_per_step": 4,
           "data.init_args.num_val": 32, "data.init_args.val_batch_size": 32},
    "eval": {**TINY["eval"], "model.init_args.validation.max_new_tokens": 128,
             "model.init_args.validation.temperature": _SMOL_T, "model.init_args.engine.dtype": "float32",
             "model.init_args.engine.kv_cache_gb": 0.5, "data.init_args.num_val": 128, "data.init_args.val_batch_size": 64},
}
"""The ``scale="smol"`` sizes, for a ~135M model on a 2-core CPU in about 25 minutes (``make recipe-smol``):
32 collection problems x 2 responses, M = 4 prover completions per prefix and a best-of-4 prover (PAV's
choice), 16 PRM updates of 4 trajectories, 6 RL steps of 4 problems x 4 responses (one update each, lr
5e-6), validation on 32 problems x 2, evaluation on 128 test problems x 2; budgets of 128 tokens,
sampling at T = 0.7, fp32. Figures at these sizes are a demonstration on real weights, not a result."""
SCALES = {"tiny": TINY, "smol": SMOL}


def check_model_folder(path: str, role: str, flag: str) -> None:
    """A clear error before anything runs: ``path`` must be a local model folder with a config and a tokenizer."""
    from hca.models.gguf import check_gguf_file, is_gguf_ref

    if is_gguf_ref(path):  # converted into a cached folder on first load (hca.models.gguf)
        check_gguf_file(path)
        return
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{flag} {path!r}: no such folder (the {role} must be a local model folder "
                                "saved with save_pretrained)")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{flag} {path!r}: no config.json in the {role} folder (not a save_pretrained model)")
    from hca.models.loading import has_tokenizer_files

    if not has_tokenizer_files(p):
        raise FileNotFoundError(f"{flag} {path!r}: the {role} folder has no tokenizer (tokenizer.json or "
                                "tokenizer_config.json); save one there with tokenizer.save_pretrained(folder)")


def recipe_stages(recipe: str = "gsm8k", policy: str | None = None, prover: str | None = None,
                  prm_backbone: str | None = None, out: str | None = None, scale: str = "full",
                  tiny: bool = False, engine: str | None = None) -> list[Stage]:
    """The stages of a recipe (module docstring). ``tiny``: build the tiny real-format models
    (:mod:`hca.workflows.tiny_models`) into ``runs/tiny`` first and use them (implies ``scale="tiny"``).
    ``engine``: the rollout engine of collection, RL and evaluation (``hf | vllm | auto``); None: the YAMLs'."""
    known = recipes()
    if recipe not in known:
        raise ValueError(f"--recipe {recipe!r}: unknown; valid: {sorted(known)}")
    if scale not in ("full", *SCALES):
        raise ValueError(f"--scale {scale!r}: valid: full, {', '.join(SCALES)}")
    r = known[recipe]
    out = out or f"runs/{recipe}"
    stages: list[Stage] = []
    if tiny:
        scale = "tiny"
        policy, prover, prm_backbone = (policy or "runs/tiny/policy", prover or "runs/tiny/prover",
                                        prm_backbone or "runs/tiny/prm_backbone")
        stages.append(Stage(name="tiny-models", title="Tiny real-format models (hca.workflows.tiny_models, random weights + brief SFT)",
                            outputs=[f"{m}/config.json" for m in (policy, prover, prm_backbone)],
                            run=lambda: _build_tiny("runs/tiny")))
    missing = [flag for flag, v in (("--policy", policy), ("--prover", prover), ("--prm-backbone", prm_backbone)) if not v]
    if missing:
        raise ValueError(f"recipe {recipe!r} needs {', '.join(missing)} (local model folders; or --tiny)")
    if not tiny:
        for path, role, flag in ((policy, "policy", "--policy"), (prover, "prover", "--prover"),
                                 (prm_backbone, "PRM backbone", "--prm-backbone")):
            check_model_folder(path, role, flag)
    if r.split is not None:
        split = {"math": math_split, "gsm8k_easy": gsm8k_easy_split}[r.split]
        stages.append(Stage(name="data", title=SPLITS[r.split], outputs=[r.train_file, r.test_file], run=split))
    cfg = stage_configs(recipe, policy, prover, prm_backbone, out, scale, engine)
    base, folder, values = cfg["collect"]
    stages.append(Stage(
        name="collect", title=f"Prover-labeled trajectories on {recipe} ({base})", outputs=[f"{folder}/manifest.json"],
        run=lambda: predict_from_config(derived_config(*cfg["collect"]))))
    base, folder, values = cfg["prm"]
    stages.append(Stage(
        name="prm", title=f"Progress PRM ({base}, backbone {prm_backbone})", outputs=[f"{folder}/model/prm_config.json"],
        run=lambda f=folder: fit_from_config(derived_config(*cfg["prm"]), f"{f}/model", f"{f}/checkpoints")))
    pb_limit = PROCESSBENCH_LIMIT.get(scale)
    if r.task == "gsm8k" and scale != "tiny" and Path(_shared("processbench", "gsm8k.json")).exists():
        stages.append(Stage(
            name="processbench", title=f"ProcessBench GSM8K F1 of the PRM ({pb_limit or 'all'} items)",
            outputs=[f"{out}/processbench.json"],
            run=lambda f=folder: processbench_stage(f"{f}/model", f"{out}/processbench.json", pb_limit)))
    for method in ("grpo", "hca"):
        base, folder, values = cfg[f"rl-{method}"]
        stages.append(Stage(
            name=f"rl-{method}", title=f"RL with {method.upper()} from {policy} ({base})",
            outputs=[f"{folder}/model/config.json"],
            run=lambda c=cfg[f"rl-{method}"]: fit_from_config(derived_config(*c), f"{c[1]}/model", f"{c[1]}/checkpoints")))
    models = {"start": policy, "grpo": f"{out}/rl/grpo/model", "hca": f"{out}/rl/hca/model"}
    base, folder, values = cfg["eval"]
    stages.append(Stage(
        name="eval", title=f"Held-out evaluation on {os.path.relpath(r.test_file)}: start policy, GRPO, HCA ({base})",
        outputs=[f"{out}/eval.json"], run=lambda: evaluate_recipe(models, *cfg["eval"], f"{out}/eval.json")))
    return stages


def stage_configs(recipe: str, policy: str, prover: str, prm_backbone: str, out: str, scale: str = "full",
                  engine: str | None = None) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """``{stage: (base YAML, output folder, dotted overrides)}``: what :func:`hca.workflows.pipeline.derived_config`
    makes each stage's ``config.yaml`` from (the evaluation's folder gets one sub-folder per checkpoint).
    ``engine`` (``hf | vllm | auto``) overrides ``model.init_args.engine.engine`` of every sampling stage."""
    r = recipes()[recipe]
    sizes = SCALES.get(scale) or {k: {} for k in TINY}
    stem = r.config_stem
    task = {"data.init_args.task": r.task}
    collect_dir, prm_dir = f"{out}/collect", f"{out}/prm"
    cfg = {
        "collect": (f"configs/collect/{stem}.yaml", collect_dir, {
            **sizes["collect"], **task, "model.init_args.policy": policy, "model.init_args.prover": prover,
            "data.init_args.problems_file": r.train_file, "data.init_args.out_dir": collect_dir}),
        "prm": (f"configs/prm/{stem}.yaml", prm_dir, {
            **sizes["prm"], "model.init_args.backbone": prm_backbone, "model.init_args.tokenizer": prm_backbone,
            "data.init_args.tokenizer": prm_backbone, "data.init_args.data_dir": collect_dir}),
        "eval": (f"configs/eval/{stem}.yaml", f"{out}/eval", {
            **sizes["eval"], **task, "data.init_args.train_file": r.test_file, "data.init_args.val_file": r.test_file}),
    }
    for method in ("grpo", "hca"):
        values = {**sizes["rl"], **task, "data.init_args.train_file": r.train_file,
                  "data.init_args.val_file": r.test_file, "model.init_args.policy": policy}
        if method == "hca":
            values["model.init_args.scorer.init_args.path"] = f"{prm_dir}/model"
            values.update(TINY_HCA_SCORER if scale in SCALES else {})
        cfg[f"rl-{method}"] = (f"configs/rl/{stem}_{method}.yaml", f"{out}/rl/{method}", values)
    if engine is not None:
        if engine not in ("hf", "vllm", "auto"):
            raise ValueError(f"--engine {engine!r}: valid: hf, vllm, auto")
        for stage in ("collect", "eval", "rl-grpo", "rl-hca"):
            cfg[stage][2]["model.init_args.engine.engine"] = engine
            if scale == "tiny":  # tiny models: fp32 and a small vLLM KV cache per engine (several live in one process)
                cfg[stage][2]["model.init_args.engine.kv_cache_gb"] = 0.25
                cfg[stage][2]["model.init_args.engine.dtype"] = "float32"
    return cfg


PROCESSBENCH_LIMIT = {"full": None, "smol": None}  # ProcessBench GSM8K items per scale (None: all 400; the first 207 are all erroneous, so never a prefix)
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def processbench_stage(prm: str, out_json: str, limit: int | None = None, device: str = "auto") -> dict:
    """ProcessBench's GSM8K split scored by the PRM export ``prm`` once: F1 at the usual threshold 0.5,
    and at every threshold of :data:`THRESHOLDS` (the best of which is tuned on these very items, an
    optimistic figure, reported as such) to ``out_json`` (atomically), with a line on the console."""
    from hca.prm.scorer import PRMScorer
    from hca.evaluation.processbench import f1_at, score_items
    from hca.data.trajectories import write_json_atomic

    scorer = PRMScorer(prm, device=device, dtype="float32", batch_size=8)
    items, values = score_items(scorer, "gsm8k", limit)
    sweep = [f1_at(items, values, t, "gsm8k") for t in THRESHOLDS]
    at_half = f1_at(items, values, 0.5, "gsm8k")
    best = max(sweep, key=lambda r: -1.0 if r["f1"] != r["f1"] else r["f1"])
    result = {"prm": prm, "split": "gsm8k", "items": len(items), "f1@0.5": at_half["f1"], "at_0.5": at_half,
              "best_threshold_tuned_on_these_items": best["threshold"], "f1_best": best["f1"], "sweep": sweep,
              "mean_value_h0": sum(v[0] for v in values) / len(values),
              "anchor": "Qwen2.5-Math-PRM-7B: 73.5 average F1 over ProcessBench's four splits (published)"}
    write_json_atomic(out_json, _json_safe(result))
    print(f"  ProcessBench GSM8K ({len(items)} items): F1 {at_half['f1']:.3f} at threshold 0.5 "
          f"(acc erroneous {at_half['acc_erroneous']:.3f}, correct {at_half['acc_correct']:.3f}); "
          f"best {best['f1']:.3f} at {best['threshold']} (tuned on these items)", flush=True)
    return result


def _json_safe(obj):
    """``obj`` with NaN / infinite floats as None (JSON has no NaN; an F1 is NaN when a class is empty)."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _build_tiny(folder: str) -> None:
    from hca.workflows.tiny_models import build_tiny_models

    for name, path in build_tiny_models(folder, _shared("gsm8k", "train.jsonl")).items():
        print(f"  {name}: {path}", flush=True)


def evaluate_recipe(models: dict[str, str], config: str, out_dir: str, values: dict, out_json: str) -> dict:
    """``python train.py validate`` of ``config`` for each named checkpoint; the ``val/*`` figures of
    all of them go to ``out_json`` (atomically) and a table to the console."""
    from hca.workflows.cli import main
    from hca.data.trajectories import write_json_atomic

    results = {}
    for name, path in models.items():
        cfg = derived_config(config, f"{out_dir}/{name}", {**values, "model.init_args.policy": path})
        cli = main(args=["validate", "--config", cfg])
        metrics = {k.removeprefix("val/"): float(v) for k, v in cli.trainer.callback_metrics.items()
                   if k.startswith("val/") and k not in ("val/samples", "val/tokens", "val/rl_step",
                                                              "val/response_tokens", "val/scorer_tokens")}
        results[name] = {"checkpoint": path, **metrics}
    write_json_atomic(out_json, results)
    keys = [k for k in ("pass@1", "pass@2", "pass@4", "pass@8", "maj@4", "maj@8", "truncated_frac")
            if any(k in r for r in results.values())]
    print("\n" + f"{'checkpoint':<10} " + " ".join(f"{k:>14}" for k in keys))
    for name, r in results.items():
        print(f"{name:<10} " + " ".join(f"{r.get(k, float('nan')):14.3f}" for k in keys))
    print(f"(written to {out_json})", flush=True)
    return results
