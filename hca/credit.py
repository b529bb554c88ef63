"""Credit assignment math (METHOD.md sections 5-7) as pure functions of torch tensors.

Layout, in the order the RL step uses it:

* ``token_entropy``      -- H_t of the behaviour policy's next-token distribution (section 6), fp32, chunked.
* ``outcome_advantages`` -- group-relative outcome advantage A_i: GRPO / RLOO / Dr. GRPO (section 5).
* ``step_progress``      -- P_k = V(h_k) - V(h_{k-1}), last step grounded in the outcome (sections 3, 5).
* ``whiten_progress``    -- optional batch whitening of the valid progress entries (section 5).
* ``cap_truncated``      -- guard: no positive progress on a response cut at its budget (section 10).
* ``min_form_progress``  -- guard: a step's credit is the soft minimum of the progress from it to the end (PURE).
* ``clip_progress``      -- guard: progress ``min(P - eta, 0)`` on every step but the grounded last one (Gao et al.).
* ``entropy_weights``    -- w_t, clipped entropy ratio rescaled to mean 1 within each step (section 6).
* ``token_advantages``   -- A_t = w_t * (A_i + alpha * P_{i,k(t)}) (sections 5, 6).
* ``entropy_bonus``      -- the additive, capped token term A_t + min(c H_t, |A_t| / kappa) (arXiv 2506.14758).
* ``policy_loss``        -- clipped surrogate with asymmetric clip and three aggregations (section 7).
* ``aggregate``          -- the masked reduction shared by ``policy_loss`` and the KL term.
* ``kl_k3``              -- k3 estimator of KL(pi || pi_ref) per token (section 7).

Shapes: ``B`` problems, ``G`` responses per problem, ``N = B*G`` responses, ``T`` token positions,
``S`` step slots, ``V`` vocabulary.  ``step_index [N, T]`` holds the 0-based step of every response
token and -1 at prompt/padding positions.  Everything that must ignore a position does so with
``torch.where`` (never multiplication by a mask), so NaN/inf at ignored positions leaks neither into
values nor into gradients.  Nothing here calls ``.item()`` on hot paths; ``step_progress`` and
``entropy_weights`` each do one host sync (a shape check / a bucket count).

Where this departs from the papers, and why:

* GRPO uses the sample (unbiased) standard deviation, as ``torch.std`` and TRL do.  A group whose
  rewards are all equal, or G = 1, gets exactly 0 by an explicit test, not by relying on eps
  (``(r - mean)`` is not exactly 0 in floating point for e.g. rewards of 0.1).
* Progress is grounded on the last step, ``P_K = R - V(h_{K-1})`` (METHOD section 5), rather than
  using the prover's value after the final step as Setlur et al. do; the sum then telescopes to
  ``R - V(h_0)`` exactly, so progress is potential-based shaping of the verified outcome.
* Entropy weights redistribute credit *within a step* and keep each step's total (mean weight 1);
  GTPO (Tan et al. 2025) instead shapes rewards by entropy across a group's sequences.  The ratio
  is clipped to [w_min, w_max] *before* rescaling, so the final weights can lie slightly outside
  that range; the clip bounds how concentrated the credit can become, the rescale is exact.
* ``policy_loss`` clamps the log-ratio to [-20, 20] before ``exp`` (as verl does): the ratio e^20
  is already far outside any clip range and the clamp avoids ``inf * 0 = NaN`` in backward.  There
  is no dual clip.  ``"seq_mean_token_sum_norm"`` divides by N x T (or N x ``max_len`` when given);
  Dr. GRPO uses the generation budget, which is what ``max_len`` is for.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
"""|log ratio| bound used by ``policy_loss`` and ``kl_k3`` before exponentiating."""

DEFAULT_CHUNK_ELEMENTS = 64 * 2**20
"""``token_entropy`` processes at most about this many logits (64M) per fp32 chunk by default."""


# --------------------------------------------------------------------------------------------
# Token entropy (section 6)
# --------------------------------------------------------------------------------------------
def token_entropy(logits: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Entropy in nats of ``softmax(logits / temperature)`` over the last dim.

    ``logits [..., V]`` of any float dtype -> ``[...]`` float32.  Computed in fp32 in the stable form
    ``H = logsumexp(z) - sum(softmax(z) * z)`` with ``z`` shifted by its row max.  ``-inf`` logits
    (masked vocabulary) contribute 0; every row needs at least one finite logit.

    The leading dims are flattened to rows and processed ``chunk_size`` rows at a time, so e.g.
    ``[N, T, 150_000]`` bf16 logits are never copied whole in fp32.  ``chunk_size=None`` picks
    ``max(1, 64M // V)`` rows.  The function is differentiable, but the RL step records entropies of
    the behaviour policy under ``torch.no_grad`` (METHOD section 6: no gradient flows through H_t).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    finfo_min = torch.finfo(torch.float32).min
    parts = []
    for start in range(0, rows.shape[0], chunk_size):
        z = rows[start:start + chunk_size].float()
        u = z - z.amax(dim=-1, keepdim=True)                                # new fp32 tensor, max 0
        if temperature != 1.0:
            u.div_(temperature)
        u.clamp_min_(finfo_min)                                             # -inf -> finite, exp -> 0
        e = torch.exp(u)                                                    # the only other [c, V] tensor
        total = e.sum(dim=-1)                                               # >= 1 (the max's term)
        parts.append(total.log() - torch.linalg.vecdot(e, u) / total)       # log sum e - E_p[u]
    if not parts:
        return logits.new_zeros(lead, dtype=torch.float32)
    return torch.cat(parts).reshape(lead)


# --------------------------------------------------------------------------------------------
# Outcome advantage (section 5)
# --------------------------------------------------------------------------------------------
def _grpo(r: Tensor, eps: float) -> Tensor:
    return (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + eps)


def _rloo(r: Tensor, eps: float) -> Tensor:
    g = r.shape[-1]
    return r - (r.sum(-1, keepdim=True) - r) / (g - 1)


def _dr_grpo(r: Tensor, eps: float) -> Tensor:
    return r - r.mean(-1, keepdim=True)


OUTCOME_ESTIMATORS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "grpo": _grpo,        # (r - mean) / (std + eps), std unbiased
    "rloo": _rloo,        # r_i - mean_{j != i} r_j  (= G/(G-1) (r_i - mean))
    "dr_grpo": _dr_grpo,  # r - mean
}


def outcome_advantages(rewards: Tensor, estimator: str, eps: float = 1e-6) -> Tensor:
    """Group-relative outcome advantage ``[B, G] -> [B, G]`` (one row per problem).

    ``"grpo"``: ``(r - mean) / (std + eps)``, sample std; ``"rloo"``: ``r_i - mean_{j != i} r_j``;
    ``"dr_grpo"``: ``r - mean``.  A group with all-equal rewards, or G = 1, gives exactly 0.
    Integer/bool rewards are cast to the default float dtype.
    """
    if estimator not in OUTCOME_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {sorted(OUTCOME_ESTIMATORS)}")
    r = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())
    if r.shape[-1] <= 1:
        return torch.zeros_like(r)
    degenerate = (r.amax(-1, keepdim=True) == r.amin(-1, keepdim=True))
    adv = OUTCOME_ESTIMATORS[estimator](r, eps)
    return torch.where(degenerate, torch.zeros_like(adv), adv)


# --------------------------------------------------------------------------------------------
# Step progress (sections 3, 5)
# --------------------------------------------------------------------------------------------
def step_progress(values: Tensor, num_steps: Tensor, outcome: Tensor | None = None) -> Tensor:
    """Progress ``P_k = V(h_k) - V(h_{k-1})`` per step: ``values [N, S+1]``, ``num_steps [N]`` -> ``[N, S]``.

    ``values[:, 0]`` is V(h_0) and ``values[:, k]`` is V(h_k).  Entry ``k-1`` holds P_k for
    ``k <= num_steps`` and 0 beyond; values past a row's last step may be garbage (NaN) and do not
    leak.  With ``outcome [N]`` the last step is grounded, ``P_K = R - V(h_{K-1})`` (so
    ``values[:, K]`` is not read) and the row sums to ``R - V(h_0)`` exactly.  Rows with
    ``num_steps = 0`` are all zeros.  Requires ``0 <= num_steps <= S`` (checked).
    """
    s = values.shape[-1] - 1
    num_steps = num_steps.to(values.device)
    if bool(((num_steps < 0) | (num_steps > s)).any()):
        raise ValueError(f"num_steps must lie in [0, {s}] (S = values.shape[-1] - 1)")
    k = torch.arange(1, s + 1, device=values.device)                 # step number of each entry
    n = num_steps.unsqueeze(-1)
    diff = values[:, 1:] - values[:, :-1]
    if outcome is not None:
        grounded = outcome.to(values.dtype).unsqueeze(-1) - values[:, :-1]
        diff = torch.where(k == n, grounded, diff)
    return torch.where(k <= n, diff, torch.zeros_like(diff))


def whiten_progress(progress: Tensor, num_steps: Tensor, eps: float = 1e-6, center: bool = True) -> Tensor:
    """Whiten the valid progress entries (``k < num_steps``) over the whole batch; 0 elsewhere.

    ``progress [N, S]``, ``num_steps [N]`` -> ``[N, S]``: ``(P - mean) / (std + eps)`` with the
    population std over valid entries.  Caution: centering adds ``-mean`` to every step, i.e.
    ``-K * mean`` to a response's total, a bias by number of steps that breaks the telescoping
    property; ``center=False`` only rescales (keeps sign and the potential-based form up to scale).
    """
    valid = torch.arange(progress.shape[-1], device=progress.device) < num_steps.to(progress.device).unsqueeze(-1)
    p = torch.where(valid, progress, torch.zeros_like(progress))
    count = valid.sum().clamp_min(1)
    mean = p.sum() / count
    var = (torch.where(valid, p - mean, torch.zeros_like(p)) ** 2).sum() / count
    out = ((p - mean) if center else p) / (var.sqrt() + eps)
    return torch.where(valid, out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------------
# Guards against a farmed progress signal (METHOD.md section 10)
# --------------------------------------------------------------------------------------------
def _valid_steps(progress: Tensor, num_steps: Tensor) -> Tensor:
    return torch.arange(progress.shape[-1], device=progress.device) < num_steps.to(progress.device).unsqueeze(-1)


def cap_truncated(progress: Tensor, truncated: Tensor) -> Tensor:
    """``progress [N, S]``, ``truncated [N] bool`` -> ``[N, S]``: ``min(P, 0)`` on every step of a
    truncated row, unchanged elsewhere. A response cut at its budget has no verified answer, so no
    step of it may be rewarded (the farmed responses of the sparse regime were all cut at the budget)."""
    cut = truncated.to(progress.device).bool().unsqueeze(-1)
    return torch.where(cut, progress.clamp(max=0), progress)


def min_form_progress(progress: Tensor, num_steps: Tensor, temperature: float = 0.1) -> Tensor:
    """PURE's min-form credit (Cheng et al. 2025, arXiv 2504.15275): the credit of step ``k`` is the
    soft minimum of the process rewards from it to the last step,
    ``G_k = sum_{j=k..K} softmax_j(-P_j / T) * P_j`` (the softmax over ``j = k..K`` only).

    ``progress [N, S]``, ``num_steps [N]`` -> ``[N, S]``, 0 beyond ``K``. ``T -> 0`` is the hard
    minimum ``min_{j >= k} P_j``; ``T -> inf`` the mean of ``P_k..P_K``. The last step keeps
    ``G_K = P_K`` (grounded in the outcome), and a step is never credited more than the worst step
    after it by much: a response that ends badly cannot collect positive credit on its way there.
    Unlike the sum-form (today's per-step ``P_k``), the credit no longer telescopes to ``R - V(h_0)``.
    ``O(N S^2)`` memory (S is a few dozen steps).
    """
    if not temperature > 0:
        raise ValueError(f"min-form temperature must be > 0, got {temperature!r}")
    s = progress.shape[-1]
    valid = _valid_steps(progress, num_steps)
    p = torch.where(valid, progress, torch.zeros_like(progress))
    idx = torch.arange(s, device=progress.device)
    # window[n, k, j]: j in [k, K) -- the steps whose rewards step k's return soft-minimises
    window = (idx.view(1, 1, s) >= idx.view(1, s, 1)) & valid.unsqueeze(1)
    logits = torch.where(window, (-p / temperature).unsqueeze(1).expand(-1, s, -1),
                         torch.full_like(p, -torch.inf).unsqueeze(1).expand(-1, s, -1))
    any_j = window.any(-1, keepdim=True)
    weight = torch.softmax(torch.where(any_j, logits, torch.zeros_like(logits)), dim=-1)
    g = (torch.where(window, weight, torch.zeros_like(weight)) * p.unsqueeze(1)).sum(-1)
    return torch.where(valid, g, torch.zeros_like(g))


def clip_progress(progress: Tensor, num_steps: Tensor, eta: float = 0.0) -> Tensor:
    """Gao et al.'s Clip (arXiv 2410.15115): ``P_k <- min(P_k - eta, 0)`` for ``k < K``; the last,
    grounded step ``P_K`` (``R - V(h_{K-1})``) is left as is. ``progress [N, S]``, ``num_steps [N]`` ->
    ``[N, S]``, 0 beyond ``K``. Intermediate steps can then only be blamed, never rewarded, so a
    response's total process reward is at most its last step's: more steps cannot earn more."""
    valid = _valid_steps(progress, num_steps)
    k = torch.arange(1, progress.shape[-1] + 1, device=progress.device)
    last = k == num_steps.to(progress.device).unsqueeze(-1)
    out = torch.where(last, progress, (progress - eta).clamp(max=0))
    return torch.where(valid, out, torch.zeros_like(out))


# --------------------------------------------------------------------------------------------
# Token weights and token advantage (section 6)
# --------------------------------------------------------------------------------------------
def entropy_weights(
    entropy: Tensor,
    step_index: Tensor,
    beta: float = 1.0,
    w_min: float = 0.1,
    w_max: float = 5.0,
    eps: float = 1e-6,
    flat_threshold: float = 1e-6,
) -> Tensor:
    """Entropy weights ``w_t`` within each step: ``entropy [N, T]``, ``step_index [N, T]`` -> ``[N, T]``.

    Per (row, step): ``w = clip((H_t / (mean_step H + eps))^beta, w_min, w_max)``, then divided by its
    mean over the step's tokens so the step keeps its total credit (sum of w = token count).  A step
    whose mean entropy is below ``flat_threshold`` gets weight 1 on every token; ``beta = 0`` gives
    exactly 1 on every step token; positions with ``step_index = -1`` get 0 and their entropy (even
    NaN/inf) does not leak.  Negative entropies (rounding) are clamped to 0.

    Defaults: ``w_min = 0.1`` keeps some credit on near-deterministic tokens (a confident wrong token
    still receives a share of a negative advantage) instead of silencing them; ``w_max = 5`` stops a
    single high-entropy token from taking most of a long step's credit.  Both bound the ratio before
    the rescale, so final weights may lie somewhat outside [w_min, w_max].  Need ``0 <= w_min <= 1
    <= w_max``.  Output is float32 (float64 if the input is).  ``beta < 0`` gives the inverse
    weights of the ``inverse_on_negative`` sign rule: confident tokens get more (a zero-entropy token
    the ``w_max`` clip).
    """
    if not 0.0 <= w_min <= 1.0 <= w_max:
        raise ValueError(f"need 0 <= w_min <= 1 <= w_max, got w_min={w_min}, w_max={w_max}")
    dtype = torch.promote_types(entropy.dtype, torch.float32)
    valid = step_index >= 0
    zero = torch.zeros((), dtype=dtype, device=entropy.device)
    if beta == 0:
        return torch.where(valid, torch.ones_like(entropy, dtype=dtype), zero)
    if step_index.numel() == 0:
        return torch.zeros_like(entropy, dtype=dtype)
    # One bucket per (row, step), flattened as row * num_slots + step, plus a dummy bucket for -1.
    n = step_index.shape[0]
    num_slots = int(step_index.max().clamp_min(0)) + 1                        # one host sync
    ids = torch.arange(n, device=step_index.device).unsqueeze(-1) * num_slots + step_index
    ids = torch.where(valid, ids, torch.full_like(ids, n * num_slots)).reshape(-1)

    def bucket_sum(x: Tensor) -> Tensor:
        return torch.zeros(n * num_slots + 1, dtype=dtype, device=x.device).scatter_add_(0, ids, x.reshape(-1))

    counts = bucket_sum(valid.to(dtype)).clamp_min(1)

    def per_step_mean(x: Tensor) -> Tensor:  # mean over each (row, step), broadcast back to tokens
        return (bucket_sum(x) / counts)[ids].reshape(x.shape)

    h = torch.where(valid, entropy.to(dtype), zero).clamp_min(0)
    mean_h = per_step_mean(h)
    w = (h / (mean_h + eps)).pow(beta).clamp(w_min, w_max)
    w = torch.where(valid, w, zero)
    w = w / per_step_mean(w).clamp_min(torch.finfo(dtype).tiny)
    w = torch.where(mean_h < flat_threshold, torch.ones_like(w), w)
    return torch.where(valid, w, zero)


MODULATE = ("advantage", "progress")  # what the entropy weights multiply (METHOD.md section 6)
SIGN_RULES = ("same", "inverse_on_negative")  # which weights a step with a negative modulated term takes


def token_advantages(
    outcome_adv: Tensor,
    progress: Tensor,
    step_index: Tensor,
    weights: Tensor | None = None,
    progress_coef: float = 1.0,
    modulate: str = "advantage",
    inverse_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token advantages and the weights applied: ``(A [N, T], w [N, T])``, 0 where ``step_index = -1``.

    ``outcome_adv [N]``, ``progress [N, S]``, ``step_index [N, T]``, ``weights [N, T]`` (None: all 1),
    ``inverse_weights [N, T]`` (the weights at exponent ``-beta``, :func:`entropy_weights`; None: the
    ``same`` sign rule). With ``s_t = alpha * P_{i, step(t)}`` (METHOD.md section 6):

    * ``modulate = "advantage"`` (default): ``A_t = w_t * (A_i + s_t)``;
    * ``modulate = "progress"``: ``A_t = A_i + w_t * s_t`` (the outcome term stays uniform, as in GRPO).

    The modulated term is ``A_i + s_t`` or ``s_t``; where it is negative and ``inverse_weights`` is
    given, that step's tokens take ``inverse_weights`` instead (blame on the confident tokens, GTPO's
    rule for failed responses). The term is constant within a step and both weight sets have mean 1
    per step, so every variant keeps each step's total credit; with ``alpha = 0`` and uniform weights
    every variant is the outcome-only baseline exactly. ``progress_coef = 0`` skips the progress term
    entirely (even if ``progress`` holds NaN). A valid ``step_index >= S`` is an indexing error, not
    silently clamped.
    """
    if modulate not in MODULATE:
        raise ValueError(f"unknown modulate {modulate!r}; valid: {list(MODULATE)}")
    valid = step_index >= 0
    zeros = torch.zeros(step_index.shape, dtype=outcome_adv.dtype, device=outcome_adv.device)
    base = outcome_adv.unsqueeze(-1).expand(step_index.shape)
    step = zeros
    if progress_coef != 0:
        gathered = torch.gather(progress, 1, step_index.clamp_min(0))
        step = progress_coef * torch.where(valid, gathered, torch.zeros_like(gathered))
    term = base + step if modulate == "advantage" else step
    w = torch.ones_like(term) if weights is None else weights.to(term.dtype)
    if inverse_weights is not None:
        w = torch.where(term < 0, inverse_weights.to(term.dtype), w)
    w = torch.where(valid, w, torch.zeros_like(w))
    adv = w * term if modulate == "advantage" else base + w * step
    return torch.where(valid, adv, torch.zeros_like(adv)), w


def entropy_bonus(advantages: Tensor, entropy: Tensor, mask: Tensor, coef: float, kappa: float = 2.0
                  ) -> tuple[Tensor, Tensor]:
    """The additive, capped entropy term of Cheng et al. 2025 (arXiv 2506.14758):
    ``A_t + psi_t`` with ``psi_t = min(coef * H_t, |A_t| / kappa)``, ``H_t`` detached.

    ``advantages, entropy [N, T]``, ``mask [N, T] bool`` -> ``(A' [N, T], psi [N, T])``, both 0 where
    masked out. ``psi >= 0`` is added whatever the sign of ``A_t``: a rewarded token gains up to
    ``|A| / kappa``, a blamed one loses up to that much of its blame (more so where the policy was
    uncertain). With ``kappa > 1`` it never flips a sign, and it is 0 where ``A_t = 0`` (no credit is
    created). ``coef = 0`` returns the advantages unchanged. Departs from the multiplicative weights of
    METHOD.md section 6 in that a step's total credit is *not* kept: the term only adds.
    """
    if coef < 0 or not kappa > 1:
        raise ValueError(f"entropy bonus needs coef >= 0 and kappa > 1, got coef={coef}, kappa={kappa}")
    mask = mask.bool()
    zero = torch.zeros_like(advantages)
    if coef == 0:
        return torch.where(mask, advantages, zero), zero
    h = torch.where(mask, entropy.detach().to(advantages.dtype), zero).clamp_min(0)
    psi = torch.minimum(coef * h, advantages.abs() / kappa)
    psi = torch.where(mask, psi, zero)
    return torch.where(mask, advantages + psi, zero), psi


# --------------------------------------------------------------------------------------------
# Objective (section 7)
# --------------------------------------------------------------------------------------------
def _token_mean(v: Tensor, m: Tensor, max_len: int | None) -> Tensor:
    return v.sum() / m.sum().clamp_min(1)


def _seq_mean_token_mean(v: Tensor, m: Tensor, max_len: int | None) -> Tensor:
    count = m.sum(-1)
    seq = v.sum(-1) / count.clamp_min(1)
    has = count > 0
    return torch.where(has, seq, torch.zeros_like(seq)).sum() / has.sum().clamp_min(1)


def _seq_mean_token_sum_norm(v: Tensor, m: Tensor, max_len: int | None) -> Tensor:
    return v.sum() / (v.shape[0] * (v.shape[-1] if max_len is None else max_len))


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int | None], Tensor]] = {
    "token_mean": _token_mean,                            # sum over masked tokens / their count
    "seq_mean_token_mean": _seq_mean_token_mean,          # mean over non-empty rows of row token-means
    "seq_mean_token_sum_norm": _seq_mean_token_sum_norm,  # sum / (N * T): Dr. GRPO constant normaliser
}


def aggregate(values: Tensor, mask: Tensor, agg: str = "token_mean", max_len: int | None = None) -> Tensor:
    """Reduce ``values [N, T]`` over ``mask [N, T]`` (True = counts) to a scalar.

    ``"token_mean"``, ``"seq_mean_token_mean"`` or ``"seq_mean_token_sum_norm"`` (divides by
    ``N * T``, or ``N * max_len`` for a fixed generation budget).  Unmasked values never leak; an
    all-masked input gives 0.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"unknown agg {agg!r}; valid: {sorted(AGGREGATIONS)}")
    mask = mask.bool()
    v = torch.where(mask, values, torch.zeros_like(values))
    return AGGREGATIONS[agg](v, mask, max_len)


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """k3 estimate of KL(pi || pi_ref) per token, sampled from pi: ``[N, T]`` -> ``[N, T]``.

    ``exp(d) - d - 1`` with ``d = ref_logp - logp`` clamped to [-20, 20] (beyond that the estimate
    is astronomically large anyway; the clamp keeps it finite and its gradient 0 there).  Always
    >= 0.  With ``mask`` the result is 0 (value and gradient) where mask is False, whatever the
    inputs hold there.
    """
    if mask is not None:
        mask = mask.bool()
        logp = torch.where(mask, logp, torch.zeros_like(logp))
        ref_logp = torch.where(mask, ref_logp, torch.zeros_like(ref_logp))
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    kl = torch.exp(d) - d - 1
    return kl if mask is None else torch.where(mask, kl, torch.zeros_like(kl))


def truncated_is_weights(old_logp: Tensor, behaviour_logp: Tensor, mask: Tensor, cap: float
                         ) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training") for samples drawn by an inference engine whose probabilities are
    not exactly the trainer's: ``w = min(exp(old_logp - behaviour_logp), cap)`` per token.

    ``old_logp`` (the trainer's teacher-forced log-probs of the samples, pi_old), ``behaviour_logp``
    (the sampling engine's), ``mask [N, T]`` -> ``(w [N, T], metrics)``; ``w = 1`` where masked out.
    The log-ratio is clamped like the PPO ratio. Metrics: ``tis_weight_mean`` and ``tis_clip_frac``
    (fraction of masked-in tokens where the cap bit), 0 when nothing is masked in.
    """
    if not cap > 0:
        raise ValueError(f"the importance-weight cap must be > 0, got {cap!r}")
    mask = mask.bool()
    zero = torch.zeros_like(old_logp)
    log_ratio = (torch.where(mask, old_logp, zero) - torch.where(mask, behaviour_logp.to(old_logp.dtype), zero))
    raw = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    w = torch.where(mask, raw.clamp(max=cap), torch.ones_like(raw))
    count = mask.sum().clamp_min(1)
    metrics = {"tis_weight_mean": (w * mask).sum() / count, "tis_clip_frac": ((raw > cap) & mask).sum() / count}
    return w, metrics


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token_mean",
    max_len: int | None = None,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate ``-min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)``, aggregated.

    ``token_weight [N, T]`` (optional, no gradient): a per-token factor on the surrogate before
    aggregation, e.g. the truncated importance weights of :func:`truncated_is_weights`.

    ``logp, old_logp, advantages, mask [N, T]`` -> ``(loss, metrics)``, ``rho = exp(logp - old_logp)``
    (log-ratio clamped to [-20, 20]).  Positions with ``mask = False`` influence neither the loss
    nor any gradient, even if they hold NaN/inf; an all-masked batch gives loss 0 (with a graph).
    ``agg`` / ``max_len``: see ``aggregate``.

    Metrics (detached scalars, over masked tokens): ``clip_frac`` (the clipped term is strictly the
    smaller objective, so its gradient is 0), ``clip_frac_low`` / ``clip_frac_high`` (that, with
    rho below / above 1), ``approx_kl`` (k3 estimate of KL(pi_old || pi): ``rho - 1 - log rho``),
    ``ratio_mean``, ``ratio_max`` (0 when nothing is masked in).
    """
    mask = mask.bool()
    zero = torch.zeros_like(logp)
    log_ratio = torch.where(mask, logp, zero) - torch.where(mask, old_logp.to(logp.dtype), zero)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = torch.where(mask, advantages.to(logp.dtype), zero)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if token_weight is not None:
        per_token = per_token * torch.where(mask, token_weight.detach().to(logp.dtype), zero)
    loss = aggregate(per_token, mask, agg, max_len)

    with torch.no_grad():
        count = mask.sum().clamp_min(1)
        is_clipped = (clipped > unclipped) & mask

        def frac(b: Tensor) -> Tensor:
            return b.sum().to(ratio.dtype) / count

        metrics = {
            "clip_frac": frac(is_clipped),
            "clip_frac_low": frac(is_clipped & (ratio < 1)),
            "clip_frac_high": frac(is_clipped & (ratio > 1)),
            "approx_kl": torch.where(mask, ratio - 1 - log_ratio, zero).sum() / count,
            "ratio_mean": torch.where(mask, ratio, zero).sum() / count,
            "ratio_max": torch.where(mask, ratio, zero).max() if ratio.numel() else zero.sum(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


__all__ = [
    "token_entropy", "outcome_advantages", "step_progress", "whiten_progress", "cap_truncated", "min_form_progress",
    "clip_progress", "entropy_weights", "token_advantages", "entropy_bonus", "aggregate", "policy_loss", "kl_k3",
    "OUTCOME_ESTIMATORS", "AGGREGATIONS", "LOG_RATIO_CLAMP", "DEFAULT_CHUNK_ELEMENTS",
]
