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
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices ``[batch_size]`` grouped by length (see the module docstring)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, pool_batches: int = 16, seed: int = 0,
                 drop_last: bool = False):
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size}, {pool_batches}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)  # [N]
        self.batch_size, self.pool_batches, self.seed, self.drop_last = batch_size, pool_batches, seed, drop_last
        self.epoch, self.skip = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
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

    def __len__(self) -> int:
        n = len(self.lengths)
        if self.drop_last:
            return n // self.batch_size
        pool = self.batch_size * self.pool_batches
        full, rest = divmod(n, pool)
        return full * self.pool_batches + -(-rest // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.skip:]


class BucketLoader(DataLoader):
    """``DataLoader(dataset, batch_sampler=BucketBatchSampler(...))`` with an exact mid-epoch resume.

    The state is the number of batches handed to the training loop in the current epoch (Lightning
    checkpoints at ``on_train_batch_end``, so that count equals the batches trained on); a state
    saved at the very end of an epoch resumes at the next epoch.
    """

    def __init__(self, dataset, lengths: Sequence[int], batch_size: int, pool_batches: int = 16, seed: int = 0,
                 drop_last: bool = False, **kwargs):
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for {len(dataset)} examples")
        self._buckets = BucketBatchSampler(lengths, batch_size, pool_batches, seed, drop_last)
        super().__init__(dataset, batch_sampler=self._buckets, **kwargs)
        self._yielded = 0
        self._resume_batches = 0

    def __iter__(self):
        skip, self._resume_batches = self._resume_batches, 0
        self._buckets.skip = skip
        self._yielded = skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self._buckets.epoch += 1
        self._yielded = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._buckets.epoch, "batches": self._yielded, "seed": self._buckets.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self._buckets.seed) != self._buckets.seed:
            raise ValueError(f"checkpoint was written with data seed {state['seed']}, this run uses {self._buckets.seed}")
        self._buckets.epoch = int(state["epoch"])
        self._resume_batches = int(state["batches"])
        if self._resume_batches >= len(self):
            self._buckets.epoch += 1
            self._resume_batches = 0
