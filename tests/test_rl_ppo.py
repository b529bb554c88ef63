"""hca.rl.ppo: the micro-batch weights reproduce every aggregation of the whole mini-batch (so gradient
accumulation gives the mini-batch's gradient), and the settings are checked."""
import pytest
import torch

from hca.credit import AGGREGATIONS, aggregate
from hca.rl.ppo import PPOConfig, micro_batch_weights, micro_batches


def ragged_batch(n=7, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 3, 0, 5, 1, 9, 4])[:n]  # a row with no response token (length 0)
    response = torch.arange(t)[None, :] < lengths[:, None]
    loss = response & (torch.rand(n, t, generator=g) > 0.2)  # some response tokens out of the loss
    values = torch.randn(n, t, generator=g)
    return values, response, loss


def cut(x, rows, response):
    """What RLBatch.select does to a part: its rows, columns cut to its longest response."""
    keep = max(1, int(response[rows].sum(-1).max()))
    return x[rows][:, :keep]


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
@pytest.mark.parametrize("max_len", [None, 12])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_weighted_micro_batch_aggregates_equal_the_mini_batch(agg, max_len, size):
    values, response, loss = ragged_batch()
    whole = aggregate(values, loss, agg, max_len)
    parts = micro_batches(len(values), PPOConfig(micro_batch_size=size))
    assert torch.equal(torch.cat(parts), torch.arange(len(values)))
    w = micro_batch_weights(response, loss, parts, agg, max_len)
    acc = sum(wj * aggregate(cut(values, p, response), cut(loss, p, response), agg, max_len) for p, wj in zip(parts, w))
    torch.testing.assert_close(acc, whole, rtol=1e-6, atol=1e-7)


def test_hand_computed_weights():
    response = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]).bool()
    loss = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]).bool()
    parts = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    assert micro_batch_weights(response, loss, parts, "token_mean") == [3 / 5, 2 / 5]
    assert micro_batch_weights(response, loss, parts, "seq_mean_token_mean") == [2 / 3, 1 / 3]
    assert micro_batch_weights(response, loss, parts, "seq_mean_token_sum_norm", 8) == [0.5, 0.5]
    # no max_len: each part is normalised by its own longest response (3 and 2) against the batch's 3
    assert micro_batch_weights(response, loss, parts, "seq_mean_token_sum_norm") == [2 * 3 / 12, 2 * 2 / 12]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_micro_batch_size_is_checked(bad):
    with pytest.raises(ValueError, match="micro_batch_size"):
        PPOConfig(micro_batch_size=bad)
