"""KL-weight schedules λ_k (Eq. 2) and when the teacher forward can be skipped.

warmup_linear_decay (paper): λ_k = w0 for k < warmup; w0·(end − k)/(end − warmup) for
warmup ≤ k < end; 0 for k ≥ end. With w0 = 0.5, warmup = 10, end = 40: 0.5 until step 10, linear to 0
at step 40, then pure GRPO. ρ_k = 1 − λ_k/w0 is the GRPO weight on span tokens in Eq. 1; the same
ratio λ_k/w0 is RLSD's mixing strength (trace.losses.rlsd_token_advantages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_linear_decay(step: int, w0: float, warmup: int, end: int) -> float:
    if step < warmup:
        return w0
    if step < end:
        return w0 * (end - step) / (end - warmup)
    return 0.0


def constant(step: int, w0: float, warmup: int, end: int) -> float:
    return w0


def none(step: int, w0: float, warmup: int, end: int) -> float:
    return 0.0


LAMBDA_SCHEDULES = {"warmup_linear_decay": warmup_linear_decay, "constant": constant, "none": none}


@dataclass(frozen=True)
class LambdaSchedule:
    kind: str = "warmup_linear_decay"
    w0: float = 0.5
    warmup: int = 10
    end: int = 40

    def __post_init__(self):
        if self.kind not in LAMBDA_SCHEDULES:
            raise ValueError(f"unknown λ schedule {self.kind!r}; choose from {sorted(LAMBDA_SCHEDULES)}")
        if self.w0 < 0 or not 0 <= self.warmup <= self.end:
            raise ValueError(f"need w0 ≥ 0 and 0 ≤ warmup ≤ end, got {self}")

    def __call__(self, step: int) -> float:
        """λ_k at optimizer step k (0-based)."""
        return LAMBDA_SCHEDULES[self.kind](step, self.w0, self.warmup, self.end)

    def rho(self, step: int) -> float:
        """ρ_k = 1 − λ_k / w0 (1 when w0 = 0: no KL, full GRPO everywhere)."""
        return 1.0 - self.strength(step)

    def strength(self, step: int) -> float:
        """λ_k / w0 ∈ [0, 1] (0 when w0 = 0)."""
        return self(step) / self.w0 if self.w0 > 0 else 0.0

    def last_active_step(self) -> float:
        """The last step with λ > 0 (−1 if none, inf if it never ends)."""
        if self.w0 == 0 or self.kind == "none":
            return -1
        if self.kind == "constant":
            return math.inf
        return self.end - 1  # warmup_linear_decay: λ_{end−1} = w0/(end − warmup) > 0 (or w0 if warmup = end)

    def teacher_forward_needed(self, step: int) -> bool:
        """Whether λ is > 0 now or at any later step. Once False it stays False: the teacher forward
        (and the annotator, for TRACE) can be skipped for the rest of training.
        """
        return step <= self.last_active_step()


def teacher_sync_due(step: int, every: int = 10) -> bool:
    """TRACE re-copies the student weights into the teacher at steps 0, every, 2·every, … (§2: every 10)."""
    return every > 0 and step % every == 0
