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


def _as_lightning_draws(loader, epochs):
    """What Lightning's fit loop does: ``len(loader)`` batches per epoch from a fresh iterator, which
    it then leaves without exhausting (the code after the loader's last yield never runs)."""
    out = []
    for _ in range(epochs):
        it = iter(loader)
        out.append([next(it).tolist() for _ in range(len(loader))])
    return out


def test_epochs_advance_when_lightning_leaves_the_iterator():
    from hca.datamodules.bucketing import BucketLoader

    for make in (lambda: ResumableLoader(list(range(12)), batch_size=3, seed=1, drop_last=True),
                 lambda: BucketLoader(list(range(12)), lengths=[1 + i % 5 for i in range(12)], batch_size=3,
                                      pool_batches=2, seed=1, collate_fn=torch.tensor)):
        left, exhausted = _as_lightning_draws(make(), 3), [batches(loader) for loader in [make()] for _ in range(3)]
        assert left == exhausted  # leaving or exhausting a pass gives the same epochs
        assert left[0] != left[1] != left[2]
        assert all(sorted(sum(e, [])) == list(range(12)) for e in left)
        # a checkpoint taken after epoch 0 ended (state saved before the next pass starts) resumes at epoch 1
        loader = make()
        _as_lightning_draws(loader, 1)
        resumed = make()
        resumed.load_state_dict(loader.state_dict())
        assert _as_lightning_draws(resumed, 2) == left[1:]
