"""Tests of hca.credit: hand-worked tables (expected numbers are literals, arithmetic in comments)
and properties (telescoping, credit conservation, masking, NaN safety, baselines)."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from hca.credit import (
    aggregate,
    entropy_weights,
    kl_k3,
    outcome_advantages,
    policy_loss,
    step_progress,
    token_advantages,
    token_entropy,
    whiten_progress,
)

AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
ESTIMATORS = ["grpo", "rloo", "dr_grpo"]
NAN, INF = float("nan"), float("inf")


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# token_entropy
# ---------------------------------------------------------------------------------------------
def test_entropy_uniform_is_log_vocab():
    h = token_entropy(torch.zeros(2, 3, 7))
    assert h.shape == (2, 3) and h.dtype == torch.float32
    close(h, torch.full((2, 3), math.log(7)), atol=1e-6)


def test_entropy_peaked_is_zero_and_neg_inf_logits_are_ignored():
    peaked = torch.zeros(4, 50)
    peaked[:, 3] = 1e4
    close(token_entropy(peaked), torch.zeros(4), atol=1e-6)
    # two equal finite logits and masked vocabulary: H = ln 2
    masked = torch.tensor([[0.0, 0.0, -INF, -INF]])
    close(token_entropy(masked), [math.log(2)], atol=1e-6)


def test_entropy_matches_reference_and_temperature():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    p = torch.softmax(logits.double() / 0.7, -1)
    ref = -(p * p.log()).sum(-1)
    close(token_entropy(logits, temperature=0.7), ref, atol=1e-5)
    before = logits.clone()
    token_entropy(logits, temperature=0.7)
    assert torch.equal(logits, before)  # input untouched
    with pytest.raises(ValueError):
        token_entropy(logits, temperature=0.0)


def test_entropy_bf16_matches_fp32():
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 300) * 2
    h32 = token_entropy(logits)
    h16 = token_entropy(logits.bfloat16())
    assert h16.dtype == torch.float32
    close(h16, h32, atol=5e-2)
    close(token_entropy(logits.half()), h32, atol=1e-2)


def test_entropy_chunked_equals_unchunked():
    torch.manual_seed(2)
    logits = torch.randn(3, 7, 13)
    full = token_entropy(logits, chunk_size=10_000)
    for cs in (1, 2, 5, 20):
        torch.testing.assert_close(token_entropy(logits, chunk_size=cs), full, atol=1e-6, rtol=0)
    assert token_entropy(torch.zeros(0, 4, 9)).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# outcome_advantages
# ---------------------------------------------------------------------------------------------
def test_outcome_advantages_hand_table():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # row 0: mean 0.5, sample var = (4 * 0.25) / 3 = 1/3, std = 0.5773503
    #   grpo = +-0.5 / (0.5773503 + 1e-6) = +-0.8660239
    # row 1: mean 0.25, sample var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std = 0.5
    #   grpo = 0.75 / 0.500001 = 1.4999970, -0.25 / 0.500001 = -0.4999990
    close(outcome_advantages(r, "grpo"), [[0.8660239, -0.8660239, -0.8660239, 0.8660239],
                                          [1.4999970, -0.4999990, -0.4999990, -0.4999990]], atol=1e-6)
    # rloo row 0: 1 - mean(0,0,1) = 2/3, 0 - mean(1,0,1) = -2/3
    # rloo row 1: 1 - mean(0,0,0) = 1,   0 - mean(1,0,0) = -1/3
    close(outcome_advantages(r, "rloo"), [[0.6666667, -0.6666667, -0.6666667, 0.6666667],
                                          [1.0, -0.3333333, -0.3333333, -0.3333333]], atol=1e-6)
    # dr_grpo: r - mean
    close(outcome_advantages(r, "dr_grpo"), [[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]], atol=1e-7)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_outcome_advantages_degenerate_groups_are_exactly_zero(estimator):
    r = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.3, 0.3, 0.3]])
    adv = outcome_advantages(r, estimator)
    assert torch.equal(adv, torch.zeros_like(adv))
    single = outcome_advantages(torch.tensor([[1.0], [0.0]]), estimator)  # G = 1
    assert torch.equal(single, torch.zeros(2, 1))
    ints = outcome_advantages(torch.tensor([[1, 0], [1, 1]]), estimator)
    assert ints.is_floating_point() and torch.isfinite(ints).all() and torch.equal(ints[1], torch.zeros(2))


def test_outcome_advantages_rloo_identity_and_unknown():
    torch.manual_seed(3)
    r = torch.rand(5, 6)
    close(outcome_advantages(r, "rloo"), 6 / 5 * (r - r.mean(-1, keepdim=True)))
    with pytest.raises(ValueError, match="dr_grpo.*grpo.*rloo"):
        outcome_advantages(r, "ppo")


# ---------------------------------------------------------------------------------------------
# step_progress / whiten_progress
# ---------------------------------------------------------------------------------------------
def test_step_progress_hand_table():
    values = torch.tensor([[0.2, 0.5, 0.4, 1.0],
                           [0.6, 0.3, NAN, NAN],
                           [0.5, NAN, NAN, NAN]])
    num_steps = torch.tensor([3, 1, 0])
    # row 0: 0.5-0.2, 0.4-0.5, 1.0-0.4; row 1: 0.3-0.6 then zeros (NaN must not leak); row 2: zeros
    close(step_progress(values, num_steps), [[0.3, -0.1, 0.6], [-0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # grounded, R = (0, 1, 1): row 0 last = 0 - 0.4 = -0.4; row 1 last (K=1) = 1 - 0.6 = 0.4
    grounded = step_progress(values, num_steps, outcome=torch.tensor([0.0, 1.0, 1.0]))
    close(grounded, [[0.3, -0.1, -0.4], [0.4, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError):
        step_progress(values, torch.tensor([4, 1, 0]))


def test_step_progress_telescopes():
    torch.manual_seed(4)
    n, s = 16, 6
    num_steps = torch.randint(1, s + 1, (n,))
    values = torch.rand(n, s + 1, dtype=torch.float64)
    outcome = torch.randint(0, 2, (n,)).double()
    beyond = torch.arange(s + 1) >= num_steps[:, None]
    garbage = values.masked_fill(beyond, NAN)  # V(h_K) and later unknown
    p = step_progress(garbage, num_steps, outcome)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), outcome - values[:, 0], atol=1e-12, rtol=0)
    # ungrounded: sums to V(h_K) - V(h_0)
    p = step_progress(values, num_steps)
    torch.testing.assert_close(p.sum(-1), values.gather(1, num_steps[:, None])[:, 0] - values[:, 0])


def test_step_progress_gradient_ignores_garbage():
    values = torch.tensor([[0.2, 0.7, NAN]], requires_grad=True)
    step_progress(values, torch.tensor([1]), torch.tensor([1.0])).sum().backward()
    # P_1 = R - V(h_0): d/dV0 = -1, nothing else
    close(values.grad, [[-1.0, 0.0, 0.0]], atol=0)


def test_whiten_progress():
    p = torch.tensor([[1.0, 3.0, NAN], [2.0, NAN, NAN]])
    n = torch.tensor([2, 1])
    # valid {1, 3, 2}: mean 2, population std sqrt(2/3) = 0.8164966
    close(whiten_progress(p, n), [[-1.2247434, 1.2247434, 0.0], [0.0, 0.0, 0.0]], atol=1e-5)
    # scale only: x / (0.8164966 + 1e-6): 1 -> 1.2247434, 3 -> 3.6742302, 2 -> 2.4494868
    close(whiten_progress(p, n, center=False), [[1.2247434, 3.6742302, 0.0], [2.4494868, 0.0, 0.0]], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# entropy_weights
# ---------------------------------------------------------------------------------------------
def test_entropy_weights_hand_table():
    step_index = torch.tensor([[-1, 0, 0, 1, 1, 1], [0, 0, 0, -1, -1, -1]])
    entropy = torch.tensor([[NAN, 1.0, 3.0, 0.0, 0.0, 6.0], [0.0, 0.0, 0.0, INF, NAN, -INF]])
    w = entropy_weights(entropy, step_index, beta=1.0, w_min=0.1, w_max=2.5, eps=0.0)
    # row 0 step 0: mean H = 2, ratios 0.5, 1.5 (inside the clip), mean 1 -> unchanged
    # row 0 step 1: mean H = 2, ratios 0, 0, 3 -> clip 0.1, 0.1, 2.5; mean 2.7/3 = 0.9
    #   rescaled 0.1/0.9 = 0.1111111, 2.5/0.9 = 2.7777778 (above w_max after the rescale)
    # row 1: a flat step (mean H = 0) -> uniform 1; padding -> 0 whatever its entropy
    close(w, [[0.0, 0.5, 1.5, 0.1111111, 0.1111111, 2.7777778], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]], atol=1e-6)
    # beta = 2, step 0: ratios^2 = 0.25, 2.25, mean 1.25 -> 0.2, 1.8
    w2 = entropy_weights(entropy, step_index, beta=2.0, w_min=0.1, w_max=2.5, eps=0.0)
    close(w2[0, 1:3], [0.2, 1.8], atol=1e-6)


def _random_steps(seed, n=6, t=20):
    g = torch.Generator().manual_seed(seed)
    step_index = torch.full((n, t), -1)
    for i in range(n):
        start = int(torch.randint(0, 4, (1,), generator=g))
        length = int(torch.randint(0, t - start + 1, (1,), generator=g))
        bounds = torch.cumsum(torch.rand(length, generator=g) < 0.3, 0)  # new step w.p. 0.3
        step_index[i, start:start + length] = bounds
    entropy = torch.rand(n, t, generator=g) ** 3 * 4  # heavy mass near 0, some large
    return entropy, step_index


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_entropy_weights_each_step_keeps_its_credit(beta):
    entropy, step_index = _random_steps(5)
    garbage = torch.where(step_index >= 0, entropy, torch.tensor(NAN))
    w = entropy_weights(garbage, step_index, beta=beta)
    assert torch.isfinite(w).all() and (w[step_index < 0] == 0).all() and (w[step_index >= 0] > 0).all()
    torch.testing.assert_close(w, entropy_weights(entropy, step_index, beta=beta))  # no leak
    for i in range(step_index.shape[0]):
        for k in step_index[i].unique().tolist():
            if k < 0:
                continue
            sel = step_index[i] == k
            assert abs(w[i, sel].sum().item() - sel.sum().item()) < 1e-4
            # against a direct per-step computation
            h = entropy[i, sel]
            ref = (h / (h.mean() + 1e-6)).pow(beta).clamp(0.1, 5.0)
            close(w[i, sel], ref / ref.mean(), atol=1e-5)


def test_entropy_weights_beta_zero_is_uniform_and_bounds_checked():
    entropy, step_index = _random_steps(6)
    w = entropy_weights(entropy, step_index, beta=0.0)
    assert torch.equal(w, (step_index >= 0).float())
    with pytest.raises(ValueError):
        entropy_weights(entropy, step_index, w_min=1.5)


# ---------------------------------------------------------------------------------------------
# token_advantages
# ---------------------------------------------------------------------------------------------
def test_token_advantages_hand_table():
    outcome = torch.tensor([0.5, -1.0])
    progress = torch.tensor([[0.3, -0.1], [0.2, NAN]])
    step_index = torch.tensor([[-1, 0, 0, 1], [-1, -1, 0, -1]])
    weights = torch.tensor([[9.0, 0.5, 1.5, 1.0], [NAN, 9.0, 1.0, INF]])
    a, w = token_advantages(outcome, progress, step_index, weights, progress_coef=2.0)
    close(w, [[0.0, 0.5, 1.5, 1.0], [0.0, 0.0, 1.0, 0.0]])  # the weights applied: 0 off the steps
    # row 0 step 0: 0.5 + 2*0.3 = 1.1 -> 0.5*1.1 = 0.55, 1.5*1.1 = 1.65; step 1: 0.5 - 0.2 = 0.3
    # row 1 step 0: -1 + 2*0.2 = -0.6
    close(a, [[0.0, 0.55, 1.65, 0.3], [0.0, 0.0, -0.6, 0.0]], atol=1e-6)


def test_token_advantages_alpha_zero_is_outcome_only():
    entropy, step_index = _random_steps(7)
    outcome = torch.randn(step_index.shape[0])
    progress = torch.full((step_index.shape[0], 21), NAN)
    a, _ = token_advantages(outcome, progress, step_index, weights=None, progress_coef=0.0)
    valid = step_index >= 0
    assert torch.equal(a, torch.where(valid, outcome[:, None].expand_as(a), torch.zeros_like(a)))
    # alpha = 0, beta = 0 is exactly the outcome-only baseline, weights included
    w = entropy_weights(entropy, step_index, beta=0.0)
    assert torch.equal(token_advantages(outcome, progress, step_index, w, 0.0)[0], a)
    # ... and so is every token variant
    for modulate in ("advantage", "progress"):
        inverse = entropy_weights(entropy, step_index, beta=-0.0)
        assert torch.equal(token_advantages(outcome, progress, step_index, w, 0.0, modulate, inverse)[0], a)


# token variants (METHOD.md section 6): entropies [2, 1, 1] in step 0, [1, 3] in step 1, beta = 1, no clip
_VAR_H = torch.tensor([[2.0, 1.0, 1.0, 1.0, 3.0]])
_VAR_STEPS = torch.tensor([[0, 0, 0, 1, 1]])


def _variant_weights(beta):
    return entropy_weights(_VAR_H, _VAR_STEPS, beta=beta, w_min=0.0, w_max=100.0, eps=0.0)


def test_inverse_entropy_weights_hand_table():
    # step 0: mean H 4/3 -> ratios 1.5, .75, .75 (mean 1); inverse: 2/3, 4/3, 4/3, mean 10/9 -> .6, 1.2, 1.2
    # step 1: mean H 2 -> ratios .5, 1.5; inverse: 2, 2/3, mean 4/3 -> 1.5, .5
    close(_variant_weights(1.0), [[1.5, 0.75, 0.75, 0.5, 1.5]], atol=1e-6)
    close(_variant_weights(-1.0), [[0.6, 1.2, 1.2, 1.5, 0.5]], atol=1e-6)


@pytest.mark.parametrize("modulate, sign, expected", [
    # A_i = -0.5, alpha = 1, P = [+0.8, -0.2]: step values A_i + P = [+0.3, -0.7]
    # advantage/same: w * [0.3 | -0.7]
    ("advantage", "same", [0.45, 0.225, 0.225, -0.35, -1.05]),
    # advantage/inverse: step 1 is negative -> inverse weights [1.5, .5]
    ("advantage", "inverse_on_negative", [0.45, 0.225, 0.225, -1.05, -0.35]),
    # progress/same: -0.5 + w * [0.8 | -0.2]
    ("progress", "same", [0.7, 0.1, 0.1, -0.6, -0.8]),
    # progress/inverse: step 1's progress is negative -> -0.5 + [1.5, .5] * -0.2
    ("progress", "inverse_on_negative", [0.7, 0.1, 0.1, -0.8, -0.6]),
])
def test_token_variants_hand_table(modulate, sign, expected):
    outcome, progress = torch.tensor([-0.5]), torch.tensor([[0.8, -0.2]])
    inverse = _variant_weights(-1.0) if sign == "inverse_on_negative" else None
    a, w = token_advantages(outcome, progress, _VAR_STEPS, _variant_weights(1.0), 1.0, modulate, inverse)
    close(a, [expected], atol=1e-6)
    # every variant keeps each step's total: (A_i + P_k) * tokens of step k
    sums = [float(a[0, :3].sum()), float(a[0, 3:].sum())]
    assert sums == pytest.approx([0.3 * 3, -0.7 * 2], abs=1e-6)


@pytest.mark.parametrize("modulate", ["advantage", "progress"])
@pytest.mark.parametrize("sign", ["same", "inverse_on_negative"])
def test_token_variants_keep_step_totals_on_random_batches(modulate, sign):
    entropy, step_index = _random_steps(11)
    n, s = step_index.shape[0], int(step_index.max()) + 1
    g = torch.Generator().manual_seed(3)
    outcome, progress = torch.randn(n, generator=g), torch.randn(n, s, generator=g)
    w = entropy_weights(entropy, step_index, beta=1.5)
    inverse = entropy_weights(entropy, step_index, beta=-1.5) if sign == "inverse_on_negative" else None
    a, applied = token_advantages(outcome, progress, step_index, w, 0.7, modulate, inverse)
    assert torch.isfinite(a).all() and torch.isfinite(applied).all()
    for i in range(n):
        for k in range(s):
            sel = step_index[i] == k
            if sel.any():
                want = (outcome[i] + 0.7 * progress[i, k]) * sel.sum()
                assert float(a[i, sel].sum()) == pytest.approx(float(want), rel=1e-4, abs=1e-4)
                assert float(applied[i, sel].mean()) == pytest.approx(1.0, abs=1e-4)


def test_token_variant_names_are_checked():
    from hca.rl.batch import CreditConfig

    with pytest.raises(ValueError, match="modulate"):
        token_advantages(torch.zeros(1), torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.long), modulate="tokens")
    with pytest.raises(ValueError, match="modulate"):
        CreditConfig(modulate="tokens")
    with pytest.raises(ValueError, match="sign"):
        CreditConfig(sign="opposite")


# ---------------------------------------------------------------------------------------------
# policy_loss / aggregate / kl_k3
# ---------------------------------------------------------------------------------------------
def _tiny_batch():
    ratios = torch.tensor([[1.0, 1.5, 0.9], [0.5, 1.1, 1.0]])
    logp = ratios.log().requires_grad_(True)
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-2.0, 2.0, 5.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return logp, old, adv, mask


@pytest.mark.parametrize("agg, expected", [
    # per-token -min(rA, clip(r)A), clip 0.2:
    #   (0,0) r=1,   A=1:  -1        (0,1) r=1.5, A=1:  -min(1.5, 1.2) = -1.2  clipped (high)
    #   (0,2) r=0.9, A=-1: 0.9       (1,0) r=0.5, A=-2: -min(-1, -1.6) = 1.6   clipped (low)
    #   (1,1) r=1.1, A=2:  -2.2      (1,2) masked out
    ("token_mean", -0.38),                    # (-1 - 1.2 + 0.9 + 1.6 - 2.2) / 5 = -1.9 / 5
    ("seq_mean_token_mean", -0.3666667),      # mean(-1.3 / 3, -0.6 / 2) = mean(-0.4333, -0.3)
    ("seq_mean_token_sum_norm", -0.3166667),  # -1.9 / (2 * 3)
])
def test_policy_loss_hand_table(agg, expected):
    logp, old, adv, mask = _tiny_batch()
    loss, m = policy_loss(logp, old, adv, mask, 0.2, 0.2, agg=agg)
    close(loss, expected, atol=1e-6)
    close(m["clip_frac"], 0.4, atol=1e-7)  # 2 of 5
    close(m["clip_frac_high"], 0.2, atol=1e-7)
    close(m["clip_frac_low"], 0.2, atol=1e-7)
    close(m["ratio_mean"], 1.0, atol=1e-6)  # (1 + 1.5 + 0.9 + 0.5 + 1.1) / 5
    close(m["ratio_max"], 1.5, atol=1e-6)
    # k3 of (old -> new): r - 1 - ln r = 0, 0.0945349, 0.0053605, 0.1931472, 0.0046898; / 5
    close(m["approx_kl"], 0.0595465, atol=1e-6)
    assert all(not v.requires_grad and v.dim() == 0 for v in m.values())


def test_policy_loss_gradient_hand_table():
    logp, old, adv, mask = _tiny_batch()
    loss, _ = policy_loss(logp, old, adv, mask)
    loss.backward()
    # d/dlogp of -rA / 5 = -A r / 5 unclipped; 0 when clipped or masked out
    #   (0,0): -1*1/5 = -0.2, (0,2): 1*0.9/5 = 0.18, (1,1): -2*1.1/5 = -0.44
    close(logp.grad, [[-0.2, 0.0, 0.18], [0.0, -0.44, 0.0]], atol=1e-6)


def test_policy_loss_asymmetric_clip():
    logp = torch.tensor([[1.25, 0.75]]).log()
    adv = torch.tensor([[1.0, -1.0]])
    loss, m = policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2, dtype=torch.bool), clip_low=0.2, clip_high=0.28)
    # r=1.25, A=1: 1.25 < 1 + 0.28, unclipped -> -1.25; r=0.75, A=-1: clip to 1 - 0.2 = 0.8 -> +0.8
    close(loss, -0.225, atol=1e-6)  # (-1.25 + 0.8) / 2
    close(m["clip_frac_low"], 0.5, atol=0)
    close(m["clip_frac_high"], 0.0, atol=0)


def test_policy_loss_unclipped_gradient_is_minus_a_rho_over_count():
    torch.manual_seed(8)
    n, t = 4, 9
    old = torch.randn(n, t)
    logp = (old + (torch.rand(n, t) - 0.5) * 0.15).requires_grad_(True)  # |log r| < 0.075
    adv = torch.randn(n, t)
    mask = torch.rand(n, t) < 0.7
    loss, m = policy_loss(logp, old, adv, mask)
    loss.backward()
    rho = (logp - old).exp().detach()
    expected = torch.where(mask, -adv * rho / mask.sum(), torch.zeros_like(rho))
    torch.testing.assert_close(logp.grad, expected)
    assert m["clip_frac"] == 0


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_masked_positions_change_nothing(agg):
    torch.manual_seed(9)
    n, t = 5, 8
    old = torch.randn(n, t)
    logp0 = old + torch.randn(n, t) * 0.3
    adv = torch.randn(n, t)
    mask = torch.rand(n, t) < 0.6
    mask[2] = False  # an empty row
    junk = torch.tensor([NAN, INF, -INF, 1e30])[torch.randint(0, 4, (n, t))]

    def run(lp, o, a):
        lp = lp.clone().requires_grad_(True)
        loss, metrics = policy_loss(lp, o, a, mask, 0.2, 0.28, agg=agg)
        loss.backward()
        return loss, lp.grad, metrics

    clean = run(logp0, old, adv)
    dirty = run(torch.where(mask, logp0, junk), torch.where(mask, old, junk.flip(0)), torch.where(mask, adv, junk))
    torch.testing.assert_close(dirty[0], clean[0], rtol=0, atol=0)
    torch.testing.assert_close(dirty[1], clean[1], rtol=0, atol=0)
    assert torch.isfinite(dirty[1]).all() and (dirty[1][~mask] == 0).all()
    assert (clean[1][mask] != 0).any()
    for k in clean[2]:
        torch.testing.assert_close(dirty[2][k], clean[2][k], rtol=0, atol=0)


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_all_masked_is_zero(agg):
    logp = torch.full((2, 3), NAN, requires_grad=True)
    loss, m = policy_loss(logp, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), agg=agg)
    loss.backward()
    assert loss.item() == 0 and torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(torch.isfinite(v) for v in m.values())


def test_aggregate_and_unknown():
    v = torch.tensor([[1.0, 2.0, NAN], [4.0, NAN, NAN]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    close(aggregate(v, mask, "token_mean"), 7 / 3)               # (1 + 2 + 4) / 3
    close(aggregate(v, mask, "seq_mean_token_mean"), 2.75)       # mean(1.5, 4)
    close(aggregate(v, mask, "seq_mean_token_sum_norm"), 7 / 6)  # 7 / (2 * 3)
    close(aggregate(v, mask, "seq_mean_token_sum_norm", max_len=7), 0.5)  # 7 / (2 * 7)
    empty_row = torch.tensor([[True, True, False], [False, False, False]])
    close(aggregate(v, empty_row, "seq_mean_token_mean"), 1.5)  # empty rows do not count: mean(1.5)
    close(aggregate(v, empty_row, "token_mean"), 1.5)           # (1 + 2) / 2
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(v, mask, "sum")


def test_kl_k3_hand_table_and_properties():
    logp = torch.tensor([math.log(0.5), math.log(0.3), math.log(0.25), 0.0])
    ref = torch.tensor([math.log(0.25), math.log(0.3), math.log(0.5), 100.0])
    # d = ref - logp: ln 0.5 -> 0.5 + 0.6931472 - 1 = 0.1931472; 0 -> 0;
    #   ln 2 -> 2 - 0.6931472 - 1 = 0.3068528; 100 clamped to 20 -> e^20 - 21 = 485165174.4
    close(kl_k3(logp, ref)[:3], [0.1931472, 0.0, 0.3068528], atol=1e-6)
    close(kl_k3(logp, ref)[3], math.exp(20) - 21, atol=100.0)
    torch.manual_seed(10)
    a, b = torch.randn(50), torch.randn(50)
    assert (kl_k3(a, b) >= 0).all()
    mask = torch.rand(50) < 0.5
    lp = torch.where(mask, a, torch.tensor(NAN)).requires_grad_(True)
    out = kl_k3(lp, torch.where(mask, b, torch.tensor(INF)), mask)
    torch.testing.assert_close(out, torch.where(mask, kl_k3(a, b), torch.zeros(50)))
    out.sum().backward()
    assert torch.isfinite(lp.grad).all() and (lp.grad[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------
# import hygiene
# ---------------------------------------------------------------------------------------------
def test_import_is_light():
    code = ("import hca.credit, sys; print(sorted({k.split('.')[0] for k in sys.modules} & "
            "{'lightning', 'pytorch_lightning', 'transformers', 'deepspeed', 'wandb'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------------------------
# Guards against a farmed progress signal and the additive entropy term
# --------------------------------------------------------------------------------------------
from hca.credit import cap_truncated, clip_progress, entropy_bonus, min_form_progress  # noqa: E402


def test_cap_truncated_hand_computed():
    p = torch.tensor([[0.2, -0.1, 0.3], [0.2, -0.1, 0.3]])
    out = cap_truncated(p, torch.tensor([False, True]))
    close(out, [[0.2, -0.1, 0.3], [0.0, -0.1, 0.0]])


def test_min_form_hand_computed():
    # row 0: P = [0.2, -0.1, 0.3], K = 3; row 1: P = [0.5, 0.4, (pad 9.0)], K = 2
    p = torch.tensor([[0.2, -0.1, 0.3], [0.5, 0.4, 9.0]])
    k = torch.tensor([3, 2])
    t = 0.1

    def softmin(xs):  # sum_j softmax(-x/T)_j x_j, by hand
        w = [math.exp(-x / t) for x in xs]
        return sum(a * x for a, x in zip(w, xs)) / sum(w)

    expect = [[softmin([0.2, -0.1, 0.3]), softmin([-0.1, 0.3]), 0.3], [softmin([0.5, 0.4]), 0.4, 0.0]]
    # e.g. G_2 of row 0 = (e^1 * -0.1 + e^-3 * 0.3) / (e^1 + e^-3) = -0.0929
    assert abs(expect[0][1] - (-0.0929)) < 1e-4
    close(min_form_progress(p, k, t), expect)
    # T -> 0: the hard minimum of the steps from k to the end; T large: their mean
    close(min_form_progress(p, k, 1e-4), [[-0.1, -0.1, 0.3], [0.4, 0.4, 0.0]])
    close(min_form_progress(p, k, 1e6), [[0.4 / 3, 0.1, 0.3], [0.45, 0.4, 0.0]], atol=1e-4)


def test_min_form_never_above_the_last_step_when_it_is_the_worst_and_nan_safe():
    torch.manual_seed(0)
    p = torch.rand(64, 6) * 0.4
    p[:, -1] = -0.9  # every response ends badly (grounded R - V = -0.9)
    k = torch.full((64,), 6)
    g = min_form_progress(p, k, 0.1)
    assert (g <= 0).all() and (g[:, :-1] < p[:, :-1]).all()  # nothing collects positive credit on the way down
    # rows with K = 0 are all zero; NaN beyond K does not leak (value or gradient)
    q = torch.tensor([[0.1, NAN], [NAN, NAN]], requires_grad=True)
    out = min_form_progress(q, torch.tensor([1, 0]))
    assert torch.equal(out.detach(), torch.tensor([[0.1, 0.0], [0.0, 0.0]]))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="temperature"):
        min_form_progress(p, k, 0.0)


def test_clip_progress_hand_computed():
    p = torch.tensor([[0.2, -0.1, 0.3], [0.5, 0.4, 9.0]])
    k = torch.tensor([3, 2])
    close(clip_progress(p, k), [[0.0, -0.1, 0.3], [0.0, 0.4, 0.0]])  # last step (k = K) kept
    close(clip_progress(p, k, eta=0.15), [[0.0, -0.25, 0.3], [0.0, 0.4, 0.0]])  # min(0.2 - 0.15, 0) = 0


def test_entropy_bonus_hand_computed():
    a = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.0, 2.0]])
    h = torch.tensor([[0.5, 3.0, 0.5, 3.0, 3.0, 1.0]])
    m = torch.tensor([[True, True, True, True, True, False]])
    out, psi = entropy_bonus(a, h, m, coef=0.4, kappa=2.0)
    # psi = min(0.4 H, |A| / 2): 0.2, min(1.2, 0.5) = 0.5, 0.2, 0.5, min(1.2, 0) = 0, masked 0
    close(psi, [[0.2, 0.5, 0.2, 0.5, 0.0, 0.0]])
    close(out, [[1.2, 1.5, -0.8, -0.5, 0.0, 0.0]])
    nz = m & (a != 0)
    assert (torch.sign(out[nz]) == torch.sign(a[nz])).all() and (out[m & (a == 0)] == 0).all()
    same, zero = entropy_bonus(a, h, m, coef=0.0)
    assert torch.equal(same, torch.where(m, a, 0.0)) and not zero.any()
    with pytest.raises(ValueError, match="kappa"):
        entropy_bonus(a, h, m, coef=0.4, kappa=1.0)


def test_entropy_bonus_never_flips_a_sign():
    torch.manual_seed(1)
    a = torch.randn(32, 20)
    h = torch.rand(32, 20) * 10
    out, _ = entropy_bonus(a, h, torch.ones_like(a, dtype=torch.bool), coef=5.0, kappa=1.5)
    assert ((out > 0) == (a > 0)).all() and ((out < 0) == (a < 0)).all()
    assert (out.abs() <= a.abs() * (1 + 1 / 1.5) + 1e-6).all()
