"""Tests of the trajectory format (hca/data/trajectories.py): round trips, validation errors that name the
shard and line, the manifest checks of read_dataset, model identity, and the documented example."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hca.data.trajectories import (FORMAT_VERSION, Trajectory, TrajectoryFormatError, file_sha256,
                                   read_dataset, read_shard, shard_name, validate_record, write_manifest, write_shard)

DOC = Path(__file__).resolve().parents[1] / "docs" / "trajectory_format.md"


def example() -> dict:
    """The example record of docs/trajectory_format.md (so the doc cannot drift from the code)."""
    block = re.search(r"## Example record.*?```json\n(.*?)```", DOC.read_text(), re.S).group(1)
    return json.loads(block)


def rec(**kw) -> dict:
    return {**example(), **kw}


def test_documented_example_is_valid():
    t = validate_record(example())
    assert isinstance(t, Trajectory) and t.num_steps == 3 and sum(t.progress) == pytest.approx(t.outcome - t.values[0])


def test_shard_round_trip_is_atomic(tmp_path):
    recs = [rec(response_index=i) for i in range(3)]
    sha = write_shard(tmp_path / shard_name(0), recs)
    assert sha == file_sha256(tmp_path / shard_name(0))
    assert [t.to_dict() for t in read_shard(tmp_path / shard_name(0))] == recs
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard_name(0)]  # no temporary file left


def test_write_shard_refuses_invalid_records(tmp_path):
    with pytest.raises(ValueError, match="values"):
        write_shard(tmp_path / "s.jsonl", [rec(values=[0.5, 0.0])])
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize("change, message", [
    ({"format": "hca-trajectories/0"}, "this reader reads"),
    ({"values": [0.625, 0.75, 0.0]}, "values must be a list of K\\+1=4"),
    ({"counts": [[5, 8], [3, 4]]}, "counts must be a list of K=3"),
    ({"progress": [0.125, -0.75, 0.5]}, r"progress\[2\]"),
    ({"truncated": True}, "truncated must be"),
    ({"finish_reason": "length", "truncated": True, "outcome": 1, "values": [0.625, 0.75, 0.0, 1],
      "progress": [0.125, -0.75, 1.0]}, "outcome must be 0 or 1 \\(0 when truncated\\)"),
    ({"step_spans": [[0, 6], [6, 13], [13, 19]]}, "do not tile"),
    ({"counts": [[5, 8], [5, 4], [0, 4]]}, r"counts\[1\]"),
    ({"counts": [[4, 8], [3, 4], [0, 4]]}, "differs from h0_count"),
    ({"labeled_steps": 2}, "labeled_steps"),
    ({"step_correct": [True, False]}, "step_correct"),
    ({"values": [0.625, 0.75, 0.0, 1]}, "must equal the outcome"),
    ({"response_index": "2"}, "response_index must be an integer"),
    ({"extra": 1}, "unknown field"),
])
def test_validation_errors(change, message):
    with pytest.raises(ValueError, match=message):
        validate_record(rec(**change))


def test_missing_field():
    r = example()
    del r["counts"]
    with pytest.raises(ValueError, match="missing field\\(s\\) counts"):
        validate_record(r)


def test_unlabeled_prefixes_are_valid_when_consistent():
    r = rec(counts=[[5, 8], [0, 4], None], values=[0.625, 0.0, None, 0], progress=[-0.625, None, None], labeled_steps=1)
    assert validate_record(r).labeled_steps == 1
    with pytest.raises(ValueError, match="both null"):
        validate_record({**r, "values": [0.625, 0.0, 0.0, 0]})


def test_malformed_shard_line_names_shard_and_line(tmp_path):
    path = tmp_path / shard_name(4)
    good = json.dumps(example())
    path.write_text(good + "\n" + good[:-5] + "\n")
    with pytest.raises(TrajectoryFormatError, match=r"shard-000004\.jsonl:2: invalid JSON"):
        read_shard(path)
    bad = dict(example())
    bad["values"] = [0.625]
    path.write_text(good + "\n" + good + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(TrajectoryFormatError, match=r"shard-000004\.jsonl:3: values must be"):
        read_shard(path)


def make_collection(d: Path, n: int = 2) -> dict:
    shards = []
    for c in range(n):
        recs = [rec(chunk_id=c, response_index=i) for i in range(2)]
        sha = write_shard(d / shard_name(c), recs)
        shards.append({"file": shard_name(c), "chunk_id": c, "records": 2, "problems": 1, "sha256": sha, "stats": None})
    m = {"format": FORMAT_VERSION, "created": "now", "complete": True, "missing_chunks": [], "identity": {},
         "totals": {}, "shards": shards}
    write_manifest(d, m)
    return m


def test_read_dataset_checks_the_manifest(tmp_path):
    make_collection(tmp_path)
    m, recs = read_dataset(tmp_path)
    assert len(recs) == 4 and [r.chunk_id for r in recs] == [0, 0, 1, 1]
    write_shard(tmp_path / shard_name(7), [rec(chunk_id=7)])  # an unfinished later run
    with pytest.raises(TrajectoryFormatError, match="not in the manifest.*shard-000007"):
        read_dataset(tmp_path)
    with pytest.warns(UserWarning, match="not in the manifest"):
        assert len(read_dataset(tmp_path, strict=False)[1]) == 4
    (tmp_path / shard_name(7)).unlink()
    (tmp_path / shard_name(1)).unlink()
    with pytest.raises(TrajectoryFormatError, match="lists shard-000001.jsonl, which is not on disk"):
        read_dataset(tmp_path)


def test_read_dataset_detects_changed_shard_and_bad_version(tmp_path):
    make_collection(tmp_path)
    write_shard(tmp_path / shard_name(0), [rec(chunk_id=0)])
    with pytest.raises(TrajectoryFormatError, match="sha256 differs"):
        read_dataset(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "format": "hca-trajectories/9"}))
    with pytest.raises(TrajectoryFormatError, match="manifest.json: format 'hca-trajectories/9'"):
        read_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="not finished"):
        read_dataset(tmp_path / "nothing")
