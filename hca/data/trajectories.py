"""The prover-labeled trajectory format (``hca-trajectories/1``): one JSON record per policy
response, in JSONL shards, plus a ``manifest.json`` describing the whole collection.

Written by :mod:`hca.collection.writer`, read by the PRM stage. The full field reference, an example
record and the versioning rule are in ``docs/trajectory_format.md``; in short:

* ``shard-{chunk_id:06d}.jsonl``: the records of one chunk of problems (names do not depend on
  how many ranks wrote them, so a collection resumes on any number of ranks);
* ``shard-{chunk_id:06d}.meta.json``: that chunk's collection statistics and the shard's sha256;
* ``manifest.json``: format, configuration, policy and prover identity, seed, totals, shard list.

Every write is atomic (temporary file, fsync, rename): a file is whole or absent. Every read is
validated; a bad record raises :class:`TrajectoryFormatError` naming the shard and 1-based line.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

FORMAT_VERSION = "hca-trajectories/1"
MANIFEST_NAME = "manifest.json"
FINISH_REASONS = ("eos", "stop", "length")  # as hca.rollout.FINISH_REASONS (not imported: no torch here)


class TrajectoryFormatError(ValueError):
    """A shard, record or manifest does not follow the format; the message names the file (and line)."""


@dataclass
class Trajectory:
    """One policy response to one problem with its prover labels. ``K = len(step_spans)``."""

    format: str  # FORMAT_VERSION
    problem_id: str  # Problem.id
    task: str  # verifier name ("arithmetic" | "gsm8k" | "math")
    prompt: str  # exact text the policy was conditioned on (h_0)
    answer: str  # reference answer
    response_index: int  # 0..N-1: which of the problem's N responses
    response: str  # decoded response text (special tokens skipped)
    response_token_ids: list[int]  # [T] policy token ids, including the EOS token when emitted
    finish_reason: str  # "eos" | "stop" | "length"
    truncated: bool  # finish_reason == "length": cut at the token budget (kept, outcome 0)
    outcome: int  # R(p, y) in {0, 1}; 0 whenever truncated
    delimiter: str  # step delimiter used by split_steps
    step_spans: list[list[int]]  # [K][2] half-open character spans [start, end) of the steps in `response`
    h0_count: list[int]  # [2] (correct, total) prover completions of h_0 (shared by the problem's responses)
    counts: list[list[int] | None]  # [K] (correct, total) for h_0..h_{K-1}; None: not labeled (first pit)
    values: list[float | None]  # [K+1] V(h_0)..V(h_K) after the prover transform; V(h_K) = outcome; None: not labeled
    progress: list[float | None]  # [K] P_k = V(h_k) - V(h_{k-1}), P_K = outcome - V(h_{K-1}); None: undefined
    labeled_steps: int  # steps 1..labeled_steps have progress (K when fully labeled)
    step_correct: list[bool] | None  # [K] ground-truth step correctness (arithmetic task), else None
    seed: int  # collection seed; with chunk_id it fixes every sampling seed (hca.rollout.seeds.derive_seed)
    chunk_id: int  # chunk of problems this record was collected in (its shard)

    @property
    def num_steps(self) -> int:
        return len(self.step_spans)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = [f.name for f in fields(Trajectory)]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _count_ok(c) -> bool:
    return isinstance(c, list) and len(c) == 2 and all(map(_is_int, c)) and 0 <= c[0] <= c[1] and c[1] >= 1


def validate_record(rec: Any) -> Trajectory:
    """Check one decoded record against the format and return it as a :class:`Trajectory`.
    Raises ``ValueError`` with what is wrong (callers add the file and line)."""
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, got {type(rec).__name__}")
    if rec.get("format") != FORMAT_VERSION:
        raise ValueError(f"format {rec.get('format')!r}, this reader reads {FORMAT_VERSION!r}")
    missing = [f for f in _FIELDS if f not in rec]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    extra = sorted(set(rec) - set(_FIELDS))
    if extra:
        raise ValueError(f"unknown field(s) {', '.join(extra)} (not in {FORMAT_VERSION})")
    for name in ("problem_id", "task", "prompt", "answer", "response", "delimiter", "finish_reason"):
        if not isinstance(rec[name], str):
            raise ValueError(f"{name} must be a string, got {type(rec[name]).__name__}")
    for name in ("response_index", "outcome", "labeled_steps", "seed", "chunk_id"):
        if not _is_int(rec[name]):
            raise ValueError(f"{name} must be an integer, got {rec[name]!r}")
    if not rec["delimiter"]:
        raise ValueError("delimiter must be non-empty")
    if rec["response_index"] < 0 or rec["chunk_id"] < 0:
        raise ValueError("response_index and chunk_id must be >= 0")
    if rec["finish_reason"] not in FINISH_REASONS:
        raise ValueError(f"finish_reason {rec['finish_reason']!r} not in {FINISH_REASONS}")
    if not isinstance(rec["truncated"], bool) or rec["truncated"] != (rec["finish_reason"] == "length"):
        raise ValueError(f"truncated must be the bool finish_reason == 'length', got {rec['truncated']!r}")
    if rec["outcome"] not in (0, 1) or (rec["truncated"] and rec["outcome"] != 0):
        raise ValueError(f"outcome must be 0 or 1 (0 when truncated), got {rec['outcome']!r}")
    ids = rec["response_token_ids"]
    if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
        raise ValueError("response_token_ids must be a list of non-negative integers")
    spans, text = rec["step_spans"], rec["response"]
    if not isinstance(spans, list) or not all(isinstance(s, list) and len(s) == 2 and all(map(_is_int, s)) for s in spans):
        raise ValueError("step_spans must be a list of [start, end] integer pairs")
    ends = [0] + [e for _, e in spans]
    if any(s[0] != ends[i] or s[1] <= s[0] for i, s in enumerate(spans)) or ends[-1] != len(text):
        raise ValueError(f"step_spans {spans} do not tile the response ({len(text)} characters) with non-empty steps")
    K = len(spans)
    if not _count_ok(rec["h0_count"]):
        raise ValueError(f"h0_count must be [correct, total] with 0 <= correct <= total, total >= 1, got {rec['h0_count']!r}")
    counts, values, progress = rec["counts"], rec["values"], rec["progress"]
    if not isinstance(counts, list) or len(counts) != K:
        raise ValueError(f"counts must be a list of K={K} entries")
    if not isinstance(values, list) or len(values) != K + 1:
        raise ValueError(f"values must be a list of K+1={K + 1} entries")
    if not isinstance(progress, list) or len(progress) != K:
        raise ValueError(f"progress must be a list of K={K} entries")
    for k, c in enumerate(counts):
        if c is not None and not _count_ok(c):
            raise ValueError(f"counts[{k}] must be null or [correct, total] with 0 <= correct <= total, total >= 1")
        if (c is None) != (values[k] is None):
            raise ValueError(f"counts[{k}] and values[{k}] must be both null or both set")
    if K and counts[0] != rec["h0_count"]:
        raise ValueError(f"counts[0] {counts[0]} differs from h0_count {rec['h0_count']}")
    for k, v in enumerate(values):
        if v is not None and not (_is_num(v) and 0 <= v <= 1):
            raise ValueError(f"values[{k}] must be null or a number in [0, 1], got {v!r}")
    if values[K] != rec["outcome"]:
        raise ValueError(f"values[K={K}] must equal the outcome {rec['outcome']}, got {values[K]!r}")
    for k, p in enumerate(progress):
        if p is not None and not (_is_num(p) and -1 <= p <= 1):
            raise ValueError(f"progress[{k}] must be null or a number in [-1, 1], got {p!r}")
        a, b = values[k], values[k + 1]  # P_{k+1} = V(h_{k+1}) - V(h_k); V(h_K) is the outcome
        if (p is None) != (a is None or b is None) or (p is not None and abs(p - (b - a)) > 1e-9):
            raise ValueError(f"progress[{k}]={p!r} is not values[{k + 1}] - values[{k}] ({b!r} - {a!r})")
    n = rec["labeled_steps"]
    if not 0 <= n <= K or any(p is None for p in progress[:n]) or (n < K and progress[n] is not None):
        raise ValueError(f"labeled_steps={n} must count the leading non-null progress entries (K={K})")
    sc = rec["step_correct"]
    if sc is not None and not (isinstance(sc, list) and len(sc) == K and all(isinstance(b, bool) for b in sc)):
        raise ValueError(f"step_correct must be null or a list of K={K} booleans")
    return Trajectory(**rec)


# ------------------------------------------------------------------------------------------------ files
def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` through a temporary file in the same folder, fsync, rename: whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def is_temporary(name: str) -> bool:
    """Whether a file name is a leftover temporary file of :func:`_write_atomic` (a killed writer)."""
    return name.startswith(".") and ".tmp." in name


def shard_name(chunk_id: int) -> str:
    return f"shard-{chunk_id:06d}.jsonl"


def shard_meta_name(chunk_id: int) -> str:
    return f"shard-{chunk_id:06d}.meta.json"


def shard_chunk_id(name: str) -> int:
    """Chunk id of a shard file name (``shard-000012.jsonl`` -> 12)."""
    stem = name[len("shard-"):-len(".jsonl")] if name.startswith("shard-") and name.endswith(".jsonl") else ""
    if not stem.isdigit():
        raise ValueError(f"not a shard file name: {name!r}")
    return int(stem)


def list_shards(out_dir: str | os.PathLike) -> dict[int, Path]:
    """The finished shards in ``out_dir``: chunk id -> path (temporary files are ignored)."""
    out = {}
    d = Path(out_dir)
    for p in sorted(d.glob("shard-*.jsonl")) if d.is_dir() else []:
        try:
            out[shard_chunk_id(p.name)] = p
        except ValueError:
            continue
    return out


def encode_shard(trajectories: Iterable[Trajectory | dict]) -> bytes:
    lines = []
    for t in trajectories:
        rec = t.to_dict() if isinstance(t, Trajectory) else dict(t)
        validate_record(rec)
        lines.append(json.dumps(rec, ensure_ascii=False, allow_nan=False))
    return "".join(line + "\n" for line in lines).encode("utf-8")


def write_shard(path: str | os.PathLike, trajectories: Iterable[Trajectory | dict]) -> str:
    """Validate and write records as JSONL atomically. Returns the file's sha256 (hex)."""
    data = encode_shard(trajectories)
    write_bytes_atomic(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def read_shard(path: str | os.PathLike) -> list[Trajectory]:
    """Read and validate every record of a shard; errors name the shard and the 1-based line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"shard not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                raise TrajectoryFormatError(f"{path}:{lineno}: blank line (a shard holds one record per line)")
            try:
                out.append(validate_record(json.loads(line)))
            except json.JSONDecodeError as e:
                raise TrajectoryFormatError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            except ValueError as e:
                raise TrajectoryFormatError(f"{path}:{lineno}: {e}") from None
    return out


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(Path(path), (json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TrajectoryFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


# ------------------------------------------------------------------------------------------------ manifest
MANIFEST_KEYS = ("format", "created", "complete", "identity", "totals", "shards")


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (see docs/trajectory_format.md for its keys)."""
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing or manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"a manifest needs keys {MANIFEST_KEYS} and format {FORMAT_VERSION!r}; missing {missing}")
    path = Path(out_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


def manifest_prompt_format(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The prompt format the collection rendered its prompts with (:meth:`hca.data.prompts.PromptFormat.describe`),
    or None for a collection made before formats were recorded."""
    return ((manifest.get("identity") or {}).get("module") or {}).get("prompt_format")


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the collection has not finished (rerun it to resume and finish)")
    m = read_json(path)
    if not isinstance(m, dict) or m.get("format") != FORMAT_VERSION:
        got = m.get("format") if isinstance(m, dict) else None
        raise TrajectoryFormatError(f"{path}: format {got!r}, this reader reads {FORMAT_VERSION!r}")
    missing = [k for k in MANIFEST_KEYS if k not in m]
    if missing:
        raise TrajectoryFormatError(f"{path}: missing key(s) {', '.join(missing)}")
    return m


def iter_dataset(out_dir: str | os.PathLike, strict: bool = True, verify_sha256: bool = True) -> tuple[dict, Iterator[Trajectory]]:
    """``(manifest, records)`` with records read lazily, shard by shard, in chunk order.

    Checks, before any record is read: the manifest's format; that every listed shard exists (and,
    with ``verify_sha256``, has the listed sha256 and record count); that no shard on disk is
    missing from the manifest. An unlisted shard means a later collection into the same folder did
    not finish (its manifest was never written): with ``strict`` that is an error (so records are
    neither silently mixed in nor silently dropped), otherwise a warning and the shard is ignored.
    An incomplete manifest (``complete: false``) is an error with ``strict`` too, a warning otherwise.
    """
    out_dir = Path(out_dir)
    m = read_manifest(out_dir)
    listed = {s["file"]: s for s in m["shards"]}
    for name, s in listed.items():
        p = out_dir / name
        if not p.exists():
            raise TrajectoryFormatError(f"{out_dir / MANIFEST_NAME}: lists {name}, which is not on disk")
        if verify_sha256 and s.get("sha256") and file_sha256(p) != s["sha256"]:
            raise TrajectoryFormatError(f"{p}: sha256 differs from the manifest's (the shard changed after collection)")
    extra = sorted(p.name for p in list_shards(out_dir).values() if p.name not in listed)
    problems = []
    if extra:
        problems.append(f"{len(extra)} shard(s) on disk are not in the manifest ({', '.join(extra[:3])}"
                        f"{', ...' if len(extra) > 3 else ''}): a later collection into this folder did not finish; "
                        "rerun it to finish and rewrite the manifest")
    if not m["complete"]:
        problems.append(f"the manifest says the collection is incomplete (missing chunks: {m.get('missing_chunks')})")
    if problems:
        msg = f"{out_dir}: " + "; ".join(problems)
        if strict:
            raise TrajectoryFormatError(msg + " (strict=False reads what the manifest lists)")
        warnings.warn(msg, stacklevel=2)

    def records() -> Iterator[Trajectory]:
        for s in sorted(m["shards"], key=lambda s: s["chunk_id"]):
            recs = read_shard(out_dir / s["file"])
            if verify_sha256 and len(recs) != s["records"]:
                raise TrajectoryFormatError(f"{out_dir / s['file']}: {len(recs)} records, the manifest says {s['records']}")
            yield from recs

    return m, records()


def read_dataset(out_dir: str | os.PathLike, strict: bool = True, verify_sha256: bool = True) -> tuple[dict, list[Trajectory]]:
    """:func:`iter_dataset`, all records in a list."""
    m, it = iter_dataset(out_dir, strict, verify_sha256)
    return m, list(it)
