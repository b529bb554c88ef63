"""Length-bucketed batches with a seeded order and an exact mid-epoch resume.

Padding waste is what makes a PRM epoch slow when lengths vary (a 40-token and a 400-token
response in one batch cost 2 x 400). :class:`BucketBatchSampler` draws batches of similar length:

1. a permutation of all examples, a pure function of ``(seed, epoch)``;
2. cut into *pools* of ``pool_batches * batch_size`` consecutive examples; each pool is sorted by
   length (stable) and cut into batches of ``batch_size`` (the last batch of the last pool may be
   smaller unless ``drop_last``);
3. the order of all batches of the epoch is shuffled again (same generator), so long and short
   batches alternate and no epoch starts with all the short ones.

``pool_batches = 1`` is a plain shuffled loader; ``pool_batches >= len / batch_size`` is a full
sort. :class:`BucketLoader` is a ``DataLoader`` over that sampler with Lightning's
``state_dict``/``load_state_dict`` protocol (as :class:`hca.datamodules.resumable.ResumableLoader`):
a run resumed from a mid-epoch checkpoint skips exactly the batches the interrupted run trained on.

Several ranks. Rank ``r`` of ``W`` trains on batches ``r, r + W, ...`` of the epoch's batch list,
cut to a multiple of ``W`` first (so every rank takes as many steps; up to ``W - 1`` batches of an
epoch are left out, other ones each epoch). Run with ``trainer.use_distributed_sampler: false``
and resume on the same number of ranks (checked).

Evaluation on several ranks: :mod:`hca.datamodules.sharding`.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from hca.datamodules.resumable import EpochResume


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices ``[batch_size]`` grouped by length (see the module docstring)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, pool_batches: int = 16, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size}, {pool_batches}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)  # [N]
        self.batch_size, self.pool_batches, self.seed, self.drop_last = batch_size, pool_batches, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0
        if world_size > 1 and self._num_batches() < world_size:
            raise ValueError(f"{self._num_batches()} batches of {batch_size} cannot be shared by {world_size} ranks")

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, in order (all of them on one rank)."""
        every = self.all_batches(epoch)
        return every[: len(self) * self.world_size][self.rank::self.world_size]

    def all_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch``, in order."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.lengths), generator=g)
        pool = self.batch_size * self.pool_batches
        out: list[list[int]] = []
        for a in range(0, len(perm), pool):
            idx = perm[a:a + pool]
            idx = idx[torch.argsort(self.lengths[idx], stable=True)].tolist()
            out.extend(idx[b:b + self.batch_size] for b in range(0, len(idx), self.batch_size))
        if self.drop_last:
            out = [b for b in out if len(b) == self.batch_size]
        order = torch.randperm(len(out), generator=g).tolist()
        return [out[i] for i in order]

    def _num_batches(self) -> int:
        n = len(self.lengths)
        if self.drop_last:
            return n // self.batch_size
        pool = self.batch_size * self.pool_batches
        full, rest = divmod(n, pool)
        return full * self.pool_batches + -(-rest // self.batch_size)

    def __len__(self) -> int:
        return self._num_batches() // self.world_size  # this rank's share

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.skip:]


class BucketLoader(EpochResume, DataLoader):
    """``DataLoader(dataset, batch_sampler=BucketBatchSampler(...))`` with an exact mid-epoch resume
    and epoch counting (:class:`hca.datamodules.resumable.EpochResume`)."""

    def __init__(self, dataset, lengths: Sequence[int], batch_size: int, pool_batches: int = 16, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, **kwargs):
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} examples")
        self._buckets = BucketBatchSampler(lengths, batch_size, pool_batches, seed, drop_last, rank, world_size)
        super().__init__(dataset, batch_sampler=self._buckets, **kwargs)
        self._order = self._buckets
        self._yielded = 0
        self._resume_batches = 0

    def _skip(self, batches: int) -> None:
        self._buckets.skip = batches

    def __len__(self) -> int:
        return len(self._buckets)
