"""trace.router: exact counts, no overlaps, the coverage cap, and correctness routing."""

import math

import pytest
import torch

from trace import router as R

LENGTHS = [8, 5, 12, 1, 0, 7]
T = 12
MASK = torch.arange(T).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(-1)  # unequal lengths, one empty
CORRECT = torch.tensor([True, False, True, False, True, False])


def spans(rows):
    """[B, T] bool mask from {row: [(start, end), ...]}."""
    out = torch.zeros(len(LENGTHS), T, dtype=torch.bool)
    for row, ranges in rows.items():
        for start, end in ranges:
            out[row, start:end] = True
    return out


KEY = spans({0: [(1, 3)], 2: [(0, 2), (5, 9)], 4: []})
ERROR = spans({1: [(1, 4)], 5: [(2, 3)]})


def generator(seed):
    return torch.Generator().manual_seed(seed)


def test_corners():
    assert R.CORNERS["trace_fkl"] == (0.0, 1.0) and R.CORNERS["trace_fkl"].mu_K == 1.0
    assert R.CORNERS["trace_rkl"] == R.Corner(mu_E=1.0, mu_K=0.0)
    assert R.CORNERS["trace_both"] == (1.0, 1.0)


def test_routed_masks_partition_the_response():
    routed = R.RoutedMasks.from_spans(MASK, KEY, ERROR)
    assert torch.equal(routed.key | routed.error | routed.rest, MASK)
    assert not (routed.key & routed.rest).any() and not (routed.error & routed.rest).any()
    assert torch.equal(routed.span, KEY | ERROR)


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.5, 1.0])
def test_random_fraction_has_exact_counts(alpha):
    routed = R.random_fraction_masks(MASK, CORRECT, alpha, generator(0))
    counts = routed.span.sum(-1).tolist()
    assert counts == [math.floor(alpha * n) for n in LENGTHS]
    assert not (routed.span & ~MASK).any()


def test_random_fraction_is_seeded():
    first = R.random_fraction_masks(MASK, CORRECT, 0.25, generator(1)).span
    again = R.random_fraction_masks(MASK, CORRECT, 0.25, generator(1)).span
    other = R.random_fraction_masks(MASK, CORRECT, 0.5, generator(2)).span
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_floor_is_robust_to_float_products():
    mask = torch.ones(1, 100, dtype=torch.bool)
    assert R.coverage_budget(mask, 0.29).item() == 29  # 0.29 * 100 = 28.999999999999996 in floats


def test_correctness_routing():
    routed = R.random_fraction_masks(MASK, CORRECT, 0.5, generator(3))
    assert not routed.key[~CORRECT].any() and not routed.error[CORRECT].any()
    as_key = R.random_fraction_masks(MASK, CORRECT, 0.5, generator(3), route_by="key")
    assert not as_key.error.any() and torch.equal(as_key.key, routed.span)
    with pytest.raises(ValueError):
        R.route_selected(MASK, MASK, CORRECT, route_by="nope")


@pytest.mark.parametrize("seed", range(5))
def test_inverted_fraction_exact_counts_and_never_overlaps_spans(seed):
    alpha = 0.25
    routed = R.inverted_fraction_masks(MASK, KEY, ERROR, CORRECT, alpha, generator(seed))
    assert not (routed.span & (KEY | ERROR)).any()
    assert not (routed.span & ~MASK).any()
    available = (MASK & ~(KEY | ERROR)).sum(-1)
    expected = [min(math.floor(alpha * n), int(a)) for n, a in zip(LENGTHS, available)]
    assert routed.span.sum(-1).tolist() == expected


def test_inverted_fraction_takes_all_that_remains():
    mask = torch.ones(1, 4, dtype=torch.bool)
    key = torch.tensor([[True, True, True, False]])
    routed = R.inverted_fraction_masks(mask, key, torch.zeros_like(key), torch.tensor([True]), 0.5, generator(0))
    assert routed.span.tolist() == [[False, False, False, True]]  # asked for 2, only 1 token is outside spans


def test_cap_keeps_earliest_span_tokens():
    mask = torch.ones(1, 12, dtype=torch.bool)
    span = torch.zeros(1, 12, dtype=torch.bool)
    span[0, 1:3] = True
    span[0, 5:9] = True  # 6 span tokens, budget floor(0.25 · 12) = 3
    capped = R.cap_span_coverage(span, mask, 0.25)
    assert capped[0].nonzero().flatten().tolist() == [1, 2, 5]


@pytest.mark.parametrize("seed", range(5))
def test_cap_never_exceeds_alpha(seed):
    torch.manual_seed(seed)
    key = (torch.rand(len(LENGTHS), T) < 0.6) & CORRECT.unsqueeze(-1)
    error = (torch.rand(len(LENGTHS), T) < 0.6) & ~CORRECT.unsqueeze(-1)
    for alpha in (0.1, 0.25, 0.5):
        routed = R.annotated_masks(MASK, key, error, alpha)
        assert (routed.span.sum(-1) <= torch.tensor([math.floor(alpha * n) for n in LENGTHS])).all()
        assert not (routed.key & ~key).any() and not (routed.error & ~error).any()  # only removes tokens
    uncapped = R.annotated_masks(MASK, key, error, alpha=None)
    assert torch.equal(uncapped.span, (key | error) & MASK)


def test_all_failed_and_none_masks():
    all_tokens = R.all_token_masks(MASK, CORRECT)
    assert torch.equal(all_tokens.span, MASK)
    assert torch.equal(all_tokens.key, MASK & CORRECT.unsqueeze(-1))
    failed = R.failed_rollout_masks(MASK, CORRECT)
    assert not failed.key.any()
    assert torch.equal(failed.error, MASK & ~CORRECT.unsqueeze(-1))
    assert not R.no_span_masks(MASK).span.any()


def test_build_routed_masks_dispatch():
    for strategy in R.ROUTING_STRATEGIES:
        routed = R.build_routed_masks(strategy, MASK, CORRECT, KEY, ERROR, 0.25, generator(0))
        assert torch.equal(routed.key | routed.error | routed.rest, MASK)
    with pytest.raises(ValueError):
        R.build_routed_masks("everything", MASK, CORRECT)


def test_the_coverage_cap_has_one_definition():
    """The router's cap and the annotation contract's cap (issue 12, item 11): the same budget
    floor(α·|y|) computed exactly for the decimal α (α = 1/3, |y| = 3: 0, not float's 1), and the
    same kept tokens (the earliest ones) for the same |y|."""
    import random

    from trace.annotate.contract import cap_coverage
    from trace.annotate.contract import coverage_budget as contract_budget

    rng = random.Random(0)
    for alpha in (1 / 3, 0.25, 0.29, 0.1, 2 / 3, 0.7):
        for n in range(0, 120):
            mask = torch.zeros(1, 130, dtype=torch.bool)
            mask[0, :n] = True
            assert R.coverage_budget(mask, alpha).item() == contract_budget(n, alpha), (alpha, n)
            marked = [rng.random() < 0.6 for _ in range(n)]
            span = torch.zeros(1, 130, dtype=torch.bool)
            span[0, :n] = torch.tensor(marked, dtype=torch.bool)
            assert R.cap_span_coverage(span, mask, alpha)[0, :n].tolist() == cap_coverage(marked, alpha)
