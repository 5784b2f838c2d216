"""Sampling metrics for the evaluation tables (spec §6): avg@k, unbiased pass@k, bootstrap CIs; and the
calibration of agreement confidence over the k samples (issue 23): majority vote, ECE, reliability bins,
Brier score.

Inputs are per-problem lists of per-sample correctness (``correct[i][j]``: sample j of
problem i was graded correct) or of per-sample final answers.
"""
from __future__ import annotations

from collections import Counter
from typing import Hashable, Sequence

import numpy as np


def _check_nonempty(correct: Sequence[Sequence[bool]]) -> None:
    if len(correct) == 0:
        raise ValueError("no problems to score")
    empty = [i for i, samples in enumerate(correct) if len(samples) == 0]
    if empty:
        raise ValueError(f"problems {empty[:5]} have no graded samples")


def per_problem_accuracy(correct: Sequence[Sequence[bool]]) -> list[float]:
    """Fraction of correct samples for each problem."""
    _check_nonempty(correct)
    return [sum(map(bool, samples)) / len(samples) for samples in correct]


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of correct samples (the paper's avg@k)."""
    return float(np.mean(per_problem_accuracy(correct)))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, Eq. 1).

    1 - C(n-c, k) / C(n, k), computed as a running product so large n does not overflow.
    """
    if not (0 <= c <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every size-k subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems (each problem uses all of its samples as n)."""
    _check_nonempty(correct)
    return float(np.mean([pass_at_k(len(samples), sum(map(bool, samples)), k) for samples in correct]))


def bootstrap_ci(per_problem_scores: Sequence[float], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean score, resampling problems with replacement."""
    scores = np.asarray(per_problem_scores, dtype=float)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D list of scores, got shape {scores.shape}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    resampled = rng.integers(0, scores.size, size=(n_boot, scores.size))
    means = scores[resampled].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------
# Calibration of agreement confidence (issue 23): inputs are per-problem lists of the k
# samples' final answers (hashable; None = the sample gave no answer) and, where needed,
# per-problem correctness of the majority answer.
# ---------------------------------------------------------------------------------------

def majority_vote(answers: Sequence[Hashable | None]) -> tuple[int, float]:
    """(index of the first sample giving the most common answer, that answer's share of the samples).

    ``None`` (no extractable answer) is one answer of its own: the samples without an answer agree with
    each other and with nothing else, and "no answer" can be the majority. Ties go to the answer given
    first (the lowest sample index).
    """
    if len(answers) == 0:
        raise ValueError("majority_vote: a problem has no samples")
    counts = Counter(answers)  # insertion order: first occurrence, so most_common breaks ties by it
    answer, count = counts.most_common(1)[0]
    return list(answers).index(answer), count / len(answers)


def agreement_confidence(answers: Sequence[Sequence[Hashable | None]]) -> list[float]:
    """Per problem: the share of its samples whose answer equals the majority (most common) answer."""
    _check_nonempty(answers)
    return [majority_vote(samples)[1] for samples in answers]


def majority_correctness(answers: Sequence[Sequence[Hashable | None]],
                         correct: Sequence[Sequence[bool]]) -> list[bool]:
    """Per problem: the grade of the majority answer, i.e. of the first sample that gave it
    (``correct[i][j]``: sample j of problem i graded correct)."""
    _check_nonempty(answers)
    if [len(a) for a in answers] != [len(c) for c in correct]:
        raise ValueError("majority_correctness: answers and grades differ in shape")
    return [bool(grades[majority_vote(samples)[0]]) for samples, grades in zip(answers, correct)]


def _calibration_arrays(confidence: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    conf, hit = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    if conf.ndim != 1 or conf.size == 0 or conf.shape != hit.shape:
        raise ValueError(f"calibration needs two non-empty 1-D sequences of equal length, got shapes "
                         f"{conf.shape} and {hit.shape}")
    if np.any((conf < 0) | (conf > 1)) or np.isnan(conf).any():
        raise ValueError("calibration: confidences must lie in [0, 1]")
    return conf, hit


def bin_index(confidence, n_bins: int) -> np.ndarray:
    """Equal-width bin of each confidence: bin b holds (b/n, (b+1)/n], bin 0 also holds 0.

    The edges are b/n_bins by float division, so a share c/k equal to an edge as a fraction is the same
    float and lands in the bin it closes (0.5 in (0.4, 0.5] with 10 bins), never one off by rounding.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.arange(1, n_bins, dtype=float) / n_bins  # the inner edges 1/n ... (n-1)/n
    return np.searchsorted(edges, np.asarray(confidence, dtype=float), side="left")


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> list[dict]:
    """The reliability diagram's numbers: per equal-width bin (see :func:`bin_index`) its edges, the number
    of problems in it, their accuracy and their mean confidence (None for an empty bin)."""
    conf, hit = _calibration_arrays(confidence, correct)
    bins = bin_index(conf, n_bins)
    out = []
    for b in range(n_bins):
        inside = bins == b
        count = int(inside.sum())
        out.append({"low": b / n_bins, "high": (b + 1) / n_bins, "count": count,
                    "accuracy": float(hit[inside].mean()) if count else None,
                    "confidence": float(conf[inside].mean()) if count else None})
    return out


def _ece_rows(conf: np.ndarray, hit: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of each row of (rows, n) arrays (vectorised for the bootstrap)."""
    rows, n = conf.shape
    slot = bin_index(conf, n_bins) + n_bins * np.arange(rows)[:, None]
    size = rows * n_bins
    gap = (np.bincount(slot.ravel(), weights=conf.ravel(), minlength=size)
           - np.bincount(slot.ravel(), weights=hit.ravel(), minlength=size))
    return np.abs(gap).reshape(rows, n_bins).sum(axis=1) / n


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """ECE = Σ_b (n_b / n) · |accuracy_b − mean confidence_b| over equal-width bins (:func:`bin_index`)."""
    conf, hit = _calibration_arrays(confidence, correct)
    return float(_ece_rows(conf[None, :], hit[None, :], n_bins)[0])


def brier_score(confidence: Sequence[float], correct: Sequence[bool]) -> float:
    """Mean squared difference between confidence and correctness (0 or 1)."""
    conf, hit = _calibration_arrays(confidence, correct)
    return float(np.mean((conf - hit) ** 2))


CALIBRATION_STATISTICS = ("ece", "brier", "mean_confidence", "majority_accuracy")


def calibration_statistics(confidence, correct, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Every calibration statistic of each row of (rows, n) arrays (or of one 1-D pair, as 1-element arrays)."""
    conf, hit = np.atleast_2d(np.asarray(confidence, dtype=float)), np.atleast_2d(np.asarray(correct, dtype=float))
    return {"ece": _ece_rows(conf, hit, n_bins), "brier": ((conf - hit) ** 2).mean(axis=1),
            "mean_confidence": conf.mean(axis=1), "majority_accuracy": hit.mean(axis=1)}


def bootstrap_calibration_ci(confidence: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]],
                             n_bins: int = 10, n_boot: int = 1000, seed: int = 0,
                             level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of :data:`CALIBRATION_STATISTICS`, resampling problems with replacement.

    ``confidence[s][i]`` / ``correct[s][i]``: problem i in replicate s (a training seed), the same problems
    in every replicate; each resample draws one set of problems for all replicates and averages the
    replicates' statistics (the table's value is that average). The ECE of a resample is a plug-in
    estimate: with few problems per bin it is biased upward, and so is its interval."""
    conf, hit = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    if conf.ndim != 2 or conf.shape != hit.shape or conf.size == 0:
        raise ValueError(f"bootstrap_calibration_ci needs two (replicates, problems) arrays, got shapes "
                         f"{conf.shape} and {hit.shape}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"bootstrap_calibration_ci: need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
    _calibration_arrays(conf.ravel(), hit.ravel())
    resampled = np.random.default_rng(seed).integers(0, conf.shape[1], size=(n_boot, conf.shape[1]))
    totals = {name: np.zeros(n_boot) for name in CALIBRATION_STATISTICS}
    for replicate_conf, replicate_hit in zip(conf, hit):
        for name, values in calibration_statistics(replicate_conf[resampled], replicate_hit[resampled],
                                                   n_bins).items():
            totals[name] += values
    tail = (1 - level) / 2
    return {name: tuple(float(q) for q in np.quantile(total / conf.shape[0], [tail, 1 - tail]))
            for name, total in totals.items()}
