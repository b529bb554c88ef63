"""Reasoning steps: cut a response into steps by a delimiter and map exactly between character
spans and token positions, for any Hugging Face fast tokenizer (METHOD.md section 2).

Character rule (:func:`split_steps`)
    A *delimiter stretch* is a maximal run of text covered by (possibly overlapping) occurrences of
    the delimiter, so ``"\\n\\n\\n"`` is one stretch for ``"\\n\\n"``. Every stretch ends a step and
    belongs to the step it ends: step ``k`` includes its trailing delimiters and step ``k+1``
    starts right after them. Consecutive delimiters thus merge into the preceding step, delimiters
    at the end of the text stay in the last step, and delimiters at the start belong to the first
    step. Spans tile the text (every character in exactly one step) and no step is empty; only a
    text made of delimiters alone has a step with no content. A text without delimiters is one
    step. The empty text has zero steps: ``K >= 1`` exactly when the response is non-empty. The
    delimiter *ends* steps; header-style markers ("Step 2:") are not supported as such, write the
    blank line before them as the delimiter instead.

Token rule (:func:`token_step_index`)
    A token belongs to the step that contains its **last** character (``end - 1``). A token that
    straddles a boundary (a BPE merge such as ``".\\n\\nThe"``) therefore belongs to the later
    step. Why: the tokens up to and including the last token of step ``k`` then never carry text of
    a later step, so a value read there is a function of ``h_k`` alone (no leak of ``s_{k+1}`` into
    ``V(h_k)`` or into the PRM), and the last step always holds the response's last token. The
    price is that a straddling token's first characters (here ``"."``) are credited to the next
    step. A zero-width token (special tokens such as EOS when decoding sampled ids) belongs to the
    step that is open when it is emitted; one at the very start belongs to the first step.

Step ends (:func:`step_end_positions`)
    ``step_ends[k]`` is the last token ``t`` such that tokens ``0..t`` all lie inside ``h_k``,
    i.e. the longest token prefix whose text is a prefix of ``h_k``. This is where the PRM value
    ``f(h_k)`` is read. With the token rule it is the last token of step ``k`` and, if a straddling
    token leaves step ``k`` without tokens, the end of the previous step (so that step gets zero
    predicted progress and the telescoping sum stays exact); ``-1`` when no token fits at all.

Prompt + response (:func:`align_prompt_response`)
    The PRM tokenizes ``prompt + response`` jointly; a token belongs to the prompt iff it ends at
    or before ``len(prompt)``. A token straddling the prompt/response boundary belongs to the first
    step (same last-character rule); the prompt end (where ``V(h_0)`` is read) is the token before
    the first response token.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple, Sequence, Union

import torch

DEFAULT_DELIMITER = "\n\n"
Offsets = Union[Sequence[Sequence[int]], torch.Tensor]  # [T, 2] (start, end) character span per token


class StepSpan(NamedTuple):
    """Half-open character span ``[start, end)`` of one step in the response text."""

    start: int
    end: int


def _stretches(text: str, delimiter: str) -> list[tuple[int, int]]:
    """Maximal runs of text covered by (possibly overlapping) delimiter occurrences."""
    if not delimiter:
        raise ValueError("the step delimiter must be a non-empty string")
    out: list[tuple[int, int]] = []
    for m in re.finditer(f"(?=({re.escape(delimiter)}))", text):
        a, b = m.start(), m.start() + len(delimiter)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def split_steps(text: str, delimiter: str = DEFAULT_DELIMITER) -> list[StepSpan]:
    """Character spans ``[K]`` of the steps of ``text`` (the module's character rule)."""
    cuts = [b for a, b in _stretches(text, delimiter) if a > 0 and b < len(text)]
    bounds = [0, *cuts, len(text)] if text else []
    return [StepSpan(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def step_texts(text: str, delimiter: str = DEFAULT_DELIMITER) -> list[str]:
    """The steps' contents ``[K]`` without their delimiters (what a verifier sees): the trailing
    stretch of every step and the leading stretch of the first step are removed."""
    stretches = _stretches(text, delimiter)
    starts_at = {b: a for a, b in stretches}  # stretch end -> stretch start
    lead = stretches[0][1] if stretches and stretches[0][0] == 0 else 0
    out = []
    for k, (a, b) in enumerate(split_steps(text, delimiter)):
        a = lead if k == 0 else a
        out.append(text[a:max(a, starts_at.get(b, b))])
    return out


def prefix_text(text: str, spans: Sequence[tuple[int, int]], k: int) -> str:
    """The response part of ``h_k``: the exact text of steps ``0..k-1`` (``""`` for ``k = 0``,
    the whole text for ``k = K``). For ``0 < k < K`` it ends with step ``k-1``'s delimiters, so a
    prover continues with the next step."""
    if not 0 <= k <= len(spans):
        raise ValueError(f"k={k} outside [0, {len(spans)}]")
    return text[: spans[k - 1][1]] if k else ""


def token_step_index(offsets: Offsets, spans: Sequence[tuple[int, int]], response_start: int | None = None) -> torch.Tensor:
    """Step of each token ``[T]`` (long) by the last-character rule.

    ``response_start=None``: ``offsets`` index the response text and every token gets a step in
    ``[0, K)`` (all ``-1`` when ``K = 0``). ``response_start=P``: ``offsets`` index
    ``prompt + response`` with the response at character ``P``; tokens ending at or before ``P``
    (the prompt, and special tokens with ``(0, 0)`` offsets) get ``-1``.
    """
    ends = torch.as_tensor(offsets, dtype=torch.long).reshape(-1, 2)[:, 1]
    bounds = torch.tensor([int(e) for _, e in spans], dtype=torch.long)  # [K] step end characters
    n = int(bounds[-1]) if len(bounds) else 0
    if response_start is None:  # zero-width tokens at the start join the first step
        last = (ends - 1).clamp(min=0) if spans else ends - 1
        outside = torch.zeros_like(ends, dtype=torch.bool) if spans else last < 0
    else:
        last = ends - 1 - response_start
        outside = last < 0
    if bool(((last >= n) & ~outside).any()):
        raise ValueError(f"token offsets reach past the end of the text ({n} characters)")
    step = torch.searchsorted(bounds, last, right=True)
    return torch.where(outside, torch.full_like(step, -1), step)


def step_end_positions(step_index: Sequence[int] | torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
    """Token index ``[K]`` where each ``h_k`` ends (see the module docstring; ``-1``: none).
    ``num_steps`` defaults to ``max(step_index) + 1``."""
    si = torch.as_tensor(step_index, dtype=torch.long).reshape(-1)
    if num_steps is None:
        num_steps = int(si.max()) + 1 if si.numel() else 0
    if si.numel() == 0:
        return torch.full((num_steps,), -1, dtype=torch.long)
    reached = torch.cummax(si, 0).values  # [T] latest step reached by tokens 0..t
    return torch.searchsorted(reached, torch.arange(num_steps), right=True) - 1


def tokens_to_chars(offsets: Offsets, step_ends: Sequence[int] | torch.Tensor) -> list[StepSpan]:
    """Inverse map: the character span ``[K]`` each step's tokens cover. Step ``k``'s tokens end
    at ``c_k`` = the furthest character reached by tokens ``0..step_ends[k]``; span ``k`` is
    ``[c_{k-1}, c_k)`` with ``c_{-1} = 0``. It equals the step's own span exactly when no token
    straddles its boundaries; ``text[:c_k]`` is the text of the policy's token prefix for ``h_k``."""
    ends = torch.as_tensor(offsets, dtype=torch.long).reshape(-1, 2)[:, 1]
    reach = torch.cummax(ends, 0).values.tolist() if ends.numel() else []
    c = [reach[int(e)] if int(e) >= 0 else 0 for e in step_ends]
    return [StepSpan(a, b) for a, b in zip([0, *c[:-1]], c)]


def decode_with_offsets(tokenizer, ids: Sequence[int] | torch.Tensor, context: int = 8) -> tuple[str, torch.Tensor]:
    """Decode sampled ``ids`` into ``(text, offsets [T, 2])`` with HF-style character offsets.

    ``text = tokenizer.decode(ids, skip_special_tokens=True)`` without clean-up. Each token's new
    characters are the difference between the decodes of ``ids[s:t+1]`` and ``ids[s:t]`` over a
    window of ``context`` previous tokens (so decoders that strip or join at the start of a
    sequence agree), all windows in one batched Rust call: O(T * context). Trailing ``U+FFFD`` is
    an incomplete UTF-8 character (byte-level BPE or byte fallback splitting a character over
    tokens): its bytes are pending and the character is committed by the token that completes it;
    like the tokenizer's own offsets, every token holding bytes of a character covers that
    character. Special tokens decode to nothing: zero-width spans. If the windows disagree with the
    full decode, it falls back to whole-prefix windows (O(T^2)) and raises if even those disagree.
    """
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    backend = tokenizer.backend_tokenizer
    text = backend.decode(ids, skip_special_tokens=True)
    T = len(ids)
    for ctx in dict.fromkeys((max(context, 1), T)):
        starts = [max(0, t - ctx) for t in range(T)]
        dec = backend.decode_batch([ids[s:t] for t, s in enumerate(starts)] + [ids[s:t + 1] for t, s in enumerate(starts)],
                                   skip_special_tokens=True)
        pieces, pending = [], []
        for before, after in zip(dec[:T], dec[T:]):
            b, a = before.rstrip("\ufffd"), after.rstrip("\ufffd")
            if not a.startswith(b):
                break
            pieces.append(a[len(b):])
            pending.append(len(a) < len(after))
        joined = "".join(pieces)
        if len(pieces) == T and text.startswith(joined) and not text[len(joined):].strip("\ufffd"):
            offsets, c = [], 0
            if T:  # characters still pending after the last token are flushed as U+FFFD
                pieces[-1], pending[-1] = pieces[-1] + text[len(joined):], False
            for piece, pend in zip(pieces, pending):
                offsets.append((c, c + len(piece) + pend))
                c += len(piece)
            return text, torch.tensor(offsets, dtype=torch.long).reshape(-1, 2)
    raise ValueError("this tokenizer's decoding is not prefix-consistent; cannot map tokens to characters")


@dataclass(frozen=True)
class StepAlignment:
    """A response cut into steps, at character and token level."""

    text: str  # the response text all character offsets index
    input_ids: torch.Tensor  # [T] long, response token ids (no special tokens added)
    offsets: torch.Tensor  # [T, 2] long, (start, end) character span of each token in `text`
    step_index: torch.Tensor  # [T] long, step of each token, in [0, K) (-1 only when K = 0)
    step_spans: list[StepSpan]  # [K] character span of each step in `text`
    step_ends: torch.Tensor  # [K] long, token index where h_k ends (-1: no token lies within h_k)

    @property
    def num_steps(self) -> int:
        return len(self.step_spans)


def _align(text: str, ids, offsets, delimiter: str) -> StepAlignment:
    spans = split_steps(text, delimiter)
    index = token_step_index(offsets, spans)
    return StepAlignment(text, torch.as_tensor(ids, dtype=torch.long).reshape(-1), offsets, index, spans,
                         step_end_positions(index, len(spans)))


def align_response(tokenizer, response_text: str, delimiter: str = DEFAULT_DELIMITER) -> StepAlignment:
    """Tokenize ``response_text`` (no special tokens) and align its tokens with its steps, using
    the tokenizer's offset mapping."""
    enc = tokenizer(response_text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    return _align(response_text, enc["input_ids"], offsets, delimiter)


def align_tokens(tokenizer, response_ids: Sequence[int] | torch.Tensor, delimiter: str = DEFAULT_DELIMITER) -> StepAlignment:
    """Align tokens sampled by a policy (ids given, not re-tokenized; padding removed) with the
    steps of their decoded text (:func:`decode_with_offsets`). Gives the same step assignment as
    :func:`align_response` when ``response_ids`` is the tokenizer's own encoding of the text and
    decoding is lossless (byte-level BPE, byte-fallback SentencePiece; a lossy decode, e.g. of
    ``<unk>``, is segmented as decoded). A trailing EOS is zero-width and joins the last step."""
    text, offsets = decode_with_offsets(tokenizer, response_ids)
    return _align(text, response_ids, offsets, delimiter)


class PromptResponseAlignment(NamedTuple):
    input_ids: torch.Tensor  # [L] long, joint tokenization of prompt + response
    step_ends: torch.Tensor  # [K] long, position in input_ids where each h_k ends (read f(h_k) here)
    prompt_end: int  # position of the last token before the response (read f(h_0) here)


def align_prompt_response(tokenizer, prompt: str, response: str, delimiter: str = DEFAULT_DELIMITER,
                          add_special_tokens: bool = True) -> PromptResponseAlignment:
    """Tokenize ``prompt + response`` jointly (as a PRM with its own tokenizer sees it) and locate
    ``h_0`` and every ``h_k`` in full-sequence coordinates. Raises if no token lies within the prompt."""
    enc = tokenizer(prompt + response, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    spans = split_steps(response, delimiter)
    index = token_step_index(enc["offset_mapping"], spans, response_start=len(prompt))
    reached = torch.cummax(index, 0).values if index.numel() else index
    prompt_end = int((reached < 0).sum()) - 1
    if prompt_end < 0:
        raise ValueError("no token lies within the prompt: nowhere to read the value of h_0")
    return PromptResponseAlignment(torch.tensor(enc["input_ids"], dtype=torch.long), step_end_positions(index, len(spans)), prompt_end)
