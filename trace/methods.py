"""Every method of the study as one named setting of the routed objective (TRACE.md §3–4).

A method says which tokens get a KL channel (routing), toward which teacher (weights and
private context), in which direction (corner / divergence), on which λ schedule. GRPO is the
method with no channel at all; every other method reduces to it when λ = 0.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    objective: str                 # grpo | trace | sdpo | srpo | rlsd  (which loss assembles the pieces)
    routing: str = "none"          # router strategy: annotated | all | random | inverted | failed | none
    corner: str | None = None      # trace_fkl (μ_E,μ_K)=(0,1) | trace_rkl (1,0) | trace_both (1,1)
    teacher: str = "none"          # none | synced (re-copied every k steps) | ema | frozen (initial student)
    teacher_context: str = "label"  # label: annotator's diagnostic type label | reference: reference solution
    schedule: str = "none"         # λ schedule (trace/schedule.py)
    divergence: str = "fkl"        # all-token baselines: jsd (SDPO/SRPO)
    needs_annotation: bool = False

    @property
    def uses_teacher(self) -> bool:
        return self.teacher != "none"


_TRACE = dict(objective="trace", teacher="synced", teacher_context="label",
              schedule="warmup_linear_decay", needs_annotation=True)

METHODS: dict[str, MethodSpec] = {
    "grpo": MethodSpec(objective="grpo"),
    # TRACE: KL only on annotated spans, teacher = live policy + diagnostic label, annealed to 0.
    "trace_fkl": MethodSpec(routing="annotated", corner="trace_fkl", **_TRACE),
    "trace_rkl": MethodSpec(routing="annotated", corner="trace_rkl", **_TRACE),
    "trace_both": MethodSpec(routing="annotated", corner="trace_both", **_TRACE),
    # Mask-localisation ablation (Table 4): same teacher, corner and schedule, other token sets.
    "alltoken_decay": MethodSpec(routing="all", corner="trace_fkl", **_TRACE),
    "random25": MethodSpec(routing="random", corner="trace_fkl", **_TRACE),
    "inverted25": MethodSpec(routing="inverted", corner="trace_fkl", **_TRACE),
    # All-token self-distillation baselines: teacher sees the reference solution.
    "sdpo": MethodSpec(objective="sdpo", routing="all", teacher="frozen", teacher_context="reference",
                       schedule="constant", divergence="jsd"),
    "srpo": MethodSpec(objective="srpo", routing="failed", teacher="ema", teacher_context="reference",
                       schedule="constant", divergence="jsd"),
    "rlsd": MethodSpec(objective="rlsd", routing="all", teacher="synced", teacher_context="reference",
                       schedule="warmup_linear_decay"),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (config key 'methods'); choose from {sorted(METHODS)}")
    return METHODS[name]
