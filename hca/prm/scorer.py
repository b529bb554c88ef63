"""The learned PRM as a :class:`hca.rl.scoring.StepScorer` (RL) and as a scorer of whole responses
(best-of-N, beam search, ProcessBench).

``score(prompts, responses, delimiter, problems=None)[i] = [f(h_0), ..., f(h_{K-1})]`` exactly as
the protocol asks (``problems`` is ignored: a learned scorer must not see the reference answer).
:meth:`PRMScorer.values` adds ``f(h_K)`` (the PRM's verdict on the finished response) and
:meth:`PRMScorer.values_at_spans` scores given step spans (ProcessBench's steps may contain the
delimiter themselves).

``prompt + response`` is tokenized jointly with the PRM's own tokenizer and boundaries are
located with the rules of :mod:`hca.steps` (as in training). Sequences are sorted by length and
run in batches of ``batch_size`` (right padding), in eval mode without gradients, so the scores
are deterministic. A sequence longer than ``max_length`` (default: the ``max_length`` the PRM was
trained with, else the backbone's ``max_position_embeddings``) is cut to its first
``max_length`` tokens and every boundary beyond the cut gets the value of the last boundary
inside it (if even the prompt does not fit, its last ``max_length`` tokens are kept and every
boundary gets ``f(h_0)``); a warning says how many sequences were cut.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from hca.data.problems import Problem
from hca.steps import split_steps, step_end_positions, token_step_index


class PRMScorer:
    def __init__(self, path: str, device: str = "auto", batch_size: int = 64, dtype: str = "float32",
                 max_length: int | None = None):
        """
        Args:
            path: a PRM export folder (``hca.prm.model.save_prm``; written by ``configs/prm/*.yaml``).
            device: where the PRM runs; ``"auto"``: CUDA when available, else CPU.
            batch_size: sequences per forward pass.
            dtype: parameter dtype of the backbone (the head stays float32).
            max_length: tokens per sequence (None: the training ``max_length``, else the model's limit).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.device, self.batch_size, self.dtype, self._max_length = path, device, batch_size, dtype, max_length
        self._loaded = None

    def _load(self):
        if self._loaded is None:
            from hca.prm.model import load_prm

            device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
            self._loaded = load_prm(self.path, self.dtype, device)
        return self._loaded

    @property
    def tokenizer(self):
        return self._load().tokenizer

    @property
    def prompt_format(self) -> dict | None:
        """The prompt format of the collection the PRM was trained on (:mod:`hca.data.prompts`); None if not recorded."""
        return self._load().config.get("prompt_format")

    @property
    def max_length(self) -> int:
        if self._max_length is not None:
            return self._max_length
        prm = self._load()
        return int(prm.config.get("max_length") or getattr(prm.model.backbone.config, "max_position_embeddings", 4096))

    # ---------------------------------------------------------------------------------- protocol
    def score(self, prompts: list[str], responses: list[str], delimiter: str,
              problems: Sequence[Problem] | None = None) -> list[list[float]]:
        """``[f(h_0) .. f(h_{K-1})]`` per response (``[]`` when ``K = 0``)."""
        return [v[:-1] for v in self.values(prompts, responses, delimiter)]

    def values(self, prompts: list[str], responses: list[str], delimiter: str) -> list[list[float]]:
        """``[f(h_0) .. f(h_K)]`` per response (``K + 1`` values; ``[f(h_0)]`` when ``K = 0``)."""
        return self.values_at_spans(prompts, responses, [split_steps(r, delimiter) for r in responses])

    def values_at_spans(self, prompts: list[str], responses: list[str],
                        spans: list[Sequence[tuple[int, int]]]) -> list[list[float]]:
        """``[f(h_0) .. f(h_K)]`` for steps given as character spans ``[K][2]`` tiling each response."""
        if not len(prompts) == len(responses) == len(spans):
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {len(spans)} span lists")
        prm = self._load()
        items = [self._encode(prm.tokenizer, p, r, s) for p, r, s in zip(prompts, responses, spans)]
        cut = sum(c for _, _, c in items)
        if cut:
            warnings.warn(f"{cut} of {len(items)} sequences are longer than max_length={self.max_length} tokens; "
                          "boundaries past the cut take the value of the last boundary inside it", stacklevel=2)
        out: list[list[float]] = [[] for _ in items]
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        pad = prm.tokenizer.pad_token_id
        dev = next(prm.model.parameters()).device
        for a in range(0, len(order), self.batch_size):
            idx = order[a:a + self.batch_size]
            T, J = max(len(items[i][0]) for i in idx), max(len(items[i][1]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            pos = torch.zeros((len(idx), J), dtype=torch.long)
            for row, i in enumerate(idx):
                seq, p, _ = items[i]
                ids[row, :len(seq)], mask[row, :len(seq)], pos[row, :len(p)] = torch.tensor(seq), 1, torch.tensor(p)
            with torch.inference_mode():
                f = torch.sigmoid(prm.model(ids.to(dev), mask.to(dev), pos.to(dev))).float().cpu()
            for row, i in enumerate(idx):
                out[i] = f[row, :len(items[i][1])].tolist()
        return out

    def _encode(self, tokenizer, prompt: str, response: str, spans) -> tuple[list[int], list[int], bool]:
        """``(input_ids [L], positions [K+1], was_cut)`` with the module docstring's cutting rule."""
        enc = tokenizer(prompt + response, add_special_tokens=True, return_offsets_mapping=True)
        index = token_step_index(enc["offset_mapping"], spans, response_start=len(prompt))
        reached = torch.cummax(index, 0).values if index.numel() else index
        prompt_end = int((reached < 0).sum()) - 1
        if prompt_end < 0:
            raise ValueError(f"no token lies within the prompt {prompt[:40]!r}: nowhere to read the value of h_0")
        positions = [prompt_end, *step_end_positions(index, len(spans)).tolist()]
        ids, n = list(enc["input_ids"]), self.max_length
        if len(ids) <= n:
            return ids, positions, False
        if prompt_end + 1 > n:
            return ids[prompt_end + 1 - n: prompt_end + 1], [n - 1] * len(positions), True
        inside = [p for p in positions if p < n]
        return ids[:n], inside + [inside[-1]] * (len(positions) - len(inside)), True
