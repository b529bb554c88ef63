"""The embedded model is an ordinary HF checkpoint; importing hca stays light."""
import subprocess
import sys

import torch

from hca.models.loading import char_tokenizer, load_causal_lm, load_tokenizer, save_checkpoint, tiny_llama


def test_char_tokenizer_one_token_per_char_with_offsets():
    tok = char_tokenizer()
    enc = tok("Q:12+3\n", return_offsets_mapping=True)
    assert enc.input_ids[0] == tok.bos_token_id and len(enc.input_ids) == 1 + 7
    assert enc.offset_mapping[1:] == [(i, i + 1) for i in range(7)]
    assert tok.decode(enc.input_ids, skip_special_tokens=True) == "Q:12+3\n"
    assert tok.padding_side == "left"


def test_checkpoint_roundtrip_by_path(tmp_path):
    tok = char_tokenizer()
    model = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, seed=3)
    path = save_checkpoint(model, tok, tmp_path / "ck")
    assert not (tmp_path / "ck.tmp").exists()
    m2, t2 = load_causal_lm(str(path)), load_tokenizer(str(path))
    ids = torch.tensor([t2("Q:1+2\n").input_ids])
    torch.testing.assert_close(m2(ids).logits, model(ids).logits)
    # seeds make distinct models; the same seed the same model
    other = tiny_llama(tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, seed=4)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)
    spec = load_causal_lm("tiny-llama:hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,"
                          "num_key_value_heads=1,seed=3")
    assert torch.equal(spec.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_import_hca_is_light():
    code = ("import sys, hca, hca.credit, hca.steps, hca.data.problems, hca.data.arithmetic, hca.verify; "
            "print(','.join(m for m in ('lightning', 'transformers', 'deepspeed', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
