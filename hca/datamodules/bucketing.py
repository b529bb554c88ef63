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

Evaluation on several ranks (:func:`eval_loader`): fixed batches, the same as one process would
make, are dealt out whole -- rank ``r`` gets batches ``r, r + W, ...`` (:func:`global_batch_index`)
-- so every item is evaluated exactly once and a per-batch seed or a per-batch statistic does not
depend on the number of ranks. With ``pad`` every rank runs as many steps (the short ones repeat
a batch, flagged, whose results must be discarded): needed where a forward pass is a collective
(ZeRO-3). :func:`gather_objects` collects what each rank measured, for exact sums.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

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


# ---------------------------------------------------------------------------------- several ranks
def rank_and_world(trainer, own_sharding: bool = True) -> tuple[int, int]:
    """``(global_rank, world_size)`` of ``trainer`` (``(0, 1)`` without one). With ``own_sharding``
    (a loader that shards by itself, which Lightning cannot wrap) refuse a distributed run in which
    Lightning would inject its ``DistributedSampler``."""
    if trainer is None:
        return 0, 1
    rank, world = trainer.global_rank, trainer.world_size
    if own_sharding and world > 1 and getattr(getattr(trainer, "_accelerator_connector", None),
                                              "use_distributed_sampler", False):
        raise ValueError(f"this loader shards itself over the {world} ranks: run with "
                         "trainer.use_distributed_sampler: false (the configs/strategy fragments set it)")
    return rank, world


def global_batch_index(batch_idx: int, rank: int, world_size: int) -> int:
    """Which of the fixed evaluation batches rank ``rank``'s ``batch_idx``-th step holds."""
    return batch_idx * world_size + rank


class EvalShard(DistributedSampler):
    """Rank ``rank``'s evaluation batches: indices ``rank, rank + W, ...`` of ``num_batches``; with
    ``pad``, index ``num_batches`` (a padding item) fills up to ``ceil(num_batches / W)`` steps.

    A ``DistributedSampler`` subclass only so that Lightning never replaces it (it leaves those
    alone whether or not ``use_distributed_sampler`` is set); its ``__init__`` is not called."""

    def __init__(self, num_batches: int, rank: int = 0, world_size: int = 1, pad: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_batches, self.rank, self.world_size, self.pad = num_batches, rank, world_size, pad
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        for i in range(len(self)):
            g = global_batch_index(i, self.rank, self.world_size)
            yield g if g < self.num_batches else self.num_batches

    def __len__(self) -> int:
        if self.pad:
            return -(-self.num_batches // self.world_size)
        return len(range(self.rank, self.num_batches, self.world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def _first(batch: list):
    return batch[0]


def eval_loader(batches: list, rank: int = 0, world_size: int = 1, pad_item=None, collate_fn=None,
                num_workers: int = 0) -> DataLoader:
    """A loader over ``batches`` (each already a whole batch) that yields rank ``rank``'s share in
    order (:class:`EvalShard`); ``pad_item`` (when given) is yielded where a rank has run out, so
    that every rank takes ``ceil(len(batches) / W)`` steps. ``collate_fn`` maps an item to the batch."""
    items = list(batches) + ([pad_item] if pad_item is not None else [])
    sampler = EvalShard(len(batches), rank, world_size, pad=pad_item is not None)
    collate = _first if collate_fn is None else _Collate(collate_fn)
    return DataLoader(items, batch_size=1, sampler=sampler, collate_fn=collate, num_workers=num_workers)


class _Collate:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, batch: list):
        return self.fn(batch[0])


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; every rank must call it); ``[obj]``
    outside a distributed run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
