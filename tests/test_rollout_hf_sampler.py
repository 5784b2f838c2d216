"""transformers' top-p warper without the full-vocabulary sort (trace/rollout/hf.py): the same scores as
transformers' own, bit for bit, after top-k as generate applies it, on Qwen3's vocabulary size too."""
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from trace.rollout.hf import fast_top_p_call, install_fast_top_p

FULL_SORT = getattr(TopPLogitsWarper.__call__, "full_sort", TopPLogitsWarper.__call__)


def both(warper, scores):
    return fast_top_p_call(warper, None, scores.clone(), full_sort=FULL_SORT), FULL_SORT(warper, None, scores.clone())


@pytest.mark.parametrize("vocab", [400, 151_936])
def test_same_scores_as_the_full_sort_after_top_k(vocab):
    generator = torch.Generator().manual_seed(vocab)
    cut = 0
    for trial in range(12):
        rows = 1 + trial % 5
        scores = torch.randn(rows, vocab, generator=generator) * (0.3 + trial % 4)
        scores = TopKLogitsWarper([5, 20, 40][trial % 3])(None, scores)
        warper = TopPLogitsWarper(float(torch.rand(1, generator=generator)) * 0.98 + 0.01,
                                  min_tokens_to_keep=1 + trial % 2)
        fast, full = both(warper, scores)
        assert torch.equal(fast, full), trial
        cut += int((torch.isfinite(fast).sum(dim=1) < torch.isfinite(scores).sum(dim=1)).sum())
    assert cut > 0  # top-p removed some of top-k's survivors: the case is exercised


def test_ties_and_untruncated_scores_take_the_full_sort():
    tied = torch.tensor([[2.0, 2.0, 1.0, -float("inf"), -float("inf"), -float("inf"), -float("inf"), -float("inf")]])
    warper = TopPLogitsWarper(0.5)
    fast, full = both(warper, tied)
    assert torch.equal(fast, full) and torch.isfinite(fast).sum() == 2  # the tied pair survives, the 1.0 does not
    dense = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))  # no top-k before: nothing to skip
    fast, full = both(warper, dense)
    assert torch.equal(fast, full)


def test_installing_routes_generate_through_it_once():
    install_fast_top_p()
    install_fast_top_p()
    assert TopPLogitsWarper.__call__.trace_fast and TopPLogitsWarper.__call__.full_sort is FULL_SORT
    scores = TopKLogitsWarper(20)(None, torch.randn(4, 5000, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(TopPLogitsWarper(0.9)(None, scores.clone()), FULL_SORT(TopPLogitsWarper(0.9), None, scores))
