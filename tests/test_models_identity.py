"""hca.models.identity: a model's identity for a collection's manifest tells checkpoints apart."""
from hca.models.identity import model_identity


def test_model_identity_tells_checkpoints_apart(tmp_path):
    import shutil

    from hca.models.loading import char_tokenizer, save_checkpoint, tiny_llama

    tok = char_tokenizer()
    for seed in (0, 1):
        m = tiny_llama(tok, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, seed=seed)
        save_checkpoint(m, tok, tmp_path / f"m{seed}")
    shutil.copytree(tmp_path / "m0", tmp_path / "copy")
    a, b, c = (model_identity(str(tmp_path / n)) for n in ("m0", "m1", "copy"))
    assert a["kind"] == "local" and a["sha256"] != b["sha256"]  # same architecture, different weights
    assert a["sha256"] == c["sha256"]
    assert model_identity("tiny-llama:seed=1")["kind"] == "tiny-spec"
    assert model_identity("org/some-model") == {"name": "org/some-model", "kind": "hub", "sha256": None}
