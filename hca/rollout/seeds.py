"""Named random streams: every sampling seed of a run is a function of ``(seed, index, stream)``.

Collection seeds a chunk's engine calls with ``(seed, chunk_id, "policy" | "prover/<round>")``, RL a
step's with ``(seed, rl_step, "policy/<rank>" | "minibatches")``, evaluation a batch's with
``(seed, batch index, "val/0")``. A seed never depends on the rank that does the work, on the order
of the work or on restarts, so resumed and multi-rank runs reproduce single-process ones.
"""
from __future__ import annotations

import hashlib


def derive_seed(seed: int, index: int, stream: str) -> int:
    """A 62-bit seed from ``(seed, index, stream)`` (sha256; independent of rank and run)."""
    digest = hashlib.sha256(f"{seed}/{index}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)
