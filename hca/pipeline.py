"""The whole method as plain Python: a list of stages, each a Lightning run driven by its YAML
config, each skipped when its output already exists, and resumed from its last checkpoint when it
was killed midway.

    python -m hca.pipeline                 # what `make quickstart` runs
    python -m hca.pipeline --only sft-policy --force

From a notebook::

    from hca.pipeline import quickstart_stages, run_stages
    run_stages(quickstart_stages())
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Stage:
    name: str  # short id, e.g. "sft-policy"
    title: str  # what the banner says
    outputs: list[str]  # paths that exist once the stage has finished
    run: Callable[[], None]  # does the work (resuming where it can)
    notes: list[str] = field(default_factory=list)

    def done(self) -> bool:
        return all(Path(p).exists() for p in self.outputs)


def banner(text: str) -> None:
    line = "=" * max(60, len(text) + 8)
    print(f"\n{line}\n==  {text}\n{line}", flush=True)


def fit_from_config(config: str, export_dir: str, ckpt_dir: str, overrides: list[str] | None = None) -> None:
    """``python train.py fit --config CONFIG [overrides]`` in this process, resuming from
    ``ckpt_dir/last.ckpt`` when a previous run was killed before exporting."""
    from hca.cli import main

    args = ["fit", "--config", config, *(overrides or [])]
    last = Path(ckpt_dir) / "last.ckpt"
    if last.exists() and not Path(export_dir).exists():
        print(f"resuming from {last}", flush=True)
        args += ["--ckpt_path", str(last)]
    main(args=args)


def predict_from_config(config: str) -> None:
    """``python train.py predict --config CONFIG`` in this process (collection resumes by itself:
    finished shards are skipped)."""
    from hca.cli import main

    main(args=["predict", "--config", config])


def evaluate_checkpoints(models: dict[str, str], problems_file: str, out_json: str, n: int = 8,
                         max_new_tokens: int = 64, limit: int | None = None) -> dict:
    """Held-out pass@1 (greedy and sampled), pass@k and maj@k for each named checkpoint."""
    import torch

    from hca.evaluation import evaluate_policy
    from hca.models import load_causal_lm, load_tokenizer
    from hca.problems import load_problems
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


def quickstart_stages() -> list[Stage]:
    """The stages of `make quickstart`. Paths are those the YAML configs name (under ``runs/``)."""
    root = "runs"
    sft = {
        "policy": ("configs/sft/arithmetic.yaml", f"{root}/sft/policy"),
        "prover": ("configs/sft/arithmetic_prover.yaml", f"{root}/sft/prover"),
    }
    stages = []
    for who, (cfg, out) in sft.items():
        stages.append(Stage(
            name=f"sft-{who}", title=f"SFT of the {who} ({cfg})", outputs=[f"{out}/model/config.json"],
            run=lambda cfg=cfg, out=out: fit_from_config(cfg, f"{out}/model", f"{out}/checkpoints")))
    stages.append(Stage(
        name="collect", title="Prover-labeled trajectories (configs/collect/arithmetic.yaml)",
        outputs=[f"{root}/collect/arithmetic/manifest.json"],
        run=lambda: predict_from_config("configs/collect/arithmetic.yaml")))
    stages.append(Stage(
        name="eval-sft", title="Held-out evaluation of the SFT checkpoints", outputs=[f"{root}/quickstart/eval_sft.json"],
        run=lambda: evaluate_checkpoints({w: f"{o}/model" for w, (_, o) in sft.items()}, f"{root}/data/arithmetic/test.jsonl",
                                         f"{root}/quickstart/eval_sft.json")))
    return stages


def run_stages(stages: list[Stage], only: list[str] | None = None, force: bool = False) -> None:
    t_start = time.time()
    timings = []
    for i, st in enumerate(stages, 1):
        if only and st.name not in only:
            continue
        if st.done() and not force:
            banner(f"[{i}/{len(stages)}] {st.title}: already done, skipped")
            timings.append((st.name, "skipped"))
            continue
        banner(f"[{i}/{len(stages)}] {st.title}")
        t0 = time.time()
        st.run()
        timings.append((st.name, f"{time.time() - t0:.0f}s"))
    banner(f"pipeline finished in {time.time() - t_start:.0f}s")
    for name, t in timings:
        print(f"  {name:<14} {t}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="run only these stages")
    ap.add_argument("--force", action="store_true", help="rerun stages even when their outputs exist")
    a = ap.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    run_stages(quickstart_stages(), a.only, a.force)


if __name__ == "__main__":
    main()
