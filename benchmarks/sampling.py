"""Sampling throughput: HFRolloutEngine vs transformers' ``model.generate`` (not a test).

Shape: tiny Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, tied embeddings, fp32), char
tokenizer, 32 arithmetic prompts x 8 samples, 48 new tokens, temperature 1. Each contender gets a
warm-up call; then the contenders run in turns until each has had a timed window of run time
(interleaved, so that load from other processes hits all alike). Throughput is the median over
calls of generated tokens (up to and including EOS) per second. Contenders, side by side in the same process:

* ``engine``: ``HFRolloutEngine.generate`` (one sub-batch of 256 samples, prefill per prompt);
* ``hf_generate_loop``: ``model.generate(do_sample=True, num_return_sequences=8)`` per prompt;
* ``hf_generate``: ``model.generate`` on the 32 left-padded prompts at once, 8 return sequences.

The last line is ``engine_tokens_per_s=<x> hf_generate_tokens_per_s=<y> ratio=<x/y>`` with ``y``
the batched ``model.generate``. Run: ``python benchmarks/sampling.py [--seconds 5] [--device cpu] [--threads 1]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from hca.models.loading import char_tokenizer, tiny_llama
from hca.rollout import HFRolloutEngine, SamplingParams
from hca.data.arithmetic import generate_problems

NUM_PROMPTS, N, MAX_NEW = 32, 8, 48


def _count(new_tokens: torch.Tensor, eos: int) -> int:
    """Tokens generated per row up to and including the first EOS ([R, T] -> total)."""
    is_eos = new_tokens == eos
    full = torch.full_like(is_eos[:, 0], new_tokens.shape[1], dtype=torch.long)
    return int(torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, full).sum())


def _interleaved(contenders: dict, seconds: float) -> dict[str, tuple[float, int]]:
    """Warm up each contender, then run them in turns (one call each per round) until every one has
    had ``seconds`` of run time. Returns name -> (median over calls of tokens/s, calls): turns and
    the median keep bursts of load from other processes from deciding the comparison."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in contenders.values():
        fn()
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    spent = dict.fromkeys(contenders, 0.0)
    while any(v < seconds for v in spent.values()):
        for name, fn in contenders.items():
            if spent[name] >= seconds:
                continue
            sync()
            t0 = time.perf_counter()
            tokens = fn()
            sync()
            dt = time.perf_counter() - t0
            spent[name] += dt
            rates[name].append(tokens / dt)
    return {k: (statistics.median(r), len(r)) for k, r in rates.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="timed window per contender")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-loop", action="store_true", help="skip the per-prompt generate loop")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: at this size more threads only add sync cost, and "
                         "OpenMP threads spin-waiting on a shared busy machine slow everything badly)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tok = char_tokenizer()
    model = tiny_llama(tok, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=True).to(args.device).eval()
    prompts = [p.prompt for p in generate_problems(NUM_PROMPTS, seed=0)]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    engine = HFRolloutEngine(model, tok, max_batch_size=NUM_PROMPTS * N)
    seed = iter(range(10**9))

    def run_engine() -> int:
        return engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, n=N, seed=next(seed))).num_generated_tokens

    def run_hf_batched() -> int:
        enc = tok(prompts, return_tensors="pt", padding=True).to(args.device)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=MAX_NEW,
                                 num_return_sequences=N, pad_token_id=pad)
        return _count(out[:, enc["input_ids"].shape[1]:], eos)

    def run_hf_loop() -> int:
        total = 0
        for p in prompts:
            enc = tok([p], return_tensors="pt").to(args.device)
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                     max_new_tokens=MAX_NEW, num_return_sequences=N, pad_token_id=pad)
            total += _count(out[:, enc["input_ids"].shape[1]:], eos)
        return total

    print(f"device={args.device} threads={torch.get_num_threads()} prompts={NUM_PROMPTS} n={N} "
          f"max_new_tokens={MAX_NEW} window={args.seconds}s")
    contenders = {"engine": run_engine, "hf_generate": run_hf_batched}
    if not args.skip_loop:
        contenders["hf_generate_loop"] = run_hf_loop
    res = _interleaved(contenders, args.seconds)
    for name, (rate, calls) in res.items():
        print(f"{name:18s}{rate:10.0f} tokens/s ({calls} calls)")
    x, y = res["engine"][0], res["hf_generate"][0]
    if "hf_generate_loop" in res:
        print(f"engine / hf_generate_loop ratio={x / res['hf_generate_loop'][0]:.2f}")
    print(f"engine_tokens_per_s={x:.0f} hf_generate_tokens_per_s={y:.0f} ratio={x / y:.2f}")


if __name__ == "__main__":
    main()
