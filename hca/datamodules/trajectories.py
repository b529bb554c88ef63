"""The collected, prover-labeled trajectories (``docs/trajectory_format.md``) as training data for
the PRM, and as the problem source of RL (:meth:`TrajectoryDataModule.problems`).

Reading
    :func:`hca.data.trajectories.read_dataset` checks the manifest's format version, every shard's
    sha256 and record count, and validates every record; a bad record raises
    ``TrajectoryFormatError("<shard>:<line>: ...")``. Every response of one problem must carry the
    same prompt, answer and task (checked). Empty responses (``K = 0``) carry no step and no MC
    label of their own (their ``values`` hold only the outcome) and are skipped (counted in
    :attr:`TrajectoryDataModule.stats`).

Split (by problem, never by response: METHOD.md section 4)
    Unique problem ids are ranked by ``sha256(f"{split_seed}:{id}")``; the first
    ``round(val_fraction * n)`` (at least 1 when ``val_fraction > 0`` and ``n >= 2``) are
    validation, the rest training. A problem's responses all land in one split, and the split of a
    problem does not depend on which other problems were collected.

Labels of one response (boundaries ``h_0 .. h_K``; the value is read at the last token of each)
    ``targets[j] = values[j]``: the prover value ``V̂(h_j)`` for ``j < K``, the outcome ``R`` for
    ``h_K`` (exact, ``is_final``). ``rollouts[j]`` = the prover completions behind the label
    (``counts[j][1]``). ``h_0``'s estimate is computed once per problem and repeated in every one
    of its ``n`` responses, whose ``h_0`` inputs are identical token for token, so each copy gets
    ``rollouts / n``: the problem's ``h_0`` label weighs its true rollout count in total. Labels a
    first-pit collection did not compute are masked. How the weights enter the loss (and the
    weight of ``h_K``) is the PRM module's choice (:mod:`hca.modules.prm`).

Tokenization
    With the PRM's own tokenizer (which may differ from the policy's), ``prompt + response``
    jointly, boundaries placed by :func:`hca.steps.align_prompt_response` (``h_0`` at the prompt's
    last token, ``h_k`` at step ``k``'s last token, trailing delimiter included).

Truncation to ``max_length`` tokens
    If the sequence is longer, whole trailing steps are dropped: the kept steps are those whose
    last token lies within the first ``max_length`` tokens, the sequence is cut after the last
    kept step, and ``h_K`` (the outcome label) is kept only if no step was dropped. If even the
    prompt is longer than ``max_length``, the prompt is left-truncated to its last ``max_length``
    tokens and only ``h_0`` is kept. Counted in :attr:`TrajectoryDataModule.stats`.

Several ranks (:mod:`hca.datamodules.bucketing`)
    Training: rank ``r`` of ``W`` takes batches ``r, r + W, ...`` of each epoch's bucketed batch
    list (run with ``trainer.use_distributed_sampler: false``; resume on as many ranks).
    Validation: the fixed batches of :meth:`TrajectoryDataModule.val_batches` (those of one
    process) are dealt out whole, every response exactly once; a rank short of a batch runs a
    flagged copy (``PRMBatch.padding``) whose results the module discards.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader

from hca.data.problems import Problem, load_problems
from hca.data.trajectories import Trajectory, read_dataset
from hca.datamodules.bucketing import BucketLoader
from hca.datamodules.sharding import eval_loader, rank_and_world
from hca.steps import align_prompt_response


@dataclass
class PRMExample:
    """One response, tokenized and labeled at its ``J`` kept boundaries ``h_0 .. h_{J-1}``."""

    input_ids: list[int]  # [L] prompt + response, PRM tokenizer, L <= max_length
    positions: list[int]  # [J] token index of each boundary h_j (h_0: last prompt token)
    targets: list[float]  # [J] V̂(h_j); the outcome R at h_K
    rollouts: list[float]  # [J] rollouts behind each label (h_0: shared by the problem's responses); 0: none
    labeled: list[bool]  # [J] a label exists (False: not computed, first pit)
    is_final: list[bool]  # [J] the boundary is h_K (target = outcome)
    step_correct: list[int]  # [J] ground truth of the step ending at h_j: 1 right, 0 wrong, -1 unknown (h_0: -1)
    outcome: int  # R(p, y) of the whole response
    problem_index: int  # index into the split's problem list
    response_index: int  # Trajectory.response_index (which of the problem's responses)
    truncated_steps: int  # trailing steps dropped by the max_length rule


@dataclass
class PRMBatch:
    """A padded batch of :class:`PRMExample` (``B`` responses, ``T`` tokens, ``J`` boundaries)."""

    input_ids: torch.Tensor  # [B, T] long, right-padded with the tokenizer's pad id
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens
    positions: torch.Tensor  # [B, J] long, token index where the value of h_j is read (0 on padding)
    targets: torch.Tensor  # [B, J] float, V̂(h_j), the outcome at h_K (0 on padding)
    rollouts: torch.Tensor  # [B, J] float, rollouts behind each label (0 on padding / unlabeled)
    boundary_mask: torch.Tensor  # [B, J] bool, the boundary exists (False: padding)
    label_mask: torch.Tensor  # [B, J] bool, a label exists (False: padding, or not computed: first pit)
    is_final: torch.Tensor  # [B, J] bool, the boundary is h_K
    step_correct: torch.Tensor  # [B, J] long, ground truth of the step ending at h_j (1/0; -1 unknown, h_0, padding)
    outcome: torch.Tensor  # [B] float, R of each response
    problem_index: torch.Tensor  # [B] long, index of the response's problem in its split
    padding: bool = False  # a stand-in batch that only keeps ranks in step (validation): discard its results

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def split_problem_ids(ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train_ids, val_ids)``: unique ids ranked by a seeded hash; the first ``round(f * n)`` are val."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    uniq = sorted(set(ids), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    n_val = round(val_fraction * len(uniq))
    if val_fraction > 0 and len(uniq) >= 2:
        n_val = min(max(n_val, 1), len(uniq) - 1)
    val = set(uniq[:n_val])
    order = list(dict.fromkeys(ids))  # data order
    return [i for i in order if i not in val], [i for i in order if i in val]


def encode_trajectory(tokenizer, t: Trajectory, max_length: int, problem_index: int = 0, h0_share: int = 1,
                      add_special_tokens: bool = True) -> PRMExample:
    """Tokenize and label one response with the module's truncation rule (``K >= 1`` required)."""
    K = t.num_steps
    if K == 0:
        raise ValueError("an empty response (K = 0) has no step to label")
    al = align_prompt_response(tokenizer, t.prompt, t.response, t.delimiter, add_special_tokens=add_special_tokens)
    ids = al.input_ids.tolist()
    positions = [al.prompt_end, *al.step_ends.tolist()]  # [K+1]
    if positions[0] + 1 > max_length:  # even the prompt is too long: keep its last max_length tokens, h_0 only
        ids, positions = ids[positions[0] + 1 - max_length: positions[0] + 1], [max_length - 1]
    elif len(ids) > max_length:  # drop whole trailing steps
        positions = [p for p in positions if p < max_length]
        ids = ids[: positions[-1] + 1]
    J = len(positions)
    rollouts = [float(c[1]) if c is not None else 0.0 for c in t.counts] + [0.0]  # [K+1], h_K has none
    rollouts[0] /= h0_share
    sc = [-1] + ([int(b) for b in t.step_correct] if t.step_correct is not None else [-1] * K)
    return PRMExample(
        input_ids=ids, positions=positions,
        targets=[float(v) if v is not None else 0.0 for v in t.values[:J]],
        rollouts=rollouts[:J], labeled=[v is not None for v in t.values[:J]],
        is_final=[j == K for j in range(J)], step_correct=sc[:J], outcome=t.outcome,
        problem_index=problem_index, response_index=t.response_index, truncated_steps=K + 1 - J)


def collate_examples(batch: list[PRMExample], pad_id: int, padding: bool = False) -> PRMBatch:
    B, T, J = len(batch), max(len(e.input_ids) for e in batch), max(len(e.positions) for e in batch)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    positions = torch.zeros((B, J), dtype=torch.long)
    targets, rollouts = torch.zeros((B, J)), torch.zeros((B, J))
    boundary_mask, label_mask = torch.zeros((B, J), dtype=torch.bool), torch.zeros((B, J), dtype=torch.bool)
    is_final = torch.zeros((B, J), dtype=torch.bool)
    step_correct = torch.full((B, J), -1, dtype=torch.long)
    for i, e in enumerate(batch):
        n, j = len(e.input_ids), len(e.positions)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        attention_mask[i, :n] = 1
        positions[i, :j] = torch.tensor(e.positions)
        targets[i, :j] = torch.tensor(e.targets)
        rollouts[i, :j] = torch.tensor(e.rollouts) * torch.tensor(e.labeled)
        boundary_mask[i, :j] = True
        label_mask[i, :j] = torch.tensor(e.labeled)
        is_final[i, :j] = torch.tensor(e.is_final)
        step_correct[i, :j] = torch.tensor(e.step_correct)
    return PRMBatch(input_ids, attention_mask, positions, targets, rollouts, boundary_mask, label_mask, is_final,
                    step_correct, torch.tensor([float(e.outcome) for e in batch]),
                    torch.tensor([e.problem_index for e in batch], dtype=torch.long), padding)


class TrajectoryDataModule(L.LightningDataModule):
    def __init__(self, data_dir: str, tokenizer: str, val_fraction: float = 0.1, split_seed: int = 0,
                 max_length: int = 512, batch_size: int = 32, val_batch_size: int | None = None,
                 pool_batches: int = 16, seed: int = 0, problems_file: str | None = None, strict: bool = True,
                 verify_sha256: bool = True, add_special_tokens: bool = True, num_workers: int = 0):
        """
        Args:
            data_dir: a collection folder (``manifest.json`` + shards), e.g. ``runs/collect/arithmetic``.
            tokenizer: the PRM's tokenizer (hub name, local path or ``tiny-llama``): must be the PRM backbone's.
            val_fraction: fraction of problems held out for validation (split by problem id).
            split_seed: seed of the problem hash that decides the split.
            max_length: tokens per sequence; longer ones lose whole trailing steps (module docstring).
            batch_size: responses per training batch.
            val_batch_size: responses per validation batch (None: ``batch_size``).
            pool_batches: length bucketing: batches per sorted pool (1: no bucketing).
            seed: training order seed (the order is a function of seed and epoch; resumable mid-epoch).
            problems_file: optional problem file to take the problems' ``meta`` from (RL on the
                arithmetic task needs it for ground-truth step checks); matched by id.
            strict: refuse an incomplete collection (see :func:`hca.data.trajectories.iter_dataset`).
            verify_sha256: check every shard against the manifest's sha256 before reading.
            add_special_tokens: let the tokenizer add its special tokens (BOS), as the PRM scorer does.
            num_workers: DataLoader workers (examples are pre-tokenized: 0 is enough).
        """
        super().__init__()
        self.save_hyperparameters()
        if max_length < 2 or batch_size < 1:
            raise ValueError(f"max_length must be >= 2 and batch_size >= 1, got {max_length}, {batch_size}")
        split_problem_ids([], val_fraction, split_seed)  # validates val_fraction early
        self.tokenizer = None
        self.manifest: dict = {}
        self._problems: dict[str, list[Problem]] = {}
        self._examples: dict[str, list[PRMExample]] = {}
        self.stats: dict[str, int] = {}

    # ---------------------------------------------------------------------------------- reading
    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        from hca.models.loading import load_tokenizer

        hp = self.hparams
        self.manifest, records = read_dataset(hp.data_dir, strict=hp.strict, verify_sha256=hp.verify_sha256)
        if not records:
            raise ValueError(f"{hp.data_dir}: the collection holds no records")
        meta = {}
        if hp.problems_file:
            meta = {p.id: p.meta for p in load_problems(hp.problems_file, records[0].task)[0]}
        first: dict[str, Trajectory] = {}
        n_resp: dict[str, int] = {}
        for t in records:
            f = first.setdefault(t.problem_id, t)
            if (t.prompt, t.answer, t.task) != (f.prompt, f.answer, f.task):
                raise ValueError(f"{hp.data_dir}: problem {t.problem_id!r} has responses with different prompts, "
                                 "answers or tasks (a collection must key problems uniquely)")
            n_resp[t.problem_id] = n_resp.get(t.problem_id, 0) + 1
        train_ids, val_ids = split_problem_ids([t.problem_id for t in records], hp.val_fraction, hp.split_seed)
        self.tokenizer = load_tokenizer(hp.tokenizer)
        stats = {"records": len(records), "empty_skipped": 0, "truncated_responses": 0, "truncated_steps": 0}
        for split, ids in (("train", train_ids), ("val", val_ids)):
            index = {pid: i for i, pid in enumerate(ids)}
            self._problems[split] = [Problem(id=pid, prompt=first[pid].prompt, answer=first[pid].answer,
                                             task=first[pid].task, meta=meta.get(pid, {})) for pid in ids]
            out = []
            for t in records:
                if t.problem_id not in index:
                    continue
                if t.num_steps == 0:
                    stats["empty_skipped"] += 1
                    continue
                e = encode_trajectory(self.tokenizer, t, hp.max_length, index[t.problem_id], n_resp[t.problem_id],
                                      hp.add_special_tokens)
                stats["truncated_responses"] += e.truncated_steps > 0
                stats["truncated_steps"] += e.truncated_steps
                out.append(e)
            self._examples[split] = out
            stats[f"{split}_problems"], stats[f"{split}_responses"] = len(ids), len(out)
        self.stats = stats
        if not self._examples["train"]:
            raise ValueError(f"{hp.data_dir}: no training examples after the split (val_fraction={hp.val_fraction})")

    def _check(self, split: str) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not self._examples:
            raise RuntimeError("call setup() first")

    def problems(self, split: str) -> list[Problem]:
        """The unique problems of a split (data order), for RL to draw from."""
        self._check(split)
        return list(self._problems[split])

    def examples(self, split: str) -> list[PRMExample]:
        self._check(split)
        return self._examples[split]

    # ---------------------------------------------------------------------------------- loaders
    def collate(self, batch: list[PRMExample]) -> PRMBatch:
        return collate_examples(batch, self.tokenizer.pad_token_id)

    def collate_val(self, item: tuple[list[PRMExample], bool]) -> PRMBatch:
        return collate_examples(item[0], self.tokenizer.pad_token_id, padding=item[1])

    def train_dataloader(self) -> DataLoader:
        hp, ex = self.hparams, self.examples("train")
        rank, world = rank_and_world(self.trainer)
        return BucketLoader(ex, [len(e.input_ids) for e in ex], hp.batch_size, hp.pool_batches, hp.seed,
                            rank=rank, world_size=world, collate_fn=self.collate, num_workers=hp.num_workers)

    def val_batches(self) -> list[list[PRMExample]]:
        """The fixed validation batches: examples sorted by length (stable; little padding), cut into
        ``val_batch_size``; the same on any number of ranks."""
        ex = sorted(self.examples("val"), key=lambda e: len(e.input_ids))
        size = self.hparams.val_batch_size or self.hparams.batch_size
        return [ex[a:a + size] for a in range(0, len(ex), size)]

    def val_dataloader(self) -> DataLoader:
        """This rank's validation batches (``r, r + W, ...`` of :meth:`val_batches`), padded with a
        copy of batch 0 flagged ``padding`` so that every rank runs as many forward passes (ZeRO-3)."""
        rank, world = rank_and_world(self.trainer, own_sharding=False)
        batches = self.val_batches()
        pad = (batches[0], True) if batches and world > 1 else None
        return eval_loader([(b, False) for b in batches], rank, world, pad, self.collate_val, self.hparams.num_workers)

