"""Tiny prover-labeled collections for the PRM tests, written with hca.data.trajectories' own writers.

Responses are gold arithmetic solutions, some with one wrong step (the error propagates, as a
policy's would); MC labels are binomial draws around a value that drops to ~0 after an error, so a
PRM can learn them and first-error detection has a ground truth (ArithmeticProblem.step_correct).
"""
from __future__ import annotations

import random
from pathlib import Path

from hca.steps import split_steps
from hca.data.arithmetic import ArithmeticConfig, ArithmeticProblem, generate_problems
from hca.data.trajectories import FORMAT_VERSION, Trajectory, shard_name, write_manifest, write_shard

TINY = "tiny-llama:hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=1"


def corrupt(p: ArithmeticProblem, error_at: int | None) -> str:
    """A solution of ``p`` with the result of step ``error_at`` off by 1..3 (None: gold)."""
    prev, out = p.start, []
    for k, (op, b) in enumerate(p.ops):
        v = {"+": prev + b, "-": prev - b, "*": prev * b}[op]
        if k == error_at:
            v += 1 + k % 3
        out.append(f"{prev}{op}{b}={v}")
        prev = v
    return "\n".join(out)


def make_records(problems: list[ArithmeticProblem], n_resp: int, seed: int, chunk_id: int, m: int = 8,
                 error_rate: float = 0.5) -> list[Trajectory]:
    rng = random.Random(seed * 1000 + chunk_id)
    out = []
    for p in problems:
        v0 = rng.choice([0.5, 0.75, 0.875, 1.0])
        h0 = [sum(rng.random() < v0 for _ in range(2 * m)), 2 * m]
        for r in range(n_resp):
            err = rng.randrange(p.num_steps) if rng.random() < error_rate else None
            text = corrupt(p, err)
            spans = [list(s) for s in split_steps(text, "\n")]
            K = len(spans)
            correct = p.step_correct(text.split("\n"))
            counts = [h0]
            for k in range(1, K):
                true_v = 0.02 if (err is not None and k > err) else min(1.0, v0 + 0.05 * k)
                counts.append([sum(rng.random() < true_v for _ in range(m)), m])
            outcome = int(all(correct))
            values = [c / t for c, t in counts] + [outcome]
            progress = [values[k + 1] - values[k] for k in range(K)]
            out.append(Trajectory(
                format=FORMAT_VERSION, problem_id=p.id, task="arithmetic", prompt=p.prompt, answer=p.answer,
                response_index=r, response=text, response_token_ids=[1] * len(text), finish_reason="eos",
                truncated=False, outcome=outcome, delimiter="\n", step_spans=spans, h0_count=list(h0),
                counts=counts, values=values, progress=progress, labeled_steps=K, step_correct=correct,
                seed=seed, chunk_id=chunk_id))
    return out


def write_collection(out_dir: Path, num_problems: int = 24, n_resp: int = 4, chunk_size: int = 8, seed: int = 0,
                     error_rate: float = 0.5) -> Path:
    """A complete collection folder (shards + manifest) over freshly generated problems."""
    cfg = ArithmeticConfig(min_steps=2, max_steps=4, max_start=9, max_operand=5, max_value=99)
    problems = generate_problems(num_problems, seed, cfg, id_prefix="train")
    shards = []
    for c in range(0, num_problems, chunk_size):
        recs = make_records(problems[c:c + chunk_size], n_resp, seed, c // chunk_size, error_rate=error_rate)
        sha = write_shard(out_dir / shard_name(c // chunk_size), recs)
        shards.append({"file": shard_name(c // chunk_size), "chunk_id": c // chunk_size, "records": len(recs),
                       "problems": len(problems[c:c + chunk_size]), "sha256": sha, "stats": {}})
    write_manifest(out_dir, {"format": FORMAT_VERSION, "created": "test", "complete": True, "missing_chunks": [],
                             "identity": {}, "totals": {"records": sum(s["records"] for s in shards)}, "shards": shards})
    return out_dir


def problems_file(out_dir: Path, num_problems: int = 24, seed: int = 0) -> Path:
    """The problems of :func:`write_collection` as a problem file (with meta)."""
    from hca.data.problems import write_jsonl_atomic

    cfg = ArithmeticConfig(min_steps=2, max_steps=4, max_start=9, max_operand=5, max_value=99)
    return write_jsonl_atomic(out_dir / "problems.jsonl",
                              (p.to_record() for p in generate_problems(num_problems, seed, cfg, id_prefix="train")))
