"""Sampling metrics for the evaluation tables (spec §6): avg@k, unbiased pass@k, bootstrap CIs.

Inputs are per-problem lists of per-sample correctness (``correct[i][j]``: sample j of
problem i was graded correct).
"""
from __future__ import annotations

from typing import Sequence

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
