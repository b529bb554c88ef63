"""Tiny real-format models for smoke runs of the GSM8K / MATH recipes, built here without a download.

Real architectures with random weights and real BPE tokenizers trained locally (``tokenizers``) on
problem text, saved with ``save_pretrained`` so every stage loads them exactly as it loads a real
checkpoint folder:

* ``policy`` and ``prover``: ``Qwen2ForCausalLM`` (hidden 64, 2 layers) with a byte-level BPE
  tokenizer that carries a ChatML chat template (``<|im_start|>role ... <|im_end|>``, as Qwen's),
  each briefly fine-tuned (:class:`hca.modules.sft.SFTModule`) on GSM8K solutions in the step
  format (``solution_format: steps``), so that they write blank-line separated steps and a
  ``\\boxed{}`` answer; the prover with another seed and more steps. They are still far too small
  to solve GSM8K: what these models test is the plumbing, not learning.
* ``prm_backbone``: a ``LlamaForCausalLM`` with a *different* BPE tokenizer (another vocabulary,
  no chat template): the PRM re-tokenizes the policy's text, as a real PRM of another family must.

    python -m hca.workflows.tiny_models --out runs/tiny  # policy/, prover/, prm_backbone/ (about a minute on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def gsm8k_texts(path: str | os.PathLike, limit: int = 2000) -> list[str]:
    """Questions and worked solutions of the first ``limit`` lines of a GSM8K JSONL file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= limit:
                break
            obj = json.loads(line)
            out += [obj["question"], obj["answer"]]
    return out


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, chat_template: str | None = None,
                        specials: list[str] | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (no BOS token, like Qwen's;
    ``eos`` = ``<|im_end|>`` with the chat template, else ``<|endoftext|>``; left padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = specials or CHATML_SPECIALS
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(list(texts), trainer=trainer)
    eos = "<|im_end|>" if chat_template and "<|im_end|>" in specials else specials[0]
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=specials[0], padding_side="left",
                                  clean_up_tokenization_spaces=False)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_qwen2(tokenizer, hidden_size: int = 64, num_hidden_layers: int = 2, seed: int = 0,
               max_position_embeddings: int = 2048):
    """A randomly initialised ``Qwen2ForCausalLM`` for ``tokenizer`` (deterministic in ``seed``)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # head_dim 32: the smallest head size vLLM's CPU attention supports (so the vLLM engine runs these too)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=max(1, hidden_size // 32),
                      num_key_value_heads=1,
                      max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(cfg)


def tiny_llama_for(tokenizer, hidden_size: int = 64, num_hidden_layers: int = 2, seed: int = 0,
                   max_position_embeddings: int = 2048):
    """A randomly initialised ``LlamaForCausalLM`` for ``tokenizer`` (a PRM backbone of another family)."""
    from hca.models.loading import tiny_llama

    model = tiny_llama(tokenizer, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max_position_embeddings, seed=seed)
    model.config.bos_token_id = None
    return model


def sft_steps_format(folder: str, train_file: str, max_steps: int, seed: int, limit: int = 256,
                     batch_size: int = 16, lr: float = 3e-3) -> None:
    """Fine-tune the causal LM in ``folder`` in place on GSM8K solutions in the step format (chat
    prompts from its own template), with the project's SFT module; no logger, no checkpoint."""
    import lightning as L

    from hca.datamodules.sft import SFTDataModule
    from hca.modules.sft import SFTModule

    L.seed_everything(seed, verbose=False)
    module = SFTModule(model=folder, optimizer=lambda p: __import__("torch").optim.AdamW(p, lr=lr),
                       sampling_eval=None, export_dir=folder)
    data = SFTDataModule(tokenizer=folder, train_file=train_file, val_file=train_file, task="gsm8k",
                         batch_size=batch_size, max_length=384, seed=seed, solution_format="steps", limit=limit)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=True, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, data)


def build_tiny_models(out: str | os.PathLike, gsm8k_train: str | os.PathLike, sft_steps: int = 120,
                      prover_sft_steps: int = 200, vocab_size: int = 512, prm_vocab_size: int = 400,
                      text_limit: int = 2000) -> dict[str, str]:
    """Write ``out/{policy,prover,prm_backbone}`` (module docstring); returns their paths. A folder
    that already holds a ``config.json`` is kept (delete it to rebuild)."""
    from hca.models.loading import save_checkpoint

    out = Path(out)
    texts = gsm8k_texts(gsm8k_train, text_limit)
    paths = {name: str(out / name) for name in ("policy", "prover", "prm_backbone")}
    for name, seed, steps in (("policy", 0, sft_steps), ("prover", 1, prover_sft_steps)):
        if (Path(paths[name]) / "config.json").exists():
            continue
        work = Path(paths[name] + ".building")  # renamed into place only once fine-tuned: a killed build redoes it
        if work.exists():
            shutil.rmtree(work)
        tok = train_bpe_tokenizer(texts, vocab_size, CHATML_TEMPLATE)
        save_checkpoint(tiny_qwen2(tok, seed=seed), tok, work)
        if steps:
            sft_steps_format(str(work), str(gsm8k_train), steps, seed)
        work.rename(paths[name])
    if not (Path(paths["prm_backbone"]) / "config.json").exists():
        tok = train_bpe_tokenizer(texts, prm_vocab_size, None, specials=["<pad>", "</s>"])
        save_checkpoint(tiny_llama_for(tok, seed=2), tok, paths["prm_backbone"])
    return paths


def main(argv=None) -> None:
    from hca.runtime.console import quiet_console
    from hca.evaluation.processbench import data_dir

    quiet_console()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tiny", help="folder for policy/, prover/, prm_backbone/")
    ap.add_argument("--gsm8k-train", default=str(data_dir() / "gsm8k" / "train.jsonl"),
                    help="GSM8K train.jsonl (tokenizer text and SFT data)")
    ap.add_argument("--sft-steps", type=int, default=120, help="SFT steps of the policy (0: random weights)")
    ap.add_argument("--prover-sft-steps", type=int, default=200, help="SFT steps of the prover")
    a = ap.parse_args(argv)
    for name, path in build_tiny_models(a.out, a.gsm8k_train, a.sft_steps, a.prover_sft_steps).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
