"""Sharding over ranks without launching any (tests/test_runtime_multirank.py runs two real processes):
evaluation batches dealt out whole and padded, PRM training batches split evenly and disjointly,
the RL val batches' size rule, refusals, and a PRM padding batch that changes nothing."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from builders import TINY, write_collection
from builders.policy import write_problems

from hca.datamodules.bucketing import BucketBatchSampler, BucketLoader
from hca.datamodules.sharding import eval_loader, rank_and_world
from hca.datamodules.rl_problems import ProblemDataModule
from hca.datamodules.trajectories import TrajectoryDataModule
from hca.modules.prm import PRMModule


@pytest.mark.parametrize("n, world", [(5, 1), (5, 2), (6, 3), (2, 4), (0, 2)])
def test_eval_loader_deals_whole_batches_once(n, world):
    batches = [[f"b{i}x", f"b{i}y"] for i in range(n)]
    per_rank = [list(eval_loader(batches, r, world, pad_item=["pad"])) for r in range(world)]
    assert {len(p) for p in per_rank} == {-(-n // world)}  # padded: every rank as many steps
    real = [b for p in per_rank for b in p if b != ["pad"]]
    assert sorted(map(tuple, real)) == sorted(map(tuple, batches))  # each batch exactly once, whole
    for r, p in enumerate(per_rank):  # rank r holds global batches r, r + W, ...
        assert [b for b in p if b != ["pad"]] == batches[r::world]
    unpadded = [list(eval_loader(batches, r, world)) for r in range(world)]
    assert unpadded == [batches[r::world] for r in range(world)]


def test_bucket_batches_are_split_evenly_and_disjointly():
    lengths = [(7 * i) % 23 + 1 for i in range(37)]  # 10 batches of 4 (the last one of 1)
    one = BucketBatchSampler(lengths, 4, pool_batches=3, seed=5)
    for world in (2, 3):
        shares = [BucketBatchSampler(lengths, 4, pool_batches=3, seed=5, rank=r, world_size=world)
                  for r in range(world)]
        for epoch in (0, 1):
            got = [s.batches(epoch) for s in shares]
            assert {len(g) for g in got} == {len(one.batches(epoch)) // world} == {len(shares[0])}
            flat = [i for g in got for b in g for i in b]
            assert len(flat) == len(set(flat))  # no example on two ranks (or twice on one)
            kept = one.all_batches(epoch)[: len(shares[0]) * world]
            assert sorted(map(tuple, (b for g in got for b in g))) == sorted(map(tuple, kept))
    with pytest.raises(ValueError, match="cannot be shared"):
        BucketBatchSampler(lengths[:4], 4, rank=0, world_size=2)
    state = BucketLoader(list(range(37)), lengths, 4, rank=1, world_size=2).state_dict()
    with pytest.raises(ValueError, match="ranks"):
        BucketLoader(list(range(37)), lengths, 4).load_state_dict(state)


def test_own_sharding_refuses_lightnings_sampler():
    def trainer(flag):
        return SimpleNamespace(global_rank=1, world_size=2, _accelerator_connector=SimpleNamespace(
            use_distributed_sampler=flag))

    assert rank_and_world(trainer(False)) == (1, 2) and rank_and_world(trainer(True), own_sharding=False) == (1, 2)
    with pytest.raises(ValueError, match="use_distributed_sampler: false"):
        rank_and_world(trainer(True))


def test_rl_val_batches(tmp_path):
    dm = ProblemDataModule(write_problems(tmp_path / "t.jsonl", 8), write_problems(tmp_path / "v.jsonl", 5, 100),
                           problems_per_step=2, val_batch_size=2)
    dm.setup()
    sizes = {w: [len(b) for b in dm.val_batches(w)] for w in (1, 2, 3, 4, 5)}
    assert sizes == {1: [2, 2, 1], 2: [2, 2, 1], 3: [2, 2, 1], 4: [1] * 5, 5: [1] * 5}  # >= 1 batch per rank
    with pytest.raises(ValueError, match="cannot be shared"):
        dm.val_batches(6)
    dm.val_problems = []
    assert dm.val_batches(2) == [] and list(dm.val_dataloader()) == []


def test_prm_padding_batch_changes_nothing(tmp_path):
    coll = write_collection(tmp_path / "coll", num_problems=16)
    dm = TrajectoryDataModule(str(coll), "tiny-llama", val_fraction=0.25, batch_size=8, max_length=64)
    dm.setup()
    module = PRMModule(backbone=TINY, tokenizer="tiny-llama")
    module.configure_model()
    batches = [dm.collate_val((b, False)) for b in dm.val_batches()]
    results = []
    for pad in (False, True):
        module.on_validation_epoch_start()
        with torch.no_grad():  # as in Lightning's validation
            for i, b in enumerate(batches):
                module.validation_step(b, i)
            if pad:
                module.validation_step(dataclasses.replace(batches[0], padding=True), len(batches))
        counts = dict(module._val_counts())
        results.append((counts, {k: float(m.compute()) for k, m in module._val_metrics().items() if counts[k]}))
        for m in module._val_metrics().values():
            m.reset()
    assert results[0] == results[1] and results[0][0]["responses"] == len(dm.examples("val"))
