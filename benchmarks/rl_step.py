"""RL step throughput of HCAPolicyModule: GRPO and full HCA, side by side in one process (not a test).

The shape of ``/work/shared/peers/trl_grpo_tiny.py`` (TRL's GRPOTrainer), so that its
``samples_per_s`` line compares: a tiny random Llama (hidden 64, intermediate 128, 2 layers, 4
heads, 2 KV heads, tied embeddings, max_position 256, seed 0) with a character tokenizer over the
same characters (``hca.models.loading.char_tokenizer``: same vocabulary size, hence the same initial weights
and about the same response lengths), arithmetic prompts ``"Q: 12+7*3=? A:"``, 4 problems x 8
samples per RL step, at most 48 new tokens, temperature 1, fp32, no reference model, one PPO epoch
over one mini-batch of 32 (one AdamW update, lr 1e-4, grad clip 1.0, per step).

* ``grpo``: ``progress_coef = entropy_beta = 0`` (outcome credit only, no scorer);
* ``hca``: ``progress_coef = entropy_beta = 1`` with a PRM scorer: a tiny **random** PRM of the same
  backbone shape (``hca.prm.model``: backbone + value head, written with ``save_prm`` and read by
  ``hca.prm.scorer.PRMScorer``), so every step pays a batched PRM forward over prompt + response
  and the entropy weights. Its values are noise; this measures cost, not learning.

Both run the module's real ``training_step`` through a Lightning ``Trainer`` (sampling, verifying,
scoring, credit, PPO update, logging). The variants alternate in ``--rounds`` rounds (so that load
from other processes hits both alike); each round is ``--warmup`` untimed RL steps, then ``--steps``
timed ones (a fresh Trainer and module per round, same seed). ``samples/s`` = responses sampled and
trained on / wall seconds of the timed steps, summed over rounds. Threads: torch's default (what
TRL's run uses) unless ``--threads``.

It also prints the **model-work floor** (:func:`model_floor`): the bare HF forwards, backward and
AdamW step of one GRPO step at this shape, i.e. the samples/s of a framework with zero overhead.

Run: ``python benchmarks/rl_step.py [--steps 30] [--warmup 3] [--rounds 2] [--threads N]``; then TRL's
``OPT_STEPS=31 python /work/shared/peers/trl_grpo_tiny.py`` in its own venv, same threads (docs/rl.md).
Last line: ``grpo_samples_per_s=<x> hca_samples_per_s=<y>``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import string
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from hca.datamodules.rl_problems import ProblemDataModule  # noqa: E402
from hca.models.loading import char_tokenizer  # noqa: E402
from hca.modules.policy import HCAPolicyModule  # noqa: E402
from hca.rl.ppo import PPOConfig  # noqa: E402
from hca.rl.batch import CreditConfig  # noqa: E402

PROBLEMS, G, MAX_NEW = 4, 8, 48
CHARS = list("0123456789+-*/=?:. ABQ\n") + list(string.ascii_lowercase)  # the peer script's characters
SHAPE = "hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2," \
        "max_position_embeddings=256,tie_word_embeddings=true,seed=0"


def write_problems(path: Path, n: int) -> str:
    """The peer script's arithmetic prompts, as JSONL problems for the arithmetic verifier."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            a, b, c = rng.randint(0, 99), rng.randint(0, 9), rng.randint(0, 9)
            op1, op2 = rng.choice("+-"), rng.choice("+-*")
            val = eval(f"{a}{op1}{b}{op2}{c}")  # noqa: S307 (digits and operators only)
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Q: {a}{op1}{b}{op2}{c}=? A:", "answer": str(val),
                                "task": "arithmetic"}) + "\n")
    return str(path)


def tiny_prm(folder: Path, tokenizer) -> str:
    """A random PRM export (same backbone shape as the policy, its own head seed) for PRMScorer."""
    from hca.prm.model import ProgressRewardModel, hidden_size_of, load_backbone, save_prm

    backbone = load_backbone("tiny-llama:" + SHAPE.replace("seed=0", "seed=1"), tokenizer=tokenizer)
    prm = ProgressRewardModel(backbone, hidden_size_of(backbone), head_seed=0)
    save_prm(prm.backbone, prm.head, tokenizer, folder, {"max_length": 256})
    return str(folder)


class StepClock(L.Callback):
    """Wall time and samples after every RL step."""

    def __init__(self):
        self.marks: list[tuple[float, int, int]] = []  # (time, samples so far, generated tokens so far)
        self.tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.tokens += int(trainer.callback_metrics["train/response_length"] * PROBLEMS * G)
        self.marks.append((time.perf_counter(), pl_module.samples_seen, self.tokens))


def run(variant: str, steps: int, warmup: int, work: Path, prm_path: str | None) -> dict[str, float]:
    tok = char_tokenizer(CHARS)
    hca = variant == "hca"
    scorer = None
    if hca:
        from hca.prm.scorer import PRMScorer

        scorer = PRMScorer(prm_path, device="cpu", batch_size=64)
    module = HCAPolicyModule(
        policy="tiny-llama:" + SHAPE, scorer=scorer, dtype="float32",
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0),
        credit=CreditConfig("grpo", progress_coef=1.0 if hca else 0.0, entropy_beta=1.0 if hca else 0.0),
        ppo=PPOConfig(group_size=G, ppo_epochs=1, mini_batch_size=PROBLEMS * G, max_grad_norm=1.0),
        sampling={"max_new_tokens": MAX_NEW, "temperature": 1.0}, delimiter="\n", validation=None, seed=0)
    module.tokenizer = tok
    dm = ProblemDataModule(train_file=write_problems(work / "train.jsonl", PROBLEMS * (steps + warmup) * 2),
                           val_file=write_problems(work / "val.jsonl", 4), problems_per_step=PROBLEMS, seed=0)
    clock = StepClock()
    trainer = L.Trainer(max_steps=steps + warmup, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1, callbacks=[clock],
                        default_root_dir=str(work))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, dm)
    (t0, s0, k0), (t1, s1, k1) = clock.marks[warmup - 1], clock.marks[-1]
    return {"seconds": t1 - t0, "samples": s1 - s0, "tokens": k1 - k0}


def model_floor(reps: int = 12) -> tuple[float, float]:
    """Milliseconds of the bare model work of one GRPO step at this shape, median over ``reps``:
    prefill + 47 cached decode forwards of 32 rows (all rows kept to the end, no sampling or
    bookkeeping), and one forward + backward + AdamW step on ``[32, prompt + 48]``: what a framework
    running this model code pays per step before any overhead of its own (dropping finished rows
    and shorter responses can only shave the decode part a little)."""
    import statistics

    from transformers import DynamicCache

    from hca.models.loading import load_causal_lm

    tok = char_tokenizer(CHARS)
    model = load_causal_lm("tiny-llama:" + SHAPE, tokenizer=tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.randint(4, len(tok), (PROBLEMS * G, 15 + MAX_NEW))
    decode, update = [], []
    for _ in range(reps):
        model.eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :15], cache=cache, use_cache=True, logits_to_keep=1)
            for t in range(15, 15 + MAX_NEW - 1):
                model(input_ids=ids[:, t:t + 1], position_ids=torch.full((len(ids), 1), t), cache=cache,
                      use_cache=True)
        t1 = time.perf_counter()
        model.train()
        logits = model(input_ids=ids, logits_to_keep=MAX_NEW + 1).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 15:, None])
        (-logp.mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        decode.append(t1 - t0)
        update.append(t2 - t1)
    return 1000 * statistics.median(decode[2:]), 1000 * statistics.median(update[2:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed RL steps per variant and round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed RL steps first (>= 1)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of grpo, hca")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lightning.pytorch.utilities.rank_zero as rz
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rz.rank_zero_only.rank = 0
    import transformers

    print(f"versions: torch={torch.__version__} transformers={transformers.__version__} lightning={L.__version__} "
          f"threads={torch.get_num_threads()}")
    print(f"shape: {PROBLEMS} problems x {G} samples per RL step, <= {MAX_NEW} new tokens, tiny Llama ({SHAPE}), "
          f"vocab {len(char_tokenizer(CHARS))}, fp32, 1 update per step; hca scorer: tiny random PRM "
          "(hca.prm.scorer.PRMScorer, same backbone shape)")
    totals = {v: {"seconds": 0.0, "samples": 0, "tokens": 0} for v in ("grpo", "hca")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prm = tiny_prm(tmp / "prm", char_tokenizer(CHARS))
        for r in range(args.rounds):
            for variant in ("grpo", "hca"):
                work = tmp / f"{variant}{r}"
                work.mkdir()
                res = run(variant, args.steps, args.warmup, work, prm)
                for k in res:
                    totals[variant][k] += res[k]
                print(f"round {r} {variant}: {res['samples']} samples in {res['seconds']:.2f} s = "
                      f"{res['samples'] / res['seconds']:.1f} samples/s, mean response length "
                      f"{res['tokens'] / res['samples']:.1f} tokens", flush=True)
    dec, upd = model_floor()
    print(f"model-work floor of one GRPO step (bare HF forwards, no sampling/credit/logging): decode {dec:.1f} ms + "
          f"forward/backward/AdamW {upd:.1f} ms = {PROBLEMS * G / (dec + upd) * 1000:.0f} samples/s with zero overhead")
    rate = {v: t["samples"] / t["seconds"] for v, t in totals.items()}
    for v, t in totals.items():
        print(f"{v}: {t['samples']} samples, {t['seconds']:.2f} s, {rate[v]:.1f} samples/s, "
              f"{t['tokens'] / t['seconds']:.0f} tokens/s")
    print(f"grpo_samples_per_s={rate['grpo']:.1f} hca_samples_per_s={rate['hca']:.1f}")


if __name__ == "__main__":
    main()
