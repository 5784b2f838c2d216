"""trace.evaluation.metrics against hand-computed values."""
import math

import pytest

from trace.evaluation.metrics import avg_at_k, bootstrap_ci, mean_pass_at_k, pass_at_k, per_problem_accuracy


def test_avg_at_k_is_mean_of_per_problem_fractions():
    correct = [[True, False, False, False], [True, True, True, True], [False] * 4]
    assert per_problem_accuracy(correct) == [0.25, 1.0, 0.0]
    assert avg_at_k(correct) == pytest.approx((0.25 + 1.0 + 0.0) / 3)


def test_avg_at_k_weights_problems_not_samples():
    # 1/1 and 0/3: per-problem mean 0.5 (a per-sample mean would say 0.25)
    assert avg_at_k([[True], [False, False, False]]) == pytest.approx(0.5)


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 2 / 5),                       # pass@1 = c/n
    (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 1 - 3/10 = 0.7
    (4, 1, 2, 1 - 3 / 6),                   # 1 - C(3,2)/C(4,2)
    (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
    (4, 0, 4, 0.0),                         # no correct sample
    (4, 3, 2, 1.0),                         # n - c < k: every pair holds a correct one
    (8, 8, 8, 1.0),
])
def test_pass_at_k_matches_the_combinatorial_formula(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_with_many_samples_does_not_overflow():
    assert pass_at_k(1000, 1, 1000) == 1.0
    assert pass_at_k(1000, 10, 1) == pytest.approx(0.01)


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_over_problems():
    correct = [[True, False], [False, False], [True, True]]
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))  # pass@1 == avg@k
    assert mean_pass_at_k(correct, 2) == pytest.approx(2 / 3)


def test_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="no problems"):
        avg_at_k([])
    with pytest.raises(ValueError, match="no graded samples"):
        avg_at_k([[True], []])
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_bootstrap_ci_of_constant_scores_is_a_point():
    assert bootstrap_ci([0.5] * 20, n_boot=200, seed=1) == (0.5, 0.5)


def test_bootstrap_ci_two_problems_hand_computed():
    # Scores {0, 1}: a resample of 2 problems has mean 0 (p=1/4), 0.5 (1/2) or 1 (1/4);
    # a 50% interval is then [0.5, 0.5] and a 99% interval [0, 1].
    assert bootstrap_ci([0.0, 1.0], n_boot=4000, seed=0, level=0.5) == (0.5, 0.5)
    assert bootstrap_ci([0.0, 1.0], n_boot=4000, seed=0, level=0.99) == (0.0, 1.0)


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    scores = [0.0, 0.25, 1.0, 0.5, 0.75, 0.0, 1.0, 0.125]
    low, high = bootstrap_ci(scores, n_boot=1000, seed=3)
    assert (low, high) == bootstrap_ci(scores, n_boot=1000, seed=3)
    assert low < sum(scores) / len(scores) < high
    narrow = bootstrap_ci(scores, n_boot=1000, seed=3, level=0.5)
    assert low <= narrow[0] <= narrow[1] <= high


def test_bootstrap_ci_rejects_bad_level():
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0.1, 0.2], level=95)
