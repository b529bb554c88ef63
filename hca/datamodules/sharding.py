"""Several ranks: which rank does what, and collecting what each measured.

* :func:`rank_and_world`: ``(global_rank, world_size)`` of a trainer, refusing a distributed run in
  which Lightning would wrap a loader that shards itself (``use_distributed_sampler`` must be off).
* Evaluation (:func:`eval_loader`): fixed batches, the same as one process would make, are dealt
  out whole -- rank ``r`` gets batches ``r, r + W, ...`` (:func:`global_batch_index`) -- so every
  item is evaluated exactly once and a per-batch seed or a per-batch statistic does not depend on
  the number of ranks. With ``pad`` every rank runs as many steps (the short ones repeat a batch,
  flagged, whose results must be discarded): needed where a forward pass is a collective (ZeRO-3).
* :func:`gather_objects` collects what each rank measured, for exact sums.
"""
from __future__ import annotations

from typing import Iterator

from torch.utils.data import DataLoader, DistributedSampler

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
