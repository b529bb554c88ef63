"""Tests of the rollout engine (hca/rollout/hf.py) on a tiny random Llama with the char tokenizer, and of
the sampling settings (hca/rollout/base.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hca.credit import token_entropy
from hca.models.loading import char_tokenizer, tiny_llama
from hca.rl.logprobs import sequence_logprobs
from hca.rollout import HFRolloutEngine, RolloutBatch, RolloutEngine, SamplingParams
from hca.rollout.hf import _forward_kwargs

PROMPTS = ["Q:1+2\n", "Q:17*3-4\n", "Q:5\n", "Q:123+45*6-7+8\n"]  # different lengths


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """Tiny Llama with large random weights, so greedy outputs vary with the prompt (the default
    0.02 init emits one repeated token) and EOS comes up now and then."""
    m = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


class Forced(torch.nn.Module):
    """A wrapped model (``past_key_values`` kwarg, ``SimpleNamespace`` output) that adds ``bias`` to
    the logits and forces token ``forced[q]`` at query position ``q``; records every call's shape."""

    def __init__(self, inner, bias: dict[int, float] | None = None, forced: dict[int, int] | None = None):
        super().__init__()
        self.inner, self.bias, self.forced, self.calls = inner, bias or {}, forced or {}, []

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        self.calls.append(tuple(input_ids.shape))
        cache_kw, _ = _forward_kwargs(self.inner)  # "cache" (newer transformers 5.x) or "past_key_values"
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, **{cache_kw: past_key_values})
        logits = out.logits.clone()
        for t, b in self.bias.items():
            logits[..., t] += b
        for q, t in self.forced.items():
            logits[..., t] += 1e6 * (position_ids == q).to(logits.dtype)
        cache = getattr(out, "cache", None)
        return SimpleNamespace(logits=logits, past_key_values=out.past_key_values if cache is None else cache)


def _check_layout(b: RolloutBatch, tok, num_prompts: int, n: int, max_new: int):
    N = num_prompts * n
    assert b.prompt_index.tolist() == [i for i in range(num_prompts) for _ in range(n)]
    assert len(b.prompt_ids) == len(b.finish_reason) == len(b.texts) == len(b) == N
    assert b.response_ids.shape == b.response_mask.shape == b.logprobs.shape == b.entropy.shape
    assert b.response_ids.dtype == torch.long and b.response_mask.dtype == torch.bool
    assert b.logprobs.dtype == b.entropy.dtype == torch.float32
    lengths = b.response_mask.sum(-1)
    assert b.response_ids.shape[1] == int(lengths.max()) <= max_new
    # the mask is a prefix; padding is pad id / zeros
    assert torch.equal(b.response_mask, torch.arange(b.response_ids.shape[1]) < lengths[:, None])
    assert (b.response_ids[~b.response_mask] == tok.pad_token_id).all()
    assert (b.logprobs[~b.response_mask] == 0).all() and (b.entropy[~b.response_mask] == 0).all()
    assert (b.logprobs[b.response_mask] <= 0).all() and (b.entropy[b.response_mask] >= 0).all()
    assert b.num_generated_tokens == int(lengths.sum())
    for i in range(N):
        ids = b.response_ids[i, : lengths[i]].tolist()
        last_is_eos = ids[-1] == tok.eos_token_id
        assert tok.eos_token_id not in ids[:-1]
        assert (b.finish_reason[i] == "eos") == last_is_eos
        if b.finish_reason[i] == "length":
            assert len(ids) == max_new
        if b.finish_reason[i] != "stop":
            assert b.texts[i] == tok.decode(ids, skip_special_tokens=True)


def test_shapes_and_prompt_index(model, tok):
    eng = HFRolloutEngine(model, tok)
    assert isinstance(eng, RolloutEngine)
    b = eng.generate(PROMPTS[:3], SamplingParams(max_new_tokens=12, n=4, seed=0))
    _check_layout(b, tok, 3, 4, 12)
    enc = tok(PROMPTS[:3])["input_ids"]
    assert b.prompt_ids == [enc[i] for i in range(3) for _ in range(4)]
    assert set(b.finish_reason) <= {"eos", "length"} and "length" in b.finish_reason
    moved = b.to("cpu")
    assert isinstance(moved, RolloutBatch) and torch.equal(moved.logprobs, b.logprobs) and moved.texts == b.texts


def test_seed_reproducibility(model, tok):
    eng = HFRolloutEngine(model, tok)
    a, b, c = (eng.generate(PROMPTS, SamplingParams(max_new_tokens=16, n=2, seed=s)) for s in (7, 7, 8))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert a.texts == b.texts and a.finish_reason == b.finish_reason
    assert not torch.equal(a.response_ids, c.response_ids)


@pytest.mark.parametrize("max_batch_size", [256, 3])
def test_greedy_matches_hf_generate(model, tok, max_batch_size):
    max_new = 14
    b = HFRolloutEngine(model, tok, max_batch_size=max_batch_size).generate(
        PROMPTS, SamplingParams(max_new_tokens=max_new, greedy=True))
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ref = model.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id)
    ref = ref[:, enc["input_ids"].shape[1]:]
    assert ref.shape == b.response_ids.shape
    assert torch.equal(ref, b.response_ids)
    assert len(set(b.texts)) == len(PROMPTS)  # the test is not vacuous


def test_logprobs_and_entropy_match_teacher_forcing(model, tok):
    T = 0.7
    b = HFRolloutEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=10, n=2, temperature=T, seed=1))
    m = b.response_mask
    # one teacher-forced pass over the left-padded batch
    ids, attn, start = b.model_inputs()
    lp, ent = sequence_logprobs(model, ids, attn, start, temperature=T, with_entropy=True)
    assert lp.shape == m.shape
    assert torch.allclose(lp * m, b.logprobs, atol=1e-4) and torch.allclose(ent * m, b.entropy, atol=1e-4)
    # ragged starts: unpadded prompt + response, right-padded
    seqs = [p + r[mk].tolist() for p, r, mk in zip(b.prompt_ids, b.response_ids, m)]
    L = max(map(len, seqs))
    ids2 = torch.tensor([s + [tok.pad_token_id] * (L - len(s)) for s in seqs])
    attn2 = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    starts = torch.tensor([len(p) for p in b.prompt_ids])
    lp2, ent2 = sequence_logprobs(model, ids2, attn2, starts, temperature=T, with_entropy=True)
    assert torch.allclose(lp2[:, : m.shape[1]] * m, b.logprobs, atol=1e-4)
    # plain full forward, one sample at a time, no padding at all
    for i, s in enumerate(seqs):
        logits = model(torch.tensor([s])).logits[0, len(b.prompt_ids[i]) - 1: -1]
        k = int(m[i].sum())
        ref = torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(s[-k:])[:, None]).squeeze(-1)
        assert torch.allclose(ref, b.logprobs[i, :k], atol=1e-4)
        assert torch.allclose(token_entropy(logits, temperature=T), b.entropy[i, :k], atol=1e-4)


def test_sequence_logprobs_gradients_and_wrapped_model(model, tok):
    ids = torch.tensor(tok(["Q:1+2\n12", "Q:3*4\n9+"])["input_ids"])
    lp, ent = sequence_logprobs(model, ids, torch.ones_like(ids), 7, with_entropy=True)
    assert lp.shape == ent.shape == (2, ids.shape[1] - 7) and lp.requires_grad and not ent.requires_grad
    lp.sum().backward()
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)
    lp2, ent2 = sequence_logprobs(Forced(model), ids, torch.ones_like(ids), 7, with_entropy=True)  # plain path
    assert torch.allclose(lp, lp2, atol=1e-6) and torch.allclose(ent, ent2, atol=1e-6)


def test_eager_attention_matches_sdpa(model, tok):
    import copy

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")  # 2-D masks instead of the engine's 4-D sdpa fast path
    p = SamplingParams(max_new_tokens=12, n=2, seed=4)
    a, b = HFRolloutEngine(model, tok).generate(PROMPTS, p), HFRolloutEngine(eager, tok).generate(PROMPTS, p)
    assert torch.equal(a.response_ids, b.response_ids) and torch.allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_length_finish(model, tok):
    wrapped = Forced(model, bias={tok.eos_token_id: -1e4})
    b = HFRolloutEngine(wrapped, tok).generate(PROMPTS, SamplingParams(max_new_tokens=5, n=2, seed=0))
    assert b.finish_reason == ["length"] * 8 and b.response_mask.all() and b.response_ids.shape == (8, 5)
    _check_layout(b, tok, 4, 2, 5)


def test_eos_finish(model, tok):
    eos = tok.eos_token_id
    # EOS forced at query position 12: a prompt of length L stops after 12 - L + 2 tokens (EOS included)
    wrapped = Forced(model, bias={eos: -1e4}, forced={12: eos})
    prompts = PROMPTS[:3]
    b = HFRolloutEngine(wrapped, tok).generate(prompts, SamplingParams(max_new_tokens=20, n=3, seed=0))
    _check_layout(b, tok, 3, 3, 20)
    assert b.finish_reason == ["eos"] * 9
    expect = [12 - len(tok(p)["input_ids"]) + 2 for p in prompts for _ in range(3)]
    assert b.response_mask.sum(-1).tolist() == expect
    for i, k in enumerate(expect):
        assert b.response_ids[i, k - 1] == eos
    # always EOS: a one-token response with an empty text
    b = HFRolloutEngine(Forced(model, bias={eos: 1e4}), tok).generate(PROMPTS, SamplingParams(n=2, seed=0))
    assert b.response_ids.tolist() == [[eos]] * 8 and b.texts == [""] * 8 and b.finish_reason == ["eos"] * 8


def test_stop_strings(model, tok):
    v = tok.convert_tokens_to_ids
    prompts = ["Q:1+2\n", "Q:3*4\n"]  # same length (7 tokens); they end with the stop string "\n"
    # forced response "..xy\n..": tokens 2, 3, 4 are x, y, newline
    wrapped = Forced(model, bias={tok.eos_token_id: -1e4}, forced={8: v("x"), 9: v("y"), 10: v("\n")})
    eng = HFRolloutEngine(wrapped, tok)
    b = eng.generate(prompts, SamplingParams(max_new_tokens=12, n=2, seed=0, stop=("\n",)))
    assert b.finish_reason == ["stop"] * 4 and b.response_ids.shape == (4, 5)
    assert all(t.endswith("xy\n") and len(t) == 5 for t in b.texts)
    assert (b.response_ids[:, -1] == v("\n")).all() and b.response_mask.all()
    b = eng.generate(prompts, SamplingParams(max_new_tokens=12, n=2, seed=0, stop=("zz", "xy")))
    assert b.finish_reason == ["stop"] * 4 and b.response_ids.shape == (4, 4)
    assert all(t.endswith("xy") and len(t) == 4 for t in b.texts)
    # a stop string never produced: runs to the length limit
    b = eng.generate(prompts, SamplingParams(max_new_tokens=12, seed=0, stop=("yx",)))
    assert b.finish_reason == ["length"] * 2 and b.response_ids.shape == (2, 12)


def test_top_p_tiny_is_greedy(model, tok):
    eng = HFRolloutEngine(model, tok)
    g = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, greedy=True, temperature=0.8))
    s = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, top_p=1e-6, temperature=0.8, seed=3, n=2))
    assert torch.equal(s.response_ids, g.response_ids.repeat_interleave(2, 0))
    assert torch.allclose(s.logprobs, g.logprobs.repeat_interleave(2, 0), atol=1e-5)  # untruncated log-probs
    assert (s.logprobs[s.response_mask] < 0).all()
    mid = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12, top_p=0.5, seed=3, n=4))
    _check_layout(mid, tok, 4, 4, 12)


def test_n_samples_share_prefill(model, tok):
    wrapped = Forced(model)
    b = HFRolloutEngine(wrapped, tok).generate(PROMPTS[:2], SamplingParams(max_new_tokens=8, n=8, seed=0))
    P = max(len(x) for x in tok(PROMPTS[:2])["input_ids"])
    assert wrapped.calls[0] == (2, P)  # one prefill row per unique prompt
    assert all(c[1] == 1 and c[0] <= 16 for c in wrapped.calls[1:]) and wrapped.calls[1][0] == 16
    assert len({tuple(r) for r in b.response_ids[:8].tolist()}) > 1  # samples of one prompt differ
    # chunking splits one prompt's samples across sub-batches: each chunk prefills once
    wrapped.calls.clear()
    b = HFRolloutEngine(wrapped, tok, max_batch_size=5).generate(PROMPTS[:2], SamplingParams(max_new_tokens=3, n=4))
    # samples sorted by prompt length (longest first): [p1 x4, p0 x1] then [p0 x3]
    assert [c for c in wrapped.calls if c[1] > 1] == [(2, 10), (1, 7)]
    _check_layout(b, tok, 2, 4, 3)


def test_dropping_finished_rows_and_static_cache_change_nothing(model, tok):
    wrapped = Forced(model, bias={tok.eos_token_id: -1e4}, forced={12: tok.eos_token_id})
    p = SamplingParams(max_new_tokens=16, n=3, seed=5)
    a = HFRolloutEngine(wrapped, tok).generate(PROMPTS, p)
    assert min(c[0] for c in wrapped.calls[1:]) < 12  # finished rows were dropped
    b = HFRolloutEngine(wrapped, tok, use_static_cache=True).generate(PROMPTS, p)
    assert torch.equal(a.response_ids, b.response_ids) and torch.allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_token_id_prompts_continue_prefix(model, tok):
    eng = HFRolloutEngine(model, tok)
    p = SamplingParams(max_new_tokens=10, greedy=True)
    full = eng.generate(PROMPTS, p)
    ids = [tok(x)["input_ids"] for x in PROMPTS]
    assert torch.equal(eng.generate(ids, p).response_ids, full.response_ids)
    k = 4  # continue from prompt + first k generated tokens, for the responses longer than k
    rows = [j for j in range(len(PROMPTS)) if full.response_mask[j].sum() > k]
    assert len(rows) >= 2
    cont = eng.generate([ids[j] + full.response_ids[j, :k].tolist() for j in rows],
                        SamplingParams(max_new_tokens=10 - k, greedy=True))
    for c, j in enumerate(rows):
        m = cont.response_mask[c]
        assert torch.equal(cont.response_ids[c][m], full.response_ids[j, k:][full.response_mask[j, k:]])


def test_validation_and_edge_cases(model, tok):
    for kw in [dict(temperature=0), dict(temperature=float("nan")), dict(top_p=0), dict(top_p=1.5), dict(n=0),
               dict(max_new_tokens=0), dict(stop=("",)), dict(seed=1.5)]:
        with pytest.raises(ValueError):
            SamplingParams(**kw)
    assert SamplingParams(stop="\n").stop == ("\n",)
    with pytest.raises(ValueError):
        HFRolloutEngine(model, tok, max_batch_size=0)
    eng = HFRolloutEngine(model, tok)
    with pytest.raises(TypeError):
        eng.generate("Q:1+2\n", SamplingParams())
    with pytest.raises(TypeError):
        eng.generate(["Q:1", [1, 2]], SamplingParams())
    with pytest.raises(ValueError):
        eng.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        eng.generate([[1] * 256], SamplingParams())
    with pytest.warns(UserWarning, match="clamped"):
        b = eng.generate([[1] * 250, [1] * 5], SamplingParams(max_new_tokens=20, greedy=True))
    assert b.response_mask[0].sum() <= 6
    assert b.finish_reason[0] in ("length", "eos") and (b.finish_reason[0] == "eos" or b.response_mask[0].sum() == 6)
    empty = eng.generate([], SamplingParams(n=3))
    assert len(empty) == 0 and empty.response_ids.shape == (0, 0)


def test_sampling_settings_coerce_refuses_what_the_stage_sets():
    assert SamplingParams.coerce(None) == SamplingParams()
    assert SamplingParams.coerce(None, max_new_tokens=9) == SamplingParams(max_new_tokens=9)
    assert SamplingParams.coerce({"temperature": 0.5}, max_new_tokens=9) == SamplingParams(max_new_tokens=9, temperature=0.5)
    assert SamplingParams.coerce({"stop": ["\n"]}).stop == ("\n",)
    p = SamplingParams(max_new_tokens=7)
    assert SamplingParams.coerce(p) is p and p.call(3, 11) == SamplingParams(max_new_tokens=7, n=3, seed=11)
    for bad in ({"n": 4}, {"seed": 3}, SamplingParams(n=2)):
        with pytest.raises(ValueError, match=r"^model\.init_args\.sampling: n and seed are set by the stage"):
            SamplingParams.coerce(bad, "model.init_args.sampling")
    with pytest.raises(ValueError, match=r"^scorer\.sampling: unknown sampling settings \['max_batch_size'\]"):
        SamplingParams.coerce({"max_new_tokens": 8, "max_batch_size": 256}, "scorer.sampling")
    with pytest.raises(TypeError, match="collection.policy must be a SamplingParams or a mapping"):
        SamplingParams.coerce(64, "collection.policy")


def test_mode_restored_and_progress(model, tok):
    model.train()
    try:
        b = HFRolloutEngine(model, tok, max_batch_size=2).generate(PROMPTS, SamplingParams(max_new_tokens=3),
                                                                    progress=True)
        assert model.training and len(b) == 4
    finally:
        model.eval()
