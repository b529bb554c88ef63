"""Answer verifiers for verifiable-reward RL: ``is_correct(response, reference, task)``.

Public API
----------
``is_correct(response, reference, task) -> bool``
    Whether ``response`` (a model's full output) ends in an answer equal to ``reference``.
``batch_is_correct(responses, references, task) -> list[bool]``
    The same over parallel lists (duplicate slow-path comparisons are computed once).
``verify_responses(texts, problems) -> list[bool]``
    The same against problems (``.task``, ``.answer``), grouped by task.
``extract_answer(response, task) -> str | None``
    The response's final answer as a *canonical* string (equal answers give equal strings, e.g.
    ``"18"`` for ``"18.0"``, ``"1000"`` for ``"$1,000"``, ``"0.5"`` for ``\\dfrac12``, ``"1/3"``
    for ``\\frac{2}{6}``), for majority voting. ``None`` when no answer is found. Never starts a
    sympy worker.
``start_worker(wait=True, n=1)`` / ``shutdown_worker()``
    Optional: start math workers ahead of time (the first slow-path call otherwise pays a
    worker's ~0.5-2 s start-up), or stop them.

``task`` must be one of ``TASKS``; anything else raises ``ValueError`` (a programming error).
For any ``response``/``reference`` *string* these functions never raise and return within a few
seconds (``SLOW_TIMEOUT_S`` plus a little), from any thread or process.

What each task accepts
----------------------
``"arithmetic"`` (the embedded task, :mod:`hca.data.arithmetic`)
    Prediction: the integer right after the last ``=`` of the response (``"...\\n36-4=32"`` -> 32);
    if no ``=`` is followed by an integer, the last integer in the response. Reference: an integer
    string. Exact integer equality (digit strings are compared, so there is no int-size limit).
``"gsm8k"``
    Prediction, first rule that gives a number:

    1. the last ``\\boxed{}``/``\\fbox{}`` (chat models are asked for one, and often write
       arithmetic or an "answer is" before it: ``the answer is 2 times 9, which is
       \\(\\boxed{18}\\)`` is 18). Its whole content if that is a number (``\\$1,000``,
       ``1{,}000``, ``18.00``, ``\\frac{3}{4}``, ``1\\frac{1}{2}``); else the part after its last
       ``=`` with unit ``\\text{...}`` groups removed, if that is a number, else that part's
       *first* number (``18 \\text{ cm}^2`` and ``18 apples`` are 18, ``2 \\times 9 = 18`` is 18).
       A last box without a number (``\\boxed{}``) is skipped, and earlier boxes are not used;
    2. the last ``#### N`` line, where the rest of the line is just the number (GSM8K's answer
       line; markdown headings such as ``#### Step 3: ...`` are not answers);
    3. the first number in the 60 characters after the last ``answer is`` / ``answer:``;
    4. the last number in the response.

    Numbers may carry ``$``/``\\$``, thousands commas, a leading ``-`` (or U+2212), a decimal
    part, a trailing ``%`` or period; ``a/b`` and ``\\frac{a}{b}`` are read as fractions. Reference:
    a number in the same format, or a full GSM8K solution ending in ``#### N``. Comparison is exact
    on rationals when both are integers, otherwise ``math.isclose(rel_tol=1e-6, abs_tol=1e-9)``.
    Pure Python, no sympy.
``"math"`` (MATH / MATH-500 style LaTeX answers)
    Prediction, in gsm8k's order where it applies: the content of the last ``\\boxed{...}``
    (nested braces), ``\\boxed 5`` or ``\\fbox{...}`` (an empty box counts, as a wrong answer);
    else the number of the last ``#### N`` line; else the text after the last ``final answer
    is``/``answer is``/``answer:`` (for the fast path only: when that does not decide, and when
    nothing above is found, math-verify's own extraction over the response tail decides, which
    ends with the last LaTeX/number). Reference: the LaTeX answer (a full solution with a
    ``\\boxed{}`` also works: its last box is used).

    1. *Fast path*, in-process: both sides are normalised (``\\left``/``\\right``, spacing macros,
       ``\\dfrac``/``\\tfrac``, ``\\frac12``, ``^\\circ``, trailing ``\\text{units}``, ``\\text{}``
       wrappers, ``\\$``, ``\\%``, plain-word units after a number (``43 minutes``), a leading
       ``x=``, whitespace, trailing period). Equal strings -> True. If both sides are plain
       numbers (integers, decimals, thousands commas, ``\\frac{a}{b}``, ``a/b``, mixed numbers
       ``1\\frac{4}{5}``) they are compared as exact rationals: equal -> True, clearly different
       -> False; nearly equal (within 1e-4 relative) is left to math-verify, whose float
       rounding decides.
    2. *Slow path*: math-verify 0.9 (``parse`` with ``LatexExtractionConfig`` +
       ``ExprExtractionConfig``, ``verify`` with ``strict=True``) on ``\\boxed{ref}`` vs
       ``\\boxed{pred}`` for a boxed or ``####`` prediction (else the response tail), run in a
       worker process, results cached.

Timeout design
--------------
math-verify's own timeouts use ``signal.alarm``, which only works on the main thread, and
CPython cannot interrupt a long C-level big-integer operation (``9**9**9**9``) anyway. So:

* Cheap pre-checks bound all in-process work: only the last ``MAX_TAIL_CHARS`` characters of a
  response are searched (every regex here is linear, braces are matched in one pass, so a 10 MB
  string or 10,000 nested braces cost milliseconds); extracted answers/references longer than
  ``MAX_ANSWER_CHARS`` and "explosive" expressions (power towers whose value would have more than
  1e5 digits, such as ``10^{10^{10^{10}}}``, or factorials of numbers above 1e5) never reach sympy
  and count as wrong unless already equal on the fast path; numbers longer than
  ``MAX_NUMBER_CHARS`` are not parsed.
* The slow path runs math-verify with its timeouts disabled (``parsing_timeout=None``,
  ``timeout_seconds=None``) in **persistent worker processes** started lazily with
  ``subprocess.Popen([sys.executable, "-c", ...])`` (not ``multiprocessing``: that works from
  daemonic processes such as ``multiprocessing.Pool`` workers, needs no ``__main__`` guard and is
  unaffected by the start method). A worker takes one request at a time over pipes
  (length-prefixed pickle) under its lock; the parent waits at most ``SLOW_TIMEOUT_S``
  (``select``) for each answer. On an overrun it SIGKILLs the worker, starts a fresh one in the
  background and returns False (also cached, so the same pathological pair does not cost the
  timeout twice). ``is_correct`` uses one worker (the first free one); ``batch_is_correct``
  deduplicates its slow pairs and spreads them over up to ``NUM_WORKERS`` workers (default
  ``min(4, cpu_count)``, env ``HCA_VERIFY_WORKERS``; ~60-150 MB each). Each worker limits its own
  address space (``WORKER_MEMORY_BYTES``) and, per request, its CPU time (RLIMIT_CPU, so an
  orphaned worker stuck in a C loop dies by SIGXCPU), and exits on stdin EOF when its parent
  goes. After ``os.fork`` the child forgets the parent's workers and starts its own.
* If no worker can be started (e.g. ``sys.executable`` is not a Python), the slow path runs
  in-process: with math-verify's signal timeouts on the main thread, without them elsewhere
  (the pre-checks still apply). A warning is logged once.

With more concurrent threads than workers, a call may also wait for other threads' slow-path
items (each bounded by the timeout).

Speed (2 CPU cores, ProcessBench responses of ~1,800 characters): the fast path takes ~50 us a
response (all of ``arithmetic`` and ``gsm8k``, and most ``math`` answers that are plain numbers
or equal after normalisation); a math-verify comparison takes ~6 ms median, ~12 ms mean.

Departures from a plain ``math_verify.verify(parse(gold), parse(pred))``
-----------------------------------------------------------------------
* The fast path can say True where math-verify would not: normalisation drops units in a
  trailing ``\\text{}``/``\\mbox{}`` or plain words after a number, degree signs, ``\\%`` and ``\\$``, and a leading ``x=``; and
  mixed numbers ``1\\frac{4}{5}`` mean 9/5 (MATH convention).
* The prediction is the *last* ``\\boxed{}`` (a list split over several boxes is not joined),
  even when an earlier "answer is" or ``####`` says otherwise.
* Timeouts, over-long answers and explosive expressions are False.

Modules
-------
``hca.verify`` (this file): the public API and the per-task dispatch;
:mod:`hca.verify.answers`: extraction, normalisation, the exact-number rules, the ``math`` fast
path and the pre-checks (pure Python); :mod:`hca.verify.worker`: the math-verify worker
processes (the slow path and its timeouts).
"""
from __future__ import annotations

import logging
from typing import Sequence

from hca.verify.answers import (  # noqa: F401 - the MAX_* limits are re-exported
    MAX_ANSWER_CHARS,
    MAX_NUMBER_CHARS,
    MAX_TAIL_CHARS,
    _arithmetic_correct,
    _canon_number,
    _explosive,
    _extract_arithmetic,
    _extract_gsm8k_value,
    _extract_math,
    _fast_math,
    _gsm8k_correct,
    _math_canonical,
    _math_reference,
    _tail,
)
from hca.verify.worker import (  # noqa: F401 - limits and _SLOTS re-exported (tests read _SLOTS)
    NUM_WORKERS,
    SLOW_TIMEOUT_S,
    WORKER_MEMORY_BYTES,
    WORKER_START_TIMEOUT_S,
    _SLOTS,
    _slow_math,
    _slow_math_many,
    shutdown_worker,
    start_worker,
)

__all__ = [
    "TASKS",
    "is_correct",
    "batch_is_correct",
    "extract_answer",
    "start_worker",
    "shutdown_worker",
]

logger = logging.getLogger(__name__)

TASKS = ("arithmetic", "gsm8k", "math")
MAX_MV_TAIL_CHARS = 4_000  # response tail handed to math-verify when there is no \boxed{}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown verification task {task!r}; expected one of {TASKS}")


def _as_str(x) -> str | None:
    if isinstance(x, str):
        return x
    if x is None:
        return None
    try:
        return str(x)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# math: fast path, else math-verify
# ---------------------------------------------------------------------------------------------


def _math_plan(response: str, reference: str) -> bool | tuple[str, str]:
    """The verdict if the fast path (or a pre-check) decides, else the (pred, ref) pair for
    math-verify."""
    ref = _math_reference(reference)
    if not ref or len(ref) > MAX_ANSWER_CHARS:
        return False
    pred, source = _extract_math(response)
    if pred is not None:
        verdict = _fast_math(pred, ref)
        if verdict is not None:
            return verdict
    if pred is not None and source in ("boxed", "hashes"):
        if len(pred) > MAX_ANSWER_CHARS:
            return False
        pred_text = "\\boxed{" + pred + "}"
    else:
        pred_text = _tail(response, MAX_MV_TAIL_CHARS)[0]
        if not pred_text.strip():
            return False
    if _explosive(pred_text) or _explosive(ref):
        return False
    return (pred_text, ref)


def _math_correct(response: str, reference: str) -> bool:
    plan = _math_plan(response, reference)
    return plan if isinstance(plan, bool) else _slow_math(*plan)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

_CORRECT = {"arithmetic": _arithmetic_correct, "gsm8k": _gsm8k_correct, "math": _math_correct}


def is_correct(response: str, reference: str, task: str) -> bool:
    """Whether ``response`` ends in an answer equal to ``reference`` under ``task``'s rules.

    Raises ValueError only for an unknown ``task``; any strings give a bool within a few seconds.
    """
    _check_task(task)
    response, reference = _as_str(response), _as_str(reference)
    if response is None or reference is None:
        return False
    try:
        return bool(_CORRECT[task](response, reference))
    except Exception:  # a bug here must not take down an RL step
        logger.debug("hca.verify: error while verifying", exc_info=True)
        return False


def batch_is_correct(responses: Sequence[str], references: Sequence[str], task: str) -> list[bool]:
    """``[is_correct(r, ref, task) for ...]``, faster: for ``"math"`` the pairs that need sympy
    are deduplicated and spread over up to ``NUM_WORKERS`` worker processes."""
    _check_task(task)
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")
    if task != "math":
        return [is_correct(r, ref, task) for r, ref in zip(responses, references)]
    out: list[bool | tuple[str, str]] = []
    for r, ref in zip(responses, references):
        r, ref = _as_str(r), _as_str(ref)
        try:
            out.append(False if r is None or ref is None else _math_plan(r, ref))
        except Exception:
            logger.debug("hca.verify: error while verifying", exc_info=True)
            out.append(False)
    slow = [x for x in out if not isinstance(x, bool)]
    if slow:
        try:
            verdicts = iter(_slow_math_many(slow))  # type: ignore[arg-type]
        except Exception:
            logger.debug("hca.verify: error while verifying", exc_info=True)
            verdicts = iter([False] * len(slow))
        out = [x if isinstance(x, bool) else next(verdicts) for x in out]
    return [bool(x) for x in out]


def verify_responses(texts: Sequence[str], problems: Sequence) -> list[bool]:
    """Whether ``texts[i]`` answers ``problems[i]`` (anything with ``.task`` and ``.answer``, e.g. a
    :class:`hca.data.problems.Problem`): :func:`batch_is_correct` grouped by task (a batch may mix tasks)."""
    out = [False] * len(texts)
    by_task: dict[str, list[int]] = {}
    for i, p in enumerate(problems):
        by_task.setdefault(p.task, []).append(i)
    for task, idx in by_task.items():
        for i, ok in zip(idx, batch_is_correct([texts[i] for i in idx], [problems[i].answer for i in idx], task)):
            out[i] = ok
    return out


def extract_answer(response: str, task: str) -> str | None:
    """The response's final answer as a canonical string (for majority voting), or None.

    arithmetic: the integer (``"032"`` -> ``"32"``); gsm8k: the number (``"$1,000"`` ->
    ``"1000"``, ``"18.0"`` -> ``"18"``, ``"1/4"`` -> ``"0.25"``); math: the boxed (or
    "answer is") answer, normalised, with plain numbers canonicalised like gsm8k's
    (``\\dfrac{1}{2}``, ``0.5`` and ``\\frac12`` all give ``"0.5"``). Purely syntactic: two
    different strings may still be mathematically equal (``\\sqrt{8}`` vs ``2\\sqrt{2}``).
    """
    _check_task(task)
    response = _as_str(response)
    if response is None:
        return None
    try:
        if task == "arithmetic":
            return _extract_arithmetic(response)
        if task == "gsm8k":
            q = _extract_gsm8k_value(response)
            return None if q is None else _canon_number(q)
        ans, _ = _extract_math(response)
        if ans is None or len(ans) > MAX_ANSWER_CHARS:
            return None
        out = _math_canonical(ans)
        return out or None
    except Exception:
        logger.debug("hca.verify: error while extracting", exc_info=True)
        return None
