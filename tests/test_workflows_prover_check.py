"""hca.workflows.prover_check: PAV's distinguishability and alignment, hand-computed on a small table, the
best-of-K transform and its noise, candidate parsing, and one end-to-end run on tiny models."""
import json
import math
import statistics

import pytest

from hca.models.loading import char_tokenizer, load_causal_lm, save_checkpoint
from hca.workflows.prover_check import Candidate, Response, advantages, diagnostics, main, noise_var, transform

TINY = ("tiny-llama:hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
        "num_key_value_heads=1,max_position_embeddings=64")


def test_transform_and_noise():
    assert transform(2, 8, 1) == 0.25
    assert transform(2, 8, 4) == pytest.approx(1 - 0.75 ** 4)  # 0.6836
    assert noise_var(2, 8, 1) == pytest.approx(0.25 * 0.75 / 7)
    assert noise_var(2, 8, 4) == pytest.approx(0.25 * 0.75 / 7 * (4 * 0.75 ** 3) ** 2)  # delta method
    assert noise_var(1, 1, 1) == 0.0


def test_advantages_and_diagnostics_hand_computed():
    # one problem, three responses; responses 0 and 1 share their first step ("a"), so three states are
    # visited twice or more: h_0 (3 visits) and "a\n" (2 visits)
    h0 = (0, "", None)
    a, b = (0, "a\n", None), (0, "b\n", None)
    resp = [Response(0, [h0, a], 1), Response(0, [h0, a], 0), Response(0, [h0, b], 0)]
    mu = {h0: (2, 4), a: (3, 4), b: (1, 4)}  # V^mu: 0.5, 0.75, 0.25
    pi = {h0: (1, 4), a: (2, 4), b: (0, 4)}  # V^pi: 0.25, 0.5, 0
    a_mu, noise = advantages(resp, mu, 1)
    assert a_mu == [[0.25, 0.25], [0.25, -0.75], [-0.25, -0.25]]  # [V(a) - V(h0), R - V(a)]
    assert noise[0] == [pytest.approx(0.75 * 0.25 / 3), 0.0]
    a_pi, _ = advantages(resp, pi, 1)
    assert a_pi == [[0.25, 0.5], [0.25, -0.5], [-0.25, 0.0]]
    d = diagnostics(resp, a_mu, noise, a_pi)
    # h_0: A = 0.25, 0.25, -0.25 -> unbiased var 1/12 (x3 visits); "a": A = 0.25, -0.75 -> var 0.5 (x2 visits)
    assert d["distinguishability"] == pytest.approx((3 * (1 / 12) + 2 * 0.5) / 5)
    # noise at the visits of multi-visit states: V(a) 3/16/3 twice, V(b) 3/16/3 once, then the grounded 0s
    assert d["noise"] == pytest.approx(3 * (0.1875 / 3) / 5)
    prods = [0.25 * 0.25, 0.25 * 0.5, 0.25 * 0.25, -0.75 * -0.5, -0.25 * -0.25, -0.25 * 0.0]
    assert d["alignment"] == pytest.approx(statistics.fmean(prods))
    assert d["alignment_inner"] == pytest.approx(statistics.fmean([0.25 * 0.25, 0.25 * 0.25, -0.25 * -0.25]))
    assert d["mean_abs_progress"] == pytest.approx(statistics.fmean([0.25, 0.25, 0.25, 0.75, 0.25, 0.25]))
    assert d["shared_state_visits"] == 5 and d["steps"] == 6
    # a prover that solves everything from everywhere: no progress before the last step, no distinguishability at h_0
    sure = {h0: (4, 4), a: (4, 4), b: (4, 4)}
    a_sure, n_sure = advantages(resp, sure, 1)
    assert [row[0] for row in a_sure] == [0.0, 0.0, 0.0]
    assert diagnostics(resp, a_sure, n_sure, a_pi)["alignment_inner"] == 0.0


def test_candidate_parse(tmp_path):
    assert Candidate.parse("bo4=policy@4") == Candidate("bo4", "policy", 4)
    assert Candidate.parse(f"x={tmp_path}") == Candidate("x", str(tmp_path), 1)
    with pytest.raises(ValueError, match="NAME=PATH"):
        Candidate.parse("policy")
    with pytest.raises(ValueError, match="no checkpoint"):
        Candidate.parse("x=/nonexistent/model")
    with pytest.raises(ValueError, match="best-of-K"):
        Candidate.parse("x=policy@zero")


def test_end_to_end_on_tiny_models(tmp_path):
    from hca.data.problems import write_jsonl_atomic

    import torch

    tok = char_tokenizer(list("12\n"))
    torch.manual_seed(0)
    pol = save_checkpoint(load_causal_lm(TINY, tokenizer=tok), tok, tmp_path / "policy")
    torch.manual_seed(1)
    other = save_checkpoint(load_causal_lm(TINY, tokenizer=tok), tok, tmp_path / "other")
    write_jsonl_atomic(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": "1\n", "answer": "1"} for i in range(3)])
    out = tmp_path / "check.json"
    res = main(["--policy", str(pol), "--problems-file", str(tmp_path / "p.jsonl"), "--problems", "3",
                "--responses", "4", "--rollouts", "4", "--max-new-tokens", "4", "--out", str(out),
                "--candidate", f"other={other}", "--candidate", "self=policy", "--candidate", "bo4=policy@4"])
    saved = json.loads(out.read_text())
    assert saved["responses"] == 12 and [r["candidate"] for r in saved["rows"]] == ["other", "self", "bo4"]
    for r in saved["rows"]:
        assert 0 <= r["value_h0"] <= 1 and r["prover_tokens"] > 0
        assert r["distinguishability"] >= 0 and not math.isnan(r["alignment"])
    self_row, bo4 = saved["rows"][1], saved["rows"][2]
    assert bo4["value_h0"] >= self_row["value_h0"]  # best-of-4 of the same rollouts solves at least as often
    assert bo4["prover_tokens"] == self_row["prover_tokens"]  # the transform costs no new rollouts
    assert json.dumps(res["rows"]) == json.dumps(saved["rows"])  # (NaN corr where a prover never varies)
