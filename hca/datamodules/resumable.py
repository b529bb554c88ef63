"""A shuffling DataLoader that resumes mid-epoch exactly.

Lightning restarts a plain DataLoader from the beginning of the epoch when it resumes from a
mid-epoch checkpoint, so the resumed run sees other batches than an uninterrupted one. This
loader's order is a pure function of ``(seed, epoch)`` and it implements ``state_dict`` /
``load_state_dict`` (Lightning saves and restores them with the fit loop), so a resumed run skips
exactly the batches the interrupted run had trained on.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class _EpochPermutation(Sampler[int]):
    """Rank ``rank``'s share of a ``(seed, epoch)`` permutation of ``range(n)``: every
    ``world_size``-th index of it, after cutting it to a multiple of ``world_size`` so that every
    rank gets as many indices (ranks never share an index within an epoch)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if n < world_size:
            raise ValueError(f"{n} items cannot be shared by {world_size} ranks")
        self.n, self.seed, self.rank, self.world_size, self.epoch, self.skip = n, seed, rank, world_size, 0, 0

    def __len__(self) -> int:
        return self.n // self.world_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: len(self) * self.world_size]
        yield from perm[self.rank::self.world_size][self.skip:].tolist()


class EpochResume:
    """Mid-epoch resume and epoch counting for a ``DataLoader`` whose order is a function of
    ``(seed, epoch)`` (``self._order``: an object with ``epoch``, ``seed`` and ``world_size``;
    :meth:`_skip` makes the next pass start ``n`` batches into the epoch).

    Epochs. Lightning stops drawing from the training loader once it has had ``len()`` batches,
    so the code after a pass's last ``yield`` may never run: a pass that yielded batches and was
    left is counted as finished when the next pass starts (without this every epoch repeated epoch
    0's order).

    The state is the number of batches handed to the training loop in the current epoch (Lightning
    checkpoints at ``on_train_batch_end``, before it fetches the next batch, so that count equals
    the batches trained on). A state saved at the very end of an epoch resumes at the next epoch.
    """

    _order: Any
    _yielded: int = 0  # batches of the current epoch handed out (resumed ones included)
    _resume_batches: int = 0  # batches to skip at the next pass (set by load_state_dict)

    def _skip(self, batches: int) -> None:
        raise NotImplementedError

    def __iter__(self):
        if self._resume_batches:
            skip, self._resume_batches = self._resume_batches, 0
        else:
            skip = 0
            if self._yielded:  # the previous pass was left after its last batch: that epoch is over
                self._order.epoch += 1
        self._skip(skip)
        self._yielded = skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self._order.epoch += 1
        self._yielded = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._order.epoch, "batches": self._yielded, "seed": self._order.seed,
                "world_size": self._order.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self._order.seed) != self._order.seed:
            raise ValueError(f"checkpoint was written with data seed {state['seed']}, this run uses {self._order.seed}")
        if state.get("world_size", 1) != self._order.world_size:
            raise ValueError(f"checkpoint was written by {state['world_size']} ranks, this run has "
                             f"{self._order.world_size}: each rank's share of the data would differ, so the "
                             "resume would not be exact; resume on the same number of devices")
        self._order.epoch = int(state["epoch"])
        self._resume_batches = int(state["batches"])
        self._yielded = 0
        if self._resume_batches >= len(self):
            self._order.epoch += 1
            self._resume_batches = 0


class ResumableLoader(EpochResume, DataLoader):
    """``DataLoader(dataset, batch_size, shuffle=True)`` with an exact mid-epoch resume
    (:class:`EpochResume`); on several ranks each takes its share of every epoch's permutation."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, **kwargs):
        self._perm = _EpochPermutation(len(dataset), seed, rank, world_size)
        super().__init__(dataset, batch_size=batch_size, sampler=self._perm, **kwargs)
        self._order = self._perm
        self._yielded = 0
        self._resume_batches = 0

    def _skip(self, batches: int) -> None:
        self._perm.skip = batches * self.batch_size

    def __len__(self) -> int:
        n = len(self._perm)  # this rank's share
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
