"""Teacher-forced log-probs of sampled tokens for RL training, without a full-vocabulary logits tensor.

:func:`sequence_logprobs` scores the response tokens of a batch under ``log_softmax(logits / T)``
(T: the sampling temperature), with gradients, as PPO's ratio and the KL term need. Two paths give
the same numbers (tested to 1e-5, gradients too):

* **lean** (``chunk_size`` an int, the default, for the causal LMs of :data:`LEAN_MODEL_TYPES`):
  the decoder body runs once (``model.get_decoder()``, i.e. ``model.model``) to hidden states
  ``[N, L, H]``; the hidden states that predict a response token that is not padding are gathered
  to ``[M, H]`` (``M`` = scored tokens) and the LM head (``model.get_output_embeddings()``) is
  applied ``chunk_size`` tokens at a time. Each chunk's ``lm_head -> fp32 -> log_softmax[target]``
  (:class:`_TargetLogSoftmax`) runs under ``torch.utils.checkpoint`` (non-reentrant) when gradients
  are on: its ``[chunk, V]`` intermediates are freed after the forward and recomputed in the
  backward, so the peak is about two ``[chunk, V]`` fp32 tensors (plus a bf16 one for bf16 models),
  not ``[N, T, V]``; the price is one more LM-head forward per chunk in the backward. One autograd
  graph throughout (no nested backward), so a weight used twice -- tied embeddings, or the head in
  every chunk -- gets its gradient accumulated once, as DeepSpeed ZeRO-2's reduction hooks require.
  Without gradients (reference / behaviour log-probs) chunks are just looped.
* **plain** (``chunk_size=None``, or any model the lean path does not recognise): one full forward
  ``model(...).logits`` (``logits_to_keep = T + 1`` when accepted), fp32 ``log_softmax`` over
  ``[N, T, V]``. Works for any callable that returns an object with ``.logits``.

Where the lean path departs from calling the HF model: no logits tensor exists, so nothing that
hooks or post-processes ``.logits`` runs. That is why it is limited to model types whose causal-LM
forward is exactly ``lm_head(decoder(...).last_hidden_state)`` (checked in transformers 5.24) and
whose ``forward`` is the library's own (a subclass overriding ``forward`` gets the plain path, as do
Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale`` and Granite's ``logits_scaling``, whose
types are not listed). Submodules are *called*, never their ``.weight`` read, so LoRA layers
(peft, also on ``lm_head``) and DeepSpeed ZeRO-3's parameter-gathering hooks act as in the full
forward; tied embeddings need nothing special (the head module is the embedding's weight).
A ``PeftModel`` is unwrapped to its base model (prompt-learning adapters get the plain path), a
``DeepSpeedEngine`` to its ``.module`` (the engine's own ``forward`` is bypassed; its ZeRO-3 hooks
live on the submodules); other wrappers (e.g. DDP) get the plain path.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from hca.credit import token_entropy

LEAN_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
"""HF ``model_type`` s whose ``*ForCausalLM.forward`` computes exactly ``lm_head(hidden_states)``."""

DEFAULT_CHUNK_TOKENS = 512
"""Scored tokens per LM-head chunk by default (docs/rl.md: the measurement behind it)."""


def _positions(attention_mask: Tensor) -> Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def _params(fn) -> dict:
    try:
        return dict(inspect.signature(getattr(fn, "forward", fn)).parameters)
    except (TypeError, ValueError):
        return {}


def _unwrap(model):
    """The HF model inside a ``PeftModel`` / ``DeepSpeedEngine``; None for prompt-learning adapters."""
    for _ in range(4):
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # peft.PeftModel
            cfg = getattr(model, "active_peft_config", None)
            if cfg is None or getattr(cfg, "is_prompt_learning", False):
                return None
            model = model.get_base_model()
        elif type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        else:
            return model
    return model


def lean_parts(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder, lm_head)`` modules of ``model`` when the lean path computes its log-probs exactly,
    else None (the plain path is then used)."""
    m = _unwrap(model)
    cfg = getattr(m, "config", None)
    if not isinstance(m, torch.nn.Module) or getattr(cfg, "model_type", None) not in LEAN_MODEL_TYPES:
        return None
    if getattr(cfg, "final_logit_softcapping", None) or not type(m).__name__.endswith("ForCausalLM"):
        return None
    if not getattr(type(m).forward, "__module__", "").startswith("transformers.models."):
        return None  # a subclass with its own forward may post-process the logits
    try:
        decoder, head = m.get_decoder(), m.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if not isinstance(decoder, torch.nn.Module) or decoder is m or not isinstance(head, torch.nn.Module):
        return None
    return decoder, head


def sequence_logprobs(model, input_ids: Tensor, attention_mask: Tensor, response_start: int | Tensor,
                      temperature: float = 1.0, *, chunk_size: int | None = DEFAULT_CHUNK_TOKENS,
                      with_entropy: bool = False, group: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced per-token log-probs of the response tokens.

    ``input_ids`` / ``attention_mask`` ``[N, L]`` (padding anywhere, typically left for prompts and
    right for responses); the response of row ``i`` starts at column ``response_start`` (an int or
    ``[N]`` long). Returns ``logprobs [N, T]`` float32 (with gradients) and ``entropy [N, T]``
    float32 (no gradient; None unless ``with_entropy``), ``T = L - min(response_start)``: column
    ``j`` of row ``i`` scores token ``response_start[i] + j`` under ``log_softmax(logits /
    temperature)``; it is 0 where that column is past ``L`` or the token is padding
    (``attention_mask`` 0). ``chunk_size``: scored tokens per LM-head chunk of the lean path;
    None: the plain full-logits path (see the module docstring).

    ``group [N]`` (optional; an int ``response_start``): rows of one group share their prompt (the
    ``G`` responses of a problem). The lean path then runs the decoder over each distinct prompt
    once and over the responses with that prompt's KV cache (:func:`_shared_hidden`): the same numbers
    for ``(G - 1) / G`` fewer prompt-token FLOPs. Checked, not trusted: rows whose prompt columns
    differ within a group, a model with gradient checkpointing on, or no fewer prompts than rows
    take the plain lean path.
    """
    N, L = input_ids.shape
    starts = torch.as_tensor(response_start, device=input_ids.device).long().expand(N)
    s0 = int(starts.min())
    if not 1 <= s0 <= L:
        raise ValueError(f"response_start must be in [1, {L}], got min {s0}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
    T = L - s0
    pos = starts[:, None] + torch.arange(T, device=input_ids.device)  # [N, T] column of the scored token
    valid = (pos < L) & attention_mask.gather(1, pos.clamp(max=L - 1)).bool()  # [N, T]
    parts = lean_parts(model) if chunk_size is not None else None
    if parts is None:
        return _plain(model, input_ids, attention_mask, pos, valid, s0, temperature, with_entropy)
    shared = _shared_prompts(model, input_ids, attention_mask, response_start, group)
    if shared is not None:
        hidden = _shared_hidden(parts[0], input_ids, attention_mask, s0, *shared)
        return _head(parts[1], hidden, input_ids, pos, valid, temperature, chunk_size, with_entropy)
    return _lean(*parts, input_ids, attention_mask, pos, valid, temperature, chunk_size, with_entropy)


def _shared_prompts(model, input_ids, attention_mask, response_start, group) -> tuple[Tensor, Tensor] | None:
    """``(first row of each distinct prompt [U], row -> its prompt [N])`` when sharing applies, else None."""
    if group is None or not isinstance(response_start, int) or getattr(_unwrap(model), "is_gradient_checkpointing", False):
        return None
    group = group.to(input_ids.device)
    _, inverse = torch.unique(group, return_inverse=True)  # [N] in [0, U)
    U = int(inverse.max()) + 1 if len(inverse) else 0
    if not 0 < U < len(inverse):
        return None
    first = torch.full((U,), len(inverse), device=inverse.device).scatter_reduce(
        0, inverse, torch.arange(len(inverse), device=inverse.device), "amin")  # [U]
    P = response_start
    same = (input_ids[:, :P] == input_ids[first][inverse][:, :P]) & (attention_mask[:, :P] == attention_mask[first][inverse][:, :P])
    return (first, inverse) if bool(same.all()) else None


def _shared_hidden(decoder, input_ids, attention_mask, P, first, inverse) -> Tensor:
    """``[N, L, H]`` hidden states as one decoder pass over every row would give them at the columns
    from ``P - 1`` on (the last prompt token and the response; earlier columns are zeros, never read):
    the ``U`` distinct prompts run once with a KV cache, which is then copied to the ``N`` rows
    (:func:`_rows`; autograd flows back through the copy into the prompts' pass) for the response columns."""
    from transformers import DynamicCache

    N, L = input_ids.shape
    pmask = attention_mask[first, :P]  # [U, P]
    live = pmask.any(0).nonzero()
    c0 = int(live[0]) if len(live) else P - 1  # columns left of c0 are padding in every prompt: skipped
    cache = DynamicCache(config=getattr(decoder, "config", None))
    kw = {"input_ids": input_ids[first, c0:P], "attention_mask": pmask[:, c0:], "position_ids": _positions(pmask[:, c0:]),
          "past_key_values": cache, "use_cache": True}
    h_prompt = decoder(**kw).last_hidden_state  # [U, P - c0, H]
    onehot = torch.nn.functional.one_hot(inverse, len(first)).to(h_prompt.dtype)  # [N, U]
    for layer in cache.layers:  # [U, ...] -> [N, ...]
        layer.keys, layer.values = _rows(layer.keys, onehot), _rows(layer.values, onehot)
    full_mask = attention_mask[:, c0:]  # [N, L - c0]
    rpos = (pmask.long().sum(-1)[inverse][:, None] + _positions(attention_mask[:, P:]))  # response positions
    h_resp = decoder(input_ids=input_ids[:, P:], attention_mask=full_mask, position_ids=rpos, past_key_values=cache,
                     use_cache=True).last_hidden_state  # [N, L - P, H]
    lead = h_resp.new_zeros((N, P - 1, h_resp.shape[-1]))
    return torch.cat([lead, _rows(h_prompt[:, -1:], onehot), h_resp], 1)  # [N, L, H]


def _rows(x: Tensor, onehot: Tensor) -> Tensor:
    """``x [U, ...]`` -> ``[N, ...]``, row ``n`` a copy of row ``argmax(onehot[n])``, as a matmul with
    the one-hot ``[N, U]``: the values are exact copies, and the backward (``onehot.T @ grad``) sums a
    group's gradients in a fixed order. Indexing (``x[inverse]``) would accumulate them with
    ``index_put``, whose order varies from run to run with more than one thread."""
    return (onehot.to(x.dtype) @ x.reshape(x.shape[0], -1)).reshape(onehot.shape[0], *x.shape[1:])


def _plain(model, input_ids, attention_mask, pos, valid, s0, temperature, with_entropy):
    """One forward with full logits ``[N, T, V]`` (the reference implementation)."""
    N, L = input_ids.shape
    T = pos.shape[1]
    kw = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": _positions(attention_mask)}
    params = _params(model)
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = T + 1
    if "use_cache" in params:
        kw["use_cache"] = False
    logits = model(**kw).logits[:, -(T + 1):-1]  # [N, T, V]: predicts tokens s0 .. L-1
    col = (pos - s0).clamp(max=max(T - 1, 0))  # [N, T] logits column of each scored token
    if bool((col != torch.arange(T, device=col.device)).any()):  # ragged starts: align each row's response
        logits = logits.gather(1, col[..., None].expand(-1, -1, logits.shape[-1]))
    targets = input_ids.gather(1, pos.clamp(max=L - 1))
    logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)
    zero = torch.zeros((), device=logp.device)
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = torch.where(valid, token_entropy(logits.detach(), temperature=temperature), zero)
    return torch.where(valid, logp, zero), ent


class _TargetLogSoftmax(torch.autograd.Function):
    """``log_softmax(z / temperature)[targets]`` for fp32 logits ``z [c, V]``, ``targets [c]`` -> ``[c]``.

    Same value as ``torch.log_softmax(z / t, -1).gather(...)`` (up to rounding), but lighter: the
    forward needs one ``[c, V]`` temporary beside ``z`` and keeps only ``z`` (which the chunk's
    checkpoint frees and recomputes anyway); the backward writes ``g * (onehot - softmax) / t`` into
    one new ``[c, V]`` tensor. Autograd's ``/ t -> log_softmax -> gather`` keeps the ``[c, V]``
    output and allocates two more in its backward (the scatter of ``gather`` and ``log_softmax``'s).
    """

    @staticmethod
    def forward(ctx, z: Tensor, targets: Tensor, temperature: float) -> Tensor:
        m = z.amax(-1, keepdim=True)  # [c, 1]
        e = z - m  # the one [c, V] temporary
        if temperature != 1.0:
            e.div_(temperature)
        log_s = e.exp_().sum(-1, keepdim=True).log_()  # [c, 1]: log sum exp((z - m) / t)
        ctx.temperature = temperature
        ctx.save_for_backward(z, targets, m, log_s)
        return ((z.gather(-1, targets[:, None]) - m) / temperature - log_s).squeeze(-1)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, targets, m, log_s = ctx.saved_tensors
        t = ctx.temperature
        p = z - m  # [c, V] -> softmax(z / t) in place
        if t != 1.0:
            p.div_(t)
        grad = p.sub_(log_s).exp_().mul_(-g[:, None])
        grad.scatter_add_(-1, targets[:, None], g[:, None])
        if t != 1.0:
            grad.div_(t)
        return grad, None, None


def _head_logp(head, h: Tensor, targets: Tensor, temperature: float, ent_box: list | None) -> Tensor:
    """``[c, H]`` hidden states, ``[c]`` targets -> ``[c]`` fp32 log-probs; on its first call
    (not the backward's recompute) appends the ``[c]`` entropies to ``ent_box``."""
    z = head(h).float()  # [c, V]
    if ent_box is not None and not ent_box:
        with torch.no_grad():
            ent_box.append(token_entropy(z.detach(), temperature=temperature))
    return _TargetLogSoftmax.apply(z, targets, temperature)


def _lean(decoder, head, input_ids, attention_mask, pos, valid, temperature, chunk_size, with_entropy):
    """Decoder once, then the LM head over the ``M`` scored tokens, ``chunk_size`` at a time."""
    kw = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": _positions(attention_mask)}
    if "use_cache" in _params(decoder):
        kw["use_cache"] = False
    hidden = decoder(**kw).last_hidden_state  # [N, L, H]
    return _head(head, hidden, input_ids, pos, valid, temperature, chunk_size, with_entropy)


def _head(head, hidden, input_ids, pos, valid, temperature, chunk_size, with_entropy):
    """The LM head over the ``M`` scored tokens of ``hidden [N, L, H]``, ``chunk_size`` at a time."""
    N, T = pos.shape
    rows, cols = valid.nonzero(as_tuple=True)  # [M] each (one host sync)
    tpos = pos[rows, cols]
    h = hidden[rows, tpos - 1]  # [M, H]: the hidden state that predicts each scored token
    targets = input_ids[rows, tpos]  # [M]
    grad = torch.is_grad_enabled()
    lps, ents = [], []
    for a in range(0, max(len(rows), 1), chunk_size):  # one (maybe empty) chunk when M = 0: keeps the graph
        box = [] if with_entropy else None
        args = (head, h[a:a + chunk_size], targets[a:a + chunk_size], temperature, box)
        lps.append(checkpoint(_head_logp, *args, use_reentrant=False) if grad else _head_logp(*args))
        ents += box or []
    flat = torch.cat(lps)  # [M] fp32
    logp = flat.new_zeros((N, T)).index_put((rows, cols), flat)
    ent = torch.zeros((N, T), device=flat.device).index_put((rows, cols), torch.cat(ents)) if with_entropy else None
    return logp, ent
