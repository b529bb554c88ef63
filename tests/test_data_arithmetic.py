"""The embedded task: exact per-step ground truth, deterministic disjoint splits."""
import json

import pytest

from hca.data.problems import load_problems
from hca.data.arithmetic import ArithmeticConfig, ArithmeticProblem, ensure_split_files, generate_problems, make_splits


def test_worked_example_by_hand():
    p = ArithmeticProblem(id="x", start=7, ops=(("+", 5), ("*", 3), ("-", 4)))
    assert p.prompt == "Q:7+5*3-4\n"
    assert p.values == (12, 36, 32)
    assert p.solution == "7+5=12\n12*3=36\n36-4=32"
    assert p.answer == "32"


@pytest.mark.parametrize("steps, expected, first", [
    (["7+5=12", "12*3=36", "36-4=32"], [True, True, True], None),
    (["7+5=13", "13*3=39", "39-4=35"], [False, False, False], 0),  # wrong first result: all later off track
    (["7+5=12", "12*3=35", "35-4=31"], [True, False, False], 1),  # locally right arithmetic after an error is still wrong
    (["7+5=12", "12*3=36"], [True, False], 1),  # stopped early: the last step gives a non-final answer
    (["7+5=12", "12*3=36", "36-4=32", "32+1=33"], [True, True, True, False], 3),  # extra step
    (["7+5=12", "12+3=15", "15-4=11"], [True, False, False], 1),  # wrong operation
    (["7 + 5 = 12", "garbage", "36-4=32"], [True, False, True], 1),  # spaces tolerated; unparseable is wrong
    ([], [], None),
    (["7+5*3=36", "36-4=32"], [True, True], None),  # a shortcut line consumes two operations
    (["7+5*3-4=32"], [True], None),  # three at once is a valid (if risky) line
    (["7+5*3=35", "35-4=31"], [False, False], 0),  # wrong shortcut result
    (["7+5*3=36"], [False], 0),  # stopped early after a shortcut
    (["7+5=12", "12*3-4=32"], [True, True], None),
    (["7+5*3-4-1=31"], [False], 0),  # more operations than the problem has
])
def test_step_correct(steps, expected, first):
    p = ArithmeticProblem(id="x", start=7, ops=(("+", 5), ("*", 3), ("-", 4)))
    assert p.step_correct(steps) == expected
    assert p.first_error(steps) == first


def test_generation_respects_difficulty_and_is_deterministic():
    cfg = ArithmeticConfig(min_steps=2, max_steps=4, max_start=10, max_operand=6, max_value=50, ops="+-*")
    a, b = generate_problems(300, 5, cfg), generate_problems(300, 5, cfg)
    assert [p.expression for p in a] == [p.expression for p in b]
    assert [p.expression for p in a] != [p.expression for p in generate_problems(300, 6, cfg)]
    for p in a:
        assert 2 <= p.num_steps <= 4 and 0 <= p.start <= 10
        assert all(0 <= v <= 50 for v in p.values)
        assert all(1 <= b <= 6 for _, b in p.ops)
        assert p.step_correct(p.gold_steps()) == [True] * p.num_steps
    assert {op for p in a for op, _ in p.ops} == {"+", "-", "*"}


def test_bad_config_is_rejected():
    with pytest.raises(ValueError):
        ArithmeticConfig(min_steps=4, max_steps=2)
    with pytest.raises(ValueError):
        ArithmeticConfig(ops="/")


def test_splits_are_disjoint_and_files_roundtrip(tmp_path):
    splits = make_splits(500, 50, 50, seed=3)
    exprs = {k: {p.expression for p in v} for k, v in splits.items()}
    assert not exprs["train"] & exprs["val"] and not exprs["train"] & exprs["test"] and not exprs["val"] & exprs["test"]
    paths = ensure_split_files(str(tmp_path), 500, 50, 50, seed=3)
    probs, skipped = load_problems(paths["val"])
    assert skipped == 0 and [p.prompt for p in probs] == [p.prompt for p in splits["val"]]
    rec = json.loads(open(paths["val"]).readline())
    assert ArithmeticProblem.from_record(rec).solution == rec["solution"]
    # Same spec: reused; another spec in the same folder: a clear error, never mixed data.
    assert ensure_split_files(str(tmp_path), 500, 50, 50, seed=3) == paths
    with pytest.raises(ValueError, match="spec"):
        ensure_split_files(str(tmp_path), 500, 50, 50, seed=4)


def test_shortcut_solutions():
    p = ArithmeticProblem(id="x", start=7, ops=(("+", 5), ("*", 3), ("-", 4), ("+", 1)), shortcuts=(1,))
    assert p.solution == "7+5=12\n12*3-4=32\n32+1=33"
    assert p.gold_steps() == ["7+5=12", "12*3=36", "36-4=32", "32+1=33"]  # the careful solution stays available
    assert p.step_correct(p.solution_steps()) == [True, True, True]
    assert ArithmeticProblem.from_record(json.loads(json.dumps(p.to_record()))) == p
    assert "shortcuts" not in ArithmeticProblem(id="y", start=1, ops=(("+", 1),)).to_record()["meta"]
    for bad in [(2, 3), (3,), (0, 1)]:
        with pytest.raises(ValueError, match="shortcut"):
            ArithmeticProblem(id="x", start=7, ops=p.ops, shortcuts=bad)


def test_shortcut_prob_changes_solutions_not_problems():
    plain = generate_problems(400, seed=3)
    mixed = generate_problems(400, seed=3, cfg=ArithmeticConfig(shortcut_prob=0.3))
    assert [p.ops for p in plain] == [p.ops for p in mixed] and all(not p.shortcuts for p in plain)
    lines = sum(len(p.solution_steps()) for p in mixed)
    merged = sum(len(p.shortcuts) for p in mixed)
    assert 0.15 < merged / lines < 0.45  # about shortcut_prob of the line starts (pairs only)
    assert all(p.step_correct(p.solution_steps()) == [True] * len(p.solution_steps()) for p in mixed)
    with pytest.raises(ValueError, match="shortcut_prob"):
        ArithmeticConfig(shortcut_prob=1.5)
