"""trace.evaluation.metrics against hand-computed values."""
import math

import pytest

from trace.evaluation.metrics import (agreement_confidence, avg_at_k, bin_index, bootstrap_calibration_ci, bootstrap_ci,
                                      brier_score, expected_calibration_error, majority_correctness, majority_vote,
                                      mean_pass_at_k, pass_at_k, per_problem_accuracy, reliability_bins)


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


# --------------------------------------------------------------------------- calibration of agreement confidence
# 3 problems x 4 samples (None: no extractable answer), graded against golds A, D and E:
#   P1: A A A B      majority A (3/4), right    -> confidence 0.75, correct
#   P2: C D C None   majority C (2/4), wrong    -> confidence 0.5,  wrong
#   P3: E F G H      a 4-way tie, the first (E) -> confidence 0.25, correct
ANSWERS = [["A", "A", "A", "B"], ["C", "D", "C", None], ["E", "F", "G", "H"]]
GRADES = [[True, True, True, False], [False, True, False, False], [True, False, False, False]]


def test_agreement_confidence_and_majority_correctness_by_hand():
    assert agreement_confidence(ANSWERS) == [0.75, 0.5, 0.25]
    assert majority_correctness(ANSWERS, GRADES) == [True, False, True]
    assert majority_vote(["B", "A", "A", "B"]) == (0, 0.5)  # a tie goes to the answer given first
    # no answer is one answer of its own: the three answerless samples are the majority, graded wrong
    assert majority_vote([None, "7", None, None]) == (0, 0.75)
    assert majority_correctness([[None, "7", None, None]], [[False, True, False, False]]) == [False]
    assert agreement_confidence([["x"] * 5]) == [1.0]


def test_expected_calibration_error_by_hand():
    confidence, correct = [0.75, 0.5, 0.25], [True, False, True]
    # 10 bins: one problem in each of (0.7, 0.8], (0.4, 0.5], (0.2, 0.3]:
    # ECE = (|1 - 0.75| + |0 - 0.5| + |1 - 0.25|) / 3 = 1.5 / 3
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.5)
    # 2 bins: [0, 0.5] holds P2 and P3 (accuracy 0.5, confidence 0.375), (0.5, 1] holds P1 (1 vs 0.75):
    # ECE = 2/3 * 0.125 + 1/3 * 0.25 = 1/6
    assert expected_calibration_error(confidence, correct, n_bins=2) == pytest.approx(1 / 6)
    # 1 bin: |mean accuracy - mean confidence| = |2/3 - 0.5|
    assert expected_calibration_error(confidence, correct, n_bins=1) == pytest.approx(1 / 6)
    # Brier = (0.25^2 + 0.5^2 + 0.75^2) / 3 = 0.875 / 3
    assert brier_score(confidence, correct) == pytest.approx(0.875 / 3)


def test_reliability_bins_by_hand():
    bins = reliability_bins([0.75, 0.5, 0.25], [True, False, True], n_bins=2)
    assert bins == [{"low": 0.0, "high": 0.5, "count": 2, "accuracy": 0.5, "confidence": 0.375},
                    {"low": 0.5, "high": 1.0, "count": 1, "accuracy": 1.0, "confidence": 0.75}]
    ten = reliability_bins([0.75, 0.5, 0.25], [True, False, True])
    assert [b["count"] for b in ten] == [0, 0, 1, 0, 1, 0, 0, 1, 0, 0]
    assert ten[0]["accuracy"] is None and ten[0]["confidence"] is None  # an empty bin
    assert ten[7] == {"low": 0.7, "high": 0.8, "count": 1, "accuracy": 1.0, "confidence": 0.75}


def test_a_share_on_a_bin_edge_lands_in_the_bin_it_closes():
    # c/k equal to b/n as fractions: the same float, never one bin off by rounding
    for k in range(1, 21):
        for n_bins in (1, 2, 3, 5, 10, 15, 20):
            shares = [c / k for c in range(k + 1)]
            expected = [max(0, math.ceil(c * n_bins / k) - 1) for c in range(k + 1)]  # exact integer arithmetic
            assert list(bin_index(shares, n_bins)) == expected, (k, n_bins)


def test_all_agree_and_right_is_perfectly_calibrated_all_agree_and_wrong_is_not():
    agree = [["12"] * 4 for _ in range(5)]
    confidence = agreement_confidence(agree)
    assert confidence == [1.0] * 5
    right = majority_correctness(agree, [[True] * 4] * 5)
    wrong = majority_correctness(agree, [[False] * 4] * 5)
    assert expected_calibration_error(confidence, right) == 0.0 and brier_score(confidence, right) == 0.0
    assert expected_calibration_error(confidence, wrong) == 1.0 and brier_score(confidence, wrong) == 1.0


def test_bootstrap_calibration_ci_hand_computed():
    # every problem alike: every resample is the same, the CI a point
    ci = bootstrap_calibration_ci([[1.0] * 6], [[False] * 6], n_boot=200, seed=0)
    assert ci == {"ece": (1.0, 1.0), "brier": (1.0, 1.0), "mean_confidence": (1.0, 1.0),
                  "majority_accuracy": (0.0, 0.0)}
    # two problems at confidence 1, one right one wrong: a resample of 2 is {right, right} (p 1/4, ECE 0),
    # mixed (1/2, ECE 0.5) or {wrong, wrong} (1/4, ECE 1); a 50% interval is [0.5, 0.5], a 99% one [0, 1]
    assert bootstrap_calibration_ci([[1.0, 1.0]], [[True, False]], n_boot=4000, level=0.5)["ece"] == (0.5, 0.5)
    assert bootstrap_calibration_ci([[1.0, 1.0]], [[True, False]], n_boot=4000, level=0.99)["ece"] == (0.0, 1.0)
    # the same resamples as bootstrap_ci: the majority-accuracy CI equals bootstrap_ci of the 0/1 scores
    hits = [True, False, True, True, False, True, False, True]
    ci = bootstrap_calibration_ci([[0.5] * 8], [hits], n_boot=500, seed=3)
    assert ci["majority_accuracy"] == bootstrap_ci([float(h) for h in hits], n_boot=500, seed=3)
    # two seeds: each resample averages the seeds' statistics; the mean confidence CI of (0.5, 1) seeds is 0.75
    two = bootstrap_calibration_ci([[0.5] * 4, [1.0] * 4], [[True] * 4, [True] * 4], n_boot=100)
    assert two["mean_confidence"] == (0.75, 0.75) and two["brier"] == (0.125, 0.125)


def test_calibration_rejects_bad_inputs():
    with pytest.raises(ValueError, match="no samples"):
        majority_vote([])
    with pytest.raises(ValueError, match="no graded samples"):
        agreement_confidence([["a"], []])
    with pytest.raises(ValueError, match="equal length"):
        expected_calibration_error([0.5, 0.5], [True])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        brier_score([1.5], [True])
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error([0.5], [True], n_bins=0)
    with pytest.raises(ValueError, match="differ in shape"):
        majority_correctness([["a", "a"]], [[True]])
