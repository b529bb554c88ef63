"""Collection throughput: ``hca.collection.labelling.label_chunk`` vs a naive loop (not a test).

Models: the SFT policy and prover (runs/sft/policy/model, runs/sft/prover/model) where present,
otherwise fresh tiny Llamas of the SFT shape (hidden 128, 4 layers, 4 heads, 2 KV heads; seeds 0
and 1); the output says which. Problems: the first ``--problems`` of runs/data/arithmetic/val.jsonl
(generated if absent). Settings: N = 4 responses, M = 4 prover completions per prefix (and for
h_0), 64 new tokens, T = 1, delimiter "\\n", dedupe on, first pit off, one chunk.

Three measurements in the same process, on the same problems, with the same thread count:

* ``collect``: ``label_chunk`` (policy sampling, segmentation, verification, one batched prover call
  over all unique prefixes, labels); best of ``--repeats`` runs;
* ``raw``: the very engine calls ``label_chunk`` made (same prompts, params and seeds, so the same
  tokens), replayed and timed alone: the engine's raw sampling speed at the same batch shapes;
  ``engine_fraction`` = collection tokens/s over raw tokens/s (the share of time spent sampling);
* ``naive``: the textbook loop on the same work: per problem one ``model.generate(num_return_sequences=N)``
  for the policy, then per unique prefix of the collection one ``model.generate(num_return_sequences=M)``
  for the prover, each verified. ``naive_ratio`` = collection labeled prefixes/s over naive's.

Last line: ``labeled_prefixes_per_s=<x> naive_ratio=<y> engine_fraction=<z>``.
Run: ``python benchmarks/collect.py [--problems 32] [--threads 1] [--repeats 2]``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hca.collection.labelling import CollectionConfig, label_chunk
from hca.models.loading import char_tokenizer, load_causal_lm, load_tokenizer, tiny_llama
from hca.data.problems import load_problems
from hca.rollout import HFRolloutEngine, SamplingParams
from hca.data.arithmetic import ensure_split_files
from hca.verify import batch_is_correct

SFT = {"policy": ("runs/sft/policy/model", 0), "prover": ("runs/sft/prover/model", 1)}


class Recording:
    """Delegates to an engine and keeps every (prompts, params) it was called with."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, params, *, progress=False):
        self.calls.append((list(prompts), params))
        return self.engine.generate(prompts, params, progress=progress)


def load(which: str):
    path, seed = SFT[which]
    if Path(path, "config.json").exists():
        tok = load_tokenizer(path)
        return load_causal_lm(path, tokenizer=tok).eval(), tok, f"SFT checkpoint {path}"
    tok = char_tokenizer()
    model = tiny_llama(tok, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, seed=seed).eval()
    return model, tok, f"fresh tiny Llama of the SFT shape (seed {seed}; {path} not found)"


def naive(problems, policy, ptok, prover, vtok, cfg, prefixes) -> tuple[float, int]:
    """Per-problem policy generate, then per-prefix prover generate + verification. Returns
    (seconds, generated tokens)."""
    def gen(model, tok, text, n, sampling):
        ids = tok(text, return_tensors="pt")
        out = model.generate(**ids, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                             num_return_sequences=n, max_new_tokens=sampling.max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        new = out[:, ids["input_ids"].shape[1]:]
        is_eos = new == tok.eos_token_id
        lengths = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, torch.full_like(is_eos[:, 0], new.shape[1], dtype=torch.long))
        return tok.batch_decode(new, skip_special_tokens=True), int(lengths.sum()), is_eos.any(1).tolist()

    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in problems:
            texts, k, _ = gen(policy, ptok, p.prompt, cfg.num_responses, cfg.policy)
            tokens += k
            batch_is_correct(texts, [p.answer] * len(texts), p.task)
        for p, prefix in prefixes:
            texts, k, ended = gen(prover, vtok, p.prompt + prefix, cfg.num_rollouts, cfg.prover)
            tokens += k
            ok = batch_is_correct([prefix + t for t in texts], [p.answer] * len(texts), p.task)
            sum(a and e for a, e in zip(ok, ended))
    return time.perf_counter() - t0, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=32, help="problems in the chunk")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    ap.add_argument("--repeats", type=int, default=2, help="timed collection / raw replays (best is kept)")
    ap.add_argument("--max-batch-size", type=int, default=256, help="engine sub-batch size (samples)")
    ap.add_argument("--skip-naive", action="store_true", help="skip the naive loop (no naive_ratio)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    policy, ptok, pdesc = load("policy")
    prover, vtok, vdesc = load("prover")
    print(f"policy: {pdesc}\nprover: {vdesc}\nthreads: {args.threads}, engine max_batch_size: {args.max_batch_size}")
    val = ensure_split_files("runs/data/arithmetic")["val"]
    problems, _ = load_problems(val, limit=args.problems)
    cfg = CollectionConfig(num_responses=4, num_rollouts=4, policy=SamplingParams(max_new_tokens=64), delimiter="\n")
    pe, ve = (HFRolloutEngine(policy, ptok, max_batch_size=args.max_batch_size),
              HFRolloutEngine(prover, vtok, max_batch_size=args.max_batch_size))
    label_chunk(problems[:4], pe, ve, cfg, seed=99)  # warm-up

    best, best_raw = None, float("inf")
    for r in range(args.repeats):
        rp, rv = Recording(pe), Recording(ve)
        recs, st = label_chunk(problems, rp, rv, cfg, seed=0)
        if best is None or st.seconds < best[1].seconds:
            best = (recs, st)
        t0, raw_tokens = time.perf_counter(), 0
        for rec in (rp, rv):
            for prompts, params in rec.calls:
                raw_tokens += rec.engine.generate(prompts, params).num_generated_tokens
        best_raw = min(best_raw, time.perf_counter() - t0)
        assert raw_tokens == st.policy_tokens + st.prover_tokens, "replay generated different tokens"
    recs, st = best
    tokens = st.policy_tokens + st.prover_tokens
    rate = st.prefixes_labeled / st.seconds
    collect_tps, raw_tps = tokens / st.seconds, tokens / best_raw
    print(f"collect: {st.problems} problems, {st.responses} responses, {st.prefixes_labeled} labeled prefixes "
          f"({st.prefixes_unique} unique, {st.prefixes_deduped} deduped), {st.prover_generations} prover generations, "
          f"{tokens} tokens (policy {st.policy_tokens}, prover {st.prover_tokens}) in {st.seconds:.2f} s "
          f"(policy {st.seconds_policy:.2f} s, prover {st.seconds_prover:.2f} s) -> {rate:.1f} labeled prefixes/s, "
          f"{collect_tps:.0f} tokens/s")
    print(f"raw engine (same calls replayed): {best_raw:.2f} s -> {raw_tps:.0f} tokens/s")
    ratio = float("nan")
    if not args.skip_naive:
        # the same unique prefixes the collection sent to the prover (h_0 once per problem, each h_k once)
        seen, prefixes = set(), []
        by_id = {p.id: p for p in problems}
        for r in recs:
            for k in range(r.num_steps):
                key = (r.problem_id, r.response[:r.step_spans[k - 1][1]] if k else "")
                if key not in seen:
                    seen.add(key)
                    prefixes.append((by_id[r.problem_id], key[1]))
        secs, ntok = naive(problems, policy, ptok, prover, vtok, cfg, prefixes)
        naive_rate = st.prefixes_labeled / secs
        ratio = rate / naive_rate
        print(f"naive loop: {len(problems)} policy + {len(prefixes)} prover generate calls, {ntok} tokens in {secs:.2f} s "
              f"-> {naive_rate:.1f} labeled prefixes/s, {ntok / secs:.0f} tokens/s")
    print(f"labeled_prefixes_per_s={rate:.1f} naive_ratio={ratio:.2f} engine_fraction={collect_tps / raw_tps:.3f}")


if __name__ == "__main__":
    main()
