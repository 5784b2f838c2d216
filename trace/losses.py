"""Loss pieces for GRPO, TRACE (Eq. 1) and the self-distillation baselines. Pure torch, no model code.

Reading order
    1. advantages          ADVANTAGE_ESTIMATORS["grpo"]: group-normalised outcome rewards
    2. PPO clipped term    ppo_clip_per_token: clip-higher (DAPO) + optional dual clip
    3. aggregation         AGGREGATIONS: token-mean / seq-mean-token-mean / seq-mean-token-sum-norm,
                           always divided by GLOBAL counts (count_normalizers)
    4. divergences         DIVERGENCES: fkl = KL(q||p), rkl = KL(p||q), jsd; full vocabulary or top-K
                           (+ tail bucket); per-entry clip; chunked over positions
    5. sampled-token       k1/k2/k3 metrics and a correct-gradient surrogate for the sampled RKL
    6. trace_objective     Eq. 1, line by line
    7. baselines           SDPO, SRPO, RLSD pieces and ema_update
    8. OPD                 on-policy distillation from an external teacher: full / top-K reverse KL, K1 advantages

Shapes: B sequences, T response positions, V vocabulary, N routed positions (already gathered),
d hidden size. `mask` is the [B, T] bool response mask (True = a real response token).
p = student distribution (has gradients), q = teacher distribution (always detached here).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------
# 1. Advantages
# ---------------------------------------------------------------------------------------------


def grpo_advantages(rewards: Tensor, group_size: int, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages: A_i = (r_i − mean_group) / (std_group + eps).

    rewards [N] holds N / group_size consecutive groups (the G rollouts of one prompt are adjacent).
    std is the unbiased sample std (torch default, as in verl and TRL). A group whose rewards are all
    equal gets advantage 0 (the numerator is exactly 0). normalize_std=False gives Dr. GRPO's
    mean-centred advantages.
    """
    if group_size < 2:
        raise ValueError(f"GRPO needs at least 2 rollouts per group, got group_size={group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


ADVANTAGE_ESTIMATORS = {
    "grpo": grpo_advantages,
    "grpo_no_std": partial(grpo_advantages, normalize_std=False),
}


# ---------------------------------------------------------------------------------------------
# 2. PPO / GRPO clipped policy term
# ---------------------------------------------------------------------------------------------


def ppo_clip_per_token(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: float | None = None,
    log_ratio_clamp: float = 20.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate loss (to minimise), shape [B, T].

    ratio = exp(logp − old_logp), with the log-ratio clamped to ±log_ratio_clamp before exp so a stale
    token cannot overflow. loss = max(−A·ratio, −A·clip(ratio, 1 − eps_low, 1 + eps_high)): the usual
    pessimistic PPO bound with DAPO's clip-higher (eps_high > eps_low leaves room to raise rare tokens).
    Dual clip (c > 1): for A < 0 the bound above grows without limit in the ratio, so it is capped at
    c·|A| (Ye et al. 2020).

    advantages: [B] (one per sequence, broadcast over T) or [B, T] (per token, e.g. RLSD).
    stats: bool [B, T] masks of where each clip is active (zero gradient there) plus the ratio; with
    `mask` also their fractions over the valid tokens.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.expand_as(logp)
    ratio = torch.exp((logp - old_logp).clamp(-log_ratio_clamp, log_ratio_clamp))

    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    stats = {
        "ratio": ratio.detach(),
        "clipped_high": (advantages > 0) & (ratio > 1.0 + eps_high),
        "clipped_low": (advantages < 0) & (ratio < 1.0 - eps_low),
        "dual_clipped": torch.zeros_like(ratio, dtype=torch.bool),
    }
    if dual_clip_c is not None:
        if dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
        dual_cap = -advantages * dual_clip_c  # = c·|A| where A < 0
        stats["dual_clipped"] = (advantages < 0) & (loss > dual_cap)
        loss = torch.where(advantages < 0, torch.minimum(loss, dual_cap), loss)
    if mask is not None:
        n_valid = mask.sum().clamp(min=1)
        for name in ("clipped_high", "clipped_low", "dual_clipped"):
            stats[f"{name}_frac"] = (stats[name] & mask.bool()).sum() / n_valid
    return loss, stats


# ---------------------------------------------------------------------------------------------
# 3. Aggregation with global normalisers
# ---------------------------------------------------------------------------------------------
# Every mode divides by a count that the trainer computes ONCE over the whole optimizer batch (all
# gradient-accumulation micro-batches and all data-parallel ranks, see count_normalizers) and passes
# in. Each micro-batch loss is then its share of the full-batch loss, so summing the micro-batch
# losses (and their gradients) gives exactly the full-batch loss: dividing by per-micro-batch counts
# instead would re-weight tokens by which micro-batch they fell into (§8 pitfall). With None, local
# counts are used (correct when the batch is not split).
# Convention for an all-padding row (no valid token): it is not a sequence. It contributes 0 and is
# not counted by the seq-mean modes' sequence count (local or count_normalizers); a batch of only
# such rows has loss 0.


def count_normalizers(*masks: Tensor) -> dict[str, Tensor]:
    """Global counts over the given micro-batch masks: valid tokens and sequences with ≥ 1 valid token.

    With data parallelism, all-reduce (sum) the returned tensors across ranks before use, and since
    DDP/FSDP AVERAGE gradients over ranks, scale each rank's loss by world_size so the average is the
    global sum.
    """
    tokens = sum(m.sum() for m in masks)
    seqs = sum((m.sum(-1) > 0).sum() for m in masks)
    return {"global_tokens": tokens.float(), "global_seqs": seqs.float()}


def _divide(total: Tensor, count: Tensor | float) -> Tensor:
    if isinstance(count, Tensor):
        return total / count.clamp(min=1)
    return total / max(count, 1)


def _masked_row_sums(per_token: Tensor, mask: Tensor) -> Tensor:
    # torch.where rather than multiply: a NaN at a padded position must not leak into the sum
    return torch.where(mask.bool(), per_token, 0.0).sum(-1)


def _seq_count(mask: Tensor, global_seqs: Tensor | float | None) -> Tensor | float:
    return (mask.sum(-1) > 0).sum() if global_seqs is None else global_seqs


def token_mean(per_token, mask, global_tokens=None, global_seqs=None, max_len=None) -> Tensor:
    """Σ over all valid tokens / global token count (DAPO / verl 'token-mean')."""
    n_tokens = mask.sum() if global_tokens is None else global_tokens
    return _divide(_masked_row_sums(per_token, mask).sum(), n_tokens)


def seq_mean_token_mean(per_token, mask, global_tokens=None, global_seqs=None, max_len=None) -> Tensor:
    """Mean over each sequence's own tokens, then Σ over sequences / global sequence count (GRPO paper)."""
    per_seq = _masked_row_sums(per_token, mask) / mask.sum(-1).clamp(min=1)
    return _divide(per_seq.sum(), _seq_count(mask, global_seqs))


def seq_mean_token_sum_norm(per_token, mask, global_tokens=None, global_seqs=None, max_len=None) -> Tensor:
    """Σ over each sequence's tokens / a constant max_len, then mean over sequences (Dr. GRPO).

    Pass max_len (e.g. the max response length); the default, the local padded width T, is only
    exact across micro-batches if they are all padded to the same width.
    """
    per_seq = _masked_row_sums(per_token, mask) / (max_len or per_token.shape[-1])
    return _divide(per_seq.sum(), _seq_count(mask, global_seqs))


AGGREGATIONS = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum-norm": seq_mean_token_sum_norm,
}


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    global_tokens: Tensor | float | None = None,
    global_seqs: Tensor | float | None = None,
    max_len: int | None = None,
) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar with the named mode (see AGGREGATIONS)."""
    return AGGREGATIONS[mode](per_token, mask, global_tokens, global_seqs, max_len)


# ---------------------------------------------------------------------------------------------
# 4. Divergences between student p and teacher q at the same positions
# ---------------------------------------------------------------------------------------------
# Every divergence is written as a sum over categories v of NON-NEGATIVE terms
#
#     t(a_v, b_v) = a_v·log(a_v / b_v) − a_v + b_v  ≥ 0          (generalised KL / Bregman form)
#
# For two distributions over the same categories Σ_v (−a_v + b_v) = 0, so Σ_v t = KL(a‖b) exactly,
# value and gradient.
#
# The per-entry clip (TRACE.md: "each per-vocabulary-entry term clipped at 0.05") is implemented as a
# per-TOKEN scale: loss = s·Σ_v t_v with s = min(1, c / max_v t_v), s detached (entry_clip_scale).
#   * every entry's contribution s·t_v is ≤ c, the bound the paper's wording asks for, and the loss
#     is ≥ 0 (clamping the raw a_v·log(a_v/b_v) to [−c, c] can make the sum negative and turn
#     "minimise the KL" into "push the distributions apart", §8 pitfall);
#   * the gradient is s·∇KL, a positive multiple of the KL gradient: always a descent direction.
#     Clamping each Bregman term, min(t_v, c), is NOT: an entry at the cap drops out of the gradient
#     while the softmax couples all entries, so in logit space the remaining terms can push mass
#     the wrong way (student logits [3, 0, 0, −3], teacher [0, 0, 0, 3]: ∇KL = [0.864, 0.002, 0.002,
#     −0.868], the clamped gradient [−0.0034, 0.0017, 0.0017, 0], which raises the token the student
#     already over-allocates; 20–70 % of random peaky rows point uphill, tests/test_losses.py).
# This reading of the paper's clip is ours (?): it bounds the same per-entry quantity, but by
# shrinking the whole token's KL instead of cutting single entries.
#
# Top-K restricts the categories to a support of K token ids (indices picked without gradient):
# FKL uses the TEACHER's top-K (where q has mass), RKL the STUDENT's top-K (where p has mass; the
# teacher's support would leave student mass outside it unpenalised, §8 pitfall). OPD-top-K (method
# opd_topk) takes the TEACHER's top-K for its RKL, as a served teacher returning only its top-K log-probs
# allows, and always with the tail bucket: the student's mass outside that support is then charged as one
# category (what it does inside the tail is not). The tail bucket
# appends one category holding 1 − Σ_topK of each distribution, so mass leaving the support is paid
# for; without it both sides are renormalised over the support. Either way both sides are proper
# distributions over the same categories and the identity above holds.

LOGP_FLOOR = -1e4  # keeps −inf logits (masked vocab) from producing 0·inf = NaN; exp(−1e4) is 0 anyway


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Per-entry a·log(a/b) − a + b, each ≥ 0; their sum is KL(a‖b) for normalised a, b."""
    a, b = log_a.exp(), log_b.exp()
    return a * (log_a - log_b) - a + b


def fkl_terms(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    """Forward KL(q‖p), teacher → student, mode-covering (TRACE: key spans). beta is unused."""
    return _kl_terms(teacher_logp, student_logp)


def rkl_terms(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    """Reverse KL(p‖q), student → teacher, mode-seeking (TRACE: error spans). beta is unused."""
    return _kl_terms(student_logp, teacher_logp)


def jsd_terms(student_logp: Tensor, teacher_logp: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised JSD (GKD / TRL convention): m = β·q + (1−β)·p, JSD = β·KL(q‖m) + (1−β)·KL(p‖m).

    β = 0.5 is the symmetric JSD used by SDPO; β = 0 and β = 1 are taken as the limits FKL and RKL.
    """
    if beta == 0.0:
        return fkl_terms(student_logp, teacher_logp)
    if beta == 1.0:
        return rkl_terms(student_logp, teacher_logp)
    log_m = torch.logsumexp(
        torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1.0 - beta)]), dim=0
    )
    return beta * _kl_terms(teacher_logp, log_m) + (1.0 - beta) * _kl_terms(student_logp, log_m)


DIVERGENCES = {"fkl": fkl_terms, "rkl": rkl_terms, "jsd": jsd_terms}
# Whose top-K forms the support. JSD follows SDPO's reference code (student's top-K).
TOP_K_SUPPORT = {"fkl": "teacher", "rkl": "student", "jsd": "student"}


def with_tail_bucket(logp: Tensor, ids: Tensor) -> Tensor:
    """[N, V] log-probs → [N, K+1]: the K categories ``ids`` plus one tail bucket holding the rest.

    The tail's log-mass is a logsumexp over the entries OUTSIDE the top-K, not log(1 − Σ_topK): when
    the top-K holds almost all the mass, 1 − Σ_topK cancels catastrophically in float32 (a tail of
    1e-12 comes out as 0 or ~1e-7, an error of several nats in the tail's KL term). Floored at
    LOGP_FLOOR so that K = V (an empty tail) gives a zero term instead of 0·(−inf) = NaN.
    """
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True).clamp(min=LOGP_FLOOR)
    return torch.cat([logp.gather(-1, ids), tail], dim=-1)


def restrict_to_top_k(
    student_logp: Tensor, teacher_logp: Tensor, top_k: int, support: str, tail_bucket: bool
) -> tuple[Tensor, Tensor]:
    """Both [N, V] log-prob tensors restricted to the top-K ids of `support` ('teacher' | 'student')."""
    reference = {"teacher": teacher_logp, "student": student_logp}[support]
    ids = reference.detach().topk(min(top_k, reference.shape[-1]), dim=-1).indices
    if tail_bucket:
        return with_tail_bucket(student_logp, ids), with_tail_bucket(teacher_logp, ids)
    return student_logp.gather(-1, ids).log_softmax(-1), teacher_logp.gather(-1, ids).log_softmax(-1)


def divergence_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "fkl",
    top_k: int | None = None,
    tail_bucket: bool = True,
    beta: float = 0.5,
    support: str | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-category non-negative divergence terms, [N, V] (full vocabulary) or [N, K(+1)] (top-K).

    Logits are cast to float32; the teacher side is detached. temperature divides both logits.
    """
    student_logp = (student_logits.float() / temperature).log_softmax(-1).clamp(min=LOGP_FLOOR)
    teacher_logp = (teacher_logits.detach().float() / temperature).log_softmax(-1).clamp(min=LOGP_FLOOR)
    if top_k is not None:
        student_logp, teacher_logp = restrict_to_top_k(
            student_logp, teacher_logp, top_k, support or TOP_K_SUPPORT[kind], tail_bucket
        )
    return DIVERGENCES[kind](student_logp, teacher_logp, beta=beta)


def routed_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "fkl",
    *,
    top_k: int | None = None,
    tail_bucket: bool = True,
    entry_clip: float | None = 0.05,
    beta: float = 0.5,
    support: str | None = None,
    temperature: float = 1.0,
    return_scale: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Divergence per routed position, [N]: s·Σ_v t_v with s = entry_clip_scale (entry_clip=None: s = 1).
    return_scale: also s itself (detached, [N]), so a caller can log the UNCLIPPED divergence (value / s)
    and the share of positions the clip binds (s < 1) beside the clipped one: a clip that binds
    everywhere hides how far apart teacher and student are (issue 19)."""
    terms = divergence_terms(student_logits, teacher_logits, kind, top_k, tail_bucket, beta, support, temperature)
    divergence = terms.sum(-1)
    scale = entry_clip_scale(terms, entry_clip) if entry_clip is not None else torch.ones_like(divergence).detach()
    divergence = divergence * scale
    return (divergence, scale) if return_scale else divergence


def entry_clip_scale(terms: Tensor, entry_clip: float) -> Tensor:
    """s = min(1, c / max_v t_v) per position, detached: scaling the position's whole KL by s caps every
    entry's contribution at c while keeping the gradient a positive multiple of ∇KL (see above)."""
    largest = terms.detach().amax(-1)
    return torch.where(largest > entry_clip, entry_clip / largest.clamp(min=entry_clip), 1.0)


def _chunk_slices(n: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def chunked_divergence(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    lm_head_weight: Tensor,
    kind: str = "fkl",
    *,
    chunk_size: int = 1024,
    teacher_lm_head_weight: Tensor | None = None,
    return_scale: bool = False,
    **divergence_kwargs,
) -> Tensor | tuple[Tensor, Tensor]:
    """routed_divergence from final hidden states, [N, d] → [N], never holding all N × V logits.

    Each chunk of positions computes student logits (with gradient) and teacher logits (no gradient),
    reduces them to one number per position, and is wrapped in activation checkpointing: the forward
    keeps only the [chunk, d] inputs and the backward recomputes the chunk's logits, so peak memory is
    O(chunk_size · V) in both passes. teacher_lm_head_weight defaults to lm_head_weight (same network);
    pass the teacher copy's weight when it is a separate (synced / EMA / frozen) model.
    divergence_kwargs go to routed_divergence (top_k, tail_bucket, entry_clip, beta, support, temperature);
    return_scale: (values, the entry clip's scale s per position), as routed_divergence.
    """
    teacher_weight = (lm_head_weight if teacher_lm_head_weight is None else teacher_lm_head_weight).detach()

    def divergence_of_chunk(student_h: Tensor, teacher_h: Tensor, weight: Tensor) -> Tensor:
        student_logits = F.linear(student_h, weight)
        with torch.no_grad():
            teacher_logits = F.linear(teacher_h, teacher_weight)
        return routed_divergence(student_logits, teacher_logits, kind, return_scale=True, **divergence_kwargs)

    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or lm_head_weight.requires_grad)
    pieces, scales = [], []
    for rows in _chunk_slices(student_hidden.shape[0], chunk_size):
        args = (student_hidden[rows], teacher_hidden[rows].detach(), lm_head_weight)
        value, scale = (checkpoint(divergence_of_chunk, *args, use_reentrant=False) if needs_grad
                        else divergence_of_chunk(*args))
        pieces.append(value)
        scales.append(scale.detach())
    if not pieces:
        empty = student_hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if return_scale else empty
    return (torch.cat(pieces), torch.cat(scales)) if return_scale else torch.cat(pieces)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Shannon entropy (nats) of softmax(logits / temperature) per row, [N, V] → [N]."""
    logp = (logits.float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def chunked_entropy(hidden: Tensor, lm_head_weight: Tensor, chunk_size: int = 1024, temperature: float = 1.0) -> Tensor:
    """Entropy per position from hidden states [N, d] → [N], chunked; no gradient (teacher side)."""
    pieces = [entropy_from_logits(F.linear(hidden[rows], lm_head_weight), temperature)
              for rows in _chunk_slices(hidden.shape[0], chunk_size)]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def tokens_from_positions(values: Tensor, positions: Tensor) -> Tensor:
    """Scatter per-position values [N] back to a [B, T] tensor (zeros elsewhere), keeping gradients.

    Inverse of `x[positions]`: routed positions are gathered with hidden[positions] ([B, T, d] →
    [N, d], row-major order), and their divergences come back here for trace_objective.
    """
    out = values.new_zeros(positions.shape)
    return out.masked_scatter(positions.bool(), values)


# ---------------------------------------------------------------------------------------------
# 5. Sampled-token estimators (only the sampled token's log-probs are known)
# ---------------------------------------------------------------------------------------------
# With y ~ p and log r = log q(y) − log p(y), estimators of KL(p‖q) (Schulman's k1/k2/k3):
#   k1 = −log r,  k2 = ½ (log r)²,  k3 = r − 1 − log r   (k3 ≥ 0, unbiased, low variance).
# They are good METRICS but bad losses: ∇k3 = (1 − r)·∇log p(y), whose expectation under p is
# −Σ_v q_v ∇log p_v = ∇KL(q‖p), the FORWARD KL's gradient, not the reverse KL's (§8 pitfall); and
# ∇k1 = ∇log p(y) has expectation 0. The reverse-KL gradient is E_p[log(p/q)·∇log p] (score function),
# which sampled_rkl_surrogate implements.


def k1_estimate(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    return (student_logp - teacher_logp).detach()  # −log r


def k2_estimate(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    return 0.5 * (teacher_logp - student_logp).detach() ** 2  # ½ (log r)²


def k3_estimate(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    log_r = (teacher_logp - student_logp).detach()
    return torch.expm1(log_r) - log_r  # r − 1 − log r


SAMPLED_KL_ESTIMATORS = {"k1": k1_estimate, "k2": k2_estimate, "k3": k3_estimate}  # detached: metrics only


def sampled_rkl_surrogate(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """Per-token loss whose value is k1 = log p(y) − log q(y) and whose gradient is
    sg(log p − log q)·∇log p(y): an unbiased single-sample gradient of KL(p_t‖q_t) when y ~ p
    (on-policy; off-policy samples would need an importance ratio).
    """
    k1 = k1_estimate(student_logp, teacher_logp)
    return k1 + k1 * (student_logp - student_logp.detach())  # second term: value 0, gradient k1·∇log p


# ---------------------------------------------------------------------------------------------
# 6. TRACE objective, Eq. 1
# ---------------------------------------------------------------------------------------------


def span_branch(kl_per_token: Tensor, span_class: Tensor, span: Tensor, mask: Tensor,
                global_seqs: Tensor | float | None = None) -> Tensor:
    """One KL branch of Eq. 1: per sequence, mean of the KL over that sequence's span tokens of this
    class, × |S|/|y| (its own span count over its own response length); then Σ over sequences /
    global sequence count. Sequences without tokens of this class contribute 0.
    """
    n_class = span_class.sum(-1)
    mean_over_span = _masked_row_sums(kl_per_token, span_class) / n_class.clamp(min=1)
    length_norm = span.sum(-1) / mask.sum(-1).clamp(min=1)  # |S| / |y|, per sequence
    return _divide((mean_over_span * length_norm).sum(), _seq_count(mask, global_seqs))


def _kl_or_zeros(kl_per_token: Tensor | None, span_class: Tensor, name: str) -> Tensor:
    # None is allowed only when this micro-batch has no span token of the class (nothing to distil)
    if kl_per_token is None:
        if span_class.any():
            raise ValueError(f"{name}_per_token is needed: λ > 0, its μ > 0 and the batch has such span tokens")
        return torch.zeros(span_class.shape, device=span_class.device)
    return kl_per_token


def trace_objective(
    ppo_per_token: Tensor,
    mask: Tensor,
    key_mask: Tensor,
    error_mask: Tensor,
    fkl_per_token: Tensor | None = None,
    rkl_per_token: Tensor | None = None,
    *,
    lam: float,
    w0: float = 0.5,
    mu_E: float = 0.0,
    mu_K: float = 1.0,
    agg_mode: str = "token-mean",
    global_tokens: Tensor | float | None = None,
    global_seqs: Tensor | float | None = None,
    max_len: int | None = None,
    full_grpo_on_spans_without_kl: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_k = L_GRPO^N + ρ_k·L_GRPO^S + λ_k·[μ_E·KL(p‖q) on E + μ_K·KL(q‖p) on K],  ρ_k = 1 − λ_k/w0.

    ppo_per_token [B, T] from ppo_clip_per_token; key_mask / error_mask [B, T] bool (K, E);
    fkl_per_token / rkl_per_token [B, T]: KL(q_t‖p_t) at K positions and KL(p_t‖q_t) at E positions
    (routed_divergence / chunked_divergence on the gathered positions, put back with
    tokens_from_positions; other positions are ignored). They may be None when λ = 0 or their μ = 0.

    Both GRPO parts share GRPO's normalisers (agg_mode + global counts), so L^N + L^S is the plain
    GRPO loss and λ = 0 (ρ = 1) gives exactly GRPO. The span branches follow the paper: mean over the
    branch's span tokens, × |S|/|y| per sequence (span_branch), averaged over global_seqs.

    full_grpo_on_spans_without_kl (paper unclear, §3 (?)): False = literal Eq. 1, S = K ∪ E always, so
    e.g. with μ_E = 0 error tokens still get ρ-scaled GRPO and no KL. True = a span class whose μ is 0
    is treated as N (full GRPO), since nothing replaces its down-weighted GRPO signal.
    Returns (loss, metrics); metrics are detached tensors of this micro-batch.
    """
    mask = mask.bool()
    key, error = key_mask.bool() & mask, error_mask.bool() & mask
    if full_grpo_on_spans_without_kl:
        key = key if mu_K != 0 else torch.zeros_like(key)
        error = error if mu_E != 0 else torch.zeros_like(error)
    span = key | error  # S = K ∪ E
    rest = mask & ~span  # N
    rho = 1.0 - lam / w0

    # L_GRPO^N + ρ·L_GRPO^S, by linearity one aggregate of ℓ_t·(1 on N, ρ on S) with GRPO's normalisers
    grpo_weight = torch.where(span, rho, 1.0)
    grpo = aggregate(ppo_per_token * grpo_weight, mask, agg_mode, global_tokens, global_seqs, max_len)
    loss = grpo

    kl_error = kl_key = torch.zeros((), device=ppo_per_token.device)
    if lam != 0 and mu_E != 0:
        kl_error = span_branch(_kl_or_zeros(rkl_per_token, error, "rkl"), error, span, mask, global_seqs)  # KL(p‖q) on E
    if lam != 0 and mu_K != 0:
        kl_key = span_branch(_kl_or_zeros(fkl_per_token, key, "fkl"), key, span, mask, global_seqs)  # KL(q‖p) on K
    if lam != 0:
        loss = loss + lam * (mu_E * kl_error + mu_K * kl_key)

    def branch_token_mean(kl, where):
        return aggregate(kl, where).detach() if kl is not None else torch.zeros(())

    with torch.no_grad():
        args = (mask, agg_mode, global_tokens, global_seqs, max_len)
        metrics = {
            "lambda": torch.tensor(float(lam)),
            "rho": torch.tensor(float(rho)),
            "grpo_rest": aggregate(torch.where(rest, ppo_per_token, 0.0), *args),
            "grpo_span": aggregate(torch.where(span, ppo_per_token, 0.0), *args),
            "kl_key_branch": kl_key.detach(),
            "kl_error_branch": kl_error.detach(),
            "fkl_key_token_mean": branch_token_mean(fkl_per_token, key),
            "rkl_error_token_mean": branch_token_mean(rkl_per_token, error),
            "tokens_key": key.sum(),
            "tokens_error": error.sum(),
            "tokens_rest": rest.sum(),
            "span_coverage": span.sum() / mask.sum().clamp(min=1),
        }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# 7. Baselines: SDPO, SRPO, RLSD, EMA teacher
# ---------------------------------------------------------------------------------------------


def grpo_plus_distillation(
    ppo_per_token: Tensor | None,
    mask: Tensor,
    divergence_per_token: Tensor,
    *,
    grpo_mask: Tensor | None = None,
    distill_mask: Tensor | None = None,
    grpo_coef: float = 1.0,
    distill_coef: float = 1.0,
    token_weights: Tensor | None = None,
    agg_mode: str = "token-mean",
    global_tokens: Tensor | float | None = None,
    global_seqs: Tensor | float | None = None,
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """grpo_coef·agg(ℓ on grpo_mask) + distill_coef·agg(w·D on distill_mask), both with the full
    response mask's normalisers (so routing tokens between the two terms never re-weights them).
    Shared by SDPO (all tokens, both terms) and SRPO (correct → GRPO, failed → distillation).
    """
    mask = mask.bool()
    grpo_mask = mask if grpo_mask is None else grpo_mask.bool() & mask
    distill_mask = mask if distill_mask is None else distill_mask.bool() & mask
    weighted = divergence_per_token if token_weights is None else token_weights.detach() * divergence_per_token
    args = (mask, agg_mode, global_tokens, global_seqs, max_len)

    distill = aggregate(torch.where(distill_mask, weighted, 0.0), *args)
    loss = distill_coef * distill
    grpo = torch.zeros_like(distill)
    if grpo_coef != 0:
        grpo = aggregate(torch.where(grpo_mask, ppo_per_token, 0.0), *args)
        loss = loss + grpo_coef * grpo
    metrics = {
        "grpo": grpo.detach(),
        "distill": distill.detach(),
        "tokens_grpo": grpo_mask.sum(),
        "tokens_distill": distill_mask.sum(),
    }
    return loss, metrics


def sdpo_objective(ppo_per_token: Tensor | None, mask: Tensor, jsd_per_token: Tensor, *,
                   distillation_weight: float = 1.0, **agg_kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """SDPO: (1 − w)·GRPO + w·all-token distillation (generalised JSD, β = 0.5, frozen teacher).

    w = 1 (default, as in the SDPO reference / TRL's SDPOTrainer) is pure self-distillation (?).
    """
    return grpo_plus_distillation(ppo_per_token, mask, jsd_per_token, grpo_coef=1.0 - distillation_weight,
                                  distill_coef=distillation_weight, **agg_kwargs)


def entropy_aware_weights(teacher_entropy: Tensor, routed_mask: Tensor, beta: float = 1.0,
                          global_mean: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """SRPO's w_t = exp(−β·H_teacher,t), normalised to mean 1 over the routed tokens (detached).

    global_mean: the mean of exp(−β·H) over ALL routed tokens of the optimizer batch (for exactness
    across micro-batches); None uses this micro-batch. Returns (weights [B, T], raw mean).
    """
    raw = torch.exp(-beta * teacher_entropy.detach().float())
    routed_mask = routed_mask.bool()
    raw_mean = _divide(torch.where(routed_mask, raw, 0.0).sum(), routed_mask.sum()) if global_mean is None else global_mean
    return torch.where(routed_mask, raw / raw_mean, 0.0), torch.as_tensor(raw_mean)


def srpo_objective(ppo_per_token: Tensor, mask: Tensor, divergence_per_token: Tensor, correct: Tensor,
                   teacher_entropy: Tensor, *, entropy_beta: float = 1.0, weight_global_mean=None,
                   distill_coef: float = 1.0, **agg_kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """SRPO: correct rollouts → GRPO (their usual group advantages); failed rollouts → all-token
    distillation from the EMA teacher, weighted by entropy_aware_weights. correct: [B] bool.
    """
    failed_tokens = mask.bool() & ~correct.bool().unsqueeze(-1)
    weights, raw_mean = entropy_aware_weights(teacher_entropy, failed_tokens, entropy_beta, weight_global_mean)
    loss, metrics = grpo_plus_distillation(ppo_per_token, mask, divergence_per_token,
                                           grpo_mask=~failed_tokens, distill_mask=failed_tokens,
                                           distill_coef=distill_coef, token_weights=weights, **agg_kwargs)
    metrics["entropy_weight_raw_mean"] = raw_mean.detach()
    return loss, metrics


def rlsd_token_advantages(advantages: Tensor, student_logp: Tensor, teacher_logp: Tensor, *,
                          strength: float = 1.0, eps_w: float | None = 0.2) -> Tensor:
    """RLSD: A_t = A·w_t with w_t = (P_T(y_t)/P_S(y_t))^{sign A}, computed on the sampled tokens, detached.

    w_t is clipped to [1 − eps_w, 1 + eps_w] (eps_w=None: no clip) and mixed with 1 by the schedule:
    w_eff = (1 − s) + s·w_t with s = strength = λ_k / w0 ∈ [0, 1], so s = 1 is full RLSD and s = 0
    (after the decay) is exactly GRPO. advantages [B] → returns [B, T] for ppo_clip_per_token.
    """
    log_w = torch.sign(advantages).unsqueeze(-1) * (teacher_logp - student_logp).detach()
    w = torch.exp(log_w)
    if eps_w is not None:
        w = w.clamp(1.0 - eps_w, 1.0 + eps_w)
    w_eff = (1.0 - strength) + strength * w
    return advantages.unsqueeze(-1) * w_eff


@torch.no_grad()
def ema_update(teacher_params: Iterable[Tensor], student_params: Iterable[Tensor], rate: float) -> None:
    """teacher ← (1 − rate)·teacher + rate·student, in place. SRPO: rate = 0.05, i.e. the teacher keeps
    95% of itself each update (§8 pitfall: the inverted rate would make it a near copy of the student).
    """
    for teacher, student in zip(teacher_params, student_params, strict=True):
        teacher.lerp_(student.to(teacher.dtype), rate)


# ---------------------------------------------------------------------------------------------
# 8. On-policy distillation (OPD) from an external teacher
# ---------------------------------------------------------------------------------------------
# OPD minimises KL(p‖q) on the student's own samples y ~ p, at every response token, toward a fixed
# stronger teacher q (another model with the same tokenizer), and nothing else: no GRPO term. Two ways:
#   * exact per position: the full-vocabulary (or teacher-top-K + tail) reverse KL, opd_objective;
#   * sampled token only (Thinking-Machines-style): a per-token advantage A_t = −(log p(y_t) − log q(y_t))
#     in the policy-gradient surrogate −A_t·ratio_t; on-policy (ratio = 1) its gradient is
#     k1·∇log p(y_t) = sampled_rkl_surrogate's, an unbiased single-sample estimate of ∇KL(p_t‖q_t).


def opd_objective(rkl_per_token: Tensor, mask: Tensor, *, weight: float = 1.0, agg_mode: str = "token-mean",
                  global_tokens: Tensor | float | None = None, global_seqs: Tensor | float | None = None,
                  max_len: int | None = None) -> Tensor:
    """OPD: weight · agg(KL(p_t‖q_t)) over every response token (GRPO's normalisers, no GRPO term)."""
    return weight * aggregate(rkl_per_token, mask, agg_mode, global_tokens, global_seqs, max_len)


def opd_k1_advantages(student_logp: Tensor, teacher_logp: Tensor, weight: float = 1.0) -> Tensor:
    """Per-token advantages A_t = −weight·(log p(y_t) − log q(y_t)) = −weight·k1, detached, [B, T]: a token the
    student over-allocates relative to the teacher (k1 > 0) is pushed down. Fed to ppo_clip_per_token in
    place of GRPO's sequence advantage (one update per batch: ratio 1, the clip never binds)."""
    return -weight * k1_estimate(student_logp, teacher_logp)
