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
    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.n, generator=g)[self.skip:].tolist()


class ResumableLoader(DataLoader):
    """``DataLoader(dataset, batch_size, shuffle=True)`` with an exact mid-epoch resume.

    The state is the number of batches handed to the training loop in the current epoch (Lightning
    checkpoints at ``on_train_batch_end``, before it fetches the next batch, so that count equals
    the batches trained on). A state saved at the very end of an epoch resumes at the next epoch.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0, **kwargs):
        self._perm = _EpochPermutation(len(dataset), seed)
        super().__init__(dataset, batch_size=batch_size, sampler=self._perm, **kwargs)
        self._yielded = 0
        self._resume_batches = 0

    def __iter__(self):
        skip = self._resume_batches
        self._resume_batches = 0
        self._perm.skip = skip * self.batch_size
        self._yielded = skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch
        self._perm.epoch += 1
        self._yielded = 0

    def __len__(self) -> int:
        n = len(self.dataset) // self.batch_size if self.drop_last else -(-len(self.dataset) // self.batch_size)
        return n

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._perm.epoch, "batches": self._yielded, "seed": self._perm.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self._perm.seed) != self._perm.seed:
            raise ValueError(f"checkpoint was written with data seed {state['seed']}, this run uses {self._perm.seed}")
        self._perm.epoch = int(state["epoch"])
        self._resume_batches = int(state["batches"])
        if self._resume_batches >= len(self):
            self._perm.epoch += 1
            self._resume_batches = 0
