"""How big: a checkpoint's tensor shapes and parameter count (from its safetensors headers, no
tensor read), the context a checkpoint declares, and the context a stage needs (``context_need``)
that vLLM's ``max_model_len`` is sized from (:func:`stage_context_len`). Plain Python: no torch."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence


def checkpoint_shapes(folder: str) -> dict[str, list[int]] | None:
    """``{tensor name: shape}`` of a checkpoint folder, from its safetensors headers (no tensor is
    read); None when it is not a folder or holds no safetensors file."""
    root = Path(folder)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        shapes |= {name: meta["shape"] for name, meta in header.items() if name != "__metadata__"}
    return shapes


def checkpoint_num_params(folder: str) -> int | None:
    """Parameter count of a checkpoint folder (:func:`checkpoint_shapes`); None when it has none."""
    shapes = checkpoint_shapes(folder)
    return None if shapes is None else sum(math.prod(shape) for shape in shapes.values())


def stage_context_len(longest_prompt: int, response_budget: int, block_size: int, model_max: int | None) -> int:
    """vLLM's context for a stage: ``longest_prompt + response_budget`` tokens rounded up to whole KV
    blocks of ``block_size``, at most ``model_max`` (the model's ``max_position_embeddings``; None:
    no cap)."""
    if longest_prompt < 0 or response_budget < 0 or block_size < 1:
        raise ValueError(f"stage_context_len: bad arguments ({longest_prompt}, {response_budget}, {block_size})")
    need = max(1, longest_prompt + response_budget)
    n = -(-need // block_size) * block_size
    return n if model_max is None else min(n, int(model_max))


MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")  # vLLM's, smallest wins


def model_context_len(folder: str) -> int | None:
    """The context a checkpoint folder declares (the smallest of the ``config.json`` keys vLLM
    reads, of the text config when there is one); None when it says none or is not a folder."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config") or config
    found = [int(config[k]) for k in MAX_LEN_KEYS if isinstance(config.get(k), (int, float)) and config[k] > 0]
    return min(found) if found else None


def prompt_lengths(prompts: Sequence[str], tokenizer) -> list[int]:
    """Tokens of each prompt as the engines encode it (``add_special_tokens=True``)."""
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        return []
    return [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]


def sampling_need(prompts: Sequence[str], tokenizer, response_budget: int) -> tuple[int, int]:
    """``context_need`` of an engine that samples ``response_budget`` tokens after ``prompts``."""
    return max(prompt_lengths(prompts, tokenizer), default=0), int(response_budget)


def continuation_need(prompts: Sequence[str], policy_tokenizer, policy_budget: int, prover_tokenizer,
                      prover_budget: int) -> tuple[int, int]:
    """``context_need`` of a prover that completes ``prompt + a prefix of a policy response``
    (:func:`hca.collection.labelling.estimate_prefix_values`): the longest prompt in the prover's tokens, and the
    policy's budget plus the prover's. The prefix is text of at most ``policy_budget`` policy tokens;
    with another tokenizer it counts as ``policy_budget`` times the largest ratio of prover to policy
    tokens over the prompts (at least 1)."""
    prompts = list(dict.fromkeys(prompts))
    mine = prompt_lengths(prompts, prover_tokenizer)
    budget = int(policy_budget)
    if prover_tokenizer is not policy_tokenizer and prompts:
        theirs = prompt_lengths(prompts, policy_tokenizer)
        ratio = max((a / b for a, b in zip(mine, theirs) if b), default=1.0)
        budget = math.ceil(policy_budget * max(1.0, ratio))
    return max(mine, default=0), budget + int(prover_budget)
