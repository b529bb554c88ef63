"""One prompt format, carried with the data: how a problem's question becomes the exact text the
policy is conditioned on.

:class:`PromptFormat` is the one setting (``prompt:`` in the collection, SFT, RL and evaluation
configs). A problem line that gives its own ``prompt`` (the embedded arithmetic task) is used as
is; a native GSM8K / MATH line (``question`` / ``problem``) is rendered:

* ``style: chat`` -- the tokenizer's own chat template (``apply_chat_template``, generation prompt
  added), one user message ``{question}\\n\\n{instruction}`` after an optional system message;
* ``style: plain`` -- ``template.format(question=..., instruction=...)``;
* ``style: auto`` (default) -- ``chat`` when the tokenizer has a chat template, else ``plain``.

Every later stage tokenizes prompts with ``add_special_tokens=True`` (the rollout engine, SFT, the
PRM), so a rendered chat prompt that starts with the BOS text the tokenizer adds by itself has that
text removed: the model never sees two BOS tokens.

The resolved format travels with the data: :meth:`PromptFormat.describe` gives a JSON-able record
whose ``rendered`` field is the prompt of a placeholder question (:data:`QUESTION_PLACEHOLDER`),
i.e. the exact format, template and instruction and system message included. Collection writes it to
the trajectory manifest, the PRM copies it into its export, and RL compares the policy's with the
PRM's (:func:`check_same_format`).

A prompt longer than the model's context is an error naming the problem and its file line, or,
with ``long_prompts: skip``, dropped and counted (:func:`render_problems`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from hca.data.problems import DEFAULT_INSTRUCTION, DEFAULT_PLAIN_TEMPLATE, Problem

QUESTION_PLACEHOLDER = "<<question>>"
STYLES = ("auto", "chat", "plain")
LONG_PROMPTS = ("error", "skip")


class PromptFormatError(ValueError):
    """A prompt format cannot be applied (no chat template, a bad template) or two formats differ."""


@dataclass(frozen=True)
class PromptFormat:
    """How native problem lines become prompts (module docstring)."""

    style: str = "auto"  # auto | chat | plain
    instruction: str = DEFAULT_INSTRUCTION  # appended to the question (chat: in the user message; plain: {instruction})
    system: str | None = None  # chat only: a system message first (None: none, or the template's own default)
    template: str = DEFAULT_PLAIN_TEMPLATE  # plain only: fields {question} and {instruction}
    long_prompts: str = "error"  # a prompt longer than the model's context: "error" (naming it) | "skip" (counted)

    def __post_init__(self):
        if self.style not in STYLES:
            raise PromptFormatError(f"prompt.style must be one of {STYLES}, got {self.style!r}")
        if self.long_prompts not in LONG_PROMPTS:
            raise PromptFormatError(f"prompt.long_prompts must be one of {LONG_PROMPTS}, got {self.long_prompts!r}")
        try:
            self.template.format(question="q", instruction="i")
        except (KeyError, IndexError, ValueError) as e:
            raise PromptFormatError(f"prompt.template {self.template!r} is not a format string with only "
                                    f"{{question}} and {{instruction}} fields ({e!r}; write literal braces as {{{{ }}}})")
        if "{question}" not in self.template:
            raise PromptFormatError(f"prompt.template {self.template!r} has no {{question}} field")

    @classmethod
    def coerce(cls, value: "PromptFormat | dict | None") -> "PromptFormat":
        if isinstance(value, dict):
            return cls(**value)
        return cls() if value is None else value

    def resolved_style(self, tokenizer) -> str:
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if self.style == "chat" and not has_chat:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise PromptFormatError(f"prompt.style is 'chat' but the tokenizer {name!r} has no chat template "
                                    "(set prompt.style: plain, or give a tokenizer with one)")
        return self.style if self.style != "auto" else ("chat" if has_chat else "plain")

    def render(self, question: str, tokenizer) -> str:
        """The prompt text for ``question``."""
        if self.resolved_style(tokenizer) == "plain":
            return self.template.format(question=question, instruction=self.instruction)
        user = f"{question}\n\n{self.instruction}" if self.instruction else question
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else [])
        messages.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _without_added_bos(text, tokenizer)

    def describe(self, tokenizer) -> dict:
        """The resolved format as a JSON-able record (module docstring); ``rendered`` fixes it exactly."""
        style = self.resolved_style(tokenizer)
        return {"style": style, "instruction": self.instruction, "system": self.system if style == "chat" else None,
                "template": self.template if style == "plain" else None,
                "rendered": self.render(QUESTION_PLACEHOLDER, tokenizer)}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _without_added_bos(text: str, tokenizer) -> str:
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not text.startswith(bos):
        return text
    probe = tokenizer("x", add_special_tokens=True)["input_ids"]
    adds_bos = bool(probe) and probe[0] == tokenizer.bos_token_id
    return text[len(bos):] if adds_bos else text


def context_length(model_or_config) -> int | None:
    """``max_position_embeddings`` of a model or config (None when it does not say)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def render_problems(problems: Sequence[Problem], fmt: PromptFormat, tokenizer, max_context: int | None = None
                    ) -> tuple[list[Problem], list[Problem]]:
    """``(kept, skipped)``: ``problems`` with the prompts of native lines rendered by ``fmt`` (lines
    that gave their own prompt keep it), and those whose prompt has ``>= max_context`` tokens (no
    room for a single response token) dropped when ``fmt.long_prompts == "skip"``; with ``"error"``
    such a prompt raises :class:`PromptFormatError` naming the problem and its file line."""
    out = [p if p.question is None else dataclasses.replace(p, prompt=fmt.render(p.question, tokenizer))
           for p in problems]
    if max_context is None or not out:
        return out, []
    lengths = [len(ids) for ids in tokenizer([p.prompt for p in out], add_special_tokens=True)["input_ids"]]
    kept, skipped = [], []
    for p, n in zip(out, lengths):
        if n < max_context:
            kept.append(p)
        elif fmt.long_prompts == "skip":
            skipped.append(p)
        else:
            where = f"{p.source}: " if p.source else ""
            raise PromptFormatError(f"{where}problem {p.id!r}: its prompt has {n} tokens, the model's context is "
                                    f"{max_context} (max_position_embeddings); shorten it, or set "
                                    "prompt.long_prompts: skip to drop and count such problems")
    return kept, skipped


def rendered_prompts(problems: Sequence[Problem], fmt: PromptFormat, tokenizer) -> list[str]:
    """The distinct prompts of ``problems`` rendered by ``fmt`` (first-seen order): what a stage will
    sample after, e.g. to size an engine's context (:mod:`hca.rollout.engines`)."""
    rendered, _ = render_problems(problems, fmt, tokenizer)
    return list(dict.fromkeys(p.prompt for p in rendered))


def render_like(recorded: dict | None, question: str) -> str:
    """A prompt for ``question`` in a recorded format (``describe()``'s ``rendered``, placeholder
    replaced), without its tokenizer; the plain default format when ``recorded`` is None."""
    if recorded is None or QUESTION_PLACEHOLDER not in (recorded.get("rendered") or ""):
        return DEFAULT_PLAIN_TEMPLATE.format(question=question, instruction=DEFAULT_INSTRUCTION)
    return recorded["rendered"].replace(QUESTION_PLACEHOLDER, question)


def check_same_format(policy_format: dict, other: dict | None, other_name: str, override_setting: str) -> None:
    """Raise :class:`PromptFormatError` when ``other`` (e.g. a PRM export's ``prompt_format``) was
    made with another prompt format than the policy's; ``None`` (not recorded) passes with a warning."""
    import warnings

    if other is None:
        warnings.warn(f"{other_name} records no prompt format (made before formats were recorded): cannot check that "
                      "it saw prompts like the policy's", UserWarning, stacklevel=3)
        return
    if other.get("rendered") != policy_format.get("rendered"):
        raise PromptFormatError(
            f"{other_name} was trained on prompts of another format than the policy's:\n"
            f"  {other_name}: {other.get('rendered')!r}\n  policy:  {policy_format.get('rendered')!r}\n"
            f"(placeholder question {QUESTION_PLACEHOLDER!r}). Use the same prompt settings and tokenizer chat template "
            f"as the collection, or set {override_setting}: true to score anyway")
