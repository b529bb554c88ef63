"""Best-of-N selection and PRM-guided beam search: selection rules on hand-made samples, beam
search with a scripted policy and scorer, and the CLI end to end on a tiny model."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from builders import TINY

from hca.data.problems import Problem
from hca.evaluation.search import METHODS, aggregate, beam_search, best_of_n, parse_args, run


def test_aggregations():
    v = [0.9, 0.5, 0.8, 0.7]  # f(h_0) .. f(h_3)
    assert aggregate(v, "min") == 0.5 and aggregate(v, "last") == 0.7
    assert aggregate(v, "prod") == pytest.approx(0.5 * 0.8 * 0.7)
    assert aggregate([0.4], "min") == 0.4  # empty response: f(h_0)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(v, "mean")


def test_best_of_n_rules():
    # one problem, 4 samples: answers 5 (wrong) x2, 7 (right), 9 (wrong)
    correct = [[False, False, True, False]]
    answers = [["5", "5", "7", "9"]]
    scores = {"min": [[0.2, 0.3, 0.9, 0.1]], "last": [[0.8, 0.3, 0.7, 0.1]], "prod": [[0.5, 0.5, 0.5, 0.5]]}
    r = best_of_n(correct, answers, scores, [1, 2, 4])
    assert r["prm_min"][4] == 1.0 and r["prm_last"][4] == 0.0  # different picks
    assert r["prm_prod"][4] == 0.0  # tie: the first sample
    assert r["majority"][4] == 0.0 and r["oracle"][4] == 1.0 and r["random"][4] == 0.25
    # weighted votes: min gives 5 -> 0.5, 7 -> 0.9, 9 -> 0.1; last gives 5 -> 1.1, 7 -> 0.7; equal weights = majority
    assert r["prm_vote_min"][4] == 1.0 and r["prm_vote_last"][4] == 0.0 and r["prm_vote_prod"][4] == 0.0
    # N = 2: groups (0, 1) and (2, 3); N = 1: the mean over all samples
    assert r["oracle"][2] == 0.5 and r["prm_min"][2] == 0.5 and r["majority"][2] == 0.5
    assert all(r[m][1] == 0.25 for m in r)
    with pytest.raises(ValueError, match="N=8"):
        best_of_n(correct, answers, scores, [8])


@dataclass
class _Out:
    prompt_index: torch.Tensor
    texts: list
    finish_reason: list


class ScriptedPolicy:
    """Proposes, for every prefix, a right and a wrong next step of "Q:1+1+1" (alternating)."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, params):
        idx, texts, why = [], [], []
        for i, p in enumerate(prompts):
            k = p.count("=")  # steps so far
            for j in range(params.n):
                right = (j + self.calls) % 2 == 0
                v = (k + 2) if right else (k + 7)
                last = k == 1
                texts.append(f"{k + 1}+1={v}" + ("" if last else "\n"))
                why.append("eos" if last else "stop")
                idx.append(i)
        self.calls += 1
        return _Out(torch.tensor(idx), texts, why)


class TruthScorer:
    """f = 1 when every step so far is right, else 0.1."""

    def values(self, prompts, responses, delimiter):
        out = []
        for r in responses:
            steps = [s for s in r.split("\n") if s]
            ok = all(s.endswith(f"={k + 2}") for k, s in enumerate(steps))
            out.append([0.5] + [1.0 if ok else 0.1] * len(steps))
        return out


def test_beam_search_keeps_the_best_beams():
    problems = [Problem(id="p", prompt="Q:1+1+1\n", answer="3")]
    policy = ScriptedPolicy()
    (text, ok), = beam_search(policy, TruthScorer(), problems, n=4, expand=2, delimiter="\n", max_steps=5,
                              step_tokens=8, temperature=1.0, seed=0)
    assert ok and text == "1+1=2\n2+1=3"
    assert policy.calls == 2  # two rounds: every beam finished at step 2


def test_cli_end_to_end(tmp_path):
    """Untrained tiny policy and PRM: checks the plumbing and the files, not the figures."""
    from hca.modules.prm import PRMModule
    from hca.data.problems import write_jsonl_atomic
    from hca.data.arithmetic import generate_problems

    m = PRMModule(backbone=TINY, tokenizer="tiny-llama")
    m.configure_model()
    m.export(str(tmp_path / "prm"))
    write_jsonl_atomic(tmp_path / "p.jsonl", (p.to_record() for p in generate_problems(3, 0)))
    args = parse_args(["--prm", str(tmp_path / "prm"), "--policy", TINY, "--tokenizer", "tiny-llama",
                       "--problems", str(tmp_path / "p.jsonl"), "--n", "1", "2", "--out", str(tmp_path / "out"),
                       "--max-new-tokens", "8", "--step-tokens", "4", "--beam-max-steps", "2", "--beam-expand", "2"])
    assert args.delimiter == "\n"
    rep = run(args)
    res = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert set(res) == {*METHODS, "prm_beam"}
    assert all(set(v) == {"1", "2"} and all(0 <= x <= 1 for x in v.values()) for v in res.values())
    assert (tmp_path / "out" / "best_of_n.png").stat().st_size > 1000
    assert "| prm_min |" in (tmp_path / "out" / "results.md").read_text()
    assert rep["num_problems"] == 3
    fe = rep["first_error_f1"]  # the generated arithmetic problems carry meta: ground truth exists
    assert set(fe) == {"value", "progress"} and 0 < fe["value"]["responses"] <= 6
