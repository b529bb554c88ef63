"""What the learned PRM says about the steps an RL policy writes, against the SFT policy's (not a test).

The PRM is trained on the SFT policy's responses (the collection). RL moves the policy; this asks
how the PRM's step progress ``P_k = f(h_{k+1}) - f(h_k)`` looks on the new policy's steps, split by
position: steps within the gold solution's step count, and steps beyond it (a correct response
never has those: they are the extra lines a length blow-up writes). Positive progress beyond the
gold count is credit for lines that cannot help, i.e. the PRM being exploited.

    python benchmarks/prm_on_rl_steps.py --policy runs/sparse/experiment/progress_only/seed0/model \
        --prm runs/sparse/prm/arithmetic/model --problems runs/sparse/data/arithmetic/val.jsonl

Prints one line per policy and a final line of figures for the last one.
"""
from __future__ import annotations

import argparse
import statistics


def probe(path: str, prm, problems, max_new_tokens: int, seed: int) -> dict[str, float]:
    from hca.models.loading import load_causal_lm, load_tokenizer
    from hca.rollout import HFRolloutEngine, SamplingParams
    from hca.verify import verify_responses

    tok = load_tokenizer(path)
    engine = HFRolloutEngine(load_causal_lm(path, tokenizer=tok).eval(), tok)
    out = engine.generate([p.prompt for p in problems], SamplingParams(max_new_tokens=max_new_tokens).call(1, seed))
    texts = list(out.texts)
    values = prm.values([p.prompt for p in problems], texts, "\n")
    within, beyond, lines = [], [], []
    for p, v in zip(problems, values):
        gold = len([s for s in (p.solution or "").split("\n") if s.strip()]) or None
        progress = [b - a for a, b in zip(v[:-1], v[1:])]
        lines.append(len(progress))
        for k, d in enumerate(progress):
            (within if gold is None or k < gold else beyond).append(d)
    correct = verify_responses(texts, problems)

    def mean(xs):
        return statistics.fmean(xs) if xs else float("nan")

    return {"pass@1": mean([float(c) for c in correct]), "lines": mean(lines), "progress_within": mean(within),
            "progress_beyond": mean(beyond), "positive_beyond": mean([float(d > 0) for d in beyond]),
            "steps_beyond": len(beyond), "steps_within": len(within), "example": texts[0][:120]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", default="runs/sparse/sft/policy/model", help="the policy the PRM's data came from")
    ap.add_argument("--policy", default="runs/sparse/experiment/progress_only/seed0/model", help="an RL policy")
    ap.add_argument("--prm", default="runs/sparse/prm/arithmetic/model")
    ap.add_argument("--problems", default="runs/sparse/data/arithmetic/val.jsonl")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    import torch

    from hca.runtime.console import quiet_console
    from hca.prm.scorer import PRMScorer
    from hca.data.problems import load_problems

    quiet_console()
    torch.set_num_threads(1)
    problems, _ = load_problems(a.problems, limit=a.limit)
    prm = PRMScorer(a.prm, device="cpu")
    res = {}
    for name, path in (("sft", a.sft), ("rl", a.policy)):
        r = res[name] = probe(path, prm, problems, a.max_new_tokens, a.seed)
        print(f"{name} ({path}): pass@1 {r['pass@1']:.3f}, {r['lines']:.1f} lines per response; PRM progress "
              f"within the gold step count {r['progress_within']:+.3f} (n={r['steps_within']}), beyond it "
              f"{r['progress_beyond']:+.3f} (n={r['steps_beyond']}, {r['positive_beyond']:.0%} positive); "
              f"e.g. {r['example']!r}")
    s, r = res["sft"], res["rl"]
    print(f"lines_sft={s['lines']:.1f} lines_rl={r['lines']:.1f} progress_within_sft={s['progress_within']:+.3f} "
          f"progress_within_rl={r['progress_within']:+.3f} progress_beyond_rl={r['progress_beyond']:+.3f} "
          f"positive_beyond_rl={r['positive_beyond']:.2f}")


if __name__ == "__main__":
    main()
