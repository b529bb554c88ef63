"""pass@k and maj@k against hand-computed values."""
import pytest

from hca.evaluation.policy import majority_correct, pass_at_k, weighted_majority_correct


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_majority_vote():
    assert majority_correct(["5", "5", "6"], [True, True, False])
    assert not majority_correct(["6", "5", "6"], [False, True, False])
    assert majority_correct(["5", "6"], [True, False])  # tie: first seen wins
    assert not majority_correct([None, None], [False, False])
    assert majority_correct([None, "7", None], [False, True, False])  # truncated samples do not vote


def test_weighted_majority():
    answers, correct = ["5", "5", "7", None], [False, False, True, False]
    assert not weighted_majority_correct(answers, correct, [1, 1, 1, 1])  # equal weights: plain majority
    assert weighted_majority_correct(answers, correct, [0.2, 0.3, 0.6, 5.0])  # 0.6 > 0.5; None never votes
    assert not weighted_majority_correct(answers, correct, [0.3, 0.3, 0.6, 0.0])  # tie 0.6 = 0.6: first seen (5)
    assert not weighted_majority_correct([None], [False], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        weighted_majority_correct(answers, correct, [0.1, float("nan"), 0.1, 0.1])
    with pytest.raises(ValueError, match="same length"):
        weighted_majority_correct(answers, correct, [0.1])
