"""Problem files: clear errors naming file and line, skip-and-count, native GSM8K/MATH lines."""
import json
from pathlib import Path

import pytest

from hca.data.problems import ProblemFileError, load_problems, write_jsonl_atomic

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data"


def write(tmp_path, lines):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_malformed_line_names_file_and_line(tmp_path):
    p = write(tmp_path, ['{"id": "a", "prompt": "Q:1+1\\n", "answer": "2"}', '{"id": "b", "prompt": ', ''])
    with pytest.raises(ProblemFileError, match=r"p\.jsonl:2: invalid JSON"):
        load_problems(p)
    probs, skipped = load_problems(p, skip_malformed=True)
    assert [x.id for x in probs] == ["a"] and skipped == 1


def test_missing_answer_and_empty_and_duplicates(tmp_path):
    with pytest.raises(ProblemFileError, match=r":1: missing field answer"):
        load_problems(write(tmp_path, ['{"id": "a", "prompt": "x"}']))
    with pytest.raises(ProblemFileError, match="no problems"):
        load_problems(write(tmp_path, ["", "  "]))
    with pytest.raises(ProblemFileError, match=r":2: duplicate id 'a' \(first on line 1\)"):
        load_problems(write(tmp_path, ['{"id": "a", "prompt": "x", "answer": "1"}'] * 2))
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "nope.jsonl")


def test_atomic_write_leaves_no_temp(tmp_path):
    path = write_jsonl_atomic(tmp_path / "out" / "x.jsonl", [{"a": 1}, {"a": 2}])
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"a": 1}, {"a": 2}]
    assert [p.name for p in path.parent.iterdir()] == ["x.jsonl"]


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data absent")
def test_native_gsm8k_and_math500_lines():
    gsm, _ = load_problems(SHARED / "gsm8k" / "test.jsonl", task="gsm8k", limit=5)
    assert gsm[0].answer == "18" and gsm[0].prompt.startswith("Question: Janet") and gsm[0].task == "gsm8k"
    assert "####" not in gsm[0].solution and gsm[0].solution
    math, _ = load_problems(SHARED / "math500" / "test.jsonl", task="math", limit=5)
    assert math[0].id.startswith("test/") and "\\boxed{}" in math[0].prompt
