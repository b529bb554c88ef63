"""A real model on GSM8K through hca's prompt formats, engines and verifier (not a test).

For a local model folder (or a ``.gguf`` file, converted by :mod:`hca.models.gguf`), on the first
``--limit`` problems of a GSM8K file, for each prompt format of ``--formats``:

* ``ours``: the tokenizer's chat template, user message = question + the recipes' instruction
  (steps separated by a blank line, the answer in ``\\boxed{}``): ``PromptFormat()``, what the recipes use;
* ``own``: the chat template with the question alone (the model answers in its own style);
* ``plain``: the plain template ``Question: ...\\n<instruction>\\nAnswer:\\n`` (no chat template).

and each decoding of ``--decoding`` (``greedy``; ``sampled``: T = ``--temperature`` (1), top-p 1, ``--n`` samples per
problem), it reports pass@1 (mean over samples of ``hca.verify.is_correct``), the fraction of
responses cut at ``--max-new-tokens``, the mean tokens per response, and generated tokens per
second of the engine (``--engine vllm`` or ``hf``; fp32 unless ``--dtype``).

``--engines-check N``: also the HF engine's and vLLM's tok/s on the first N problems of the
first format, greedy and sampled, and how many greedy texts are identical between them.

Run: ``python benchmarks/real_model_gsm8k.py --model runs/models/smollm2-135m-instruct --limit 500``.
Writes ``--out`` (JSON, atomically) and prints one last line of figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FORMATS = ("ours", "own", "plain")


def prompt_format(name: str):
    from hca.data.prompts import PromptFormat

    return {"ours": PromptFormat(style="chat"), "own": PromptFormat(style="chat", instruction=""),
            "plain": PromptFormat(style="plain")}[name]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--problems", default=None, help="GSM8K JSONL (default: the shared test.jsonl)")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--decoding", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    p.add_argument("--n", type=int, default=1, help="samples per problem when sampled")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="sampled decoding's temperature")
    p.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kv-cache-gb", type=float, default=1.0)
    p.add_argument("--engines-check", type=int, default=0, help="problems for the HF vs vLLM comparison (0: none)")
    p.add_argument("--out", default="runs/bench/real_model_gsm8k.json")
    return p.parse_args(argv)


def build(kind: str, model: str, tokenizer, args, context: int):
    if kind == "vllm":
        from hca.rollout.vllm import engine_for

        return engine_for(model, tokenizer, dtype=args.dtype, max_model_len=context, kv_cache_gb=args.kv_cache_gb)
    from hca.models.loading import load_causal_lm
    from hca.rollout.hf import HFRolloutEngine

    return HFRolloutEngine(load_causal_lm(model, args.dtype, tokenizer=tokenizer).requires_grad_(False).eval(), tokenizer)


def run(engine, prompts, problems, params) -> dict:
    from hca.verify import batch_is_correct

    t0 = time.perf_counter()
    batch = engine.generate(prompts, params)
    dt = time.perf_counter() - t0
    refs = [p.answer for p in problems for _ in range(params.n)]
    ok = batch_is_correct(batch.texts, refs, "gsm8k")
    lengths = batch.response_mask.sum(1)
    return {"pass@1": sum(ok) / len(ok), "truncated": sum(r == "length" for r in batch.finish_reason) / len(ok),
            "tokens_per_response": float(lengths.float().mean()), "tok_per_s": float(lengths.sum()) / dt,
            "seconds": dt, "responses": len(ok), "texts": batch.texts, "correct": ok}


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from hca.models.gguf import resolve_model_ref
    from hca.models.loading import load_tokenizer
    from hca.data.problems import load_problems
    from hca.evaluation.processbench import data_dir
    from hca.rollout.base import SamplingParams
    from hca.data.trajectories import write_json_atomic

    model = resolve_model_ref(args.model)
    tok = load_tokenizer(model)
    path = args.problems or str(Path(data_dir(), "gsm8k", "test.jsonl"))
    problems, _ = load_problems(path, task="gsm8k", limit=args.limit)
    rendered = {f: [prompt_format(f).render(p.question, tok) for p in problems] for f in args.formats}
    longest = max(len(ids) for f in rendered for ids in tok(rendered[f], add_special_tokens=True)["input_ids"])
    context = -(-(longest + args.max_new_tokens) // 32) * 32
    engine = build(args.engine, model, tok, args, context)
    results: dict = {"model": args.model, "problems": path, "limit": len(problems), "engine": args.engine,
                     "temperature": args.temperature, "n": args.n,
                     "dtype": args.dtype, "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
                     "runs": {}, "examples": {}}
    for f in args.formats:
        for d in args.decoding:
            params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=(d == "greedy"),
                                    n=1 if d == "greedy" else args.n, seed=0, temperature=args.temperature)
            r = run(engine, rendered[f], problems, params)
            results["examples"][f"{f}/{d}"] = r.pop("texts")[:3]
            r.pop("correct")
            results["runs"][f"{f}/{d}"] = r
            print(f"{f:>6} {d:>7}: pass@1 {r['pass@1']:.3f}  truncated {r['truncated']:.2f}  "
                  f"tokens/response {r['tokens_per_response']:.0f}  {r['tok_per_s']:.0f} tok/s ({r['seconds']:.0f} s)",
                  flush=True)
    if args.engines_check:
        k = args.engines_check
        f = args.formats[0]
        check = {}
        texts = {}
        for kind in ("hf", "vllm"):
            eng = engine if kind == args.engine else build(kind, model, tok, args, context)
            for d in ("greedy", "sampled"):
                params = SamplingParams(max_new_tokens=args.max_new_tokens, greedy=(d == "greedy"),
                                        n=1 if d == "greedy" else 4, seed=0, temperature=args.temperature)
                r = run(eng, rendered[f][:k], problems[:k], params)
                if d == "greedy":
                    texts[kind] = r["texts"]
                check[f"{kind}/{d}"] = {key: r[key] for key in ("tok_per_s", "seconds", "pass@1", "truncated")}
                print(f"engines {kind:>4} {d:>7}: {r['tok_per_s']:.0f} tok/s on {k} prompts", flush=True)
        check["greedy_identical"] = sum(a == b for a, b in zip(texts["hf"], texts["vllm"]))
        check["prompts"] = k
        results["engines"] = check
    write_json_atomic(args.out, results)
    best = max(results["runs"], key=lambda key: results["runs"][key]["pass@1"])
    figures = " ".join(f"{key.replace('/', '_')}_pass1={r['pass@1']:.3f}" for key, r in results["runs"].items())
    extra = ""
    if "engines" in results:
        e = results["engines"]
        extra = (f" vllm_greedy_tok_s={e['vllm/greedy']['tok_per_s']:.0f} hf_greedy_tok_s={e['hf/greedy']['tok_per_s']:.0f}"
                 f" vllm_sampled_tok_s={e['vllm/sampled']['tok_per_s']:.0f} hf_sampled_tok_s={e['hf/sampled']['tok_per_s']:.0f}"
                 f" greedy_identical={e['greedy_identical']}/{e['prompts']}")
    print(f"{figures} best={best}{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
