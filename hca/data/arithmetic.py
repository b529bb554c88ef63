"""The embedded world: a synthetic multi-step arithmetic task with exact step-level ground truth.

A problem is a start value and a chain of operations, evaluated **left to right** (no operator
precedence, so every operation is one reasoning step)::

    prompt:   "Q:7+5*3-4\n"
    solution: "7+5=12\n12*3=36\n36-4=32"

The gold solution has one step per line (step delimiter ``"\n"``); the last step holds the final
answer, which is the integer after its ``=``. A line may also take a **shortcut**: two operations at
once, ``"7+5*3=36"`` (still left to right). With ``ArithmeticConfig.shortcut_prob > 0`` the training
solutions mix careful and hasty lines, as human-written data mixes careful and hasty work; a tiny
model errs far more often on a shortcut line, so a policy imitating the mix has a choice to make at
the start of every line, and RL can learn to make it well. The configs of the embedded default use
it (``configs/sft/arithmetic.yaml``); the plain task (``shortcut_prob = 0``) has one operation per line. Intermediate values stay in ``[0, max_value]`` (the
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
_STEP_RE = re.compile(r"^\s*(\d+)\s*((?:[+\-*]\s*\d+\s*)+)=\s*(\d+)\s*$")
_OP_RE = re.compile(r"([+\-*])\s*(\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class ArithmeticProblem:
    """One problem. ``values[k]`` is the running value after operation ``k`` (0-based)."""

    id: str
    start: int
    ops: tuple[tuple[str, int], ...]  # [(op, operand)] in order, op in "+-*"
    values: tuple[int, ...] = field(default=())  # [num_steps] running values
    shortcuts: tuple[int, ...] = ()  # ops i whose solution line also does op i + 1 (increasing, non-overlapping)

    def __post_init__(self):
        for a, b in zip(self.shortcuts, self.shortcuts[1:]):
            if b < a + 2:
                raise ValueError(f"shortcuts must be increasing and non-overlapping, got {self.shortcuts}")
        if self.shortcuts and not (0 <= self.shortcuts[0] and self.shortcuts[-1] + 1 < len(self.ops)):
            raise ValueError(f"shortcut op index out of range for {len(self.ops)} ops: {self.shortcuts}")
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
        """The careful solution: one operation per line."""
        prev, out = self.start, []
        for (op, b), v in zip(self.ops, self.values):
            out.append(f"{prev}{op}{b}={v}")
            prev = v
        return out

    def solution_steps(self) -> list[str]:
        """The demonstrated solution: :meth:`gold_steps` with the lines of ``shortcuts`` merged."""
        out, prev, i = [], self.start, 0
        while i < self.num_steps:
            j = i + 2 if i in self.shortcuts else i + 1
            out.append(f"{prev}" + "".join(f"{op}{b}" for op, b in self.ops[i:j]) + f"={self.values[j - 1]}")
            prev, i = self.values[j - 1], j
        return out

    @property
    def solution(self) -> str:
        return STEP_DELIMITER.join(self.solution_steps())

    def step_correct(self, steps: list[str]) -> list[bool]:
        """Ground-truth correctness of each step of a response, already cut into steps.

        A step reads ``a{op}b=c`` or, as a shortcut, ``a{op}b{op}d...=c``. Steps consume the
        problem's operations in order: a step that holds ``m`` operations and starts at operation
        ``j`` is correct iff ``a`` is the true running value before operation ``j`` (the start value
        for ``j = 0``), its operations are the problem's operations ``j .. j+m-1`` and ``c`` is the
        true running value after them. A response that stops early makes its last step wrong (it
        states a non-final value as the answer); steps beyond the last operation, and steps that do
        not parse, are wrong (an unparsable step consumes one operation). So a response is correct
        iff every step is, and the first ``False`` is the first error.
        """
        out, j = [], 0
        for text in steps:
            m = _STEP_RE.match(text)
            if m is None or j >= self.num_steps:
                out.append(False)
                j += 1
                continue
            a, c = int(m[1]), int(m[3])
            ops = tuple((op, int(b)) for op, b in _OP_RE.findall(m[2]))
            end = j + len(ops)
            before = self.start if j == 0 else self.values[j - 1]
            out.append(end <= self.num_steps and a == before and ops == self.ops[j:end] and c == self.values[end - 1])
            j = end
        if out and out[-1] and j < self.num_steps:
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
            "meta": {"start": self.start, "ops": [[op, b] for op, b in self.ops],
                     **({"shortcuts": list(self.shortcuts)} if self.shortcuts else {})},
        }

    @classmethod
    def from_record(cls, rec: dict) -> "ArithmeticProblem":
        meta = rec["meta"]
        return cls(id=str(rec["id"]), start=int(meta["start"]), ops=tuple((op, int(b)) for op, b in meta["ops"]),
                   shortcuts=tuple(int(i) for i in meta.get("shortcuts", ())))


@dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty of generated problems."""

    min_steps: int = 3  # fewest operations per problem
    max_steps: int = 5  # most operations per problem
    max_start: int = 20  # start value drawn from [0, max_start]
    max_operand: int = 12  # operands drawn from [1, max_operand] (for * from [2, max_operand])
    max_value: int = 999  # every running value stays in [0, max_value]
    ops: str = "+-*"  # operations to draw from
    shortcut_prob: float = 0.0  # chance that a solution line merges the next two operations (module docstring)

    def __post_init__(self):
        if not 0.0 <= self.shortcut_prob <= 1.0:
            raise ValueError(f"shortcut_prob must be in [0, 1], got {self.shortcut_prob}")
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
    style = random.Random(f"shortcuts/{seed}")  # its own stream: the problems do not depend on shortcut_prob
    out = []
    for i in range(n):
        v = rng.randint(0, cfg.max_start)
        start, ops = v, []
        for _ in range(rng.randint(cfg.min_steps, cfg.max_steps)):
            op, b = _draw_op(rng, v, cfg)
            v = _OPS[op](v, b)
            ops.append((op, b))
        shortcuts, k = [], 0
        while cfg.shortcut_prob > 0 and k + 1 < len(ops):
            if style.random() < cfg.shortcut_prob:
                shortcuts.append(k)
                k += 2
            else:
                k += 1
        out.append(ArithmeticProblem(id=f"{id_prefix}-{seed}-{i}", start=start, ops=tuple(ops), shortcuts=tuple(shortcuts)))
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

    from hca.data.problems import write_jsonl_atomic

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
