"""The lean log-prob path (hca/rl/logprobs.py) against the plain full-logits path and an independent
per-row computation: values to 1e-5, parameter gradients, entropies, ragged starts, padding,
temperature, tied / untied heads, LoRA (injected and PeftModel), fall-backs, gradient checkpointing,
the wiring into hca.rl.ppo, and the policy module's reference handling. Tiny random Qwen2 models."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import transformers

from hca.credit import token_entropy
from hca.rl.logprobs import lean_parts, sequence_logprobs
from hca.rl.ppo import PPOConfig, frozen_logprobs, ppo_loss
from hca.rl.batch import RLBatch

V = 211  # vocabulary (prime, so no chunk size divides anything by accident)


def qwen(tied: bool = True, seed: int = 0, layers: int = 2):
    """A tiny Qwen2 with weights large enough that the next-token distributions are far from uniform."""
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    torch.manual_seed(seed)
    m = transformers.Qwen2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.train()  # train mode as in the update (no dropout in Qwen2 by default)


def batch(seed: int = 0, ragged: bool = False):
    """4 rows: prompts of lengths 3..6 then responses of lengths 7, 2, 9, 5 (pad id 0).
    Left-padded prompts + right-padded responses (one ``response_start``), or with ``ragged``
    unpadded prompts and per-row starts, right-padded. Returns ids, mask, start, [(prompt, response)]."""
    g = torch.Generator().manual_seed(seed)
    rows = [(torch.randint(1, V, (p,), generator=g).tolist(), torch.randint(1, V, (r,), generator=g).tolist())
            for p, r in zip((3, 6, 4, 5), (7, 2, 9, 5))]
    if ragged:
        L = max(len(p) + len(r) for p, r in rows)
        ids = torch.tensor([p + r + [0] * (L - len(p) - len(r)) for p, r in rows])
        mask = torch.tensor([[1] * (len(p) + len(r)) + [0] * (L - len(p) - len(r)) for p, r in rows])
        return ids, mask, torch.tensor([len(p) for p, _ in rows]), rows
    P, T = max(len(p) for p, _ in rows), max(len(r) for _, r in rows)
    ids = torch.tensor([[0] * (P - len(p)) + p + r + [0] * (T - len(r)) for p, r in rows])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (T - len(r)) for p, r in rows])
    return ids, mask, P, rows


def per_row_reference(model, rows, temperature):
    """Independent ground truth: each row alone, no padding, full logits, fp64 log_softmax."""
    out = []
    with torch.no_grad():
        for p, r in rows:
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1].double() / temperature
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            out.append((lp, token_entropy(logits).double()))
    return out


def grads(model, lp, weights):
    model.zero_grad(set_to_none=True)
    (lp * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, want, tol=1e-5):
    """Same parameters, each gradient equal to ``tol`` times its largest entry (fp32 rounding of the
    different summation orders is about 1e-6 of that; a wrong path is off by O(1))."""
    assert got.keys() == want.keys() and want
    for n in want:
        err = float((got[n] - want[n]).abs().max())
        assert err <= tol * float(want[n].abs().max()) + 1e-12, (n, err, float(want[n].abs().max()))


def head_calls(model):
    """Input shapes of every call of the LM head module, and the hook's handle."""
    calls = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    return calls, handle


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("ragged", [False, True], ids=["padded", "ragged"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_lean_equals_plain_and_per_row_reference(tied, ragged, temperature):
    model = qwen(tied)
    assert lean_parts(model) is not None
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ids, mask, start, rows = batch(ragged=ragged)
    plain, plain_ent = sequence_logprobs(model, ids, mask, start, temperature, chunk_size=None, with_entropy=True)
    T = plain.shape[1]
    weights = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1))
    g_plain = grads(model, plain, weights)
    ref = per_row_reference(model, rows, temperature)
    for i, (lp, ent) in enumerate(ref):  # the plain path is right, and 0 beyond each response
        k = len(lp)
        torch.testing.assert_close(plain[i, :k].double(), lp, rtol=0, atol=1e-5)
        torch.testing.assert_close(plain_ent[i, :k].double(), ent, rtol=0, atol=1e-5)
        assert (plain[i, k:] == 0).all() and (plain_ent[i, k:] == 0).all()
    assert min(float(lp.min()) for lp, _ in ref) < math.log(1 / V) - 1  # distributions are far from uniform
    M = sum(len(r) for _, r in rows)
    for chunk in (1, 3, 7, 1000):  # 3 and 7 divide neither T nor M = 23
        calls, hook = head_calls(model)
        lean, ent = sequence_logprobs(model, ids, mask, start, temperature, chunk_size=chunk, with_entropy=True)
        assert lean.shape == ent.shape == (4, T) and lean.dtype == torch.float32
        torch.testing.assert_close(lean, plain, rtol=0, atol=1e-5)
        torch.testing.assert_close(ent, plain_ent, rtol=0, atol=1e-5)
        assert not ent.requires_grad
        chunks = [c[0] for c in calls]  # the head saw [chunk, H] inputs covering the M real tokens, once
        assert all(len(c) == 2 for c in calls) and sum(chunks) == M and max(chunks) == min(chunk, M)
        g = grads(model, lean, weights)
        assert len(calls) == 2 * math.ceil(M / chunk)  # each chunk recomputed once in the backward
        assert_grads_close(g, g_plain)
        hook.remove()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_target_log_softmax_function(temperature):
    from hca.rl.logprobs import _TargetLogSoftmax

    g = torch.Generator().manual_seed(5)
    z = (torch.randn(6, 13, generator=g, dtype=torch.float64) * 4).requires_grad_()
    t = torch.randint(0, 13, (6,), generator=g)
    want = torch.log_softmax(z / temperature, -1).gather(-1, t[:, None]).squeeze(-1)
    got = _TargetLogSoftmax.apply(z, t, temperature)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    w = torch.randn(6, generator=g, dtype=torch.float64)
    gw, = torch.autograd.grad((want * w).sum(), z)
    gg, = torch.autograd.grad((got * w).sum(), z)
    torch.testing.assert_close(gg, gw, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: _TargetLogSoftmax.apply(x, t, temperature), (z,))


def test_entropy_only_when_asked_and_no_grad_path():
    model = qwen()
    ids, mask, start, _ = batch()
    lp, ent = sequence_logprobs(model, ids, mask, start)
    assert ent is None and lp.requires_grad
    with torch.no_grad():
        lp2, ent2 = sequence_logprobs(model, ids, mask, start, chunk_size=5, with_entropy=True)
    torch.testing.assert_close(lp2, lp.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ent2, sequence_logprobs(model, ids, mask, start, chunk_size=None,
                                                       with_entropy=True)[1], rtol=0, atol=1e-5)


def _saved_tensor_shapes(model, fn):
    """Shapes of the activations autograd keeps for the backward while ``fn()`` runs (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    shapes = []

    def pack(t):
        if t.data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


def test_no_vocabulary_sized_activation_is_kept_for_the_backward():
    model = qwen(tied=False)
    ids, mask, start, _ = batch()
    _, plain = _saved_tensor_shapes(model, lambda: sequence_logprobs(model, ids, mask, start, chunk_size=None))
    assert any(len(s) == 3 and s[-1] == V for s in plain)  # the plain path keeps [N, T, V] (log_softmax output)
    lp, lean = _saved_tensor_shapes(model, lambda: sequence_logprobs(model, ids, mask, start, chunk_size=4)[0])
    assert lean and not any(V in s for s in lean), [s for s in lean if V in s]
    lp.sum().backward()  # and the backward still works
    assert model.lm_head.weight.grad is not None


def test_all_padding_rows_and_empty_responses_keep_a_graph():
    model = qwen()
    ids, mask, start, _ = batch()
    mask = mask.clone()
    mask[:, start:] = 0  # no response token at all: M = 0
    lp, ent = sequence_logprobs(model, ids, mask, start, chunk_size=3, with_entropy=True)
    assert (lp == 0).all() and (ent == 0).all() and lp.requires_grad
    lp.sum().backward()


def test_lora_injected_and_peft_model():
    peft = pytest.importorskip("peft")
    from hca.models.lora import LoraSettings, add_lora

    ids, mask, start, _ = batch(ragged=True)
    weights = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))  # [N, T]
    for wrap in ("inject", "peft_model"):
        model = qwen(tied=False)
        if wrap == "inject":
            model = add_lora(model, LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj", "lm_head")))
        else:
            cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"])
            model = peft.get_peft_model(model, cfg)
        with torch.no_grad():  # B = 0 at init would make the adapters a no-op
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.3)
        assert lean_parts(model) is not None
        plain, _ = sequence_logprobs(model, ids, mask, start, 0.8, chunk_size=None)
        g_plain = grads(model, plain, weights)
        assert g_plain and all("lora_" in n for n in g_plain)  # only adapters train
        assert any("lm_head" in n for n in g_plain)  # the head's adapter is applied by calling the module
        lean, _ = sequence_logprobs(model, ids, mask, start, 0.8, chunk_size=5)
        torch.testing.assert_close(lean, plain, rtol=0, atol=1e-5)
        g = grads(model, lean, weights)
        assert_grads_close(g, g_plain)


class Wrapped(torch.nn.Module):
    """No ``get_decoder``: any callable returning ``.logits`` (like test_rollout's ``Forced``)."""

    def __init__(self, inner, bias=0.0):
        super().__init__()
        self.inner, self.bias = inner, bias

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return SimpleNamespace(logits=logits + self.bias * torch.arange(logits.shape[-1]))


class CappedQwen2ForCausalLM(transformers.Qwen2ForCausalLM):
    def forward(self, *args, **kwargs):  # post-processes the logits: the lean path would miss it
        out = super().forward(*args, **kwargs)
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out


def test_fallbacks_use_the_plain_path():
    model = qwen()
    ids, mask, start, _ = batch()
    want, _ = sequence_logprobs(model, ids, mask, start, chunk_size=None)
    w = Wrapped(model)
    assert lean_parts(w) is None
    torch.testing.assert_close(sequence_logprobs(w, ids, mask, start, chunk_size=4)[0], want, rtol=0, atol=1e-6)
    biased = Wrapped(model, bias=0.01)  # the wrapper's logits are what is scored
    assert not torch.allclose(sequence_logprobs(biased, ids, mask, start, chunk_size=4)[0], want, atol=1e-3)
    fn = lambda **kw: model(**kw)  # noqa: E731  (a plain function)
    torch.testing.assert_close(sequence_logprobs(fn, ids, mask, start)[0], want, rtol=0, atol=1e-6)

    sub = CappedQwen2ForCausalLM(model.config)
    sub.load_state_dict(model.state_dict())
    assert lean_parts(sub) is None
    got = sequence_logprobs(sub, ids, mask, start)[0]
    torch.testing.assert_close(got, sequence_logprobs(sub, ids, mask, start, chunk_size=None)[0], rtol=0, atol=0)
    assert not torch.allclose(got, want, atol=1e-3)  # the softcap matters, and was applied

    capped = qwen()
    capped.config.final_logit_softcapping = 30.0
    assert lean_parts(capped) is None
    gemma_like = qwen()
    gemma_like.config.model_type = "gemma2"
    assert lean_parts(gemma_like) is None
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logprobs(model, ids, mask, start, chunk_size=0)


def layer_calls(model):
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # the recompute may stop inside
    return calls


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_same_loss_and_grads(lora):
    from hca.models.lora import LoraSettings, add_lora

    ids, mask, start, _ = batch()
    weights = torch.randn(4, 9, generator=torch.Generator().manual_seed(3))
    results = []
    for gc in (False, True):
        model = qwen()
        if lora:
            model = add_lora(model, LoraSettings(r=4, alpha=8, target_modules=("q_proj", "up_proj")))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(n)))
        if gc:
            from hca.models.loading import enable_gradient_checkpointing

            enable_gradient_checkpointing(model, lora=lora)
        calls = layer_calls(model)
        lp, _ = sequence_logprobs(model, ids, mask, start, chunk_size=5)
        loss = (lp * weights).sum()
        g = grads(model, lp, weights)
        assert len(calls) == (2 if gc else 1)  # checkpointing really recomputed the layer in the backward
        results.append((loss.detach(), g))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-6)
    assert all(("lora_" in n) == lora for n in g0)
    assert_grads_close(g1, g0)


def rl_batch(ids, mask, P):
    N, T = ids.shape[0], ids.shape[1] - P
    rmask = mask[:, P:].bool()
    g = torch.Generator().manual_seed(4)
    z = torch.zeros(N, T)
    return RLBatch(input_ids=ids, attention_mask=mask, response_start=P, response_mask=rmask, loss_mask=rmask,
                   old_logp=torch.where(rmask, -torch.rand(N, T, generator=g) * 5, z), entropy=z,
                   step_index=torch.where(rmask, 0, -1), num_steps=torch.ones(N, dtype=torch.long),
                   group=torch.zeros(N, dtype=torch.long), truncated=torch.zeros(N, dtype=torch.bool),
                   included=torch.ones(N, dtype=torch.bool), outcome=torch.zeros(N), outcome_adv=torch.zeros(N),
                   values=None, progress=None, weights=rmask.float(),
                   advantages=torch.where(rmask, torch.randn(N, T, generator=g), z),
                   ref_logp=torch.where(rmask, -torch.rand(N, T, generator=g) * 5, z))


def test_ppo_loss_and_frozen_logprobs_use_the_chunk_setting():
    model = qwen()
    ids, mask, P, rows = batch()
    b = rl_batch(ids, mask, P)
    M = sum(len(r) for _, r in rows)
    out = {}
    for chunk in (None, 6):
        cfg = PPOConfig(kl_coef=0.1, logprob_chunk_size=chunk)
        calls, hook = head_calls(model)
        loss, metrics = ppo_loss(model, b, cfg, temperature=0.9)
        assert calls == ([(4, b.response_mask.shape[1] + 1, 32)] if chunk is None else
                         [(min(6, M - a), 32) for a in range(0, M, 6)])
        out[chunk] = (loss.detach(), metrics["kl"], grads(model, loss, torch.ones(())))
        calls.clear()
        frozen = frozen_logprobs(model, b, 3, 0.9, chunk)  # rows 0-2 (M = 7 + 2 + 9), then row 3 (M = 5)
        assert len(calls) == (2 if chunk is None else math.ceil(18 / 6) + math.ceil(5 / 6))
        out[chunk] += (frozen,)
        hook.remove()
    (l0, kl0, g0, f0), (l1, kl1, g1, f1) = out[None], out[6]
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-5)  # (the loss is in the thousands: ratios far from 1)
    torch.testing.assert_close(kl1, kl0, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(f1, f0, rtol=0, atol=1e-5)
    assert_grads_close(g1, g0)
    with pytest.raises(ValueError, match="logprob_chunk_size"):
        PPOConfig(logprob_chunk_size=0)


TINY = ("tiny-llama:hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
        "num_key_value_heads=1,max_position_embeddings=64")


OUTCOME = {"progress_coef": 0.0, "entropy_beta": 0.0}  # no scorer needed


def test_reference_skipped_without_kl_and_loaded_in_the_training_dtype(recwarn):
    import lightning as L

    from hca.modules.policy import HCAPolicyModule

    m = HCAPolicyModule(policy=TINY, credit=OUTCOME, reference=TINY, ppo=PPOConfig(kl_coef=0.0))
    m.configure_model()
    m.configure_model()
    assert "reference" not in m._frozen
    msgs = [str(w.message) for w in recwarn.list if "not loaded" in str(w.message)]
    assert len(msgs) == 1 and "kl_coef == 0" in msgs[0]  # warned once

    m = HCAPolicyModule(policy=TINY, credit=OUTCOME, reference=TINY, ppo=PPOConfig(kl_coef=0.1))
    m.configure_model()
    assert next(m._frozen["reference"].parameters()).dtype == torch.float32  # no trainer: the policy's dtype
    for precision, want in (("bf16-mixed", torch.bfloat16), ("bf16-true", torch.bfloat16), ("32-true", torch.float32)):
        m = HCAPolicyModule(policy=TINY, credit=OUTCOME, reference=TINY, ppo=PPOConfig(kl_coef=0.1))
        m.trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_progress_bar=False)
        m.configure_model()
        assert next(m._frozen["reference"].parameters()).dtype == want, precision
        assert next(m.model.parameters()).dtype == torch.float32  # the policy keeps `dtype`
    m = HCAPolicyModule(policy=TINY, credit=OUTCOME, reference=TINY, ppo=PPOConfig(kl_coef=0.1),
                        reference_dtype="float64")
    m.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False)
    m.configure_model()
    assert next(m._frozen["reference"].parameters()).dtype == torch.float64  # an explicit setting wins


def checkpointing(model) -> bool:
    """Whether HF activation checkpointing is on (its attribute name differs across transformers 5.x)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(model.is_gradient_checkpointing if flag is None else flag)


def test_policy_module_enables_gradient_checkpointing():
    from hca.models.lora import LoraSettings
    from hca.modules.policy import HCAPolicyModule

    for lora in (None, LoraSettings(r=2, alpha=4, target_modules=("q_proj",))):
        m = HCAPolicyModule(policy=TINY, credit=OUTCOME, gradient_checkpointing=True, lora=lora)
        m.configure_model()
        assert checkpointing(m.model)
    plain = HCAPolicyModule(policy=TINY, credit=OUTCOME)
    plain.configure_model()
    assert not checkpointing(plain.model)


def grouped_batch(seed: int = 0):
    """3 prompts (lengths 5, 2, 4; left-padded to 5), 4 responses each of ragged lengths, rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (5, 2, 4)]
    lengths = [6, 3, 1, 6, 5, 2, 6, 6, 4, 1, 6, 2]
    group = torch.arange(3).repeat_interleave(4)
    P, T = 5, 6
    rows = [(prompts[int(k)], torch.randint(1, V, (n,), generator=g).tolist()) for k, n in zip(group, lengths)]
    ids = torch.tensor([[0] * (P - len(p)) + p + r + [0] * (T - len(r)) for p, r in rows])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (T - len(r)) for p, r in rows])
    perm = torch.randperm(len(rows), generator=g)
    return ids[perm], mask[perm], P, group[perm], [rows[i] for i in perm]


def decoder_calls(model):
    calls = []
    handle = model.get_decoder().register_forward_hook(lambda m, args, kw, out: calls.append(tuple(kw["input_ids"].shape)),
                                                        with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [512, 5])
def test_shared_prompts_run_once_and_give_the_same_logprobs_and_gradients(tied, chunk):
    model = qwen(tied=tied)
    ids, mask, P, group, rows = grouped_batch()
    want, want_ent = sequence_logprobs(model, ids, mask, P, 0.7, chunk_size=chunk, with_entropy=True)
    calls, hook = decoder_calls(model)
    got, got_ent = sequence_logprobs(model, ids, mask, P, 0.7, chunk_size=chunk, with_entropy=True, group=group)
    hook.remove()
    assert calls == [(3, 5), (12, 6)]  # the 3 distinct prompts once (no all-padding column), then the 12 responses
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_ent, want_ent, rtol=0, atol=1e-5)
    ref = per_row_reference(model, rows, 0.7)
    for i, (lp, _) in enumerate(ref):
        torch.testing.assert_close(got[i, :len(lp)].double(), lp, rtol=0, atol=1e-4)
    w = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    assert_grads_close(grads(model, got, w), grads(model, want, w))


def test_shared_prompts_are_checked_not_trusted():
    model = qwen()
    ids, mask, P, group, _ = grouped_batch()
    ids[0, P - 1] = (ids[0, P - 1] % (V - 1)) + 1  # row 0's prompt now differs from its group's
    want, _ = sequence_logprobs(model, ids, mask, P, 1.0)
    calls, hook = decoder_calls(model)
    got, _ = sequence_logprobs(model, ids, mask, P, 1.0, group=group)
    assert calls == [tuple(ids.shape)]  # one pass over every row: the plain lean path
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    calls.clear()
    sequence_logprobs(model, ids, mask, P, 1.0, group=torch.arange(len(ids)))  # no two rows share: no sharing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask, P, group, _ = grouped_batch()
    sequence_logprobs(model, ids, mask, P, 1.0, group=group)  # checkpointing turns HF's cache off: no sharing
    hook.remove()
    assert calls == [(12, 11), (12, 11)]


def test_shared_prompt_gradients_are_deterministic_with_two_threads():
    """The prompt's KV is copied to its group's rows by a one-hot matmul, not by indexing: indexing's
    backward accumulates a group's gradients in an order that changed from run to run with 2 threads
    (which made the quickstart's RL run irreproducible)."""
    from hca.models.loading import char_tokenizer, load_causal_lm

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tok = char_tokenizer(list("0123456789+-*= \n:QA?"))
        model = load_causal_lm("tiny-llama:hidden_size=128,num_hidden_layers=4,seed=0", tokenizer=tok).train()
        g = torch.Generator().manual_seed(0)
        U, G, P, T = 16, 8, 20, 40
        group = torch.arange(U).repeat_interleave(G)
        ids = torch.cat([torch.randint(4, len(tok), (U, P), generator=g)[group],
                         torch.randint(4, len(tok), (U * G, T), generator=g)], 1)
        perm = torch.randperm(U * G, generator=g)
        ids, group = ids[perm], group[perm]
        runs = []
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            lp, _ = sequence_logprobs(model, ids, torch.ones_like(ids), P, 1.0, group=group)
            lp.sum().backward()
            runs.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert all(torch.equal(runs[0], r) for r in runs[1:])
    finally:
        torch.set_num_threads(threads)
