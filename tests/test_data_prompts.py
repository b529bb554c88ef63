"""One prompt format (hca.data.prompts): rendering, the recorded format, the check RL makes, long prompts,
and the problem-file and model-folder errors a new user meets first."""
import json
import logging
import warnings

import pytest

from hca.data.problems import Problem, ProblemFileError, load_problems
from hca.data.prompts import (QUESTION_PLACEHOLDER, PromptFormat, PromptFormatError, check_same_format, render_like,
                              render_problems)
from hca.workflows.tiny_models import CHATML_TEMPLATE, train_bpe_tokenizer

TEXTS = ["Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
         "She sold 48 / 2 = 24 clips in May.\n48 + 24 = 72 clips.\n#### 72"] * 20


@pytest.fixture(scope="module")
def chat_tok():
    return train_bpe_tokenizer(TEXTS, 300, CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def plain_tok():
    return train_bpe_tokenizer(TEXTS, 300, None, specials=["<pad>", "</s>"])


def test_chat_style_uses_the_tokenizers_template(chat_tok):
    fmt = PromptFormat(instruction="Think.", system="Be brief.")
    text = fmt.render("What is 2+2?", chat_tok)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?\n\nThink.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert fmt.resolved_style(chat_tok) == "chat"


def test_plain_style_and_auto_without_a_template(plain_tok, chat_tok):
    fmt = PromptFormat(template="Q: {question}\n{instruction}\nA:", instruction="Think.")
    assert fmt.render("2+2?", plain_tok) == "Q: 2+2?\nThink.\nA:"  # auto -> plain: no chat template
    assert PromptFormat(style="plain", template="Q: {question}\nA:").render("2+2?", chat_tok) == "Q: 2+2?\nA:"
    with pytest.raises(PromptFormatError, match="has no chat template"):
        PromptFormat(style="chat").render("2+2?", plain_tok)


@pytest.mark.parametrize("bad", [dict(style="fancy"), dict(long_prompts="truncate"), dict(template="no field"),
                                 dict(template="{question} {answer}")])
def test_bad_settings_are_named(bad):
    with pytest.raises(PromptFormatError, match="prompt\\."):
        PromptFormat(**bad)


def test_bos_text_is_not_doubled(chat_tok):
    """A template that writes the BOS text itself, with a tokenizer that adds BOS: the rendered prompt
    drops it, so the encoded prompt starts with exactly one BOS token."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import processors

    tok = PreTrainedTokenizerFast(tokenizer_object=chat_tok.backend_tokenizer.__class__.from_str(
        chat_tok.backend_tokenizer.to_str()), bos_token="<|endoftext|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>")
    bos_id = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                         special_tokens=[("<|endoftext|>", bos_id)])
    tok.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    text = PromptFormat().render("2+2?", tok)
    assert not text.startswith("<|endoftext|>")
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids[0] == bos_id and ids[1] != bos_id


def test_describe_records_the_exact_format_and_render_like_reproduces_it(chat_tok, plain_tok):
    fmt = PromptFormat(instruction="Box it.")
    d = fmt.describe(chat_tok)
    assert d["style"] == "chat" and QUESTION_PLACEHOLDER in d["rendered"]
    assert json.loads(json.dumps(d)) == d
    assert render_like(d, "What is 3*3?") == fmt.render("What is 3*3?", chat_tok)
    assert render_like(None, "x").startswith("Question: x\n")
    assert fmt.describe(plain_tok)["rendered"] != d["rendered"]


def test_check_same_format(chat_tok):
    a = PromptFormat().describe(chat_tok)
    b = PromptFormat(instruction="Other words.").describe(chat_tok)
    check_same_format(a, dict(a), "the PRM", "allow")
    with pytest.raises(PromptFormatError, match="another format") as e:
        check_same_format(a, b, "the PRM at 'p'", "model.init_args.allow_prompt_format_mismatch")
    assert "Other words." in str(e.value) and "allow_prompt_format_mismatch" in str(e.value)
    with pytest.warns(UserWarning, match="records no prompt format"):
        check_same_format(a, None, "the PRM", "allow")


def _gsm_file(tmp_path, questions):
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"work\n#### {i}"}) + "\n"
                            for i, q in enumerate(questions)))
    return path


def test_render_problems_keeps_given_prompts_and_handles_long_ones(tmp_path, chat_tok):
    probs, _ = load_problems(_gsm_file(tmp_path, ["short one", "long " * 300]), task="gsm8k")
    assert probs[0].question == "short one" and probs[1].source.endswith("gsm.jsonl:2")
    given = Problem(id="a", prompt="Q:1+1\n", answer="2")
    kept, skipped = render_problems([given, probs[0]], PromptFormat(), chat_tok, max_context=200)
    assert kept[0].prompt == "Q:1+1\n" and kept[1].prompt.startswith("<|im_start|>user\nshort one")
    with pytest.raises(PromptFormatError, match=r"gsm\.jsonl:2: problem 'gsm8k-2'.* tokens, the model's context is 200"):
        render_problems(probs, PromptFormat(), chat_tok, max_context=200)
    kept, skipped = render_problems(probs, PromptFormat(long_prompts="skip"), chat_tok, max_context=200)
    assert [p.id for p in kept] == ["gsm8k-1"] and [p.id for p in skipped] == ["gsm8k-2"]


@pytest.mark.parametrize("line,why", [('{"question": "q", "answer": ""}', "empty answer"),
                                      ('{"question": "q", "answer": "work\\n#### "}', "nothing after '####'"),
                                      ('{"question": "q"}', "missing field answer"),
                                      ('{"question": "q", "answer": null}', "missing field answer")])
def test_problem_line_without_an_answer_names_file_and_line(tmp_path, line, why):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "fine", "answer": "#### 3"}\n' + line + "\n")
    with pytest.raises(ProblemFileError, match=f"p.jsonl:2: {why}"):
        load_problems(path, task="gsm8k")
    probs, skipped = load_problems(path, task="gsm8k", skip_malformed=True)
    assert len(probs) == 1 and skipped == 1


def test_model_folder_without_a_tokenizer(tmp_path):
    from hca.models.loading import load_tokenizer
    from hca.workflows.recipes import check_model_folder

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="--policy .*has no tokenizer"):
        check_model_folder(str(tmp_path / "m"), "policy", "--policy")
    with pytest.raises(FileNotFoundError, match="--prover .*no such folder"):
        check_model_folder(str(tmp_path / "nope"), "prover", "--prover")
    (tmp_path / "e").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_model_folder(str(tmp_path / "e"), "PRM backbone", "--prm-backbone")


def test_quiet_console_drops_only_chatter(caplog):
    from hca.runtime.console import quiet_console

    quiet_console()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        log.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        log.info("GPU available: False, used: False")
        log.info("Restoring states from the checkpoint path at x")
    assert [r.getMessage() for r in caplog.records] == ["Restoring states from the checkpoint path at x"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_console.__globals__["_done"] = False  # re-apply the filters inside this catch_warnings block
        quiet_console()
        warnings.warn("Found 3 module(s) in eval mode at the start of training. This may lead to ...")
        warnings.warn("something a user must see")
    assert [str(w.message) for w in seen] == ["something a user must see"]
