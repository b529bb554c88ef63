"""Supervised fine-tuning data: problems with gold worked solutions, tokenized as the policy will
see them at sampling time.

A sequence is ``tokenizer(prompt)`` (with the tokenizer's special tokens, exactly what the rollout
engine feeds the model) followed by ``tokenizer(solution, add_special_tokens=False) + [eos]``;
the loss is on the response tokens only (prompt labels are ``-100``). Batches are right-padded.

Prompts of native GSM8K / MATH lines are rendered with ``prompt`` (:class:`hca.data.prompts.PromptFormat`),
the same setting collection and RL use. ``solution_format: steps`` rewrites a GSM8K worked solution
into the step format the default instruction asks for (:func:`step_solution`): one step per line of
the solution, calculator annotations ``<<a*b=c>>`` removed, steps joined by ``delimiter``, and a
last step ``The final answer is \\boxed{N}.``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader

from hca.data.arithmetic import ArithmeticConfig, ensure_split_files
from hca.data.problems import Problem, load_problems
from hca.data.prompts import PromptFormat, render_problems
from hca.datamodules.resumable import ResumableLoader
from hca.datamodules.sharding import rank_and_world
from hca.runtime.hparams import store_plain_hparams


@dataclass
class ArithmeticData:
    """Generate the embedded task's problem files (if absent) before training."""

    out_dir: str = "runs/data/arithmetic"  # where train/val/test.jsonl are written
    num_train: int = 20000  # training problems (before removing any that appear in val/test)
    num_val: int = 256  # held-out validation problems
    num_test: int = 512  # held-out test problems
    seed: int = 0  # generation seed
    difficulty: ArithmeticConfig | None = None  # operations per problem, operand and value ranges

    @classmethod
    def coerce(cls, value: "ArithmeticData | dict | None") -> "ArithmeticData | None":
        """The dataclass from what a config or a checkpoint's hparams hold (a dict, nested dicts)."""
        if isinstance(value, dict):
            value = cls(**value)
        if value is not None and isinstance(value.difficulty, dict):
            value.difficulty = ArithmeticConfig(**value.difficulty)
        return value

    def write(self) -> dict[str, str]:
        return ensure_split_files(self.out_dir, self.num_train, self.num_val, self.num_test, self.seed,
                                  self.difficulty or ArithmeticConfig())


def _careful(p: Problem, path: str) -> Problem:
    from hca.data.arithmetic import STEP_DELIMITER, ArithmeticProblem

    if p.task != "arithmetic" or "ops" not in p.meta:
        raise ValueError(f"{path}: careful_solutions needs arithmetic problems with meta.ops; {p.id!r} has none")
    steps = ArithmeticProblem.from_record(p.to_record()).gold_steps()
    return dataclasses.replace(p, solution=STEP_DELIMITER.join(steps))


SOLUTION_FORMATS = ("as_is", "steps")


def step_solution(solution: str, answer: str, delimiter: str = "\n\n") -> str:
    """A GSM8K worked solution as steps: its non-empty lines with ``<<...>>`` calculator annotations
    removed, joined by ``delimiter``, then ``The final answer is \\boxed{answer}.``"""
    import re

    lines = [re.sub(r"<<[^>]*>>", "", line).strip() for line in solution.splitlines()]
    return delimiter.join([line for line in lines if line] + [f"The final answer is \\boxed{{{answer}}}."])


class SFTDataModule(L.LightningDataModule):
    def __init__(self, tokenizer: str, train_file: str, val_file: str, task: str = "arithmetic",
                 arithmetic: ArithmeticData | None = None, prompt: PromptFormat | None = None, batch_size: int = 64,
                 max_length: int = 256, num_val_eval: int = 128, seed: int = 0, num_workers: int = 0,
                 careful_solutions: bool = False, solution_format: str = "as_is", delimiter: str = "\n\n",
                 limit: int | None = None):
        """``careful_solutions`` (arithmetic only): train on the one-operation-per-line solution rebuilt
        from each record's ``meta`` instead of the file's ``solution`` (which mixes in shortcut lines,
        :mod:`hca.data.arithmetic`): how the embedded prover is made a more reliable policy than the
        one it judges, from the same problems. ``prompt``: how native lines become prompts.
        ``solution_format``: ``as_is`` or ``steps`` (module docstring), steps joined by ``delimiter``.
        ``limit``: the first ``limit`` problems of each file (None: all)."""
        super().__init__()
        self.save_hyperparameters()
        if solution_format not in SOLUTION_FORMATS:
            raise ValueError(f"solution_format must be one of {SOLUTION_FORMATS}, got {solution_format!r}")
        self.prompt = PromptFormat.coerce(prompt)
        store_plain_hparams(self, prompt=self.prompt)  # plain types: checkpoints load with weights_only=True
        arithmetic = ArithmeticData.coerce(arithmetic)
        self.arithmetic = arithmetic
        if arithmetic is not None:  # plain types in hparams, so checkpoints load with weights_only=True
            self.hparams["arithmetic"] = dataclasses.asdict(arithmetic)
        self.tokenizer = None
        self.train_problems: list[Problem] = []
        self.val_problems: list[Problem] = []

    def prepare_data(self) -> None:
        if self.arithmetic is not None:
            self.arithmetic.write()

    def setup(self, stage: str | None = None) -> None:
        from hca.models.loading import load_tokenizer

        if self.tokenizer is not None:
            return
        if self.arithmetic is not None:  # every rank needs the files; writing is idempotent
            self.arithmetic.write()
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        self.train_problems, _ = load_problems(hp.train_file, hp.task, limit=hp.limit)
        self.val_problems, _ = load_problems(hp.val_file, hp.task, limit=hp.limit)
        self.train_problems, _ = render_problems(self.train_problems, self.prompt, self.tokenizer)
        self.val_problems, _ = render_problems(self.val_problems, self.prompt, self.tokenizer)
        if hp.solution_format == "steps":
            self.train_problems, self.val_problems = ([dataclasses.replace(p, solution=step_solution(
                p.solution, p.answer, hp.delimiter)) if p.solution else p for p in ps]
                for ps in (self.train_problems, self.val_problems))
        if self.hparams.careful_solutions:
            self.train_problems = [_careful(p, self.hparams.train_file) for p in self.train_problems]
            self.val_problems = [_careful(p, self.hparams.val_file) for p in self.val_problems]
        missing = [p.id for p in self.train_problems if not p.solution]
        if missing:
            raise ValueError(f"{self.hparams.train_file}: {len(missing)} problems have no 'solution' to train on "
                             f"(first: {missing[0]})")
        self.train_examples = [self._encode(p) for p in self.train_problems]
        self.val_examples = [self._encode(p) for p in self.val_problems if p.solution]

    def _encode(self, p: Problem) -> tuple[list[int], int]:
        tok = self.tokenizer
        prompt = tok(p.prompt)["input_ids"]
        response = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (prompt + response)[: self.hparams.max_length]
        return ids, len(prompt)

    def _collate(self, batch: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        T = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), T), self.tokenizer.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(batch), T), dtype=torch.long)  # [B, T]
        labels = torch.full((len(batch), T), -100, dtype=torch.long)  # [B, T], -100 on prompt and padding
        for i, (ids, n_prompt) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def train_dataloader(self) -> DataLoader:
        rank, world = rank_and_world(self.trainer)
        return ResumableLoader(self.train_examples, batch_size=self.hparams.batch_size, seed=self.hparams.seed,
                               rank=rank, world_size=world, collate_fn=self._collate,
                               num_workers=self.hparams.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_examples, batch_size=self.hparams.batch_size, collate_fn=self._collate,
                          num_workers=self.hparams.num_workers)
