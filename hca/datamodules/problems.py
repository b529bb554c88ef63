"""Problems cut into fixed chunks for collection (``trainer.predict``), with resume and own sharding.

Prompts are rendered by the collector module, which owns the policy's tokenizer (:mod:`hca.data.prompts`).

Chunk ``c`` holds problems ``[c * chunk_size, (c + 1) * chunk_size)`` of the file, in file order
(after ``limit``), so a chunk id means the same problems on any number of ranks. A rank yields the
chunks with ``chunk_id % world_size == global_rank`` whose shard (``shard-{chunk_id:06d}.jsonl``)
is not yet in ``out_dir``: a restarted collection skips finished chunks, and a rerun on another
number of ranks still resumes. Lightning's ``DistributedSampler`` must be off
(``trainer.use_distributed_sampler: false``): it would pad ranks with duplicate chunks.

A rank with no chunk left gets one empty chunk (``chunk_id = -1``, no problems), because
Lightning skips the whole predict loop, hooks included, on an empty dataloader, and then that rank
would never reach the final barrier of :class:`hca.collection.writer.TrajectoryWriter`.
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from torch.utils.data import DataLoader

from hca.data.problems import Problem, load_problems
from hca.data.trajectories import file_sha256, list_shards
from hca.datamodules.sft import ArithmeticData
from hca.datamodules.sharding import rank_and_world


@dataclass(frozen=True)
class ProblemChunk:
    chunk_id: int  # index of the chunk in file order; -1: an empty placeholder (nothing to do)
    problems: tuple[Problem, ...]  # [<= chunk_size] the chunk's problems, in file order


def _single(batch: list[ProblemChunk]) -> ProblemChunk:
    return batch[0]


def make_chunks(problems: list[Problem], chunk_size: int) -> list[ProblemChunk]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [ProblemChunk(c, tuple(problems[s:s + chunk_size])) for c, s in enumerate(range(0, len(problems), chunk_size))]


def pending_chunks(chunks: list[ProblemChunk], out_dir: str, rank: int = 0, world_size: int = 1) -> list[ProblemChunk]:
    """This rank's chunks (``chunk_id % world_size == rank``) whose shard is not in ``out_dir`` yet."""
    done = set(list_shards(out_dir))
    return [c for c in chunks if c.chunk_id % world_size == rank and c.chunk_id not in done]


class ProblemChunkDataModule(L.LightningDataModule):
    def __init__(self, problems_file: str, out_dir: str, task: str = "arithmetic", chunk_size: int = 16,
                 limit: int | None = None, skip_malformed: bool = False, arithmetic: ArithmeticData | None = None):
        """
        Args:
            problems_file: JSONL problem file (see hca/data/problems.py).
            out_dir: collection folder; chunks whose shard is already there are skipped (resume).
            task: verifier name for lines that do not say theirs.
            chunk_size: problems per chunk (= per shard, per ``label_chunk`` call, per predict batch).
            limit: use only the first ``limit`` problems of the file.
            skip_malformed: skip (and count) malformed lines instead of failing on the first one.
            arithmetic: generate the embedded task's problem files first when absent.
        """
        super().__init__()
        self.save_hyperparameters()
        arithmetic = ArithmeticData.coerce(arithmetic)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.arithmetic = arithmetic
        self.out_dir = out_dir
        self.problems: list[Problem] = []
        self.num_skipped = 0  # malformed lines skipped (skip_malformed)
        self.chunks: list[ProblemChunk] = []  # all chunks of the collection
        self.pending: list[ProblemChunk] = []  # this rank's chunks still to do

    def prepare_data(self) -> None:
        if self.arithmetic is not None:
            self.arithmetic.write()

    def setup(self, stage: str | None = None) -> None:
        if self.arithmetic is not None:  # every rank needs the files; writing is idempotent
            self.arithmetic.write()
        hp = self.hparams
        self.problems, self.num_skipped = load_problems(hp.problems_file, hp.task, hp.skip_malformed, hp.limit)
        self.chunks = make_chunks(self.problems, hp.chunk_size)
        rank, world = rank_and_world(self.trainer)
        self.pending = pending_chunks(self.chunks, self.out_dir, rank, world)

    def identity(self) -> dict:
        """What fixes the chunks' contents (compared on resume; see TrajectoryWriter)."""
        hp = self.hparams
        return {"problems_file": str(hp.problems_file), "problems_sha256": file_sha256(hp.problems_file),
                "task": hp.task, "chunk_size": hp.chunk_size, "limit": hp.limit, "skip_malformed": hp.skip_malformed,
                "num_problems": len(self.problems), "num_chunks": len(self.chunks),
                "num_malformed_skipped": self.num_skipped}

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # chunks are text (frozen records); the engines put their tensors on the models' device

    def predict_dataloader(self) -> DataLoader:
        work = self.pending or [ProblemChunk(-1, ())]
        return DataLoader(work, batch_size=1, shuffle=False, collate_fn=_single, num_workers=0)
