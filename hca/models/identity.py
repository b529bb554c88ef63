"""Who a model is, for a collection's manifest (:func:`model_identity`): a hash over a checkpoint
folder's files, a GGUF file's sha256, a tiny spec's text, or a hub name as given."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from hca.data.trajectories import is_temporary
from hca.models.gguf import file_sha256, is_gguf_ref
from hca.models.loading import is_tiny_spec

FULL_HASH_BYTES = 256 * 2**20  # files up to this size are hashed whole; larger ones by sampled blocks


def _file_digest(path: Path) -> str:
    """sha256 of a file's bytes; above FULL_HASH_BYTES, of its size and three 4 MiB blocks (head,
    middle, tail), which still tells apart any two trained checkpoints in practice at no cost."""
    size = path.stat().st_size
    if size <= FULL_HASH_BYTES:
        return file_sha256(path)
    h, block = hashlib.sha256(str(size).encode()), 4 * 2**20
    with open(path, "rb") as f:
        for at in (0, size // 2, size - block):
            f.seek(at)
            h.update(f.read(block))
    return "sampled:" + h.hexdigest()


def model_identity(name_or_path: str) -> dict[str, Any]:
    """Who a model is, for the manifest: ``{"name", "kind", "sha256"}``. A local folder is hashed
    over the relative names and contents of all its files (weights included: two checkpoints of
    one architecture differ only there; weight files above 256 MiB are sampled, see
    :func:`_file_digest`); a ``tiny-llama:...`` spec is its own identity; a hub name is recorded as
    given (``sha256`` None)."""
    p = Path(name_or_path)
    if is_tiny_spec(name_or_path):
        return {"name": name_or_path, "kind": "tiny-spec", "sha256": hashlib.sha256(name_or_path.encode()).hexdigest()}
    if is_gguf_ref(name_or_path) and p.is_file():  # converted on load (hca.models.gguf): the file is the identity
        return {"name": str(name_or_path), "kind": "gguf", "sha256": file_sha256(p)}
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file() and not is_temporary(x.name)):
            h.update(f"{f.relative_to(p).as_posix()}:{_file_digest(f)}\n".encode())
        return {"name": str(name_or_path), "kind": "local", "sha256": h.hexdigest()}
    return {"name": name_or_path, "kind": "hub", "sha256": None}
