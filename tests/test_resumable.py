"""The resumable loader: a (seed, epoch) order, exact mid-epoch resume, and rank shards that never
share an item within an epoch (the RL problem loader on several ranks)."""
from types import SimpleNamespace

import pytest
import torch

from hca.datamodules.resumable import ResumableLoader


def batches(loader, k=None):
    out = []
    for b in loader:
        out.append(b.tolist())
        if k is not None and len(out) == k:
            break
    return out


def test_one_rank_is_a_seeded_shuffle_with_exact_resume():
    data = list(range(10))
    loader = ResumableLoader(data, batch_size=3, seed=4, drop_last=True)
    epoch0 = batches(loader)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(4 * 100_003))
    assert epoch0 == [perm[i:i + 3].tolist() for i in (0, 3, 6)]  # unchanged by rank sharding
    assert batches(loader) != epoch0  # the next epoch has another order
    fresh = ResumableLoader(data, batch_size=3, seed=4, drop_last=True)
    first = batches(fresh, 1)
    state = fresh.state_dict()
    resumed = ResumableLoader(data, batch_size=3, seed=4, drop_last=True)
    resumed.load_state_dict(state)
    assert first + batches(resumed) == epoch0


def test_ranks_share_nothing_and_resume_each():
    data = list(range(21))
    shards = [ResumableLoader(data, batch_size=4, seed=0, rank=r, world_size=2, drop_last=True) for r in (0, 1)]
    assert [len(s) for s in shards] == [2, 2]  # 21 -> 20 items, 10 per rank, 2 full batches each
    for _ in range(3):  # every epoch
        seen = [sum(batches(s), []) for s in shards]
        assert len(seen[0]) == len(seen[1]) == 8 and not set(seen[0]) & set(seen[1])
    a = ResumableLoader(data, batch_size=4, seed=0, rank=1, world_size=2, drop_last=True)
    straight = batches(ResumableLoader(data, batch_size=4, seed=0, rank=1, world_size=2, drop_last=True))
    first = batches(a, 1)
    b = ResumableLoader(data, batch_size=4, seed=0, rank=1, world_size=2, drop_last=True)
    b.load_state_dict(a.state_dict())
    assert first + batches(b) == straight
    with pytest.raises(ValueError, match="same number of devices"):
        ResumableLoader(data, batch_size=4, seed=0, drop_last=True).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="rank"):
        ResumableLoader(data, batch_size=4, rank=2, world_size=2)


def test_rl_problem_loader_takes_the_trainers_rank(tmp_path):
    import json

    from hca.datamodules.rl_problems import ProblemDataModule

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Q:{i}\n", "answer": str(i)}) + "\n" for i in range(20)))
    loaders = []
    for rank in (0, 1):
        dm = ProblemDataModule(train_file=str(path), val_file=str(path), problems_per_step=4, seed=1)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dm.setup("fit")
        loaders.append(dm.train_dataloader())
    ids = [{p.id for batch in loader for p in batch} for loader in loaders]
    assert len(ids[0]) == len(ids[1]) == 8 and not ids[0] & ids[1]
    dm = ProblemDataModule(train_file=str(path), val_file=str(path), problems_per_step=8)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=4)
    dm.setup("fit")
    with pytest.raises(ValueError, match="per rank"):
        dm.train_dataloader()
