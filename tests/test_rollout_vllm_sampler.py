"""vLLM's CPU top-k + top-p sampler without the full-vocabulary sort (trace/rollout/vllm_engine.py): the
same logits as vLLM's own ``apply_top_k_top_p_pytorch``, bit for bit, on Qwen3's vocabulary size too."""
import pytest
import torch

sampler = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler", reason="vLLM is not installed")

from trace.rollout.vllm_engine import fast_top_k_top_p, install_fast_cpu_top_k_top_p  # noqa: E402

FULL_SORT = sampler.apply_top_k_top_p_pytorch
if getattr(FULL_SORT, "trace_fast", False):  # installed by an engine built earlier in this process
    FULL_SORT = FULL_SORT.keywords["full_sort"]


def both(logits, k, p):
    fast = fast_top_k_top_p(logits.clone(), k, p, True, full_sort=FULL_SORT)
    return fast, FULL_SORT(logits.clone(), k, p, True)


@pytest.mark.parametrize("vocab", [64, 151_936])
@pytest.mark.parametrize("use_k, use_p", [(True, True), (True, False), (False, True)])
def test_same_logits_as_the_full_sort(vocab, use_k, use_p):
    generator = torch.Generator().manual_seed(vocab)
    cut_by_p = 0
    for trial in range(20 if vocab < 1000 else 6):
        rows = 1 + trial % 6
        logits = torch.randn(rows, vocab, generator=generator) * (0.3 + trial % 4)
        k = torch.randint(2, 40, (rows,), generator=generator) if use_k else None
        p = torch.rand(rows, generator=generator) * 0.98 + 0.01 if use_p else None
        fast, full = both(logits, k, p)
        assert torch.equal(fast, full), (trial, k, p)
        kept = torch.isfinite(fast).sum(dim=1)
        assert (kept >= 1).all() and (k is None or (kept <= k).all())
        cut_by_p += int((kept < (k if k is not None else vocab)).sum())
    assert (cut_by_p > 0) == use_p  # top-p truncated some rows beyond their top-k: the case is exercised


def test_ties_and_rows_without_top_k_take_the_full_sort():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0], [4.0, 3.0, 2.0, 1.0, 0.0]])
    k, p = torch.tensor([2, 5]), torch.tensor([0.99, 0.5])  # row 0: a tie at the 2nd value; row 1: k = vocab
    fast, full = both(logits, k, p)
    assert torch.equal(fast, full)
    assert torch.isfinite(fast[0]).sum() == 3  # vLLM keeps both tied values: 3 survivors for k = 2


def test_installing_routes_vllms_sampler_through_it_once():
    install_fast_cpu_top_k_top_p()
    install_fast_cpu_top_k_top_p()
    installed = sampler.apply_top_k_top_p_pytorch
    assert installed.trace_fast and installed.keywords["full_sort"] is FULL_SORT
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    k, p = torch.tensor([5, 20, 1]), torch.tensor([0.9, 0.95, 0.5])
    assert torch.equal(sampler.apply_top_k_top_p(logits.clone(), k, p), FULL_SORT(logits.clone(), k, p, True))
