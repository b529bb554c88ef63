"""hca.prm.metrics: how a PRM is judged, on hand-made cases: first harmful step targets, predicted
first errors, ProcessBench's F1, pairwise ranking accuracy and soft calibration error."""
import math

import pytest
import torch

from hca.prm.metrics import (FirstErrorF1, PairwiseRankAccuracy, SoftCalibrationError, f1_from_counts, first_error_counts,
                             harmful_step_targets, predicted_first_error)


def test_metric_definitions_on_hand_made_cases():
    # labels h_0..h_3 of two responses; response 0 loses at step 2 (progress -0.75), then another drop
    labels = torch.tensor([[0.8, 0.9, 0.15, 0.0], [0.5, 0.6, 0.7, 1.0]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    include, positive = harmful_step_targets(labels, mask, 0.5)
    assert include.tolist() == [[True, True, False], [True, True, True]]  # nothing after the first harmful step
    assert positive.tolist() == [[False, True, False], [False, False, False]]
    values = torch.tensor([[0.9, 0.8, 0.3, 0.2], [0.4, 0.45, 0.9, 0.95]])
    steps = torch.ones(2, 3, dtype=torch.bool)
    assert predicted_first_error(values, steps, "value", 0.5).tolist() == [1, 0]  # 0.3 < 0.5; 0.45 < 0.5
    assert predicted_first_error(values, steps, "progress", 0.5).tolist() == [1, -1]  # -0.5 <= -0.5
    assert predicted_first_error(values, torch.tensor([[True, False, False]] * 2), "value", 0.5).tolist() == [-1, 0]
    # ProcessBench F1: 2 erroneous (1 hit), 2 correct (2 hits): acc 0.5 and 1 -> F1 2/3
    counts = first_error_counts(torch.tensor([1, 0, -1, -1]), torch.tensor([1, 2, -1, -1]))
    assert counts.tolist() == [2, 1, 2, 2]
    r = f1_from_counts(counts)
    assert (r["acc_erroneous"], r["acc_correct"], r["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert math.isnan(f1_from_counts([0, 0, 3, 3])["f1"])
    f1 = FirstErrorF1()
    f1.update(torch.tensor([1, 0]), torch.tensor([1, 2]))
    f1.update(torch.tensor([-1, -1]), torch.tensor([-1, -1]))
    assert float(f1.compute()) == pytest.approx(2 / 3)
    pair = PairwiseRankAccuracy()  # problem 0: right .9 vs wrong .5 and .9 (tie); problem 1: right .2 vs wrong .8
    pair.update(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0.9, 0.5, 0.9, 0.2, 0.8]), torch.tensor([1, 0, 0, 1, 0]))
    assert float(pair.compute()) == pytest.approx((1 + 0.5 + 0) / 3)  # pairs across problems do not count
    ece = SoftCalibrationError(bins=2)
    ece.update(torch.tensor([0.2, 0.3, 0.8]), torch.tensor([0.25, 0.25, 0.5]))
    # bin [0, .5): mean pred .25 = mean target .25; bin [.5, 1]: |.8 - .5| with 1 of 3 samples
    assert float(ece.compute()) == pytest.approx(0.3 / 3)
