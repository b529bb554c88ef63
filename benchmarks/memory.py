"""Peak memory (and speed) of ONE RL update, lean vs naive log-probs, at a real vocabulary (not a test).

One update = ``hca.rl.ppo.ppo_loss`` (teacher-forced log-probs of the responses, clipped surrogate,
``token_mean``) and ``loss.backward()`` -- what ``HCAPolicyModule.update`` runs per mini-batch,
without the optimizer step. Two paths, each in its **own child process** so their peaks do not mix:

* ``lean``: ``PPOConfig(logprob_chunk_size=--chunk-size)``: decoder once, LM head chunk by chunk,
  each chunk recomputed in the backward (:mod:`hca.rl.logprobs`);
* ``naive``: ``logprob_chunk_size=None``: full ``[N, T, V]`` logits, fp32 ``log_softmax``.

Model: a randomly initialised ``Qwen2ForCausalLM`` built from a config (nothing is downloaded), tied
embeddings, vocabulary 151,936. ``--preset tiny`` (default): 2 layers, hidden 64, intermediate 128,
4 heads, 2 KV heads. ``--preset qwen2.5-0.5b``: Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14
heads, 2 KV heads, intermediate 4864). Batch: ``--batch`` rows of ``--prompt-tokens`` random prompt
ids then ``--response-tokens`` random response ids, no padding (every response token is scored).

Memory: on CPU, peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` just before the update;
``ru_maxrss`` where that is not possible) minus the RSS right before the update (model, batch and a
one-row warm-up update already done, freed heap returned with ``malloc_trim``); on CUDA,
``torch.cuda.max_memory_allocated`` minus the memory allocated right before the update (peak stats
reset there). Both include the parameter gradients the backward allocates (at the 0.5B preset in
bf16 about 0.9 GiB, the same on both paths). Speed: response tokens / wall seconds of the update, the median of
``--repeats`` further updates (synchronised on CUDA).

Run (CPU, the issue's shape)::

    python benchmarks/memory.py                           # tiny preset, N=16, T=128, fp32, CPU
    python benchmarks/memory.py --device cuda --preset qwen2.5-0.5b --batch 32 --response-tokens 512 --dtype bfloat16

The GPU mode has not been run in this project (no GPU here). Last line:
``peak_mib_lean=<x> peak_mib_naive=<y> ratio=<y/x> tokens_per_s_lean=<a> tokens_per_s_naive=<b>``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
}
VOCAB = 151_936
MIB = 2 ** 20


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=16, help="N: responses in the update")
    p.add_argument("--response-tokens", type=int, default=128, help="T: tokens per response (all scored)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="P: prompt tokens per row")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--chunk-size", type=int, default=None, help="lean path: tokens per LM-head chunk "
                   "(default: hca.rl.logprobs.DEFAULT_CHUNK_TOKENS)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="HF activation checkpointing (both paths)")
    p.add_argument("--repeats", type=int, default=2, help="timed updates after the measured one")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--paths", default="lean,naive", help="comma-separated subset of lean,naive")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so that memory freed while the
    model was built does not sit in the baseline RSS and get reused, unseen, by the update."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> dict:
    import torch
    import transformers

    from hca.rl.logprobs import DEFAULT_CHUNK_TOKENS
    from hca.rl.ppo import PPOConfig, ppo_loss
    from hca.rl.batch import RLBatch

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=32768,
                                   **PRESETS[args.preset])
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the target dtype: no fp32 copy to free (and leave in the heap)
    with torch.device(dev):
        model = transformers.Qwen2ForCausalLM(cfg).train()
    torch.set_default_dtype(default_dtype)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    N, P, T = args.batch, args.prompt_tokens, args.response_tokens
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (N, P + T), generator=g)
    rmask = torch.ones(N, T, dtype=torch.bool)
    zN, zNT = torch.zeros(N), torch.zeros(N, T)
    batch = RLBatch(input_ids=ids, attention_mask=torch.ones_like(ids), response_start=P, response_mask=rmask,
                    loss_mask=rmask, old_logp=-torch.rand(N, T, generator=g) - 11.0, entropy=zNT,
                    step_index=torch.zeros(N, T, dtype=torch.long), num_steps=torch.ones(N, dtype=torch.long),
                    group=torch.arange(N) // 8, truncated=rmask[:, 0] & False, included=rmask[:, 0].clone(),
                    outcome=zN, outcome_adv=zN, values=None, progress=None, weights=rmask.float(),
                    advantages=torch.randn(N, T, generator=g)).to(dev)
    chunk = args.chunk_size or DEFAULT_CHUNK_TOKENS
    ppo = PPOConfig(logprob_chunk_size=chunk if args.worker == "lean" else None)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def update(b):
        loss, _ = ppo_loss(model, b, ppo, temperature=1.0)
        loss.backward()
        return loss

    update(batch.select(torch.tensor([0], device=dev)))  # one-row warm-up: thread pools, kernels
    model.zero_grad(set_to_none=True)
    sync()
    import gc

    gc.collect()
    trim_heap()
    if dev.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
        reset = reset_peak_rss()
        if not reset and peak_rss_bytes() > base:
            print("warning: peak RSS could not be reset; the figure is a lower bound", file=sys.stderr)
    t0 = time.perf_counter()
    loss = update(batch)
    sync()
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else peak_rss_bytes()) - base
    times = []
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        update(batch)
        sync()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2] if times else first
    return {"path": args.worker, "peak_mib": peak / MIB, "base_mib": base / MIB, "first_s": first,
            "seconds": seconds, "tokens_per_s": N * T / seconds, "loss": float(loss),
            "chunk_size": chunk if args.worker == "lean" else None, "threads": torch.get_num_threads()}


def main(argv=None):
    args = parse(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    paths = [p for p in args.paths.split(",") if p]
    if not paths or set(paths) - {"lean", "naive"}:
        raise SystemExit(f"--paths must name lean and/or naive, got {args.paths!r}")
    import torch

    print(f"device={args.device} preset={args.preset} vocab={VOCAB} N={args.batch} P={args.prompt_tokens} "
          f"T={args.response_tokens} dtype={args.dtype} gradient_checkpointing={args.gradient_checkpointing} "
          f"torch={torch.__version__}", flush=True)
    fp32_logits = args.batch * args.response_tokens * VOCAB * 4 / MIB
    print(f"one fp32 copy of the [N, T, V] logits: {fp32_logits:.0f} MiB", flush=True)
    argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    res = {}
    for path in paths:
        out = subprocess.run([sys.executable, __file__, *argv, "--worker", path], capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            sys.stderr.write(out.stdout + out.stderr)
            raise SystemExit(f"{path} worker failed (rc {out.returncode})")
        r = res[path] = json.loads(line[len("RESULT "):])
        print(f"path={path} chunk_size={r['chunk_size']} peak_mib={r['peak_mib']:.1f} "
              f"(above {r['base_mib']:.1f} MiB after load) update_s={r['seconds']:.3f} "
              f"(first {r['first_s']:.3f}) tokens_per_s={r['tokens_per_s']:.1f} loss={r['loss']:.6f} "
              f"threads={r['threads']}", flush=True)
    last = " ".join(f"peak_mib_{p}={res[p]['peak_mib']:.1f}" for p in paths)
    if len(res) == 2:
        last += f" ratio={res['naive']['peak_mib'] / max(res['lean']['peak_mib'], 1e-9):.2f}"
    last += "".join(f" tokens_per_s_{p}={res[p]['tokens_per_s']:.1f}" for p in paths)
    print(last)


if __name__ == "__main__":
    main()
