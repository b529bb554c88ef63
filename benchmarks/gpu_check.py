"""One prepared GPU check (``make gpu-check``): RL speed, bf16 log-prob gap, lean log-prob memory,
static cache + ``torch.compile`` -- four parts, one JSON of figures (not a test).

Nothing is downloaded: models have random weights in the shapes of real checkpoints, built from
their config values, and the RL tokenizer is built here.

Parts (each runs in its own child process with a time limit, so that a crash, a hang or a broken
CUDA context in one part cannot take the others with it; the child writes its figures to a file):

* ``rl`` -- RL steps/s, samples/s and generated tokens/s of **GRPO** (``progress_coef =
  entropy_beta = 0``) and **HCA** (``progress_coef = entropy_beta = 1`` with a random PRM export
  scored by :class:`hca.prm.scorer.PRMScorer`, as in ``benchmarks/rl_step.py``): the module's real
  ``training_step`` (HF engine sampling, verifying, PRM scoring, credit, PPO update, logging) through
  a Lightning ``Trainer`` at SmolLM2-135M's shape (``LlamaForCausalLM``: hidden 576, intermediate
  1536, 30 layers, 9 heads, 3 KV heads, vocabulary 49,152, tied, rope_theta 1e5), as the GSM8K
  recipe runs it: fp32 master weights, ``bf16-mixed`` precision, ``recompute_old_logp``, mini-batches
  of 32. 8 problems x 8 samples x 256 new tokens per RL step; 1 warm-up + 3 timed RL steps per
  variant. Per-phase times are the module's ``train/time_*`` metrics (medians over the timed steps).
  The tokenizer is a synthetic byte-level BPE of exactly 49,152 tokens (the 256 byte symbols, 2-byte
  merges, ``<|endoftext|>``), so the model has SmolLM2's exact shape; random weights almost never
  emit EOS, so responses run to the token budget.
  **HBM roofline of the decode**: ``fraction = (decode_steps x W + kv_bytes_per_token x
  generated_tokens x (prompt_tokens + mean_response_tokens / 2)) / decode_seconds / 4.8e12``, with
  ``W`` the bytes of all weights in bf16 (2 x parameters; tied head counted once) read once per
  decode step, ``kv_bytes_per_token = 2 (K, V) x layers x kv_heads x head_dim x 2 bytes`` read for
  every cached token a new token attends to, ``decode_seconds`` = ``train/time_generation`` (it also
  holds the prefill and the sampling math, so the fraction is a lower bound), 4.8 TB/s = the H200's
  datasheet HBM bandwidth.
* ``logp_gap`` -- ``train/rollout_logp_gap`` under bf16: the mean |engine log-prob - teacher-forced
  log-prob| of the sampled tokens, computed exactly as :mod:`hca.modules.policy` computes it
  (:func:`hca.rl.ppo.teacher_forced`, lean path, 32 rows per pass) after sampling with
  :class:`hca.rollout.hf.HFRolloutEngine`. The module logs that metric only for engines that keep
  their own weights (vLLM); with the HF engine it is computed here directly, same model shape and
  prompts as ``rl``. Two precisions: ``bf16_mixed`` (fp32 weights under bf16 autocast, the recipe's)
  and ``bf16_weights`` (bf16 parameters), each at the random init (logits std about 0.5: a near-uniform
  distribution) and with the final norm scaled by 6 (``sharp``: logits std about 3, closer to a
  trained model's).
* ``lean_memory`` -- ``benchmarks/memory.py``'s ``--device cuda`` mode (its two worker processes,
  lean and naive) at the Qwen2.5-0.5B preset (hidden 896, 24 layers, 14 heads, 2 KV heads,
  intermediate 4864, V = 151,936, tied), 32 rows x (32 prompt + 512 response) tokens, bf16: peak
  ``torch.cuda.max_memory_allocated`` above the allocation after load of one PPO update
  (``ppo_loss`` + backward), tokens/s of the update.
* ``static_compile`` -- our HF engine's decode at SmolLM2's shape in bf16 weights, same prompts and
  seed as ``rl``: dynamic cache (the default) vs ``use_static_cache=True`` vs ``compile=True``
  (static cache + ``torch.compile(mode="reduce-overhead")`` of the one-token step, i.e. CUDA graphs;
  it is our engine, not HF ``generate``). Generated tokens/s of each (best of 2 timed calls after a
  warm-up; the compiled one's first call, compile included, is reported apart) and the same HBM
  roofline fraction. Should reduce-overhead fail, ``mode="default"`` (inductor, no CUDA graphs) is
  tried and the failure recorded.

Run (GPU; about 5-7 minutes on one H200)::

    make gpu-check                       # = python benchmarks/gpu_check.py --out runs/gpu_check.json
    python benchmarks/gpu_check.py --parts rl,logp_gap

Without a GPU (or with ``--dry-run``) every part runs as a CPU dry run at tiny shapes (tiny Llama,
vocabulary 512, 2 x 2 samples x 8 tokens; memory.py's tiny preset; ``torch.compile`` with the
``aot_eager`` backend instead of inductor) in well under a minute: the figures are meaningless, the
plumbing is what it checks (``tests/test_benchmarks_gpu_check.py``).

Exit status 0 only when every part ran. A global budget (``--budget-s``, default 540 s on GPU)
bounds the whole run: a part that would start past it is skipped with an error, a running one is
killed at it (or at its own cap, ``SETTINGS[mode]["caps"]``), keeping the figures it had written so
far. The JSON (written atomically, after every part too) has, per part, ``ok``, ``seconds``,
``figures`` (finite numbers only), ``info`` (strings, settings, formulas) and, when it failed,
``error`` and ``traceback``. Last line printed: ``gpu_check ok=<parts ok>/<parts> <figures>``.
``GPU_CHECK_INJECT_FAILURE=<part>`` makes that part raise after its work (tests of the failure path).

Needs no install of the repo (its root is put on ``sys.path``): torch, transformers, lightning,
tokenizers, safetensors.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PARTS = ("rl", "logp_gap", "lean_memory", "static_compile")
HBM_BYTES_PER_S = 4.8e12  # H200 datasheet HBM3e bandwidth
ROOFLINE_FORMULA = ("fraction = (decode_steps * W + kv_bytes_per_token * generated_tokens * (prompt_tokens + "
                    "mean_response_tokens / 2)) / decode_seconds / 4.8e12; W = 2 bytes * parameters (bf16, tied "
                    "head once), kv_bytes_per_token = 2 * layers * kv_heads * head_dim * 2 bytes")

# SmolLM2-135M's config values (LlamaForCausalLM)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49_152, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=100000.0,
                  max_position_embeddings=512, rms_norm_eps=1e-5)

SETTINGS = {
    "cuda": dict(shape_name="SmolLM2-135M", shape=SMOLLM2_135M, problems=8, group=8, max_new=256, warmup=1, timed=3,
                 mini_batch=32, gen_repeats=2, warmup_new=16, sharpen=6.0, compile_backend=None,
                 memory_args=["--device", "cuda", "--preset", "qwen2.5-0.5b", "--batch", "32",
                              "--response-tokens", "512", "--prompt-tokens", "32", "--dtype", "bfloat16",
                              "--repeats", "2"],
                 budget_s=540.0, caps={"rl": 240, "logp_gap": 120, "lean_memory": 180, "static_compile": 330}),
    "dry-run": dict(shape_name="tiny Llama (dry run)", shape=TINY_LLAMA, problems=2, group=2, max_new=8, warmup=1,
                    timed=1, mini_batch=4, gen_repeats=1, warmup_new=4, sharpen=6.0, compile_backend="aot_eager",
                    memory_args=["--device", "cpu", "--preset", "tiny", "--batch", "2", "--response-tokens", "16",
                                 "--prompt-tokens", "8", "--dtype", "bfloat16", "--repeats", "1", "--threads", "1"],
                    budget_s=240.0, caps={"rl": 120, "logp_gap": 60, "lean_memory": 90, "static_compile": 90}),
}


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


_PART_OUT: str | None = None  # the running part's result file (child process)


def checkpoint(res: dict) -> None:
    """Write the part's results so far to its result file (atomically), so that a part killed at its
    time limit still hands back the figures it had."""
    if _PART_OUT is not None:
        tmp = _PART_OUT + ".tmp"
        Path(tmp).write_text(json.dumps(res, default=str))
        os.replace(tmp, _PART_OUT)


# ---------------------------------------------------------------------------------------------- models
def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` tokens, built without
    training: ``<|endoftext|>`` (id 0: EOS and pad), the 256 byte symbols, then 2-symbol merges
    (printable ASCII pairs first) up to the size. Encodes any text, decodes any id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = "<|endoftext|>"
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    ascii_first = sorted(alphabet, key=lambda c: (not (33 <= ord(c) <= 126 or c in "ĠĊ"), ord(c)))
    if vocab_size < 1 + len(alphabet) or vocab_size > 1 + len(alphabet) + len(alphabet) ** 2:
        raise ValueError(f"vocab_size must be in [{1 + len(alphabet)}, {1 + len(alphabet) + len(alphabet) ** 2}]")
    vocab = {special: 0}
    for c in ascii_first:
        vocab[c] = len(vocab)
    merges = []
    for a in ascii_first:
        for b in ascii_first:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=special, pad_token=special, padding_side="left",
                                  clean_up_tokenization_spaces=False)
    if len(tok) != vocab_size:
        raise RuntimeError(f"synthetic tokenizer has {len(tok)} tokens, wanted {vocab_size}")
    return tok


def build_llama(shape: dict, tok, seed: int = 0, dtype=None, device="cpu"):
    """A randomly initialised ``LlamaForCausalLM`` of ``shape`` for ``tok`` (built in ``dtype`` on ``device``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    default = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)  # built in the target dtype: no fp32 copy
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model


def model_facts(shape: dict) -> dict:
    """Parameter count (tied head once), bf16 weight bytes and KV bytes per cached token."""
    H, I, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    nh, kv, V = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    hd = H // nh
    per_layer = H * nh * hd + 2 * H * kv * hd + nh * hd * H + 3 * H * I + 2 * H
    params = V * H + L * per_layer + H + (0 if shape["tie_word_embeddings"] else V * H)
    return {"params": params, "weight_bytes_bf16": 2 * params, "kv_bytes_per_token": 2 * L * kv * hd * 2}


def roofline_fraction(facts: dict, decode_steps: float, generated_tokens: float, prompt_tokens: float,
                      mean_response: float, seconds: float) -> float:
    read = decode_steps * facts["weight_bytes_bf16"] + facts["kv_bytes_per_token"] * generated_tokens * (
        prompt_tokens + mean_response / 2)
    return read / max(seconds, 1e-12) / HBM_BYTES_PER_S


def arithmetic_prompts(n: int) -> list[str]:
    """The prompts of benchmarks/rl_step.py's problems (``Q: 12+7*3=? A:``)."""
    import random

    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(0, 99), rng.randint(0, 9), rng.randint(0, 9)
        out.append(f"Q: {a}{rng.choice('+-')}{b}{rng.choice('+-*')}{c}=? A:")
    return out


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- part: rl
def part_rl(S: dict, dev, work: Path, deadline: float, res: dict) -> dict:
    import logging
    import warnings

    import lightning as L
    import torch

    from hca.runtime.console import quiet_console
    from hca.datamodules.rl_problems import ProblemDataModule
    from hca.models.loading import save_checkpoint
    from hca.modules.policy import HCAPolicyModule
    from hca.rl.ppo import PPOConfig
    from hca.prm.model import ProgressRewardModel, hidden_size_of, save_prm
    from hca.prm.scorer import PRMScorer
    from hca.rl.batch import CreditConfig
    from rl_step import write_problems  # the peer script's arithmetic problems

    quiet_console()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    shape, B, G, steps = S["shape"], S["problems"], S["group"], S["warmup"] + S["timed"]
    tok = synthetic_tokenizer(shape["vocab_size"])
    t0 = time.perf_counter()
    policy_dir = work / "policy"
    save_checkpoint(build_llama(shape, tok, seed=0), tok, policy_dir)
    prm_backbone = build_llama(shape, tok, seed=1).model
    prm = ProgressRewardModel(prm_backbone, hidden_size_of(prm_backbone), head_seed=0)
    save_prm(prm.backbone, prm.head, tok, work / "prm", {"max_length": 2048})
    del prm, prm_backbone
    log(f"rl: random {S['shape_name']} policy and PRM written in {time.perf_counter() - t0:.1f} s")
    per_step = PPOConfig(group_size=G, mini_batch_size=S["mini_batch"]).updates_per_step(B * G)
    train_file = write_problems(work / "train.jsonl", B * steps * 2)
    val_file = write_problems(work / "val.jsonl", 4)
    prompt_tokens = statistics.mean(len(x) for x in tok(arithmetic_prompts(64), add_special_tokens=True)["input_ids"])
    facts = model_facts(shape)

    class Clock(L.Callback):
        def __init__(self):
            self.marks: list[tuple[float, int, dict]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(dev)
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
            self.marks.append((time.perf_counter(), pl_module.samples_seen, m))

    figures, info = res["figures"], res["info"]  # filled as it goes: a failure keeps what ran
    for variant in ("grpo", "hca"):
        hca = variant == "hca"
        scorer = PRMScorer(str(work / "prm"), device=dev.type, batch_size=64,
                           dtype="bfloat16" if dev.type == "cuda" else "float32") if hca else None
        module = HCAPolicyModule(
            policy=str(policy_dir), scorer=scorer, dtype="float32",
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-6, weight_decay=0.0, betas=(0.9, 0.99)),
            credit=CreditConfig("grpo", progress_coef=1.0 if hca else 0.0, entropy_beta=1.0 if hca else 0.0),
            ppo=PPOConfig(group_size=G, ppo_epochs=1, mini_batch_size=S["mini_batch"], clip_high=0.28,
                          max_grad_norm=1.0, recompute_old_logp=True),
            sampling={"max_new_tokens": S["max_new"], "temperature": 1.0},
            engine={"engine": "hf", "max_batch_size": 256},
            delimiter="\n", validation=None, seed=0)
        dm = ProblemDataModule(train_file=train_file, val_file=val_file, problems_per_step=B, seed=0)
        clock = Clock()
        trainer = L.Trainer(max_steps=steps * per_step, accelerator="gpu" if dev.type == "cuda" else "cpu", devices=1,
                            precision="bf16-mixed", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, log_every_n_steps=1, callbacks=[clock],
                            default_root_dir=str(work / variant))
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, dm)
        wall = time.perf_counter() - t0
        if len(clock.marks) != steps:
            raise RuntimeError(f"{variant}: {len(clock.marks)} RL steps ran, expected {steps}")
        (ta, sa, _), (tb, sb, _) = clock.marks[S["warmup"] - 1], clock.marks[-1]
        timed = [m for _, _, m in clock.marks[S["warmup"]:]]
        seconds = tb - ta
        tokens = sum(m["train/response_length"] * B * G for m in timed)
        gen_s = sum(m["train/time_generation"] for m in timed)
        decode_steps = sum(m["train/response_length_max"] for m in timed)
        mean_len = statistics.mean(m["train/response_length"] for m in timed)
        f = {"rl_steps_per_s": S["timed"] / seconds, "samples_per_s": (sb - sa) / seconds,
             "generated_tokens_per_s": tokens / seconds, "generation_tokens_per_s": tokens / max(gen_s, 1e-12),
             "step_s": seconds / S["timed"], "mean_response_tokens": mean_len,
             "hbm_roofline_fraction_decode": roofline_fraction(facts, decode_steps, tokens, prompt_tokens, mean_len,
                                                                gen_s),
             "fit_wall_s": wall, "truncated_frac": statistics.mean(m["train/truncated_frac"] for m in timed),
             "skipped_updates": clock.marks[-1][2].get("train/skipped_updates", 0.0)}
        for k in sorted(timed[0]):
            if k.startswith("train/time_"):
                f["median_" + k.split("/", 1)[1] + "_s"] = statistics.median(m[k] for m in timed)
        figures |= {f"{variant}_{k}": v for k, v in f.items()}
        checkpoint(res)
        log(f"rl: {variant}: {f['rl_steps_per_s']:.3f} RL steps/s, {f['samples_per_s']:.1f} samples/s, "
            f"{f['generated_tokens_per_s']:.0f} generated tok/s, decode HBM roofline "
            f"{f['hbm_roofline_fraction_decode']:.3f}, step {f['step_s']:.2f} s "
            f"(generation {f['median_time_generation_s']:.2f}, scoring {f['median_time_scoring_s']:.2f}, "
            f"update {f['median_time_update_s']:.2f})")
        del trainer, module, dm, scorer
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    figures["hca_over_grpo_samples_per_s"] = figures["hca_samples_per_s"] / figures["grpo_samples_per_s"]
    figures["prompt_tokens_mean"] = prompt_tokens
    figures["params"] = facts["params"]
    info |= {"shape": f"{S['shape_name']}: {shape}", "vocab": f"synthetic byte-level BPE of {len(tok)} tokens "
             "(256 byte symbols + 2-symbol merges + <|endoftext|>), same size as the shape's vocabulary; no real "
             "tokenizer (nothing can be downloaded)",
             "per_rl_step": f"{B} problems x {G} samples, <= {S['max_new']} new tokens, temperature 1, "
             f"{per_step} updates of {S['mini_batch']} (AdamW), recompute_old_logp, no reference",
             "precision": "fp32 master weights, Lightning bf16-mixed (the GSM8K recipe's); HF engine",
             "timing": f"{S['warmup']} warm-up + {S['timed']} timed RL steps per variant (fresh Trainer each)",
             "grpo": "progress_coef = entropy_beta = 0", "hca": "progress_coef = entropy_beta = 1, PRMScorer on a "
             "random PRM export of the same backbone shape (bf16 on GPU)",
             "roofline": ROOFLINE_FORMULA + "; decode_seconds = train/time_generation (prefill and sampling "
             "included: a lower bound); W in bf16 because autocast caches the bf16 copies of the fp32 weights for "
             "the whole training_step"}
    return res


# ---------------------------------------------------------------------------------------------- part: logp_gap
def part_logp_gap(S: dict, dev, work: Path, deadline: float, res: dict) -> dict:
    import contextlib

    import torch

    from hca.rl.ppo import teacher_forced
    from hca.rollout.base import SamplingParams
    from hca.rollout.hf import HFRolloutEngine

    shape = S["shape"]
    tok = synthetic_tokenizer(shape["vocab_size"])
    model = build_llama(shape, tok, seed=0, dtype=torch.float32, device=dev).eval()
    prompts = arithmetic_prompts(S["problems"])
    params = SamplingParams(max_new_tokens=S["max_new"], temperature=1.0, n=S["group"], seed=0)
    norm = model.model.norm.weight
    base_norm = norm.detach().clone()
    figures = res["figures"]
    for precision in ("bf16_mixed", "bf16_weights"):
        if precision == "bf16_weights":
            model.to(torch.bfloat16)
            base_norm = base_norm.to(torch.bfloat16)
        for scale_name, scale in (("init", 1.0), ("sharp", S["sharpen"])):
            with torch.no_grad():
                model.model.norm.weight.copy_(base_norm * scale)
            ctx = (torch.autocast(device_type=dev.type, dtype=torch.bfloat16) if precision == "bf16_mixed"
                   else contextlib.nullcontext())
            t0 = time.perf_counter()
            with ctx:
                r = HFRolloutEngine(model, tok, max_batch_size=256).generate(prompts, params)
                ids, attn, start = r.model_inputs()
                logp, _ = teacher_forced(model, ids.to(dev), attn.to(dev), start, r.response_mask.to(dev), 32, 1.0,
                                         512)
            mask = r.response_mask
            gap = (logp.float().cpu() - r.logprobs.float()).abs()[mask]
            key = f"{precision}_{scale_name}"
            figures |= {f"{key}_rollout_logp_gap": float(gap.mean()), f"{key}_rollout_logp_gap_max": float(gap.max()),
                        f"{key}_mean_entropy": float(r.entropy[mask].mean()),
                        f"{key}_mean_logp": float(r.logprobs[mask].mean())}
            checkpoint(res)
            log(f"logp_gap: {key}: mean |engine - teacher-forced| = {float(gap.mean()):.2e} "
                f"(max {float(gap.max()):.2e}) "
                f"over {int(mask.sum())} tokens, entropy {figures[key + '_mean_entropy']:.2f} nats, "
                f"{time.perf_counter() - t0:.1f} s")
    res["info"] |= {
            "what": "train/rollout_logp_gap as hca.modules.policy computes it (mean |teacher_forced(lean, 32 rows "
            "per pass) - engine logprobs| over response tokens), HF engine sampling; the module logs it only for "
            "engines with their own weights (vLLM), so it is computed here directly",
            "shape": f"{S['shape_name']} random weights, synthetic vocabulary {shape['vocab_size']}",
            "sampling": f"{S['problems']} prompts x {S['group']} samples x {S['max_new']} new tokens, temperature 1",
            "conditions": "bf16_mixed: fp32 weights under torch.autocast(bf16) for both passes (the recipe); "
            "bf16_weights: bf16 parameters; init: random init (near-uniform logits); sharp: final RMSNorm weight x "
            f"{S['sharpen']} (peakier, closer to a trained model's logits)"}
    return res


# ---------------------------------------------------------------------------------------------- part: lean_memory
def part_lean_memory(S: dict, dev, work: Path, deadline: float, res: dict) -> dict:
    import memory  # benchmarks/memory.py

    script = str(ROOT / "benchmarks" / "memory.py")
    args = S["memory_args"]
    preset = args[args.index("--preset") + 1]
    res["info"] |= {"how": "benchmarks/memory.py worker processes (one per path): one ppo_loss + backward, peak "
                    "above the memory after load (CUDA: max_memory_allocated; CPU: peak RSS)",
                    "args": " ".join(args), "preset": f"{preset}: {memory.PRESETS[preset]}, vocab {memory.VOCAB}, tied"}
    figures, got = res["figures"], {}
    for path in ("lean", "naive"):
        left = deadline - time.monotonic()
        if left < 5:
            raise TimeoutError(f"no time left for the {path} worker")
        proc = subprocess.run([sys.executable, script, *args, "--worker", path], capture_output=True, text=True,
                              timeout=left)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"memory.py {path} worker failed (rc {proc.returncode}): "
                               f"{(proc.stdout + proc.stderr)[-3000:]}")
        got[path] = r = json.loads(line[len("RESULT "):])
        figures |= {f"peak_mib_{path}": r["peak_mib"], f"base_mib_{path}": r["base_mib"],
                    f"update_s_{path}": r["seconds"], f"first_update_s_{path}": r["first_s"],
                    f"tokens_per_s_{path}": r["tokens_per_s"], f"loss_{path}": r["loss"]}
        checkpoint(res)
        log(f"lean_memory: {path}: peak {r['peak_mib']:.1f} MiB above {r['base_mib']:.1f} MiB after load, "
            f"update {r['seconds']:.3f} s, {r['tokens_per_s']:.0f} tok/s, loss {r['loss']:.6f}")
    figures["peak_ratio_naive_over_lean"] = got["naive"]["peak_mib"] / max(got["lean"]["peak_mib"], 1e-9)
    figures["lean_chunk_size"] = float(got["lean"]["chunk_size"])
    return res


# ---------------------------------------------------------------------------------------------- part: static_compile
def part_static_compile(S: dict, dev, work: Path, deadline: float, res: dict) -> dict:
    import torch

    from hca.rollout.base import SamplingParams
    from hca.rollout.hf import HFRolloutEngine

    shape = S["shape"]
    tok = synthetic_tokenizer(shape["vocab_size"])
    model = build_llama(shape, tok, seed=0, dtype=torch.bfloat16, device=dev).eval()
    prompts = arithmetic_prompts(S["problems"])
    params = SamplingParams(max_new_tokens=S["max_new"], temperature=1.0, n=S["group"], seed=0)
    warm = SamplingParams(max_new_tokens=S["warmup_new"], temperature=1.0, n=S["group"], seed=0)
    prompt_tokens = statistics.mean(len(x) for x in tok(prompts, add_special_tokens=True)["input_ids"])
    facts = model_facts(shape)
    figures, info, outs = res["figures"], res["info"], {}

    def timed(engine, name: str, first=None):
        runs = []
        for _ in range(S["gen_repeats"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: out of time")
            sync(dev)
            t0 = time.perf_counter()
            r = engine.generate(prompts, params)
            sync(dev)
            runs.append((time.perf_counter() - t0, r))
        secs, r = min(runs, key=lambda x: x[0])  # best of gen_repeats
        tokens, steps = r.num_generated_tokens, int(r.response_lengths.max())
        mean_len = tokens / len(r)
        f = {f"tok_s_{name}": tokens / secs, f"generate_s_{name}": secs,
             f"ms_per_decode_step_{name}": 1000 * secs / steps,
             f"hbm_roofline_fraction_{name}": roofline_fraction(facts, steps, tokens, prompt_tokens, mean_len, secs)}
        outs[name] = r
        figures.update(f)
        checkpoint(res)
        log(f"static_compile: {name}: {tokens / secs:.0f} generated tok/s ({tokens} tokens in {secs:.2f} s, "
            f"{1000 * secs / steps:.2f} ms per decode step), HBM roofline {f[f'hbm_roofline_fraction_{name}']:.3f}"
            + (f"; first call (compile) {first:.1f} s" if first is not None else ""))

    for name, kw in (("dynamic", {}), ("static", {"use_static_cache": True})):
        eng = HFRolloutEngine(model, tok, max_batch_size=256, **kw)
        eng.generate(prompts, warm)  # warm-up: kernels, allocator
        timed(eng, name)

    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._logging.set_logs(recompiles=True, graph_breaks=True)  # printed only when they happen
    backend = S["compile_backend"]
    modes = [("reduce-overhead", None)] if backend is None else [(None, backend)]
    if backend is None:
        modes.append(("default", None))
    errors = []
    for mode, be in modes:
        own = be is None and mode == "reduce-overhead" and dev.type == "cuda"  # the engine's own compile setting
        try:
            torch._dynamo.reset()
            if own:
                eng = HFRolloutEngine(model, tok, max_batch_size=256, compile=True)
                how = "HFRolloutEngine(compile=True): static cache, torch.compile(mode='reduce-overhead') of the step"
            else:
                eng = HFRolloutEngine(model, tok, max_batch_size=256, use_static_cache=True)
                eng._step = torch.compile(eng._forward, mode=mode, backend=be or "inductor")
                how = (f"HFRolloutEngine(use_static_cache=True), its one-token step wrapped in "
                       f"torch.compile(mode={mode!r}, backend={be or 'inductor'!r})")
            sync(dev)
            t0 = time.perf_counter()
            eng.generate(prompts, params)  # compiles (and records the CUDA graphs)
            sync(dev)
            first = time.perf_counter() - t0
            timed(eng, "compiled", first)
            figures["compile_first_call_s"] = first
            info["compiled_with"] = how
            break
        except Exception as e:  # noqa: BLE001 - recorded, next mode tried
            errors.append(f"mode={mode} backend={be}: {type(e).__name__}: {e}"[:2000])
            log(f"static_compile: compile mode={mode} backend={be} failed: {type(e).__name__}: {str(e)[:300]}")
            if time.monotonic() > deadline:
                break
    if errors:
        info["compile_errors"] = errors
    figures["dynamo_unique_graphs"] = float(counters["stats"].get("unique_graphs", 0))
    figures["dynamo_graph_breaks"] = float(sum(counters["graph_break"].values()))
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    figures["inductor_cudagraph_skips"] = float(skips)
    if "tok_s_compiled" not in figures:
        raise RuntimeError("no compiled variant ran: " + " | ".join(errors))
    figures["speedup_compiled_vs_dynamic"] = figures["tok_s_compiled"] / figures["tok_s_dynamic"]
    figures["speedup_static_vs_dynamic"] = figures["tok_s_static"] / figures["tok_s_dynamic"]
    for name in ("static", "compiled"):
        same = torch.equal(outs[name].response_ids, outs["dynamic"].response_ids)
        info[f"{name}_same_samples_as_dynamic"] = str(same)
    figures["prompt_tokens_mean"] = prompt_tokens
    info |= {"engine": "hca.rollout.hf.HFRolloutEngine (our engine, not HF generate); dynamic: DynamicCache with "
             "finished rows dropped; static: preallocated StaticCache; compiled: static + torch.compile of the "
             "one-token decode step (reduce-overhead = CUDA graphs on CUDA)",
             "shape": f"{S['shape_name']} random weights in bf16, vocabulary {shape['vocab_size']}",
             "sampling": f"{S['problems']} prompts x {S['group']} samples x {S['max_new']} new tokens, temperature 1, "
             f"seed 0; tok/s = generated tokens / wall seconds of generate(), best of {S['gen_repeats']} after a "
             "warm-up",
             "roofline": ROOFLINE_FORMULA + "; decode_seconds = the whole generate() call"}
    return res


# ---------------------------------------------------------------------------------------------- orchestration
def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "lightning", "tokenizers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            out[name] = f"unavailable ({type(e).__name__})"
    return out


def run_child(args) -> int:
    """Run one part in this process; write ``{"figures", "info"[, "error", "traceback"]}`` to ``--part-out``
    (the figures of what ran before a failure are kept)."""
    import shutil

    import torch

    mode = args.mode
    S = SETTINGS[mode]
    dev = torch.device("cuda" if mode == "cuda" else "cpu")
    if mode == "dry-run":
        torch.set_num_threads(1)  # tiny shapes gain nothing from more (and the test suite shares 2 cores)
    deadline = time.monotonic() + args.part_timeout
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix=f"gpu_check_{args.part}_"))
    work.mkdir(parents=True, exist_ok=True)
    global _PART_OUT
    _PART_OUT = args.part_out
    res: dict = {"figures": {}, "info": {}}
    checkpoint(res)
    fn = {"rl": part_rl, "logp_gap": part_logp_gap, "lean_memory": part_lean_memory,
          "static_compile": part_static_compile}[args.part]
    try:
        fn(S, dev, work, deadline, res)
        if os.environ.get("GPU_CHECK_INJECT_FAILURE") == args.part:  # tests: the failure path of a part
            raise RuntimeError("injected failure (GPU_CHECK_INJECT_FAILURE)")
    except Exception as e:  # noqa: BLE001 - recorded in the JSON
        traceback.print_exc()
        res |= {"error": f"{type(e).__name__}: {e}"[:4000], "traceback": traceback.format_exc()[-6000:]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if dev.type == "cuda":
        res["figures"]["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    bad = {k: v for k, v in res["figures"].items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
    if bad:
        res["figures"] = {k: v for k, v in res["figures"].items() if k not in bad}
        res["info"]["non_finite_figures"] = str(bad)
        res.setdefault("error", f"non-finite or non-numeric figures: {bad}")
    checkpoint(res)
    return 0 if "error" not in res else 1


def write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_part_process(name: str, mode: str, timeout: float) -> tuple[dict, float]:
    """Run part ``name`` in a child process group (killed as a whole at ``timeout``)."""
    import shutil

    work = tempfile.mkdtemp(prefix=f"gpu_check_{name}_")  # removed here too: a killed part cannot clean up
    out = str(Path(work) / "result.json")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--mode", mode, "--part-out", out,
           "--part-timeout", str(max(1.0, timeout - 5)), "--work", str(Path(work) / "work")]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own process group: killed whole, workers included
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except BaseException as e:  # the part's time limit, or this process being stopped (SIGTERM, Ctrl-C)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rc = proc.wait()
        if not isinstance(e, subprocess.TimeoutExpired):
            shutil.rmtree(work, ignore_errors=True)
            raise
        timed_out = True
    seconds = time.perf_counter() - t0
    try:
        res = json.loads(Path(out).read_text() or "{}")  # what the part had written when it ended or was killed
    except (OSError, json.JSONDecodeError):
        res = {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res.setdefault("figures", {})
    res.setdefault("info", {})
    if timed_out:
        res["error"] = f"timed out after {timeout:.0f} s (killed; figures so far kept)"
    elif rc != 0 and "error" not in res:
        res["error"] = f"the part's process exited with rc {rc}"
    return res, seconds


def summary_line(results: dict) -> str:
    keys = {"rl": ("grpo_rl_steps_per_s", "hca_rl_steps_per_s", "grpo_samples_per_s", "hca_samples_per_s",
                   "grpo_hbm_roofline_fraction_decode"),
            "logp_gap": ("bf16_mixed_init_rollout_logp_gap", "bf16_weights_init_rollout_logp_gap",
                         "bf16_mixed_sharp_rollout_logp_gap"),
            "lean_memory": ("peak_mib_lean", "peak_mib_naive", "peak_ratio_naive_over_lean"),
            "static_compile": ("tok_s_dynamic", "tok_s_static", "tok_s_compiled", "speedup_compiled_vs_dynamic")}
    parts = []
    for name, ks in keys.items():
        figs = results.get(name, {}).get("figures", {})
        for k in ks:
            if k in figs:
                v = figs[k]
                parts.append(f"{k}={v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{k}={v:.4g}")
    return " ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="auto: cuda when torch sees a GPU, else the CPU dry run; cpu: the dry run")
    ap.add_argument("--dry-run", action="store_true", help="the CPU dry run at tiny shapes, even with a GPU")
    ap.add_argument("--out", default=str(ROOT / "runs" / "gpu_check.json"), help="the JSON of figures")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=None, help="wall budget of all parts (default: 540 on GPU)")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        return run_child(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped from outside: the running part is killed too

    start = time.perf_counter()
    parts = [p for p in args.parts.split(",") if p]
    if not parts or set(parts) - set(PARTS):
        ap.error(f"--parts must name some of {PARTS}, got {args.parts!r}")
    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda and not args.dry_run:
        log("--device cuda but torch sees no GPU")
        return 2
    mode = "cuda" if cuda and args.device != "cpu" and not args.dry_run else "dry-run"
    S = SETTINGS[mode]
    budget = args.budget_s if args.budget_s is not None else S["budget_s"]
    report = {"script": "benchmarks/gpu_check.py", "mode": mode, "budget_s": budget, "versions": versions(),
              "device": torch.cuda.get_device_name(0) if mode == "cuda" else "cpu (dry run: tiny shapes, figures "
              "meaningless)", "hbm_bytes_per_s": HBM_BYTES_PER_S, "roofline_formula": ROOFLINE_FORMULA,
              "parts": {}}
    log(f"mode={mode} parts={','.join(parts)} budget={budget:.0f} s device={report['device']} "
        + " ".join(f"{k}={v}" for k, v in report["versions"].items()))
    out = Path(args.out)
    for name in parts:
        left = budget - (time.perf_counter() - start)
        if left < 20:
            report["parts"][name] = {"ok": False, "seconds": 0.0, "figures": {},
                                     "error": f"skipped: over the time budget ({budget:.0f} s)"}
            log(f"{name}: SKIPPED (over the {budget:.0f} s budget)")
            continue
        timeout = min(S["caps"][name], left)
        log(f"{name}: start (limit {timeout:.0f} s, {left:.0f} s of the budget left)")
        res, seconds = run_part_process(name, mode, timeout)
        entry = {"ok": "error" not in res, "seconds": seconds, "figures": res.get("figures", {}),
                 "info": res.get("info", {})}
        if "error" in res:
            entry["error"] = res["error"]
            if "traceback" in res:
                entry["traceback"] = res["traceback"]
        report["parts"][name] = entry
        log(f"{name}: {'ok' if entry['ok'] else 'FAILED: ' + entry['error'][:500]} ({seconds:.1f} s)")
        report["wall_s"] = time.perf_counter() - start
        write_json_atomic(out, report | {"partial": True})
    ok = sum(1 for p in report["parts"].values() if p["ok"])
    report |= {"ok": ok == len(parts), "parts_ok": ok, "parts_total": len(parts), "wall_s": time.perf_counter() - start}
    write_json_atomic(out, report)
    log(f"wrote {out} ({report['wall_s']:.1f} s)")
    print(f"gpu_check ok={ok}/{len(parts)} mode={mode} wall_s={report['wall_s']:.0f} "
          + summary_line(report["parts"]), flush=True)
    return 0 if ok == len(parts) else 1


if __name__ == "__main__":
    sys.exit(main())
