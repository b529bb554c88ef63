"""Problems for RL: the train loader yields lists of ``problems_per_step`` :class:`~hca.data.problems.Problem`
(one RL step each), the val loader lists of held-out problems for sampled pass@k. Prompts of native
GSM8K / MATH lines are rendered by the policy module, which owns the tokenizer (:mod:`hca.data.prompts`).

The train loader is a :class:`~hca.datamodules.resumable.ResumableLoader`: its order is a function of
``(seed, epoch)`` and a run resumed from a mid-epoch checkpoint continues with exactly the problems
the uninterrupted run would have seen. Incomplete last batches are dropped, so every RL step has the
same number of problems. An "epoch" is one pass over the training problems.

On several ranks (DDP, DeepSpeed) each rank draws its own share of every epoch's permutation, so
ranks never train on the same problem in an epoch and ``problems_per_step`` is per rank (an RL step
uses ``problems_per_step x world_size`` problems in all). The loader shards by itself: run with
``trainer.use_distributed_sampler: false`` (the ``configs/strategy`` fragments do), and resume on
the same number of ranks.

Validation on several ranks: the val problems are cut into fixed batches of ``val_batch_size`` in
file order (:meth:`ProblemDataModule.val_batches`) and rank ``r`` validates batches ``r, r + W,
...`` (:func:`hca.datamodules.sharding.eval_loader`): every problem exactly once, and the policy
seeds each batch's sampling from its global index, so the samples are those of one process. Only
when there would be fewer batches than ranks are they made smaller (``n // W`` problems, so that
every rank has one; the samples then differ from one process's, not their distribution).
"""
from __future__ import annotations

import dataclasses

import lightning as L
from torch.utils.data import DataLoader

from hca.data.problems import Problem, load_problems
from hca.datamodules.resumable import ResumableLoader
from hca.datamodules.sft import ArithmeticData
from hca.datamodules.sharding import eval_loader, rank_and_world


def as_list(batch: list[Problem]) -> list[Problem]:
    """Collate: a batch of problems stays a plain list."""
    return list(batch)


class ProblemDataModule(L.LightningDataModule):
    def __init__(self, train_file: str, val_file: str, task: str = "arithmetic", problems_per_step: int = 16,
                 arithmetic: ArithmeticData | None = None, seed: int = 0,
                 num_val: int | None = None, val_batch_size: int = 64, num_workers: int = 0):
        """
        Args:
            train_file: JSONL problems to train on (see hca/data/problems.py).
            val_file: held-out JSONL problems for sampled pass@k.
            task: verifier name for lines that do not say theirs.
            problems_per_step: B, problems per RL step (each gets G sampled responses).
            arithmetic: generate the embedded task's problem files first when absent.
            seed: problem order seed (the order is a function of seed and epoch).
            num_val: evaluate only the first ``num_val`` validation problems (None: all).
            val_batch_size: validation problems per validation step.
            num_workers: DataLoader workers (problems are plain records: 0 is enough).
        """
        super().__init__()
        self.save_hyperparameters()
        arithmetic = ArithmeticData.coerce(arithmetic)
        if problems_per_step < 1 or val_batch_size < 1:
            raise ValueError("problems_per_step and val_batch_size must be >= 1")
        self.arithmetic = arithmetic
        if arithmetic is not None:  # plain types in hparams, so checkpoints load with weights_only=True
            self.hparams["arithmetic"] = dataclasses.asdict(arithmetic)
        self.train_problems: list[Problem] = []
        self.val_problems: list[Problem] = []

    def prepare_data(self) -> None:
        if self.arithmetic is not None:
            self.arithmetic.write()

    def setup(self, stage: str | None = None) -> None:
        if self.train_problems:
            return
        if self.arithmetic is not None:  # every rank needs the files; writing is idempotent
            self.arithmetic.write()
        hp = self.hparams
        self.train_problems, _ = load_problems(hp.train_file, hp.task)
        self.val_problems, _ = load_problems(hp.val_file, hp.task, limit=hp.num_val)
        if len(self.train_problems) < hp.problems_per_step:
            raise ValueError(f"{hp.train_file}: {len(self.train_problems)} problems, fewer than problems_per_step="
                             f"{hp.problems_per_step}")

    def train_dataloader(self) -> DataLoader:
        rank, world = rank_and_world(self.trainer)
        if len(self.train_problems) // world < self.hparams.problems_per_step:
            raise ValueError(f"{self.hparams.train_file}: {len(self.train_problems)} problems over {world} ranks leave "
                             f"fewer than problems_per_step={self.hparams.problems_per_step} per rank")
        return ResumableLoader(self.train_problems, batch_size=self.hparams.problems_per_step, seed=self.hparams.seed,
                               rank=rank, world_size=world, collate_fn=as_list, num_workers=self.hparams.num_workers,
                               drop_last=True)

    def val_batches(self, world_size: int = 1) -> list[list[Problem]]:
        """The fixed validation batches, in file order: ``val_batch_size`` problems each, or, when
        that leaves fewer batches than ranks, ``n // world_size`` (at least one batch per rank)."""
        n, size = len(self.val_problems), self.hparams.val_batch_size
        if 0 < n < world_size:
            raise ValueError(f"{n} validation problems cannot be shared by {world_size} ranks")
        if n and -(-n // size) < world_size:
            size = n // world_size
        return [self.val_problems[a:a + size] for a in range(0, n, size)]

    def val_dataloader(self) -> DataLoader:
        """This rank's validation batches: ``r, r + W, ...`` of :meth:`val_batches`."""
        rank, world = rank_and_world(self.trainer, own_sharding=False)
        return eval_loader(self.val_batches(world), rank, world, num_workers=self.hparams.num_workers)
