"""Step segmentation and the exact map between characters and tokens (hca.steps)."""
from __future__ import annotations

import random

import pytest
import torch

from hca.models.loading import char_tokenizer
from hca.steps import (
    StepSpan,
    align_prompt_response,
    align_response,
    align_tokens,
    decode_with_offsets,
    prefix_text,
    split_steps,
    step_end_positions,
    step_texts,
    token_step_index,
    tokens_to_chars,
)
from hca.data.arithmetic import STEP_DELIMITER, generate_problems

WORDS = ["The", "sum", "is", "π", "∑", "café", "x", "=", "Step", "so", "we", "get", "12", "345", "é", "then", "."]


@pytest.fixture(scope="module")
def chars():
    return char_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    """Byte-level BPE without the GPT-2 pre-tokenizer regex, so merges cross "\\n\\n" (".\\n\\nThe ")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    lines = []
    for _ in range(300):
        steps = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + "." for _ in range(rng.randint(1, 4))]
        lines.append("\n\n".join(steps))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_text(rng: random.Random, alphabet: list[str], n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


# ---------------------------------------------------------------- character level


def test_no_delimiter_is_one_step_and_empty_text_has_none():
    assert split_steps("x = 12 so we get 345.") == [StepSpan(0, 21)]
    assert step_texts("no blank line\nhere") == ["no blank line\nhere"]
    assert split_steps("") == [] and step_texts("") == []


@pytest.mark.parametrize("text, expected_spans, expected_texts", [
    ("A\n\nB", [(0, 3), (3, 4)], ["A", "B"]),
    ("A\n\n\n\nB", [(0, 5), (5, 6)], ["A", "B"]),  # consecutive delimiters merge into the step they end
    ("A\n\n\nB", [(0, 4), (4, 5)], ["A", "B"]),  # an odd run of newlines is one stretch too
    ("A\n\nB\n\n", [(0, 3), (3, 6)], ["A", "B"]),  # trailing delimiters stay in the last step
    ("A\n\nB\n\n\n\n", [(0, 3), (3, 8)], ["A", "B"]),
    ("\n\nA\n\nB", [(0, 5), (5, 6)], ["A", "B"]),  # leading delimiters belong to the first step
    ("\n\n\n", [(0, 3)], [""]),  # only delimiters: one step without content
    ("A\nB", [(0, 3)], ["A\nB"]),
])
def test_delimiter_runs(text, expected_spans, expected_texts):
    assert split_steps(text, "\n\n") == expected_spans
    assert step_texts(text, "\n\n") == expected_texts


@pytest.mark.parametrize("delimiter, text, expected_texts", [
    ("\n", "a=1\nb=2\n\nc=3\n", ["a=1", "b=2", "c=3"]),
    ("Step", "Step 1: a. Step 2: b.", [" 1: a. ", " 2: b."]),
    ("<sep>", "first<sep>second<sep><sep>third", ["first", "second", "third"]),
    ("aba", "xababay", ["x", "y"]),  # overlapping occurrences form one stretch
    (" ∑ ", "π ∑ é ∑ ∑ café", ["π", "é", "café"]),
])
def test_custom_delimiters(delimiter, text, expected_texts):
    spans = split_steps(text, delimiter)
    assert step_texts(text, delimiter) == expected_texts
    assert "".join(text[a:b] for a, b in spans) == text
    assert all(text[a:b].endswith(delimiter) for a, b in spans[:-1])


def test_step_delimiter_is_a_terminator_not_a_header():
    # "Step" ends a step: a leading one stays in the first step, a later one closes its step
    assert split_steps("Step 1: a. Step 2: b.", "Step") == [(0, 15), (15, 21)]


def test_empty_delimiter_rejected():
    with pytest.raises(ValueError):
        split_steps("abc", "")


def test_spans_tile_text_property():
    rng = random.Random(1)
    for delimiter, alphabet in [("\n\n", ["a", "é", " ", "\n"]), ("\n", ["x", "\n", "π"]), ("ab", ["a", "b", "c"]), ("aba", ["a", "b"])]:
        for _ in range(300):
            text = random_text(rng, alphabet, rng.randint(0, 30))
            spans = split_steps(text, delimiter)
            contents = step_texts(text, delimiter)
            assert len(spans) == len(contents) and (len(spans) >= 1) == bool(text)
            owner = [k for k, (a, b) in enumerate(spans) for _ in range(a, b)]
            assert owner == sorted(owner) and len(owner) == len(text)  # each character in exactly one step, in order
            assert all(b > a for a, b in spans)
            assert all(text[a:b].endswith(delimiter) for a, b in spans[:-1])
            if "" in contents:  # only for a text made of delimiters alone
                assert len(spans) == 1 and contents == [""] and delimiter in text


def test_arithmetic_gold_steps_roundtrip():
    for p in generate_problems(30, seed=0):
        spans = split_steps(p.solution, STEP_DELIMITER)
        assert len(spans) == p.num_steps
        assert step_texts(p.solution, STEP_DELIMITER) == p.gold_steps()
        assert p.step_correct(step_texts(p.solution, STEP_DELIMITER)) == [True] * p.num_steps


def test_prefix_text():
    text = "7+5=12\n12*3=36\n36-4=32"
    spans = split_steps(text, "\n")
    assert [prefix_text(text, spans, k) for k in range(4)] == ["", "7+5=12\n", "7+5=12\n12*3=36\n", text]
    text = "A\n\n\n\nB\n\n"
    spans = split_steps(text)
    assert [prefix_text(text, spans, k) for k in range(3)] == ["", "A\n\n\n\n", text]
    with pytest.raises(ValueError):
        prefix_text(text, spans, 3)


# ---------------------------------------------------------------- pure token rule


def test_token_rule_straddling_and_empty_steps():
    text = "ab\n\ncd"  # steps "ab\n\n" | "cd"
    spans = split_steps(text)
    offsets = [(0, 2), (2, 5), (5, 6)]  # "\n\nc" straddles the boundary: belongs to the step it ends in
    idx = token_step_index(offsets, spans)
    assert idx.tolist() == [0, 1, 1]
    assert step_end_positions(idx, 2).tolist() == [0, 2]
    assert tokens_to_chars(offsets, step_end_positions(idx, 2)) == [(0, 2), (2, 6)]
    # the tensor form gives the same
    assert torch.equal(token_step_index(torch.tensor(offsets), spans), idx)

    text = "a\nb\nc"  # steps "a\n" | "b\n" | "c"; one token swallows step 1 entirely
    spans = split_steps(text, "\n")
    idx = token_step_index([(0, 1), (1, 5)], spans)
    assert idx.tolist() == [0, 2]
    ends = step_end_positions(idx, 3)
    assert ends.tolist() == [0, 0, 1]  # the empty step reads where the previous one ended
    assert tokens_to_chars([(0, 1), (1, 5)], ends) == [(0, 1), (1, 1), (1, 5)]
    # a first token swallowing step 0: no token lies within h_1 -> -1
    assert step_end_positions(token_step_index([(0, 4), (4, 5)], spans), 3).tolist() == [-1, 0, 1]


def test_token_rule_zero_width_tokens():
    spans = split_steps("a\nb", "\n")  # [(0, 2), (2, 3)]
    # leading zero-width -> first step; one at a boundary -> the step it closes; at the end -> last step
    idx = token_step_index([(0, 0), (0, 1), (1, 2), (2, 2), (2, 3), (3, 3)], spans)
    assert idx.tolist() == [0, 0, 0, 0, 1, 1]
    assert step_end_positions(idx).tolist() == [3, 5]
    # joint coordinates: prompt tokens and (0, 0) special tokens are -1
    idx = token_step_index([(0, 0), (0, 2), (2, 4), (4, 5), (0, 0)], spans, response_start=2)
    assert idx.tolist() == [-1, -1, 0, 1, -1]
    assert step_end_positions(idx, 2).tolist() == [2, 4]


def test_token_rule_rejects_offsets_past_text():
    with pytest.raises(ValueError):
        token_step_index([(0, 1), (1, 4)], split_steps("abc"))
    with pytest.raises(ValueError):
        token_step_index([(0, 1)], [])
    assert token_step_index([(0, 0)], []).tolist() == [-1]
    assert step_end_positions([], 2).tolist() == [-1, -1]


# ---------------------------------------------------------------- char tokenizer


def test_char_tokenizer_step_index(chars):
    al = align_response(chars, "ab\ncd\n\ne", "\n")
    assert chars.convert_ids_to_tokens(al.input_ids.tolist()) == list("ab\ncd\n\ne")  # no <s>
    assert al.step_index.tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert al.step_ends.tolist() == [2, 6, 7]
    assert al.step_spans == [(0, 3), (3, 7), (7, 8)] and al.num_steps == 3
    assert al.offsets.tolist() == [[i, i + 1] for i in range(8)]


def test_char_tokenizer_sampled_ids_match(chars):
    for p in generate_problems(10, seed=3):
        ref = align_response(chars, p.solution, STEP_DELIMITER)
        got = align_tokens(chars, ref.input_ids, STEP_DELIMITER)
        assert got.text == p.solution
        assert torch.equal(got.offsets, ref.offsets) and torch.equal(got.step_index, ref.step_index)
        assert torch.equal(got.step_ends, ref.step_ends) and got.step_spans == ref.step_spans
        # the last token of every step is its delimiter, except for the last step
        assert [p.solution[e] for e in got.step_ends[:-1].tolist()] == ["\n"] * (p.num_steps - 1)


def test_sampled_eos_joins_last_step(chars):
    ids = chars("1+2=3\n3*2=6", add_special_tokens=False)["input_ids"] + [chars.eos_token_id]
    al = align_tokens(chars, ids, "\n")
    assert al.text == "1+2=3\n3*2=6"
    assert al.offsets[-1].tolist() == [11, 11]
    assert al.step_index.tolist() == [0] * 6 + [1] * 6
    assert al.step_ends.tolist() == [5, 11]


def test_char_tokenizer_prompt_response(chars):
    for p in generate_problems(10, seed=4):
        ids, ends, prompt_end = align_prompt_response(chars, p.prompt, p.solution, STEP_DELIMITER)
        spans = split_steps(p.solution, STEP_DELIMITER)
        assert ids[0].item() == chars.bos_token_id and len(ids) == 1 + len(p.prompt) + len(p.solution)
        assert prompt_end == len(p.prompt)  # <s> then one token per prompt character
        assert ends.tolist() == [len(p.prompt) + b for _, b in spans]
        toks = chars.convert_ids_to_tokens(ids.tolist())
        assert [toks[e] for e in ends[:-1].tolist()] == ["\n"] * (len(spans) - 1)
    _, _, prompt_end = align_prompt_response(chars, "", "1+1=2", "\n")
    assert prompt_end == 0  # only <s>
    with pytest.raises(ValueError):
        align_prompt_response(chars, "", "1+1=2", "\n", add_special_tokens=False)


# ---------------------------------------------------------------- byte-level BPE


BPE_TEXTS = [
    "The sum.\n\nThe π∑ café 中🙂.\n\nStep x",
    "x = 12 so we get 345.",
    "\n\nThe sum is π.\n\n\n\nso we get ∑ é.\n\n",
    "🙂🙂 中文 then ∂.\n\n.",
]


def test_bpe_has_straddling_and_partial_tokens(bpe):
    enc = bpe(BPE_TEXTS[0], add_special_tokens=False, return_offsets_mapping=True)
    pieces = [BPE_TEXTS[0][a:b] for a, b in enc["offset_mapping"]]
    assert ".\n\nThe " in pieces  # a merge across the step boundary
    assert len(enc["input_ids"]) > len(set(map(tuple, enc["offset_mapping"])))  # bytes of one char over several tokens


@pytest.mark.parametrize("text", BPE_TEXTS)
def test_bpe_straddling_tokens_follow_last_character_rule(bpe, text):
    al = align_response(bpe, text)
    for (a, b), k in zip(al.offsets.tolist(), al.step_index.tolist()):
        s, e = al.step_spans[k]
        assert s < b <= e  # the token's last character lies in its step
    # no token up to the end of h_k carries text of a later step
    for k, t in enumerate(al.step_ends.tolist()):
        assert t == -1 or al.offsets[: t + 1, 1].max() <= al.step_spans[k].end
    # step 0 of the first text ends with "The sum" because ".\n\nThe " belongs to step 1
    if text == BPE_TEXTS[0]:
        assert al.step_index.tolist()[:2] == [0, 1]
        assert bpe.decode(al.input_ids[: al.step_ends[0] + 1]) == "The sum"


@pytest.mark.parametrize("text", BPE_TEXTS)
def test_bpe_step_tokens_decode_to_their_text(bpe, text):
    al = align_response(bpe, text)
    ids = al.input_ids.tolist()
    token_chars = tokens_to_chars(al.offsets, al.step_ends)
    for k, (a, b) in enumerate(token_chars):
        toks = [i for i, s in zip(ids, al.step_index.tolist()) if s == k]
        assert bpe.decode(toks) == text[a:b]  # exactly the characters the step's tokens cover
        straddled = any(s < al.step_spans[k].end < e for s, e in al.offsets.tolist())
        if not straddled and (k == 0 or not any(s < al.step_spans[k].start < e for s, e in al.offsets.tolist())):
            assert text[a:b] == text[slice(*al.step_spans[k])]  # and that is the step itself when nothing straddles
    assert "".join(text[a:b] for a, b in token_chars) == text


@pytest.mark.parametrize("text", BPE_TEXTS)
def test_bpe_sampled_ids_match_reencoding(bpe, text):
    ref = align_response(bpe, text)
    got = align_tokens(bpe, ref.input_ids, "\n\n")
    assert got.text == text
    assert torch.equal(got.offsets, ref.offsets)  # exactly the tokenizer's own offsets, partial characters included
    assert torch.equal(got.step_index, ref.step_index) and torch.equal(got.step_ends, ref.step_ends)


def test_bpe_sampled_ids_fuzz(bpe):
    rng = random.Random(2)
    alphabet = WORDS + [" ", "\n", "\n\n", "中", "🙂", "∂"]
    for _ in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        for delimiter in ("\n\n", "\n", " ∑"):
            ref = align_response(bpe, text, delimiter)
            got = align_tokens(bpe, ref.input_ids, delimiter)
            assert got.text == text and torch.equal(got.offsets, ref.offsets)
            assert torch.equal(got.step_index, ref.step_index) and torch.equal(got.step_ends, ref.step_ends)


def test_decode_window_does_not_change_offsets(bpe):
    ids = bpe(BPE_TEXTS[0] + BPE_TEXTS[3], add_special_tokens=False)["input_ids"]
    text, off1 = decode_with_offsets(bpe, ids, context=1)
    _, off_full = decode_with_offsets(bpe, ids, context=len(ids))
    assert text == BPE_TEXTS[0] + BPE_TEXTS[3] and torch.equal(off1, off_full)


def test_sampled_invalid_utf8_bytes(bpe):
    lead = bpe.convert_tokens_to_ids("ä")  # a lone UTF-8 lead byte, then a complete text
    ids = [lead] + bpe("x\n\ny", add_special_tokens=False)["input_ids"] + [lead]
    al = align_tokens(bpe, ids, "\n\n")
    assert al.text == bpe.decode(ids) and al.text.startswith("\ufffd") and al.text.endswith("\ufffd")
    assert al.offsets[-1].tolist() == [len(al.text) - 1, len(al.text)]
    assert al.num_steps == 2 and al.step_index[-1].item() == 1


def test_bpe_prompt_response(bpe):
    prompt, response = "The sum is π.", "\n\nThe x = 12.\n\nso we get 345.\n\nStep ∑ é"
    ids, ends, prompt_end = align_prompt_response(bpe, prompt, response)
    enc = bpe(prompt + response, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    # ".\n\nThe " straddles prompt and response: it belongs to the response, so h_0 ends before it
    assert offsets[prompt_end][1] <= len(prompt) < offsets[prompt_end + 1][1]
    assert prompt_end < ends[0] and ends.tolist() == sorted(set(ends.tolist()))
    assert ends[-1].item() == len(ids) - 1
    spans = split_steps(response)
    for k, t in enumerate(ends.tolist()):  # the token prefix read for h_k never sees a later step
        assert bpe.decode(ids[: t + 1]) == (prompt + response)[: offsets[t][1]]
        assert offsets[t][1] <= len(prompt) + spans[k].end
        assert offsets[t + 1][1] > len(prompt) + spans[k].end if t + 1 < len(ids) else True
