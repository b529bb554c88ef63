"""The HF engine: batched sampling over any torch causal LM, with per-token log-probs and entropies.

The tiny CPU default's engine, and the one that trains in place (it samples from the very module
being optimized, so it never needs a weight sync). :class:`HFRolloutEngine` runs a hand-written
decode loop:

* prompts are sorted by length, cut into sub-batches of at most ``max_batch_size`` samples,
  left-padded (``attention_mask`` + explicit ``position_ids``) and prefilled **once per unique
  prompt**; the KV cache is then expanded to the ``n`` samples of each prompt;
* each step samples from ``softmax(logits / temperature)`` (optionally top-p truncated, or greedy)
  with a ``torch.Generator`` seeded from ``params.seed`` (noise drawn per sub-batch row, so
  dropping finished rows does not change the samples) and records, for the sampled token,
  ``logprobs = log_softmax(logits / temperature)`` of the **untruncated** distribution (what PPO's
  ``old_logp`` must equal) and ``entropy = token_entropy(logits, temperature)`` (METHOD.md §6);
* a sample finishes on EOS (``"eos"``; the EOS token is kept in ``response_ids`` and
  ``response_mask``, so RL trains on it, but not in ``texts``), on a stop string (``"stop"``: the
  response is truncated after the token that completed the stop string, ``texts`` is cut right
  after the stop string, which is kept; stop strings are matched in the response text only, and
  checked only at tokens whose text could complete one), or on its token budget (``"length"``:
  ``max_new_tokens``, clamped per prompt to the model's ``max_position_embeddings`` with a warning). Finished rows are
  dropped from the batch as they accumulate (dynamic cache only).

Same prompts, params (with a seed) and ``max_batch_size`` give identical outputs (the chunking
into sub-batches changes the random stream, so a different ``max_batch_size`` does too).
:func:`hca.rl.logprobs.sequence_logprobs` recomputes the same log-probs / entropies by teacher forcing
(with gradients, without a full-vocabulary fp32 logits tensor), for RL training.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from hca.credit import token_entropy
from hca.rollout.base import RolloutBatch, SamplingParams, encode_prompts, token_budgets


def _forward_kwargs(model) -> tuple[str, bool]:
    """Name of the cache kwarg (``cache`` in transformers >= 5, else ``past_key_values``) and
    whether ``logits_to_keep`` is accepted."""
    try:
        params = inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        params = {}
    name = "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"
    return name, "logits_to_keep" in params


def _find_config(model):
    """The HF config of ``model`` or of the first wrapped submodule that has one."""
    candidates = [model] + (list(model.modules()) if isinstance(model, torch.nn.Module) else [])
    for obj in candidates:
        if hasattr(getattr(obj, "config", None), "max_position_embeddings"):
            return obj.config
    return None


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


class HFRolloutEngine:
    """:class:`RolloutEngine` over a causal LM (a ``PreTrainedModel`` or any callable taking
    ``input_ids, attention_mask, position_ids, cache|past_key_values, use_cache`` and returning
    ``.logits``) with a transformers ``DynamicCache``.

    ``use_static_cache`` decodes into a preallocated ``StaticCache`` (fixed shapes: finished rows
    are not dropped; the test-suite checks it gives the same samples on CPU). ``compile`` wraps the
    one-token decode step in ``torch.compile`` (``mode="reduce-overhead"``, i.e. CUDA graphs, on
    CUDA) and implies ``use_static_cache`` (a growing cache would recompile every step); it is meant
    for GPUs and is untested (no GPU in CI, and compiling is too slow for the CPU suite).
    """

    records_entropy = True
    samples_live_weights = True  # samples from the training module itself: nothing to sync
    compact_ratio = 0.75  # drop finished rows once at most this fraction of the batch rows is live

    def __init__(self, model, tokenizer, max_batch_size: int = 256, use_static_cache: bool = False,
                 compile: bool = False, progress: bool = False):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.progress = max_batch_size, progress
        self.use_static_cache = use_static_cache or compile
        self.config = _find_config(model)
        self.max_positions = getattr(self.config, "max_position_embeddings", None)
        self._cache_kw, self._keep_kw = _forward_kwargs(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        self.eos_ids = sorted(e for e in eos if e is not None)
        self._stop_filter: dict[tuple[str, ...], torch.Tensor] = {}
        self._mask_4d = getattr(self.config, "_attn_implementation", None) == "sdpa"
        self._step = self._forward
        if compile:
            cuda = self.device.type == "cuda"
            self._step = torch.compile(self._forward, mode="reduce-overhead" if cuda else None)

    @property
    def device(self) -> torch.device:
        p = next(iter(self.model.parameters()), None) if hasattr(self.model, "parameters") else None
        return p.device if p is not None else torch.device("cpu")

    def _forward(self, ids, attn, pos, cache, keep_last: bool):
        kw = {"input_ids": ids, "attention_mask": attn, "position_ids": pos, self._cache_kw: cache, "use_cache": True}
        if keep_last and self._keep_kw:
            kw["logits_to_keep"] = 1
        out = self.model(**kw)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1], (new_cache if new_cache is not None else cache)

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], params: SamplingParams | None = None, *,
                 progress: bool | None = None) -> RolloutBatch:
        params = params or SamplingParams()
        pids = encode_prompts(self.tokenizer, prompts)
        n, N = params.n, len(pids) * params.n
        budgets = token_budgets(pids, params.max_new_tokens, self.max_positions, "max_position_embeddings")
        # Samples in order of decreasing prompt length (stable), cut into sub-batches.
        order = sorted(range(len(pids)), key=lambda i: -len(pids[i]))
        samples = [i for i in order for _ in range(n)]
        chunks = [samples[k:k + self.max_batch_size] for k in range(0, N, self.max_batch_size)]
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        gen = torch.Generator(device=self.device).manual_seed(seed)
        parts, done = [], [0] * len(pids)
        was_training = getattr(self.model, "training", False)
        from tqdm.auto import tqdm

        show = self.progress if progress is None else progress
        try:
            if hasattr(self.model, "eval"):
                self.model.eval()
            with torch.inference_mode():
                for chunk in tqdm(chunks, desc="rollout", unit="batch", disable=not show or len(chunks) < 2):
                    uniq = list(dict.fromkeys(chunk))  # chunk = [u0] * c0 + [u1] * c1 + ...
                    dest = []  # output sample index of each chunk row
                    for u in chunk:
                        dest.append(u * n + done[u])
                        done[u] += 1
                    out = self._generate_chunk([pids[u] for u in uniq], [chunk.count(u) for u in uniq],
                                               [budgets[u] for u in uniq], params, gen)
                    parts.append((dest, out))
        finally:
            if was_training and hasattr(self.model, "train"):
                self.model.train()
        return self._assemble(parts, pids, n)

    # ------------------------------------------------------------------ helpers
    def _stop_candidates(self, stop: tuple[str, ...]) -> torch.Tensor:
        """[V] bool: tokens whose text could complete a stop string (contains a stop string's last
        character, or decodes to nothing / a partial character on its own)."""
        if stop not in self._stop_filter:
            last = {s[-1] for s in stop}
            V = max(len(self.tokenizer), int(getattr(self.config, "vocab_size", 0) or 0))
            texts = self.tokenizer.batch_decode([[v] for v in range(len(self.tokenizer))])
            flags = [not t or "\ufffd" in t or any(c in t for c in last) for t in texts] + [False] * (V - len(texts))
            self._stop_filter[stop] = torch.tensor(flags, device=self.device)
        return self._stop_filter[stop]

    def _sample(self, logits: torch.Tensor, p: SamplingParams, gen: torch.Generator, rows: torch.Tensor, B: int):
        """Sample one token per live row; returns ``(tokens, logprobs, entropies)``, each [len(rows)].
        Inverse-CDF sampling with one uniform per row, drawn for all ``B`` rows of the sub-batch so
        that a sample does not depend on which other rows are still alive (dropping finished rows,
        or a static cache that keeps them, changes nothing)."""
        logp_all = torch.log_softmax(logits.float() / p.temperature, -1)  # [b, V]
        if p.greedy:
            tok = logits.argmax(-1)
        else:
            probs, idx = logp_all.exp(), None
            if p.top_p < 1.0:  # keep the smallest head of mass >= top_p (always the top token)
                probs, idx = probs.sort(-1, descending=True)
                probs = probs.masked_fill((probs.cumsum(-1) - probs) >= p.top_p, 0.0)
            cdf = probs.double().cumsum(-1)
            u = torch.rand(B, 1, generator=gen, device=probs.device, dtype=torch.float64)[rows]
            tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
            last = probs.shape[-1] - 1 - probs.flip(-1).ne(0).int().argmax(-1)  # last token with p > 0
            tok = torch.minimum(tok, last)
            if idx is not None:
                tok = idx.gather(-1, tok[:, None]).squeeze(-1)
        logp = logp_all.gather(-1, tok[:, None]).squeeze(-1)
        return tok, logp, token_entropy(logits, temperature=p.temperature)

    def _generate_chunk(self, prompts: list[list[int]], counts: list[int], budgets: list[int],
                        p: SamplingParams, gen: torch.Generator) -> dict[str, Any]:
        """Decode ``counts[i]`` samples of each prompt ``i``; rows of the outputs are the samples
        (prompt-major). Token slots past a row's length hold garbage; :meth:`_assemble` masks them."""
        from transformers import DynamicCache

        dev = self.device
        U, P = len(prompts), max(map(len, prompts))
        ids = torch.full((U, P), self.pad_id, dtype=torch.long)
        attn = torch.zeros((U, P), dtype=torch.long)
        for i, q in enumerate(prompts):
            ids[i, P - len(q):] = torch.tensor(q)
            attn[i, P - len(q):] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = _positions(attn)
        cache = DynamicCache(config=self.config) if self.config is not None else DynamicCache()
        logits, cache = self._forward(ids, attn, pos, cache, keep_last=True)  # prefill once per unique prompt
        expand = torch.repeat_interleave(torch.arange(U, device=dev), torch.tensor(counts, device=dev))
        B, steps = len(expand), max(budgets)
        cache.batch_select_indices(expand)  # share the prefill among the samples of a prompt
        logits, pos = logits[expand], pos[expand, -1:]
        attn = torch.cat([attn[expand], attn.new_zeros((B, steps))], 1)  # [B, P + steps], filled as we go
        if self.use_static_cache:
            cache = self._to_static(cache, P + steps)
        budget = torch.tensor(budgets, device=dev)[expand]
        out_ids = torch.empty((B, steps), dtype=torch.long, device=dev)
        out_logp = torch.empty((B, steps), dtype=torch.float32, device=dev)
        out_ent = torch.empty((B, steps), dtype=torch.float32, device=dev)
        length = torch.full((B,), steps, dtype=torch.long, device=dev)  # tokens kept per sample
        is_eos_end = torch.zeros(B, dtype=torch.bool, device=dev)
        rows = torch.arange(B, device=dev)  # sample index of each batch row
        alive = torch.ones(B, dtype=torch.bool, device=dev)  # batch rows not finished yet
        eos = torch.tensor(self.eos_ids or [-1], device=dev)
        cand_filter = self._stop_candidates(p.stop) if p.stop else None
        stop_text: dict[int, str] = {}
        checked = [0] * B  # text length already searched for stop strings, per sample
        for t in range(steps):
            tok, logp, ent = self._sample(logits, p, gen, rows, B)
            out_ids[rows, t], out_logp[rows, t], out_ent[rows, t] = tok, logp, ent
            is_eos = torch.isin(tok, eos) & alive
            finished = is_eos | (alive & (budget <= t + 1))
            if cand_filter is not None:
                for i in (alive & ~is_eos & cand_filter[tok]).nonzero().flatten().tolist():
                    s = int(rows[i])
                    hit = self._find_stop(out_ids[s, :t + 1].tolist(), p.stop, checked, s)
                    if hit is not None:
                        stop_text[s] = hit
                        finished[i] = True
            length[rows[finished]] = t + 1
            is_eos_end[rows[is_eos]] = True
            alive &= ~finished
            num_alive = int(alive.sum())
            if num_alive == 0 or t + 1 == steps:
                break
            if not self.use_static_cache and num_alive <= self.compact_ratio * len(rows):  # drop finished rows
                keep = alive.nonzero().flatten()
                cache.batch_select_indices(keep)
                rows, alive, tok, budget = rows[keep], alive[keep], tok[keep], budget[keep]
                attn, pos = attn[keep], pos[keep]
            pos = pos + 1
            attn[:, P + t] = 1
            step_attn = attn if self.use_static_cache else attn[:, :P + t + 1]
            if self._mask_4d:  # [b, 1, 1, kv] bool: spares transformers building the mask each step
                step_attn = step_attn[:, None, None, :].bool()
            tok = tok.masked_fill(~alive, self.pad_id)[:, None]  # finished rows still in the batch: pad
            logits, cache = self._step(tok, step_attn, pos, cache, keep_last=False)
        reason = ["eos" if e else "length" for e in is_eos_end.tolist()]
        for s in stop_text:
            reason[s] = "stop"
        return {"ids": out_ids.cpu(), "logp": out_logp.cpu(), "ent": out_ent.cpu(), "length": length.cpu(),
                "reason": reason, "stop_text": stop_text}

    def _find_stop(self, ids: list[int], stop: tuple[str, ...], checked: list[int], s: int) -> str | None:
        """The response text cut right after the earliest stop string ending past ``checked[s]``."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        ends = [j + len(x) for x in stop if (j := text.find(x, max(0, checked[s] - len(x) + 1))) >= 0]
        checked[s] = len(text)
        return text[:min(ends)] if ends else None

    def _to_static(self, cache, max_len: int):
        """Copy a filled dynamic cache into a preallocated StaticCache of ``max_len`` positions."""
        from transformers import StaticCache

        static = StaticCache(config=self.config, max_cache_len=max_len)
        for i, layer in enumerate(cache.layers):
            static.layers[i].update(layer.keys, layer.values)
        return static

    def _assemble(self, parts: list[tuple[list[int], dict]], pids: list[list[int]], n: int) -> RolloutBatch:
        N = len(pids) * n
        T = max((int(o["length"].max()) for _, o in parts), default=0)
        ids = torch.full((N, T), self.pad_id, dtype=torch.long)
        logp, ent = torch.zeros((N, T)), torch.zeros((N, T))
        length = torch.zeros(N, dtype=torch.long)
        reason, texts = [""] * N, [""] * N
        for dest, o in parts:
            w, d = min(T, o["ids"].shape[1]), torch.tensor(dest)
            ids[d, :w], logp[d, :w], ent[d, :w] = o["ids"][:, :w], o["logp"][:, :w], o["ent"][:, :w]
            length[d] = o["length"]
            for row, i in enumerate(dest):
                reason[i] = o["reason"][row]
                if row in o["stop_text"]:
                    texts[i] = o["stop_text"][row]
        mask = torch.arange(T) < length[:, None]
        ids.masked_fill_(~mask, self.pad_id)
        logp.masked_fill_(~mask, 0.0)
        ent.masked_fill_(~mask, 0.0)
        rows = ids.tolist()
        decoded = self.tokenizer.batch_decode([r[:k] for r, k in zip(rows, length.tolist())], skip_special_tokens=True)
        texts = [t if r == "stop" else d for t, r, d in zip(texts, reason, decoded)]
        return RolloutBatch(
            prompt_index=torch.arange(len(pids)).repeat_interleave(n), prompt_ids=[q for q in pids for _ in range(n)],
            response_ids=ids, response_mask=mask, logprobs=logp, entropy=ent, finish_reason=reason, texts=texts,
            pad_token_id=self.pad_id,
        )
