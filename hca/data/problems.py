"""The problem record and problem files.

Every task's problems share one JSONL format, one object per line::

    {"id": "arith-0-3", "prompt": "Q:7+5*3-4\\n", "answer": "32", "task": "arithmetic",
     "solution": "7+5=12\\n...", "meta": {...}}

``id``, ``prompt``, ``answer`` are required; ``task`` defaults to the loader's; ``solution`` (a gold
worked solution, used by SFT) and ``meta`` are optional. Native GSM8K (``question``/``answer`` with
``#### N``) and MATH-500 (``problem``/``answer``) lines are read too: they keep their ``question``,
and their prompt is rendered by the stage that owns the tokenizer (:mod:`hca.data.prompts`; until then it
is the plain default format). An ``answer`` that is empty, or a GSM8K answer with nothing after
``####``, is a malformed line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


# The plain prompt of a native line until a stage renders it in its model's format (hca.data.prompts
# re-exports both: they are the default of its PromptFormat).
DEFAULT_INSTRUCTION = ("Solve the problem step by step, separating the steps by a blank line, and put the final "
                       "answer within \\boxed{}.")
DEFAULT_PLAIN_TEMPLATE = "Question: {question}\n{instruction}\nAnswer:\n"


class ProblemFileError(ValueError):
    """A problem file is malformed; the message names the file and the 1-based line."""


@dataclass(frozen=True)
class Problem:
    id: str  # unique within a data set; splits and shards are keyed on it
    prompt: str  # the exact text the policy is conditioned on
    answer: str  # the reference final answer, as the verifier of `task` reads it
    task: str = "arithmetic"  # verifier name: "arithmetic" | "gsm8k" | "math"
    solution: str | None = None  # a gold worked solution, steps separated by the task's delimiter
    meta: dict = field(default_factory=dict, compare=False)  # free-form extras
    question: str | None = None  # native lines: the raw question the prompt is rendered from (hca.data.prompts)
    source: str = field(default="", compare=False)  # "file:line" it was read from ("" when built in code)

    def to_record(self) -> dict:
        rec = {"id": self.id, "prompt": self.prompt, "answer": self.answer, "task": self.task}
        if self.question is not None:
            rec["question"] = self.question
        if self.solution is not None:
            rec["solution"] = self.solution
        if self.meta:
            rec["meta"] = self.meta
        return rec


class _Malformed(Exception):
    """A line's content is wrong (the message says how)."""


def _answer_of(obj: dict) -> str:
    if "answer" not in obj or obj["answer"] is None:
        raise KeyError("answer")
    answer = str(obj["answer"])
    if not answer.strip():
        raise _Malformed("empty answer")
    return answer


def _from_obj(obj: dict, task: str, lineno: int, source: str) -> Problem:
    if not isinstance(obj, dict):
        raise KeyError("a JSON object")
    if "prompt" in obj:
        answer = _answer_of(obj)
        pid = obj.get("id", obj.get("unique_id", f"line-{lineno}"))
        return Problem(id=str(pid), prompt=str(obj["prompt"]), answer=answer, task=str(obj.get("task", task)),
                       solution=obj.get("solution"), meta=obj.get("meta") or {}, question=obj.get("question"),
                       source=source)
    question = obj.get("question", obj.get("problem"))
    if question is None:
        raise KeyError("prompt (or question/problem)")
    answer, solution = _answer_of(obj), obj.get("solution")
    if "####" in answer:  # GSM8K: worked solution, then "#### N"
        solution, answer = answer.rsplit("####", 1)[0].rstrip(), answer.rsplit("####", 1)[1].strip()
        if not answer:
            raise _Malformed("nothing after '####' in answer (GSM8K lines end with '#### <final answer>')")
    pid = obj.get("id", obj.get("unique_id", f"{task}-{lineno}"))
    prompt = DEFAULT_PLAIN_TEMPLATE.format(question=question, instruction=DEFAULT_INSTRUCTION)
    return Problem(id=str(pid), prompt=prompt, answer=answer, task=str(obj.get("task", task)), solution=solution,
                   meta=obj.get("meta") or {}, question=str(question), source=source)


def load_problems(path: str | os.PathLike, task: str = "arithmetic", skip_malformed: bool = False,
                  limit: int | None = None) -> tuple[list[Problem], int]:
    """Read a JSONL problem file. Returns ``(problems, n_skipped)``.

    A malformed line (bad JSON, not an object, a missing required field) raises
    :class:`ProblemFileError` naming the file and line, unless ``skip_malformed`` is set, in which
    case it is skipped and counted. Blank lines are ignored. Duplicate ids and an empty result are
    errors: an empty problem set would make every later stage silently do nothing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"problem file not found: {path}")
    problems, skipped, seen = [], 0, {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                p = _from_obj(json.loads(line), task, lineno, f"{path}:{lineno}")
            except json.JSONDecodeError as e:
                err = f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
            except KeyError as e:
                err = f"{path}:{lineno}: missing field {e.args[0]}"
            except _Malformed as e:
                err = f"{path}:{lineno}: {e}"
            else:
                if p.id in seen:
                    raise ProblemFileError(f"{path}:{lineno}: duplicate id {p.id!r} (first on line {seen[p.id]})")
                seen[p.id] = lineno
                problems.append(p)
                if limit is not None and len(problems) >= limit:
                    break
                continue
            if not skip_malformed:
                raise ProblemFileError(err + " (pass skip_malformed=True to skip and count such lines)")
            skipped += 1
    if not problems:
        raise ProblemFileError(f"{path}: no problems (empty file, or every line malformed: {skipped} skipped)")
    return problems, skipped


def write_jsonl_atomic(path: str | os.PathLike, records) -> Path:
    """Write records as JSONL through a temporary file and a rename: the file is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
