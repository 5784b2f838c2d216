"""trace.losses against numbers computed by hand on 2–4-category distributions, and against naive
per-token reference implementations for the gradients."""

import math

import pytest
import torch
from torch.testing import assert_close

from trace import losses as L
from trace.schedule import LambdaSchedule


def t(values, **kw):
    return torch.tensor(values, dtype=torch.float32, **kw)


def logits_of(probs):
    """Logits whose softmax is exactly `probs`."""
    return t(probs).log()


# ---------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------


def test_grpo_advantages_by_hand():
    rewards = t([1, 0, 0, 0, 1, 1, 1, 1])
    # group 1: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5; group 2: all equal → 0
    std = 0.5 + 1e-6  # eps = 1e-6 keeps all-equal groups at 0 / eps = 0
    expected = t([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std, 0, 0, 0, 0])
    assert_close(L.ADVANTAGE_ESTIMATORS["grpo"](rewards, group_size=4), expected)
    assert_close(L.ADVANTAGE_ESTIMATORS["grpo_no_std"](rewards, group_size=4), t([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert torch.equal(L.grpo_advantages(t([0, 0, 0, 0]), 4), torch.zeros(4))


def test_grpo_advantages_rejects_bad_groups():
    with pytest.raises(ValueError):
        L.grpo_advantages(t([1, 0, 1]), 2)
    with pytest.raises(ValueError):
        L.grpo_advantages(t([1, 0]), 1)


# ---------------------------------------------------------------------------------------------
# PPO clipped term
# ---------------------------------------------------------------------------------------------


def ppo_on_ratios(ratios, advantage, **kw):
    logp = t(ratios).log().requires_grad_()
    loss, stats = L.ppo_clip_per_token(logp.unsqueeze(0), torch.zeros(1, len(ratios)), t([advantage]), **kw)
    loss.sum().backward()
    return loss[0].detach(), logp.grad, stats


def test_ppo_clip_higher_positive_advantage():
    # A = +1: loss = max(−r, −clip(r, 0.8, 1.28)); the clip binds (zero gradient) only above 1.28
    loss, grad, stats = ppo_on_ratios([0.5, 1.0, 1.25, 1.5], 1.0)
    assert_close(loss, t([-0.5, -1.0, -1.25, -1.28]))
    assert_close(grad, t([-0.5, -1.0, -1.25, 0.0]))  # d(−r)/dlog r = −r
    assert stats["clipped_high"][0].tolist() == [False, False, False, True]
    assert not stats["clipped_low"].any()
    # symmetric clipping at 0.2 would have clipped 1.25 to 1.2: clip-higher is what keeps it
    loss_sym, _, _ = ppo_on_ratios([1.25], 1.0, eps_high=0.2)
    assert_close(loss_sym, t([-1.2]))


def test_ppo_negative_advantage_and_dual_clip():
    # A = −1: loss = max(r, clip(r, 0.8, 1.28)); low ratios are clipped at 0.8, high ones are unbounded
    loss, grad, stats = ppo_on_ratios([0.5, 0.9, 1.5, 4.0], -1.0)
    assert_close(loss, t([0.8, 0.9, 1.5, 4.0]))
    assert_close(grad, t([0.0, 0.9, 1.5, 4.0]))
    assert stats["clipped_low"][0].tolist() == [True, False, False, False]
    # dual clip c = 3 caps the last token at c·|A| = 3 and stops its gradient
    loss, grad, stats = ppo_on_ratios([0.5, 0.9, 1.5, 4.0], -1.0, dual_clip_c=3.0)
    assert_close(loss, t([0.8, 0.9, 1.5, 3.0]))
    assert_close(grad, t([0.0, 0.9, 1.5, 0.0]))
    assert stats["dual_clipped"][0].tolist() == [False, False, False, True]
    with pytest.raises(ValueError):
        ppo_on_ratios([1.0], -1.0, dual_clip_c=0.5)


def test_ppo_per_token_advantages_broadcast_and_fractions():
    logp, old = torch.randn(2, 3), torch.randn(2, 3)
    adv = t([0.5, -2.0])
    per_seq, _ = L.ppo_clip_per_token(logp, old, adv)
    per_tok, _ = L.ppo_clip_per_token(logp, old, adv.unsqueeze(-1).expand(2, 3))
    assert torch.equal(per_seq, per_tok)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    _, stats = L.ppo_clip_per_token(t([[1.0, 0.0, 5.0], [0.0, 0, 0]]).log1p(), torch.zeros(2, 3), t([1.0, 1.0]), mask=mask)
    # ratios 2, 1, (6: masked out), 1 → one clipped token among 3 valid ones
    assert_close(stats["clipped_high_frac"], torch.tensor(1 / 3))


def test_ppo_log_ratio_is_clamped():
    loss, _ = L.ppo_clip_per_token(t([[100.0]]), t([[0.0]]), t([-1.0]))
    assert_close(loss, t([[math.exp(20.0)]]))  # finite, not inf


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------

PER_TOKEN = t([[1, 2, 3, 4], [10, 20, float("nan"), float("nan")], [6, 0, 0, 0]])  # NaN padding must not leak
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)


def test_aggregation_modes_by_hand():
    assert_close(L.aggregate(PER_TOKEN, MASK, "token-mean"), torch.tensor((10 + 30 + 6) / 7))
    assert_close(L.aggregate(PER_TOKEN, MASK, "seq-mean-token-mean"), torch.tensor((2.5 + 15 + 6) / 3))
    assert_close(L.aggregate(PER_TOKEN, MASK, "seq-mean-token-sum-norm", max_len=8),
                 torch.tensor((10 / 8 + 30 / 8 + 6 / 8) / 3))
    assert_close(L.aggregate(PER_TOKEN, MASK, "seq-mean-token-sum-norm"), torch.tensor((10 / 4 + 30 / 4 + 6 / 4) / 3))


@pytest.mark.parametrize("mode", list(L.AGGREGATIONS))
def test_micro_batches_sum_to_full_batch(mode):
    per_token = PER_TOKEN.clone().requires_grad_()
    full = L.aggregate(per_token, MASK, mode, max_len=4)
    (full_grad,) = torch.autograd.grad(full, per_token)

    micro = [slice(0, 1), slice(1, 3)]  # unequal micro-batches of unequal-length sequences
    counts = L.count_normalizers(*(MASK[rows] for rows in micro))
    assert counts["global_tokens"] == 7 and counts["global_seqs"] == 3
    summed = sum(L.aggregate(per_token[rows], MASK[rows], mode, max_len=4, **counts) for rows in micro)
    (summed_grad,) = torch.autograd.grad(summed, per_token)
    assert_close(summed, full)
    assert_close(summed_grad, full_grad, equal_nan=True)


def test_local_normalisation_would_be_wrong():
    # the §8 pitfall: dividing each micro-batch by its own count re-weights tokens
    local = L.aggregate(PER_TOKEN[:1], MASK[:1]) + L.aggregate(PER_TOKEN[1:], MASK[1:])
    assert not torch.isclose(local, L.aggregate(PER_TOKEN, MASK))


# ---------------------------------------------------------------------------------------------
# divergences: full vocabulary, by hand
# ---------------------------------------------------------------------------------------------

P = [0.5, 0.3, 0.2]  # student
Q = [0.2, 0.2, 0.6]  # teacher


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def test_kl_directions_by_hand():
    fkl = L.routed_divergence(logits_of([P]), logits_of([Q]), "fkl", entry_clip=None)
    rkl = L.routed_divergence(logits_of([P]), logits_of([Q]), "rkl", entry_clip=None)
    # KL(q‖p) = 0.2·ln(0.2/0.5) + 0.2·ln(0.2/0.3) + 0.6·ln(0.6/0.2)
    assert_close(fkl, t([0.2 * math.log(0.4) + 0.2 * math.log(2 / 3) + 0.6 * math.log(3)]))
    # KL(p‖q) = 0.5·ln(0.5/0.2) + 0.3·ln(0.3/0.2) + 0.2·ln(0.2/0.6)
    assert_close(rkl, t([0.5 * math.log(2.5) + 0.3 * math.log(1.5) + 0.2 * math.log(1 / 3)]))
    assert not torch.isclose(fkl, rkl)  # the directions really differ here


def test_jsd_by_hand():
    m = [0.5 * q + 0.5 * p for p, q in zip(P, Q)]  # [0.35, 0.25, 0.4]
    jsd = L.routed_divergence(logits_of([P]), logits_of([Q]), "jsd", beta=0.5, entry_clip=None)
    assert_close(jsd, t([0.5 * kl(Q, m) + 0.5 * kl(P, m)]))
    m = [0.25 * q + 0.75 * p for p, q in zip(P, Q)]
    jsd = L.routed_divergence(logits_of([P]), logits_of([Q]), "jsd", beta=0.25, entry_clip=None)
    assert_close(jsd, t([0.25 * kl(Q, m) + 0.75 * kl(P, m)]))
    # the endpoints are the two KLs
    for beta, kind in ((0.0, "fkl"), (1.0, "rkl")):
        assert_close(L.routed_divergence(logits_of([P]), logits_of([Q]), "jsd", beta=beta, entry_clip=None),
                     L.routed_divergence(logits_of([P]), logits_of([Q]), kind, entry_clip=None))


def test_per_entry_terms_and_clip_by_hand():
    # FKL terms q·ln(q/p) − q + p = [0.1167, 0.0189, 0.2592]; the clip scales the token's KL by
    # s = 0.05 / 0.2592 so that the largest entry contributes exactly 0.05 and every other one less
    terms = L.divergence_terms(logits_of([P]), logits_of([Q]), "fkl")
    expected = [q * math.log(q / p) - q + p for p, q in zip(P, Q)]
    assert_close(terms, t([expected]))
    clipped = L.routed_divergence(logits_of([P]), logits_of([Q]), "fkl", entry_clip=0.05)
    assert_close(clipped, t([0.05 / expected[2] * sum(expected)]))
    assert_close(L.entry_clip_scale(terms, 0.05), t([0.05 / expected[2]]))
    assert_close(L.entry_clip_scale(terms, 0.5), t([1.0]))   # no entry above the clip: untouched


def test_naive_entry_clip_flips_sign_ours_does_not():
    a, b = [0.3, 0.3, 0.4], [0.45, 0.45, 0.1]  # a = teacher, b = student for FKL
    naive = sum(min(max(x * math.log(x / y), -0.05), 0.05) for x, y in zip(a, b))
    assert naive < 0  # clamping the raw entries to [−c, c] gives a NEGATIVE "KL"
    ours = L.routed_divergence(logits_of([b]), logits_of([a]), "fkl", entry_clip=0.05)
    terms = [x * math.log(x / y) - x + y for x, y in zip(a, b)]  # [0.0284, 0.0284, 0.0386]: none above 0.05
    assert_close(ours, t([min(1.0, 0.05 / max(terms)) * sum(terms)]))
    assert ours.item() > 0


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_clip_bounds_every_entry_contribution(kind):
    """Each entry's share of the clipped loss, s·t_v, is ≤ c (= c on the largest entry of a clipped
    row) and ≥ 0; rows whose entries are all ≤ c are left as they are."""
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 6) * 2, torch.randn(4, 6) * 2
    terms = L.divergence_terms(student, teacher, kind)
    scale = L.entry_clip_scale(terms, 0.05)
    shares = scale.unsqueeze(-1) * terms
    assert (terms >= 0).all() and (shares <= 0.05 + 1e-7).all()
    clipped_rows = terms.amax(-1) > 0.05
    assert clipped_rows.any()
    assert_close(shares.amax(-1)[clipped_rows], torch.full((int(clipped_rows.sum()),), 0.05))
    assert torch.equal(scale[~clipped_rows], torch.ones(int((~clipped_rows).sum())))


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("top_k,tail", [(None, True), (3, True), (3, False)])
def test_clipped_divergence_nonnegative_and_grad_is_scaled_kl_gradient(kind, top_k, tail):
    torch.manual_seed(1)
    student = (torch.randn(5, 7) * 2).requires_grad_()
    teacher = torch.randn(5, 7) * 2
    kw = dict(kind=kind, top_k=top_k, tail_bucket=tail)
    clipped = L.routed_divergence(student, teacher, entry_clip=0.05, **kw)
    assert (clipped >= 0).all()
    (grad,) = torch.autograd.grad(clipped.sum(), student)
    terms = L.divergence_terms(student, teacher, **kw)
    scale = L.entry_clip_scale(terms, 0.05)
    assert (scale < 1).any()
    (grad_kl,) = torch.autograd.grad((scale * terms.sum(-1)).sum(), student)
    assert_close(grad, grad_kl)


def _descent_inner_products(kind, top_k=None, tail=True, rows=2000, seed=0):
    """⟨g_clip, g_KL⟩ per row in LOGIT space on random peaky student/teacher pairs."""
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, 16, generator=gen) * 4).requires_grad_()
    teacher = torch.randn(rows, 16, generator=gen) * 4
    kw = dict(kind=kind, top_k=top_k, tail_bucket=tail)
    (g_clip,) = torch.autograd.grad(L.routed_divergence(student, teacher, entry_clip=0.05, **kw).sum(), student)
    (g_kl,) = torch.autograd.grad(L.routed_divergence(student, teacher, entry_clip=None, **kw).sum(), student)
    return (g_clip * g_kl).sum(-1), g_kl


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("top_k,tail", [(None, True), (4, True), (4, False)])
def test_entry_clip_is_a_descent_direction_in_logit_space(kind, top_k, tail):
    """Issue 12, item 13: on random peaky pairs the clipped loss's logit gradient never points uphill
    for the KL it stands for (the per-entry clamp did on 16–86 % of rows)."""
    inner, g_kl = _descent_inner_products(kind, top_k, tail)
    uphill = (inner < -1e-7 * g_kl.pow(2).sum(-1).clamp(min=1e-12)).float().mean().item()
    print(f"{kind} top_k={top_k} tail={tail}: uphill fraction {uphill:.3f}")
    assert uphill == 0.0


def test_entry_clip_on_the_issue_example():
    """FKL, student logits [3, 0, 0, −3], teacher [0, 0, 0, 3]: the unclipped logit gradient is p − q =
    [0.864, 0.002, 0.002, −0.868]; the clipped one must point the same way (here: scaled down), not raise
    the token the student already over-allocates."""
    student = torch.tensor([[3.0, 0.0, 0.0, -3.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    (g_kl,) = torch.autograd.grad(L.routed_divergence(student, teacher, "fkl", entry_clip=None).sum(), student)
    assert_close(g_kl, student.detach().softmax(-1) - teacher.softmax(-1))
    assert_close(g_kl, t([[0.864, 0.002, 0.002, -0.868]]), atol=2e-3, rtol=0)
    clipped = L.routed_divergence(student, teacher, "fkl", entry_clip=0.05)
    (g_clip,) = torch.autograd.grad(clipped.sum(), student)
    terms = L.divergence_terms(student, teacher, "fkl").detach()
    scale = 0.05 / terms.max()                          # the largest entry is brought down to the clip
    assert_close(g_clip, scale * g_kl)
    assert_close(clipped, scale * terms.sum(-1))
    assert g_clip[0, 0] > 0 and (g_clip * g_kl).sum() > 0


@pytest.mark.parametrize("kind,a_is_teacher", [("fkl", True), ("rkl", False)])
def test_unclipped_terms_have_the_plain_kl_gradient(kind, a_is_teacher):
    """Σ_v (−a_v + b_v) = 0, so the Bregman form changes neither the value nor the gradient."""
    torch.manual_seed(2)
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5)
    ours = L.routed_divergence(student, teacher, kind, entry_clip=None)
    logp, logq = student.log_softmax(-1), teacher.log_softmax(-1)
    log_a, log_b = (logq, logp) if a_is_teacher else (logp, logq)
    plain = (log_a.exp() * (log_a - log_b)).sum(-1)
    assert_close(ours, plain)
    assert_close(torch.autograd.grad(ours.sum(), student)[0], torch.autograd.grad(plain.sum(), student)[0])


# ---------------------------------------------------------------------------------------------
# top-K, by hand
# ---------------------------------------------------------------------------------------------

P4 = [0.5, 0.25, 0.15, 0.1]  # student's top-2: ids 0, 1
Q4 = [0.1, 0.2, 0.3, 0.4]  # teacher's top-2: ids 3, 2


def test_top_k_fkl_uses_teacher_support():
    with_tail = L.routed_divergence(logits_of([P4]), logits_of([Q4]), "fkl", top_k=2, entry_clip=None)
    # support {3, 2}: q = [0.4, 0.3 | tail 0.3], p = [0.1, 0.15 | tail 0.75]
    assert_close(with_tail, t([kl([0.4, 0.3, 0.3], [0.1, 0.15, 0.75])]))
    no_tail = L.routed_divergence(logits_of([P4]), logits_of([Q4]), "fkl", top_k=2, tail_bucket=False, entry_clip=None)
    # renormalised on the support: q = [4/7, 3/7], p = [0.4, 0.6]
    assert_close(no_tail, t([kl([4 / 7, 3 / 7], [0.4, 0.6])]))


def test_top_k_rkl_uses_student_support():
    with_tail = L.routed_divergence(logits_of([P4]), logits_of([Q4]), "rkl", top_k=2, entry_clip=None)
    # support {0, 1}: p = [0.5, 0.25 | tail 0.25], q = [0.1, 0.2 | tail 0.7]
    assert_close(with_tail, t([kl([0.5, 0.25, 0.25], [0.1, 0.2, 0.7])]))
    no_tail = L.routed_divergence(logits_of([P4]), logits_of([Q4]), "rkl", top_k=2, tail_bucket=False, entry_clip=None)
    assert_close(no_tail, t([kl([2 / 3, 1 / 3], [1 / 3, 2 / 3])]))


def test_tail_bucket_charges_mass_outside_the_support():
    # student moves mass from its top-2 to id 3 (outside the support): only the tail bucket notices
    before = logits_of([[0.5, 0.3, 0.2, 0.0001]])
    after = logits_of([[0.45, 0.27, 0.18, 0.1]])  # same ratios inside the support
    teacher = logits_of([[0.5, 0.3, 0.2, 0.0001]])
    for tail, changes in ((False, False), (True, True)):
        values = [L.routed_divergence(s, teacher, "rkl", top_k=2, tail_bucket=tail, entry_clip=None) for s in (before, after)]
        assert (not torch.isclose(values[0], values[1]).item()) == changes


def _top_k_tail_kl_float64(student_logits, teacher_logits, kind, k):
    """Reference in float64: the top-K categories of the support plus one tail bucket."""
    logp, logq = student_logits.double().log_softmax(-1), teacher_logits.double().log_softmax(-1)
    ids = (logq if kind == "fkl" else logp).topk(k, -1).indices
    cats = []
    for logx in (logp, logq):
        top = logx.gather(-1, ids)
        tail = logx.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
        cats.append(torch.cat([top, tail], -1))
    log_a, log_b = (cats[1], cats[0]) if kind == "fkl" else (cats[0], cats[1])
    return (log_a.exp() * (log_a - log_b)).sum(-1)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_top_k_tail_bucket_is_exact_in_float32_when_the_top_k_holds_almost_all_mass(kind):
    """Issue 12, item 14: 1 − Σ_topK in float32 loses the tail when Σ_topK ≈ 1 (the tail's log-mass is
    computed as a logsumexp over the entries outside the top-K instead)."""
    gen = torch.Generator().manual_seed(0)
    V, K = 64, 4
    student = torch.randn(8, V, generator=gen)
    teacher = torch.randn(8, V, generator=gen)
    support = student if kind == "rkl" else teacher        # whose top-K forms the support: a fat tail
    other = teacher if kind == "rkl" else student          # the other side: ~all its mass on that top-K
    ids = support.topk(K, -1).indices
    support.scatter_(-1, ids, support.gather(-1, ids) + 2.0)
    other.scatter_(-1, ids, 25.0 + torch.rand(8, K, generator=gen))
    ours = L.routed_divergence(student, teacher, kind, top_k=K, entry_clip=None)
    reference = _top_k_tail_kl_float64(student, teacher, kind, K)
    assert ours.dtype == torch.float32
    assert_close(ours.double(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", list(L.AGGREGATIONS))
def test_all_padding_rows_are_not_sequences(mode):
    """Convention: a row with no valid token (all padding) is not a sequence. It contributes 0 and is
    not counted in the sequence normaliser, locally or via count_normalizers, in every mode; the
    loss (and its gradient) of the other rows is the same with or without it, NaN padding included."""
    per_token = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]).requires_grad_()
    mask = torch.tensor([[True, True, True], [True, False, False]])
    padded = torch.cat([per_token, torch.full((1, 3), float("nan"))])
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])
    counts = L.count_normalizers(padded_mask)
    assert counts["global_seqs"].item() == 2 and counts["global_tokens"].item() == 4
    plain = L.aggregate(per_token, mask, mode, max_len=3)
    for value in (L.aggregate(padded, padded_mask, mode, max_len=3),
                  L.aggregate(padded, padded_mask, mode, counts["global_tokens"], counts["global_seqs"], 3)):
        assert_close(value, plain)
        (grad,) = torch.autograd.grad(value, per_token)
        assert_close(grad, torch.autograd.grad(plain, per_token, retain_graph=True)[0])
    everything_padded = L.aggregate(torch.full((2, 3), float("nan")), torch.zeros(2, 3, dtype=torch.bool), mode,
                                    max_len=3)
    assert everything_padded.item() == 0.0


def test_top_k_equal_to_vocab_with_tail_is_full_kl():
    torch.manual_seed(3)
    s, q = torch.randn(4, 6), torch.randn(4, 6)
    for kind in ("fkl", "rkl", "jsd"):
        assert_close(L.routed_divergence(s, q, kind, top_k=6, entry_clip=None),
                     L.routed_divergence(s, q, kind, entry_clip=None), atol=1e-5, rtol=1e-5)


def test_infinite_logits_do_not_produce_nan():
    s = t([[0.0, 1.0, float("-inf")]]).requires_grad_()
    q = t([[1.0, 0.0, float("-inf")]])
    for kind in ("fkl", "rkl", "jsd"):
        value = L.routed_divergence(s, q, kind, top_k=2)
        (grad,) = torch.autograd.grad(value.sum(), s)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------
# chunked divergence vs a naive reference
# ---------------------------------------------------------------------------------------------


def naive_kl_from_hidden(student_h, teacher_h, weight, teacher_weight, kind):
    logp = (student_h @ weight.T).log_softmax(-1)
    logq = (teacher_h @ teacher_weight.T).log_softmax(-1).detach()
    if kind == "fkl":
        return (logq.exp() * (logq - logp)).sum(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("separate_teacher", [False, True])
def test_chunked_divergence_matches_naive_values_and_grads(kind, separate_teacher):
    torch.manual_seed(4)
    N, d, V = 7, 5, 11
    student_h = torch.randn(N, d, requires_grad=True)
    teacher_h = torch.randn(N, d)
    weight = torch.randn(V, d, requires_grad=True)
    teacher_weight = torch.randn(V, d) if separate_teacher else weight
    chunked = L.chunked_divergence(student_h, teacher_h, weight, kind, chunk_size=3, entry_clip=None,
                                   teacher_lm_head_weight=teacher_weight if separate_teacher else None)
    naive = naive_kl_from_hidden(student_h, teacher_h, weight, teacher_weight.detach(), kind)
    assert_close(chunked, naive)
    coeff = torch.randn(N)  # a non-uniform downstream weighting of the positions
    grads = torch.autograd.grad((coeff * chunked).sum(), (student_h, weight))
    naive_grads = torch.autograd.grad((coeff * naive).sum(), (student_h, weight))
    for ours, ref in zip(grads, naive_grads):
        assert_close(ours, ref)


def test_chunked_divergence_with_clip_and_top_k_matches_unchunked():
    torch.manual_seed(5)
    student_h, teacher_h = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    weight = torch.randn(9, 4, requires_grad=True)
    kw = dict(kind="jsd", top_k=4, entry_clip=0.05)
    chunked = L.chunked_divergence(student_h, teacher_h, weight, chunk_size=4, **kw)
    direct = L.routed_divergence(student_h @ weight.T, teacher_h @ weight.T, **kw)
    assert_close(chunked, direct)
    for ours, ref in zip(torch.autograd.grad(chunked.sum(), (student_h, weight)),
                         torch.autograd.grad(direct.sum(), (student_h, weight))):
        assert_close(ours, ref)
    assert L.chunked_divergence(student_h[:0], teacher_h[:0], weight).shape == (0,)


def test_chunked_divergence_never_saves_all_logits():
    """Autograd keeps only the chunks' inputs, not an [N, V] logits tensor, for the backward."""
    N, d, V = 64, 4, 50
    student_h, teacher_h = torch.randn(N, d, requires_grad=True), torch.randn(N, d)
    weight = torch.randn(V, d, requires_grad=True)

    def largest_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            fn()
        return max(sizes)

    assert largest_saved(lambda: L.routed_divergence(student_h @ weight.T, teacher_h @ weight.T)) >= N * V
    assert largest_saved(lambda: L.chunked_divergence(student_h, teacher_h, weight, chunk_size=8)) <= V * d


def test_chunked_entropy_and_scatter():
    h, w = torch.randn(5, 3), torch.randn(4, 3)
    assert_close(L.chunked_entropy(h, w, chunk_size=2), L.entropy_from_logits(h @ w.T))
    assert_close(L.entropy_from_logits(logits_of([[0.5, 0.5]])), t([math.log(2)]))
    positions = torch.tensor([[False, True, True], [True, False, False]])
    values = t([1.0, 2.0, 3.0]).requires_grad_()
    scattered = L.tokens_from_positions(values, positions)
    assert torch.equal(scattered, t([[0, 1, 2], [3, 0, 0]]))
    (scattered * t([[0, 10, 20], [30, 0, 0]])).sum().backward()
    assert torch.equal(values.grad, t([10, 20, 30]))


# ---------------------------------------------------------------------------------------------
# sampled-token estimators
# ---------------------------------------------------------------------------------------------


def test_sampled_estimators_by_hand():
    logp, logq = t([-1.0]), t([-2.0])  # log r = log q − log p = −1
    assert_close(L.SAMPLED_KL_ESTIMATORS["k1"](logp, logq), t([1.0]))
    assert_close(L.SAMPLED_KL_ESTIMATORS["k2"](logp, logq), t([0.5]))
    assert_close(L.SAMPLED_KL_ESTIMATORS["k3"](logp, logq), t([math.exp(-1) - 1 + 1]))
    logp.requires_grad_()
    surrogate = L.sampled_rkl_surrogate(logp, logq)
    assert_close(surrogate, t([1.0]))  # value = k1
    surrogate.sum().backward()
    assert_close(logp.grad, t([1.0]))  # gradient = sg(k1)·∇log p


def expected_grad_over_samples(per_token_loss_fn, student_logits, teacher_logits):
    """E_{y~p}[∇ loss(y)], computed exactly by enumerating the 3 tokens."""
    logp, logq = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    probs = logp.exp().detach()
    total = sum(probs[0, y] * per_token_loss_fn(logp[0, y], logq[0, y]) for y in range(logp.shape[-1]))
    return torch.autograd.grad(total, student_logits)[0]


def test_k3_gradient_is_the_forward_kl_gradient_and_surrogate_is_reverse():
    student = logits_of([P]).requires_grad_()
    teacher = logits_of([Q])
    rkl_grad = torch.autograd.grad(L.routed_divergence(student, teacher, "rkl", entry_clip=None).sum(), student)[0]
    fkl_grad = torch.autograd.grad(L.routed_divergence(student, teacher, "fkl", entry_clip=None).sum(), student)[0]
    surrogate_grad = expected_grad_over_samples(L.sampled_rkl_surrogate, student, teacher)
    assert_close(surrogate_grad, rkl_grad)
    naive_k3 = lambda lp, lq: torch.expm1(lq - lp) - (lq - lp)  # differentiated naively
    assert_close(expected_grad_over_samples(naive_k3, student, teacher), fkl_grad)
    assert not torch.allclose(fkl_grad, rkl_grad, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# TRACE objective
# ---------------------------------------------------------------------------------------------

PPO = t([[1, 2, 3, 4], [5, 6, 7, 0]])
RESPONSE = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
KEY = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)  # sequence 0 correct
ERROR = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)  # sequence 1 failed
FKL = t([[9, 0.2, 0.4, 9], [9, 9, 9, 9]])  # only K positions are read
RKL = t([[9, 9, 9, 9], [9, 9, 0.6, 9]])  # only E positions are read


def trace_loss(**kw):
    args = dict(lam=0.25, w0=0.5, mu_E=1.0, mu_K=1.0)
    args.update(kw)
    return L.trace_objective(PPO, RESPONSE, KEY, ERROR, FKL, RKL, **args)


def test_trace_objective_by_hand():
    # ρ = 1 − 0.25/0.5 = 0.5 on S = {(0,1), (0,2), (1,2)}; token-mean over 7 tokens:
    grpo = (1 + 0.5 * 2 + 0.5 * 3 + 4 + 5 + 6 + 0.5 * 7) / 7
    # key branch: seq 0 mean(0.2, 0.4) · |S|/|y| = 0.3 · 2/4; seq 1 none → / 2 sequences
    kl_key = (0.3 * 2 / 4 + 0) / 2
    # error branch: seq 1: 0.6 · 1/3 → / 2 sequences
    kl_error = (0 + 0.6 * 1 / 3) / 2
    loss, metrics = trace_loss()
    assert_close(loss, torch.tensor(grpo + 0.25 * (kl_error + kl_key)))
    assert_close(metrics["rho"], torch.tensor(0.5))
    assert_close(metrics["kl_key_branch"], torch.tensor(kl_key))
    assert_close(metrics["fkl_key_token_mean"], torch.tensor(0.3))
    assert_close(metrics["span_coverage"], torch.tensor(3 / 7))
    assert (metrics["tokens_key"], metrics["tokens_error"], metrics["tokens_rest"]) == (2, 1, 4)

    # TRACE-FKL corner (μ_E = 0): literal Eq. 1 keeps ρ-scaled GRPO on the error token ...
    loss, _ = trace_loss(mu_E=0.0)
    assert_close(loss, torch.tensor(grpo + 0.25 * kl_key))
    # ... the documented alternative gives it full GRPO instead
    loss, _ = trace_loss(mu_E=0.0, full_grpo_on_spans_without_kl=True)
    assert_close(loss, torch.tensor((1 + 0.5 * 2 + 0.5 * 3 + 4 + 5 + 6 + 7) / 7 + 0.25 * kl_key))


@pytest.mark.parametrize("mode", list(L.AGGREGATIONS))
def test_lambda_zero_is_exactly_grpo(mode):
    schedule = LambdaSchedule()
    lam = schedule(40)
    assert lam == 0.0 and not schedule.teacher_forward_needed(40)
    loss, _ = L.trace_objective(PPO, RESPONSE, KEY, ERROR, None, None, lam=lam, w0=0.5, mu_E=1.0, mu_K=1.0, agg_mode=mode)
    assert torch.equal(loss, L.aggregate(PPO, RESPONSE, mode))


@pytest.mark.parametrize("mode", list(L.AGGREGATIONS))
def test_all_grpo_mask_is_exactly_grpo(mode):
    none = torch.zeros_like(RESPONSE)
    loss, metrics = L.trace_objective(PPO, RESPONSE, none, none, None, None, lam=0.5, w0=0.5, mu_E=1.0, mu_K=1.0, agg_mode=mode)
    assert torch.equal(loss, L.aggregate(PPO, RESPONSE, mode))
    assert metrics["span_coverage"] == 0


def test_missing_kl_with_spans_is_an_error():
    with pytest.raises(ValueError):
        L.trace_objective(PPO, RESPONSE, KEY, ERROR, None, RKL, lam=0.5, mu_K=1.0)


def test_trace_objective_micro_batches_sum_to_full_batch():
    full, _ = trace_loss()
    counts = L.count_normalizers(RESPONSE[:1], RESPONSE[1:])
    parts = [L.trace_objective(PPO[r], RESPONSE[r], KEY[r], ERROR[r], FKL[r], RKL[r], lam=0.25, w0=0.5, mu_E=1.0,
                               mu_K=1.0, **counts)[0] for r in (slice(0, 1), slice(1, 2))]
    assert_close(sum(parts), full)


def naive_trace_loss(student_logits, teacher_logits, tokens, old_logp, adv, mask, key, error,
                     lam, w0, mu_E, mu_K, clip=0.05):
    """Eq. 1 token by token, with the textbook PPO min and a per-entry clipped KL written out."""
    B, T, V = student_logits.shape
    rho = 1 - lam / w0
    grpo, kl_error, kl_key = 0.0, 0.0, 0.0
    n_tokens = int(mask.sum())

    def kl_entries(a, b):   # the whole token's KL scaled so that no entry exceeds the clip
        terms = [a[v] * torch.log(a[v] / b[v]) - a[v] + b[v] for v in range(V)]
        return min(1.0, clip / max(float(x.detach()) for x in terms)) * sum(terms)

    for i in range(B):
        seq_fkl, seq_rkl, n_key, n_err = 0.0, 0.0, 0, 0
        for j in range(T):
            if not mask[i, j]:
                continue
            p = torch.softmax(student_logits[i, j], -1)
            q = torch.softmax(teacher_logits[i, j], -1).detach()
            ratio = torch.exp(torch.log(p[tokens[i, j]]) - old_logp[i, j])
            surrogate = torch.min(ratio * adv[i], torch.clamp(ratio, 0.8, 1.28) * adv[i])
            in_span = bool(key[i, j] or error[i, j])
            grpo = grpo - (rho if in_span else 1.0) * surrogate
            if key[i, j]:
                seq_fkl, n_key = seq_fkl + kl_entries(q, p), n_key + 1
            if error[i, j]:
                seq_rkl, n_err = seq_rkl + kl_entries(p, q), n_err + 1
        length, n_span = int(mask[i].sum()), n_key + n_err
        if n_key:
            kl_key = kl_key + seq_fkl / n_key * n_span / length
        if n_err:
            kl_error = kl_error + seq_rkl / n_err * n_span / length
    return grpo / n_tokens + lam * (mu_E * kl_error / B + mu_K * kl_key / B)


@pytest.mark.parametrize("mu_E,mu_K", [(0.0, 1.0), (1.0, 0.0), (1.0, 1.0)])
def test_trace_objective_gradient_matches_naive_reference(mu_E, mu_K):
    torch.manual_seed(6)
    B, T, V = 3, 4, 5
    student = torch.randn(B, T, V, requires_grad=True)
    teacher = torch.randn(B, T, V)
    tokens = torch.randint(0, V, (B, T))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    key = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    error = torch.tensor([[0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    adv = t([1.0, -1.0, 0.5])
    logp = student.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    old_logp = logp.detach() + 0.4 * torch.randn(B, T)  # some ratios fall outside the clip range

    ppo, _ = L.ppo_clip_per_token(logp, old_logp, adv)
    fkl = L.tokens_from_positions(L.routed_divergence(student[key], teacher[key], "fkl"), key)
    rkl = L.tokens_from_positions(L.routed_divergence(student[error], teacher[error], "rkl"), error)
    loss, _ = L.trace_objective(ppo, mask, key, error, fkl, rkl, lam=0.3, w0=0.5, mu_E=mu_E, mu_K=mu_K)
    reference = naive_trace_loss(student, teacher, tokens, old_logp, adv, mask, key, error, 0.3, 0.5, mu_E, mu_K)

    assert_close(loss, reference)
    assert_close(torch.autograd.grad(loss, student)[0], torch.autograd.grad(reference, student)[0])


# ---------------------------------------------------------------------------------------------
# baselines
# ---------------------------------------------------------------------------------------------


def test_sdpo_objective():
    jsd = t([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.0]])
    pure, _ = L.sdpo_objective(None, RESPONSE, jsd)  # distillation_weight = 1: no GRPO needed
    assert_close(pure, torch.tensor(2.8 / 7))
    mixed, _ = L.sdpo_objective(PPO, RESPONSE, jsd, distillation_weight=0.25)
    assert_close(mixed, torch.tensor(0.75 * 28 / 7 + 0.25 * 2.8 / 7))


def test_entropy_aware_weights_by_hand():
    entropy = t([[0.0, math.log(2), 5.0]])
    routed = torch.tensor([[True, True, False]])
    weights, raw_mean = L.entropy_aware_weights(entropy, routed, beta=1.0)
    # raw exp(−H) = [1, 0.5] on the routed tokens, mean 0.75
    assert_close(weights, t([[1 / 0.75, 0.5 / 0.75, 0.0]]))
    assert_close(raw_mean, torch.tensor(0.75))


def test_srpo_routes_by_correctness():
    correct = torch.tensor([True, False])
    divergence = t([[9, 9, 9, 9], [0.1, 0.2, 0.3, 9]])
    entropy = t([[0, 0, 0, 0], [0.0, math.log(2), math.log(4), 0]])
    loss, metrics = L.srpo_objective(PPO, RESPONSE, divergence, correct, entropy, entropy_beta=1.0)
    # GRPO only on sequence 0 (1+2+3+4); weights on sequence 1: [1, .5, .25] / mean(7/12)
    w = [1 / (7 / 12), 0.5 / (7 / 12), 0.25 / (7 / 12)]
    distill = w[0] * 0.1 + w[1] * 0.2 + w[2] * 0.3
    assert_close(loss, torch.tensor((10 + distill) / 7))
    assert (metrics["tokens_grpo"], metrics["tokens_distill"]) == (4, 3)


def test_rlsd_token_advantages_by_hand():
    adv = t([1.0, -1.0])
    student = t([[0.5, 0.5], [0.5, 0.5]]).log()
    teacher = t([[0.6, 1.0], [0.6, 1.0]]).log()  # ratios P_T/P_S = 1.2 and 2.0
    full = L.rlsd_token_advantages(adv, student, teacher, eps_w=None)
    assert_close(full, t([[1.2, 2.0], [-1 / 1.2, -0.5]]))  # w = ratio^{sign A}
    clipped = L.rlsd_token_advantages(adv, student, teacher, eps_w=0.2)
    assert_close(clipped, t([[1.2, 1.2], [-1 / 1.2, -0.8]]))
    half = L.rlsd_token_advantages(adv, student, teacher, strength=0.5, eps_w=0.2)
    assert_close(half, t([[1.1, 1.1], [-(0.5 + 0.5 / 1.2), -0.9]]))
    assert torch.equal(L.rlsd_token_advantages(adv, student, teacher, strength=0.0), adv.unsqueeze(-1).expand(2, 2))


def test_ema_update_direction():
    teacher, student = [t([1.0, 2.0])], [t([3.0, 6.0])]
    L.ema_update(teacher, student, rate=0.05)
    assert_close(teacher[0], t([0.95 * 1 + 0.05 * 3, 0.95 * 2 + 0.05 * 6]))  # [1.1, 2.2]: mostly the old teacher
    assert torch.equal(student[0], t([3.0, 6.0]))


# ---------------------------------------------------------------------------------------------
# OPD: on-policy distillation from an external teacher (methods opd, opd_topk, opd_k1)
# ---------------------------------------------------------------------------------------------
# P = [0.5, 0.3, 0.2] (student), Q = [0.2, 0.2, 0.6] (teacher): KL(p‖q) by hand
RKL_PQ = 0.5 * math.log(2.5) + 0.3 * math.log(1.5) + 0.2 * math.log(1 / 3)   # = 0.360062…


def test_opd_full_rkl_by_hand_from_a_teacher_of_another_width():
    """The teacher is another model: hidden width 4 (the student's 2) and its own lm_head, over the same 3-token
    vocabulary. Built so that the logits are exactly log P and log Q: the value is the hand sum, the gradient
    the hand one, p_v·(log(p_v/q_v) − KL) per logit."""
    student_h = t([[1.0, 0.0]]).requires_grad_()
    student_w = torch.stack([t([math.log(v), 0.0]) for v in P]).requires_grad_()        # [V=3, d=2]
    teacher_h, teacher_w = t([[0.0, 1.0, 0.0, 0.0]]), torch.stack([t([0.0, math.log(v), 5.0, -5.0]) for v in Q])
    rkl = L.chunked_divergence(student_h, teacher_h, student_w, "rkl", entry_clip=None,
                               teacher_lm_head_weight=teacher_w)
    assert rkl.item() == pytest.approx(RKL_PQ, abs=1e-6) and RKL_PQ == pytest.approx(0.360062, abs=1e-6)
    (grad_w,) = torch.autograd.grad(rkl.sum(), student_w)
    by_hand = [p * (math.log(p / q) - RKL_PQ) for p, q in zip(P, Q)]   # ∂KL(p‖q)/∂z_v, z = student logits
    assert_close(grad_w[:, 0], t(by_hand))   # z_v = w_v·h with h = (1, 0): ∂/∂w_v0 = ∂/∂z_v
    assert_close(grad_w[:, 1], t([0.0, 0.0, 0.0]))
    # and against the naive all-logits reference, on random widths 3 (student) vs 5 (teacher), chunked by 2
    torch.manual_seed(0)
    sh, sw = torch.randn(5, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    th, tw = torch.randn(5, 5), torch.randn(7, 5)
    chunked = L.chunked_divergence(sh, th, sw, "rkl", chunk_size=2, entry_clip=None, teacher_lm_head_weight=tw)
    naive = naive_kl_from_hidden(sh, th, sw, tw, "rkl")
    assert_close(chunked, naive)
    for ours, ref in zip(torch.autograd.grad(chunked.sum(), (sh, sw)), torch.autograd.grad(naive.sum(), (sh, sw))):
        assert_close(ours, ref)


def test_opd_objective_is_the_weighted_token_mean_of_the_rkl():
    rkl = t([[0.2, 0.4, 9.0], [0.6, 9.0, 9.0]])               # 9 = padding, never read
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert L.opd_objective(rkl, mask, weight=0.5).item() == pytest.approx(0.5 * (0.2 + 0.4 + 0.6) / 3)
    # global normalisers: this micro-batch's share of a 6-token batch
    assert L.opd_objective(rkl, mask, weight=1.0, global_tokens=6.0).item() == pytest.approx(1.2 / 6)
    assert L.opd_objective(rkl, mask, weight=1.0, agg_mode="seq-mean-token-mean").item() == pytest.approx(
        ((0.2 + 0.4) / 2 + 0.6) / 2)


def test_opd_teacher_top_k_with_tail_bucket_by_hand():
    """opd_topk: the RKL over the teacher's top-2 ids plus one tail category (the student's mass outside is
    charged as one): p = uniform over 4, q = (0.6, 0.3, 0.08, 0.02) → categories p (¼, ¼, ½), q (0.6, 0.3, 0.1)."""
    student, teacher = logits_of([[0.25, 0.25, 0.25, 0.25]]), logits_of([[0.6, 0.3, 0.08, 0.02]])
    value = L.routed_divergence(student, teacher, "rkl", top_k=2, support="teacher", tail_bucket=True, entry_clip=None)
    by_hand = 0.25 * math.log(0.25 / 0.6) + 0.25 * math.log(0.25 / 0.3) + 0.5 * math.log(0.5 / 0.1)
    assert value.item() == pytest.approx(by_hand, abs=1e-6) and by_hand == pytest.approx(0.540272, abs=1e-6)
    # the full vocabulary's RKL tells the tail's two entries apart: larger (merging categories lowers a KL)
    full = L.routed_divergence(student, teacher, "rkl", entry_clip=None).item()
    full_by_hand = sum(0.25 * math.log(0.25 / q) for q in (0.6, 0.3, 0.08, 0.02))
    assert full == pytest.approx(full_by_hand, abs=1e-6) and full_by_hand == pytest.approx(0.651844, abs=1e-6)


def test_opd_k1_advantages_by_hand_and_their_expected_gradient_is_the_reverse_kl():
    """A_t = −w·(log p(y_t) − log q(y_t)); the PPO surrogate with them, on-policy (ratio 1), has the gradient
    w·k1·∇log p(y): by hand on one token, and in expectation over y ~ p (3 tokens) exactly w·∇KL(p‖q)."""
    logp, logq = t([[math.log(0.5), math.log(0.2)]]).requires_grad_(), t([[math.log(0.2), math.log(0.6)]])
    adv = L.opd_k1_advantages(logp, logq, weight=0.5)
    assert_close(adv, t([[-0.5 * math.log(2.5), -0.5 * math.log(1 / 3)]]))
    assert not adv.requires_grad
    ppo, _ = L.ppo_clip_per_token(logp, logp.detach(), adv)
    assert_close(ppo, -adv)   # value at ratio 1: w·k1
    (grad,) = torch.autograd.grad(ppo.sum(), logp)
    assert_close(grad, -adv)  # ∂/∂log p(y_t) = w·k1_t

    student, teacher = logits_of([P]).requires_grad_(), logits_of([Q])

    def k1_surrogate(lp, lq):  # the trainer's path: advantages, then the clipped surrogate at ratio 1
        a = L.opd_k1_advantages(lp.view(1, 1), lq.view(1, 1), weight=0.5)
        return L.ppo_clip_per_token(lp.view(1, 1), lp.detach().view(1, 1), a)[0].sum()

    expected = expected_grad_over_samples(k1_surrogate, student, teacher)
    rkl_grad = torch.autograd.grad(L.routed_divergence(student, teacher, "rkl", entry_clip=None).sum(), student)[0]
    assert_close(expected, 0.5 * rkl_grad)
    assert_close(rkl_grad[0], t([p * (math.log(p / q) - RKL_PQ) for p, q in zip(P, Q)]))
