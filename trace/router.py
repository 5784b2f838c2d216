"""Per-token routing masks: which response tokens are key spans K, error spans E, or the rest N.

All masks are [B, T] bool over response positions; `mask` is the response mask and `correct` [B] bool
the verifier's verdict. The annotator marks K on correct rollouts and E on incorrect ones (§2), and
trace.losses.trace_objective distils FKL on K and RKL on E according to the corner (μ_E, μ_K).

Ablation masks ("mask localisation", §4) choose WHICH tokens are distilled without an annotator. By
default (route_by="correctness") the chosen tokens are labelled like annotated spans would be: key in
correct rollouts, error in incorrect ones, so only the positions change between the ablation arms and
the KL directions stay matched. route_by="key" / "error" puts every chosen token in one class instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from trace.annotate.contract import coverage_budget as exact_budget


class Corner(NamedTuple):
    mu_E: float  # weight of RKL = KL(p‖q) on error spans
    mu_K: float  # weight of FKL = KL(q‖p) on key spans


CORNERS = {
    "trace_fkl": Corner(mu_E=0.0, mu_K=1.0),  # paper default "TRACE-FKL"
    "trace_rkl": Corner(mu_E=1.0, mu_K=0.0),  # "TRACE-RKL"
    "trace_both": Corner(mu_E=1.0, mu_K=1.0),
}


@dataclass
class RoutedMasks:
    key: Tensor  # K: distilled with FKL (μ_K), ρ-scaled GRPO
    error: Tensor  # E: distilled with RKL (μ_E), ρ-scaled GRPO
    rest: Tensor  # N: plain GRPO

    @classmethod
    def from_spans(cls, mask: Tensor, key: Tensor, error: Tensor) -> "RoutedMasks":
        mask = mask.bool()
        key, error = key.bool() & mask, error.bool() & mask
        return cls(key=key, error=error, rest=mask & ~(key | error))

    @property
    def span(self) -> Tensor:
        """S = K ∪ E."""
        return self.key | self.error


def coverage_budget(mask: Tensor, alpha: float) -> Tensor:
    """floor(α·|y|) per sequence, [B] long, with |y| = the response mask's token count (end-of-turn
    token included). The ONE definition is trace.annotate.contract.coverage_budget (exact for a
    decimal α); the annotator's own cap uses it on the same |y|."""
    lengths = mask.sum(-1).tolist()
    return torch.tensor([exact_budget(int(n), alpha) for n in lengths], dtype=torch.long, device=mask.device)


def cap_span_coverage(span: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """Keep the EARLIEST span tokens of each sequence, at most floor(α·|y|) of them (deterministic;
    a span crossing the budget is truncated, later spans are dropped). The same rule as
    trace.annotate.contract.cap_coverage, on tensors (tests/test_router.py checks they agree).
    """
    span = span.bool() & mask.bool()
    rank_in_span = torch.cumsum(span.long(), dim=-1)  # 1 for the first span token, 2 for the second, …
    return span & (rank_in_span <= coverage_budget(mask, alpha).unsqueeze(-1))


def route_selected(selected: Tensor, mask: Tensor, correct: Tensor, route_by: str = "correctness") -> RoutedMasks:
    """Label chosen tokens as key or error spans (see the module docstring)."""
    selected = selected.bool() & mask.bool()
    none = torch.zeros_like(selected)
    if route_by == "key":
        return RoutedMasks.from_spans(mask, selected, none)
    if route_by == "error":
        return RoutedMasks.from_spans(mask, none, selected)
    if route_by == "correctness":
        is_correct = correct.bool().unsqueeze(-1)
        return RoutedMasks.from_spans(mask, selected & is_correct, selected & ~is_correct)
    raise ValueError(f"route_by must be 'correctness', 'key' or 'error', got {route_by!r}")


def choose_random_tokens(eligible: Tensor, counts: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Exactly min(counts[b], #eligible in row b) eligible tokens per row, uniformly without replacement."""
    scores = torch.rand(eligible.shape, generator=generator).to(eligible.device)
    scores = scores.masked_fill(~eligible.bool(), float("inf"))  # ineligible tokens sort last
    rank = scores.argsort(dim=-1).argsort(dim=-1)  # rank of each token in its row's random order
    counts = torch.minimum(counts, eligible.sum(-1))
    return eligible.bool() & (rank < counts.unsqueeze(-1))


# ---------------------------------------------------------------------------------------------
# Mask builders
# ---------------------------------------------------------------------------------------------


def annotated_masks(mask: Tensor, key: Tensor, error: Tensor, alpha: float | None = 0.25) -> RoutedMasks:
    """TRACE: the annotator's K / E masks, with the coverage cap |K ∪ E| ≤ α·|y| (alpha=None: no cap)."""
    routed = RoutedMasks.from_spans(mask, key, error)
    if alpha is None:
        return routed
    kept = cap_span_coverage(routed.span, mask, alpha)
    return RoutedMasks.from_spans(mask, routed.key & kept, routed.error & kept)


def all_token_masks(mask: Tensor, correct: Tensor, route_by: str = "correctness") -> RoutedMasks:
    """Ablation "all-token KL": every response token is routed."""
    return route_selected(mask, mask, correct, route_by)


def random_fraction_masks(mask: Tensor, correct: Tensor, alpha: float = 0.25, generator: torch.Generator | None = None,
                          route_by: str = "correctness") -> RoutedMasks:
    """Ablation "random α": exactly floor(α·|y|) tokens per sequence, uniformly at random (seeded)."""
    return route_selected(choose_random_tokens(mask.bool(), coverage_budget(mask, alpha), generator),
                          mask, correct, route_by)


def inverted_fraction_masks(mask: Tensor, key: Tensor, error: Tensor, correct: Tensor, alpha: float = 0.25,
                            generator: torch.Generator | None = None, route_by: str = "correctness") -> RoutedMasks:
    """Ablation "inverted α": floor(α·|y|) random tokens OUTSIDE the annotated spans (all of them if
    fewer remain). Never overlaps K ∪ E.
    """
    outside_spans = mask.bool() & ~(key.bool() | error.bool())
    return route_selected(choose_random_tokens(outside_spans, coverage_budget(mask, alpha), generator),
                          mask, correct, route_by)


def failed_rollout_masks(mask: Tensor, correct: Tensor) -> RoutedMasks:
    """SRPO: every token of a failed rollout is routed to distillation (error), correct ones to GRPO."""
    failed_tokens = mask.bool() & ~correct.bool().unsqueeze(-1)
    return route_selected(failed_tokens, mask, correct, route_by="error")


def no_span_masks(mask: Tensor) -> RoutedMasks:
    """Plain GRPO: nothing routed (trace_objective then equals GRPO for any λ)."""
    none = torch.zeros_like(mask, dtype=torch.bool)
    return RoutedMasks.from_spans(mask, none, none)


def build_routed_masks(strategy: str, mask: Tensor, correct: Tensor, key: Tensor | None = None,
                       error: Tensor | None = None, alpha: float = 0.25, generator: torch.Generator | None = None,
                       route_by: str = "correctness") -> RoutedMasks:
    """Dispatch by name: 'annotated' | 'all' | 'random' | 'inverted' | 'failed' | 'none'."""
    if strategy == "annotated":
        return annotated_masks(mask, key, error, alpha)
    if strategy == "all":
        return all_token_masks(mask, correct, route_by)
    if strategy == "random":
        return random_fraction_masks(mask, correct, alpha, generator, route_by)
    if strategy == "inverted":
        return inverted_fraction_masks(mask, key, error, correct, alpha, generator, route_by)
    if strategy == "failed":
        return failed_rollout_masks(mask, correct)
    if strategy == "none":
        return no_span_masks(mask)
    raise ValueError(f"unknown routing strategy {strategy!r}")


ROUTING_STRATEGIES = ("annotated", "all", "random", "inverted", "failed", "none")


# ---------------------------------------------------------------------------------------------
# Post-teacher routers: read the teacher's log-probs, so they run after the teacher forward
# ---------------------------------------------------------------------------------------------


class AgreementRegion(NamedTuple):
    trust: Tensor  # [B, T] bool: tokens the teacher would decode too (TrOPD's trust region)
    outliers: Tensor  # [B, T] bool: the other tokens of ``mask``


def agreement_region(teacher_logp_sampled: Tensor, mask: Tensor, threshold: float) -> AgreementRegion:
    """TrOPD's split by teacher–student decoding agreement. Ours (?): TrOPD's authors split on agreement
    without a formula we could check, so token t is in the trust region iff the teacher's probability of the
    student's sampled token q(y_t) ≥ threshold; every other token of ``mask`` is an outlier.

    teacher_logp_sampled [B, T]: log q(y_t) (anything at padding); mask [B, T]: the tokens to split (TrOPD:
    the student's own completion tokens, a teacher-written guidance prefix left out)."""
    mask = mask.bool()
    agrees = teacher_logp_sampled.detach().exp() >= threshold
    return AgreementRegion(trust=mask & agrees, outliers=mask & ~agrees)
