"""build_rl_batch: the baselines exactly (alpha = beta = 0), hand-computed progress and entropy credit,
truncation modes, empty responses, mini-batch selection and the logged statistics."""
import math

import pytest
import torch

from hca.credit import OUTCOME_ESTIMATORS
from hca.models.loading import char_tokenizer
from hca.data.problems import Problem
from hca.rl.batch import CreditConfig, build_rl_batch, group_advantages
from hca.rl.metrics import batch_metrics
from hca.rollout import RolloutBatch
from hca.rl.scoring import CallableScorer, NoScorer

TOK = char_tokenizer()
BASELINE = dict(progress_coef=0.0, entropy_beta=0.0)


def rollout(prompts, texts, finish=None, entropy=None, seed=0):
    """A RolloutBatch as the engine would return it: texts tokenized, EOS appended unless cut ("length")."""
    finish = finish or ["eos"] * len(texts)
    g = len(texts) // len(prompts)
    ids = [TOK(t, add_special_tokens=False).input_ids + ([TOK.eos_token_id] if f != "length" else [])
           for t, f in zip(texts, finish)]
    n, t = len(ids), max(map(len, ids))
    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[j < len(r) for j in range(t)] for r in ids])
    resp = torch.tensor([r + [TOK.pad_token_id] * (t - len(r)) for r in ids])
    logp = torch.where(mask, -torch.rand(n, t, generator=gen), 0.0)
    ent = torch.where(mask, torch.rand(n, t, generator=gen) * 2 if entropy is None else entropy, 0.0)
    pids = [TOK(p).input_ids for p in prompts]
    return RolloutBatch(prompt_index=torch.arange(len(prompts)).repeat_interleave(g),
                        prompt_ids=[pids[i] for i in range(len(prompts)) for _ in range(g)], response_ids=resp,
                        response_mask=mask, logprobs=logp, entropy=ent, finish_reason=list(finish), texts=list(texts),
                        pad_token_id=TOK.pad_token_id)


def problems(*answers):
    return [Problem(id=f"p{i}", prompt=f"Q:{a}\n", answer=a) for i, a in enumerate(answers)]


def reference_outcome_adv(r, estimator, eps=1e-6):
    """Hand-written GRPO / RLOO / Dr. GRPO for one group of rewards (lists of floats)."""
    g, mean = len(r), sum(r) / len(r)
    if g < 2 or max(r) == min(r):
        return [0.0] * g
    if estimator == "grpo":
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (g - 1))
        return [(x - mean) / (std + eps) for x in r]
    if estimator == "rloo":
        return [x - (sum(r) - x) / (g - 1) for x in r]
    return [x - mean for x in r]


@pytest.mark.parametrize("estimator", sorted(OUTCOME_ESTIMATORS))
def test_baseline_is_outcome_advantage_on_every_token(estimator):
    probs = problems("3", "7", "5")
    texts = ["1+2=3", "x\n3", "2", "1+1=2\n2+1=3",  # group 0: rewards 1, 1, 0, 1
             "7", "8", "9", "",  # group 1: rewards 1, 0, 0, 0
             "4", "4", "4\n\n4", "6"]  # group 2: all wrong -> zero
    correct = [True, True, False, True, True, False, False, False, False, False, False, False]
    b = build_rl_batch(rollout([p.prompt for p in probs], texts), probs, correct, TOK,
                       CreditConfig(estimator=estimator, **BASELINE), "\n", scorer=NoScorer())
    expect = [a for grp in range(3) for a in reference_outcome_adv([float(c) for c in correct[4 * grp:4 * grp + 4]],
                                                                   estimator)]
    torch.testing.assert_close(b.outcome_adv, torch.tensor(expect), rtol=1e-6, atol=1e-7)
    full = b.outcome_adv.unsqueeze(-1).expand_as(b.advantages)
    assert torch.equal(b.advantages, torch.where(b.response_mask, full, 0.0))  # exactly A_i on every token, 0 on pad
    assert b.values is None and b.progress is None
    assert (b.advantages[8:] == 0).all()  # the all-equal group contributes nothing
    assert torch.equal(b.loss_mask, b.response_mask)
    assert ((b.step_index >= 0) == b.response_mask).all()  # every token incl. EOS (and the empty response's) has a step


def test_progress_and_entropy_hand_computed():
    """G = 2, delimiter "\\n": A = "1+1=2\\n2+3=5" (right), B = "1+1=3\\n3+3=6" (wrong)."""
    probs = problems("5")
    texts = ["1+1=2\n2+3=5", "1+1=3\n3+3=6"]
    ent = torch.tensor([[1.0] * 5 + [3.0] + [2.0] * 6, [0.5] * 12])  # A: step 0 = 6 tokens, step 1 = 5 + EOS
    fn = lambda prompt, prefix: 0.5 if prefix == "" else (0.9 if "=2" in prefix else 0.1)  # noqa: E731
    r = rollout([probs[0].prompt], texts, entropy=ent)
    b = build_rl_batch(r, probs, [True, False], TOK, CreditConfig("grpo", progress_coef=2.0, entropy_beta=0.0), "\n",
                       scorer=CallableScorer(fn))
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(b.outcome_adv, torch.tensor([a, -a]))
    torch.testing.assert_close(b.values[:, :2], torch.tensor([[0.5, 0.9], [0.5, 0.1]]))
    torch.testing.assert_close(b.progress, torch.tensor([[0.4, 0.1], [-0.4, -0.1]]))  # P_K = R - f(h_{K-1})
    torch.testing.assert_close(b.progress.sum(-1), b.outcome - 0.5)  # telescoping: R - f(h_0)
    assert b.step_index[0].tolist() == [0] * 6 + [1] * 6  # delimiter ends step 0; EOS joins the last step
    expect_a = torch.tensor([a + 0.8] * 6 + [a + 0.2] * 6)
    expect_b = torch.tensor([-a - 0.8] * 6 + [-a - 0.2] * 6)
    torch.testing.assert_close(b.advantages, torch.stack([expect_a, expect_b]))

    b1 = build_rl_batch(r, probs, [True, False], TOK, CreditConfig("grpo", progress_coef=2.0, entropy_beta=1.0), "\n",
                        scorer=CallableScorer(fn))
    # A step 0: H = [1]*5 + [3], mean 8/6 -> ratios 0.75, 2.25 (inside [0.1, 5]), already mean 1; step 1 flat 2 -> 1.
    w0 = torch.tensor([0.75] * 5 + [2.25])
    torch.testing.assert_close(b1.weights[0], torch.cat([w0, torch.ones(6)]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b1.weights[1], torch.ones(12))
    torch.testing.assert_close(b1.advantages[0], b1.weights[0] * expect_a, rtol=1e-5, atol=1e-6)
    for k in (0, 1):  # each step keeps its total credit
        sel = b1.step_index[0] == k
        torch.testing.assert_close(b1.advantages[0, sel].sum(), b.advantages[0, sel].sum(), rtol=1e-5, atol=1e-5)


def test_no_delimiter_is_one_step_and_empty_response_gets_outcome_credit():
    probs = problems("5")
    texts = ["12345", ""]  # no delimiter: one step; empty: EOS only
    calls = []

    def fn(prompt, prefix):
        calls.append(prefix)
        return 0.25

    b = build_rl_batch(rollout([probs[0].prompt], texts), probs, [True, False], TOK, CreditConfig("dr_grpo", 1.0, 0.0),
                       "\n", scorer=CallableScorer(fn))
    assert b.num_steps.tolist() == [1, 1] and calls == [""]  # the empty response asks for nothing
    assert b.step_index[1, 0] == 0 and b.response_mask[1].sum() == 1
    torch.testing.assert_close(b.progress[:, 0], torch.tensor([0.75, 0.0]))  # empty: zero progress
    torch.testing.assert_close(b.advantages[1, 0], torch.tensor(-0.5))  # its EOS still gets A_i
    torch.testing.assert_close(b.advantages[0, :6], torch.full((6,), 0.5 + 0.75))


def test_truncation_modes():
    probs = problems("5")
    texts, finish = ["5", "5", "4", "555"], ["eos", "eos", "eos", "length"]  # last one "correct" but cut
    r = rollout([probs[0].prompt], texts, finish)
    cfg = CreditConfig("rloo", **BASELINE)
    zero = build_rl_batch(r, probs, [True, True, False, True], TOK, cfg, "\n", truncation="zero_reward")
    assert zero.outcome.tolist() == [1, 1, 0, 0] and zero.included.all()
    torch.testing.assert_close(zero.outcome_adv, torch.tensor(reference_outcome_adv([1, 1, 0, 0], "rloo")))
    assert torch.equal(zero.loss_mask, zero.response_mask)

    mask = build_rl_batch(r, probs, [True, True, False, True], TOK, cfg, "\n", truncation="mask")
    assert mask.included.tolist() == [True, True, True, False]
    torch.testing.assert_close(mask.outcome_adv, torch.tensor(reference_outcome_adv([1, 1, 0], "rloo") + [0.0]))
    assert not mask.loss_mask[3].any() and (mask.advantages[3] == 0).all()
    assert torch.equal(mask.loss_mask[:3], mask.response_mask[:3])
    stats = batch_metrics(mask)
    assert stats["included_frac"] == 0.75 and stats["truncated_frac"] == 0.25
    with pytest.raises(ValueError, match="truncation"):
        build_rl_batch(r, probs, [True] * 4, TOK, cfg, "\n", truncation="drop")


def test_group_advantages_masked_groups():
    rewards = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    included = torch.tensor([[True, True, False], [True, False, False]])  # group 1: one left -> 0
    out = group_advantages(rewards, included, "grpo")
    torch.testing.assert_close(out, torch.tensor([reference_outcome_adv([1, 0], "grpo") + [0.0], [0.0] * 3]))


def test_scorer_errors():
    probs = problems("5")
    r = rollout([probs[0].prompt], ["1\n2", "3"])
    with pytest.raises(ValueError, match="2 steps"):
        build_rl_batch(r, probs, [False, False], TOK, CreditConfig(), "\n", scorer=_BadScorer())
    with pytest.raises(ValueError, match="StepScorer"):
        build_rl_batch(r, probs, [False, False], TOK, CreditConfig(), "\n", scorer=None)
    with pytest.raises(RuntimeError, match="NoScorer"):
        build_rl_batch(r, probs, [False, False], TOK, CreditConfig(), "\n", scorer=NoScorer())


class _BadScorer:
    def score(self, prompts, responses, delimiter, problems=None):
        return [[0.5] for _ in responses]  # one value whatever the number of steps


def test_select_and_metrics():
    probs = problems("3", "7")
    texts = ["1+2=3", "3\n\n3", "x", "7"]
    b = build_rl_batch(rollout([p.prompt for p in probs], texts), probs, [True, True, False, True], TOK,
                       CreditConfig("grpo", 1.0, 1.0), "\n", scorer=CallableScorer(lambda p, h: 0.5))
    sub = b.select(torch.tensor([2, 3]))
    assert len(sub) == 2 and sub.response_mask.shape[1] == 2  # "x"/"7" + EOS: columns cut to 2
    assert sub.input_ids.shape[1] == b.response_start + 2 and torch.equal(sub.group, torch.tensor([1, 1]))
    torch.testing.assert_close(sub.advantages, b.advantages[2:, :2])
    stats = batch_metrics(b)
    assert stats["reward"] == 0.75 and stats["pass_at_group"] == 1.0 and stats["zero_var_groups"] == 0.5
    assert stats["response_length"] == (6 + 5 + 2 + 2) / 4 and stats["num_steps"] == 1.25
    for key in ("entropy", "entropy_step_0", "entropy_step_1", "adv_mean", "adv_std", "adv_abs_mean",
                "progress_mean", "progress_std", "progress_abs_mean", "value_h0"):
        assert math.isfinite(stats[key]), key
    assert "entropy_step_2" not in stats


GUARD_VALUES = {"": 0.5, "1+1=2": 0.6, "1+1=2\n2+3=5": 0.9, "1+1=3": 0.3, "1+1=3\n3+3=6": 0.7}


def guarded_batch(**credit):
    """G = 2 on "5": A = "1+1=2\\n2+3=5\\n5+0=5" (right; the answer is fixed at step 2, step 3 restates it),
    B = "1+1=3\\n3+3=6\\n0-=0" cut at the budget (truncated, R = 0)."""
    probs = problems("5")
    texts = ["1+1=2\n2+3=5\n5+0=5", "1+1=3\n3+3=6\n0-=0"]
    scorer = CallableScorer(lambda prompt, prefix: GUARD_VALUES[prefix.rstrip("\n")])
    return build_rl_batch(rollout([probs[0].prompt], texts, finish=["eos", "length"]), probs, [True, False], TOK,
                          CreditConfig(entropy_beta=0.0, **credit), "\n", scorer=scorer)


def test_answer_guard_hand_computed():
    from hca.rl.batch import answer_steps

    assert answer_steps(["1+1=2\n2+3=5\n5+0=5", "1+1=3\n3+3=6\n0-=0", "", "7"], problems("5", "5", "5", "5"),
                        "\n") == [2, 3, 0, 1]
    off = guarded_batch()
    # values A: 0.5, 0.6, 0.9, R = 1 -> P = 0.1, 0.3, 0.1;  B: 0.5, 0.3, 0.7, R = 0 -> P = -0.2, 0.4, -0.7
    torch.testing.assert_close(off.progress, torch.tensor([[0.1, 0.3, 0.1], [-0.2, 0.4, -0.7]]))
    on = guarded_batch(answer_guard=True)
    # A grounded at step 2: 1 - 0.6 = 0.4, step 3 gets 0 (still sums to R - V(h_0) = 0.5);
    # B truncated: no positive step, 0.4 -> 0
    torch.testing.assert_close(on.progress, torch.tensor([[0.1, 0.4, 0.0], [-0.2, 0.0, -0.7]]))
    a = on.outcome_adv  # [+0.7071, -0.7071]: the restating step keeps its outcome credit, only progress is 0
    steps = on.step_index
    torch.testing.assert_close(on.advantages[0][steps[0] == 2], a[0].expand(int((steps[0] == 2).sum())))
    torch.testing.assert_close(on.advantages[1][steps[1] == 1], a[1].expand(int((steps[1] == 1).sum())))


def test_progress_forms_through_the_batch():
    from hca.credit import clip_progress, min_form_progress

    base = guarded_batch(answer_guard=True).progress
    k = torch.tensor([2, 3])  # steps that carry progress under the guard
    torch.testing.assert_close(guarded_batch(answer_guard=True, progress_form="min", min_temperature=0.05).progress,
                               min_form_progress(base, k, 0.05))
    clipped = guarded_batch(answer_guard=True, progress_form="clip").progress
    torch.testing.assert_close(clipped, clip_progress(base, k))
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.4, 0.0], [-0.2, 0.0, -0.7]]))  # by hand
    # off: the guards' settings at their defaults are today's credit exactly
    assert torch.equal(guarded_batch(progress_form="step").advantages, guarded_batch().advantages)


def test_entropy_bonus_through_the_batch():
    plain = guarded_batch(progress_coef=0.0)
    bonus = guarded_batch(progress_coef=0.0, entropy_bonus=0.4, entropy_bonus_kappa=2.0)
    expect = plain.advantages + torch.minimum(0.4 * plain.entropy, plain.advantages.abs() / 2)
    torch.testing.assert_close(bonus.advantages, torch.where(plain.response_mask, expect, 0.0))
    with pytest.raises(ValueError, match="entropy_bonus"):
        CreditConfig(entropy_bonus=-1.0)
    with pytest.raises(ValueError, match="progress_form"):
        CreditConfig(progress_form="sum")


@pytest.mark.parametrize("guard", [dict(answer_guard=True), dict(progress_form="clip"),
                                   dict(progress_form="min", min_temperature=0.05)])
def test_guards_stop_a_scorer_that_pays_for_junk_lines(guard):
    """The sparse regime's failure in miniature: a scorer whose value climbs 0.1 with every line, whatever
    it says. Unguarded, a response that fills its budget with junk lines collects positive step credit
    on its way to R = 0; each guard takes that away (the truncated response's steps earn nothing
    positive) while a short right response keeps its positive credit."""
    probs = problems("5")
    junk = "1+1=2\n" + "0-=0\n" * 6 + "0-=0"  # cut at the budget: no verified answer
    texts = [junk, "1+1=2\n2+3=5"]
    scorer = CallableScorer(lambda prompt, prefix: min(0.2 + 0.1 * prefix.count("\n"), 0.95))

    def batch(**credit):
        return build_rl_batch(rollout([probs[0].prompt], texts, finish=["length", "eos"]), probs, [False, True], TOK,
                              CreditConfig(entropy_beta=0.0, **credit), "\n", scorer=scorer)

    plain, guarded = batch(), batch(**guard)
    k = int(plain.num_steps[0])
    assert (plain.progress[0, :k - 1] > 0).all()  # unguarded: every junk line is paid +0.1
    assert (guarded.progress[0, :k] <= 1e-6).all()  # guarded: no step of the cut response is paid
    assert batch_metrics(guarded)["progress_total"] < batch_metrics(plain)["progress_total"]
    assert guarded.progress[1].sum() > 0  # the right response keeps positive credit
