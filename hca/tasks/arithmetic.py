"""The embedded world: a synthetic multi-step arithmetic task with exact step-level ground truth.

A problem is a start value and a chain of operations, evaluated **left to right** (no operator
precedence, so every operation is one reasoning step)::

    prompt:   "Q:7+5*3-4\n"
    solution: "7+5=12\n12*3=36\n36-4=32"

The gold solution has one step per line (step delimiter ``"\n"``); the last step holds the final
answer, which is the integer after its ``=``. Intermediate values stay in ``[0, max_value]`` (the
generator only picks operations that keep them there), so no step needs a minus sign.

Because the running value after every operation is known, the correctness of *every step of any
generated response* can be checked exactly (:meth:`ArithmeticProblem.step_correct`), which lets a
PRM's first-error detection be scored against ground truth rather than against Monte Carlo labels.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

STEP_DELIMITER = "\n"
_STEP_RE = re.compile(r"^\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(\d+)\s*$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem. ``values[k]`` is the running value after operation ``k`` (0-based)."""

    id: str
    start: int
    ops: tuple[tuple[str, int], ...]  # [(op, operand)] in order, op in "+-*"
    values: tuple[int, ...] = field(default=())  # [num_steps] running values

    def __post_init__(self):
        if not self.values:
            v, vals = self.start, []
            for op, b in self.ops:
                v = _OPS[op](v, b)
                vals.append(v)
            object.__setattr__(self, "values", tuple(vals))

    @property
    def num_steps(self) -> int:
        return len(self.ops)

    @property
    def expression(self) -> str:
        return str(self.start) + "".join(f"{op}{b}" for op, b in self.ops)

    @property
    def prompt(self) -> str:
        return f"Q:{self.expression}\n"

    @property
    def answer(self) -> str:
        return str(self.values[-1])

    def gold_steps(self) -> list[str]:
        prev, out = self.start, []
        for (op, b), v in zip(self.ops, self.values):
            out.append(f"{prev}{op}{b}={v}")
            prev = v
        return out

    @property
    def solution(self) -> str:
        return STEP_DELIMITER.join(self.gold_steps())

    def step_correct(self, steps: list[str]) -> list[bool]:
        """Ground-truth correctness of each step of a response, already cut into steps.

        Step ``k`` is correct iff it reads ``a{op}b=c`` with ``a`` the true running value before
        operation ``k`` (the start value for ``k = 0``), ``op``/``b`` the problem's ``k``-th
        operation and ``c`` the true running value after it. A response that stops early makes its
        last step wrong (it states a non-final value as the answer); steps beyond the last
        operation are wrong. So a response is correct iff every step is, and the first ``False``
        is the first error.
        """
        out = []
        for k, text in enumerate(steps):
            m = _STEP_RE.match(text)
            if m is None or k >= self.num_steps:
                out.append(False)
                continue
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            before = self.start if k == 0 else self.values[k - 1]
            out.append((a, op, b, c) == (before, *self.ops[k], self.values[k]))
        if out and out[-1] and len(steps) < self.num_steps:
            out[-1] = False
        return out

    def first_error(self, steps: list[str]) -> int | None:
        """0-based index of the first wrong step, or ``None`` when every step is right."""
        for k, ok in enumerate(self.step_correct(steps)):
            if not ok:
                return k
        return None

    def to_record(self) -> dict:
        """The problem as a JSONL record (the format every task's problem files share)."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "answer": self.answer,
            "task": "arithmetic",
            "solution": self.solution,
            "meta": {"start": self.start, "ops": [[op, b] for op, b in self.ops]},
        }

    @classmethod
    def from_record(cls, rec: dict) -> "ArithmeticProblem":
        meta = rec["meta"]
        return cls(id=str(rec["id"]), start=int(meta["start"]), ops=tuple((op, int(b)) for op, b in meta["ops"]))


@dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty of generated problems."""

    min_steps: int = 3  # fewest operations per problem
    max_steps: int = 5  # most operations per problem
    max_start: int = 20  # start value drawn from [0, max_start]
    max_operand: int = 12  # operands drawn from [1, max_operand] (for * from [2, max_operand])
    max_value: int = 999  # every running value stays in [0, max_value]
    ops: str = "+-*"  # operations to draw from

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if not set(self.ops) <= set(_OPS) or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {self.ops!r}")
        if self.max_start > self.max_value or self.max_operand < 1:
            raise ValueError("need max_start <= max_value and max_operand >= 1")


def _draw_op(rng: random.Random, v: int, cfg: ArithmeticConfig) -> tuple[str, int]:
    choices = []
    for op in cfg.ops:
        if op == "+" and v + 1 <= cfg.max_value:
            choices.append(("+", range(1, min(cfg.max_operand, cfg.max_value - v) + 1)))
        elif op == "-" and v >= 1:
            choices.append(("-", range(1, min(cfg.max_operand, v) + 1)))
        elif op == "*" and v >= 1 and 2 * v <= cfg.max_value and cfg.max_operand >= 2:
            choices.append(("*", range(2, min(cfg.max_operand, cfg.max_value // v) + 1)))
    if not choices:  # e.g. v == 0 with ops "-*": fall back to +
        return "+", rng.randint(1, cfg.max_operand)
    op, rng_b = rng.choice(choices)
    return op, rng.choice(rng_b)


def generate_problems(n: int, seed: int, cfg: ArithmeticConfig | None = None, id_prefix: str = "arith") -> list[ArithmeticProblem]:
    """``n`` problems, deterministic in ``seed``; ids are ``f"{id_prefix}-{seed}-{i}"``."""
    cfg = cfg or ArithmeticConfig()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        v = rng.randint(0, cfg.max_start)
        start, ops = v, []
        for _ in range(rng.randint(cfg.min_steps, cfg.max_steps)):
            op, b = _draw_op(rng, v, cfg)
            v = _OPS[op](v, b)
            ops.append((op, b))
        out.append(ArithmeticProblem(id=f"{id_prefix}-{seed}-{i}", start=start, ops=tuple(ops)))
    return out


def make_splits(num_train: int, num_val: int, num_test: int, seed: int = 0,
                cfg: ArithmeticConfig | None = None) -> dict[str, list[ArithmeticProblem]]:
    """Train/val/test problem sets with no expression in two splits (train is filtered, so it may
    hold slightly fewer than ``num_train`` problems). Deterministic in ``seed``."""
    cfg = cfg or ArithmeticConfig()
    test = generate_problems(num_test, seed * 3 + 2, cfg, id_prefix="test")
    val = generate_problems(num_val, seed * 3 + 1, cfg, id_prefix="val")
    held = {p.expression for p in test}
    val = [p for p in val if p.expression not in held]
    held |= {p.expression for p in val}
    train = [p for p in generate_problems(num_train, seed * 3, cfg, id_prefix="train") if p.expression not in held]
    return {"train": train, "val": val, "test": test}


def ensure_split_files(out_dir: str, num_train: int = 20000, num_val: int = 256, num_test: int = 512, seed: int = 0,
                       cfg: ArithmeticConfig | None = None) -> dict[str, str]:
    """Write ``{train,val,test}.jsonl`` plus ``spec.json`` into ``out_dir`` unless they already exist
    with the same spec; a different spec there is an error (never silently mixed data).
    Returns the split paths."""
    import dataclasses
    import json
    from pathlib import Path

    from hca.problems import write_jsonl_atomic

    cfg = cfg or ArithmeticConfig()
    out = Path(out_dir)
    spec = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "seed": seed, "config": dataclasses.asdict(cfg)}
    paths = {s: str(out / f"{s}.jsonl") for s in ("train", "val", "test")}
    spec_path = out / "spec.json"
    if spec_path.exists() and all(Path(p).exists() for p in paths.values()):
        have = json.loads(spec_path.read_text())
        if have != spec:
            raise ValueError(f"{spec_path} holds problems made with {have}, not {spec}: use another directory or delete it")
        return paths
    for name, probs in make_splits(num_train, num_val, num_test, seed, cfg).items():
        write_jsonl_atomic(paths[name], (p.to_record() for p in probs))
    tmp = spec_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=1))
    tmp.replace(spec_path)
    return paths
