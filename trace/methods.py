"""Every method of the study as one named setting of the routed objective (TRACE.md §3–4).

A method says which tokens get a KL channel (routing), toward which teacher (weights and
private context), in which direction (corner / divergence) over which categories (support), on which
λ schedule. GRPO is the method with no channel at all; every other method reduces to it when λ = 0.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    objective: str                 # grpo | trace | sdpo | srpo | rlsd | opd | opd_k1 | tropd  (which loss assembles
                                   # the pieces)
    routing: str = "none"          # router strategy: annotated | all | random | inverted | failed | none
    corner: str | None = None      # trace_fkl (μ_E,μ_K)=(0,1) | trace_rkl (1,0) | trace_both (1,1)
    teacher: str = "none"          # none | synced (re-copied every k steps) | ema | frozen (initial student)
                                   # | external (a fixed other model, train.teacher_model, same tokenizer)
    teacher_context: str = "label"  # label: annotator's diagnostic type label | reference: reference solution
                                    # | plain: the student's own prompt (no private context)
    schedule: str = "none"         # λ schedule (trace/schedule.py)
    divergence: str = "fkl"        # all-token baselines: jsd (SDPO/SRPO); OPD: rkl
    support: str = "settings"      # the categories a full-distribution KL sums over: settings = train.kl.top_k /
                                   # tail_bucket as set (null: the vocabulary) | vocab = the whole vocabulary |
                                   # teacher_top_k = the teacher's top train.kl.top_k + a tail bucket |
                                   # sampled = the sampled token only (a K1 policy-gradient estimate; tropd's outlier
                                   # FKL sums over the teacher's top train.tropd.outlier_top_k + a tail)
    needs_annotation: bool = False
    rollout_policy: str = "student"  # student | teacher_prefix (guidance: a teacher-written prefix continued by the
                                     # student) | trb (a teacher-aligned behaviour policy within a KL budget around
                                     # the student); trace/rollout/behaviour.py

    @property
    def uses_teacher(self) -> bool:
        return self.teacher != "none"

    @property
    def unused_train_keys(self) -> tuple[str, ...]:
        """The train.* keys this method never reads: left out of its run's settings (study_plan.train_settings)
        and resume fingerprint, so that setting or changing one reruns only the runs that read it."""
        reads = {"teacher_model": self.teacher == "external", "tropd": self.objective == "tropd",
                 "guidance": self.rollout_policy == "teacher_prefix", "trb": self.rollout_policy == "trb"}
        return tuple(key for key, used in reads.items() if not used)

    @property
    def self_teacher(self) -> bool:
        """A teacher that is the student's own network (synced / EMA / frozen copy): what the teacher
        check (rule teacher_gap) tests. An external teacher is another model: no such check."""
        return self.uses_teacher and self.teacher != "external"


_TRACE = dict(objective="trace", teacher="synced", teacher_context="label",
              schedule="warmup_linear_decay", needs_annotation=True)

_OPD = dict(routing="all", teacher="external", teacher_context="plain", schedule="constant", divergence="rkl")

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
    # On-policy distillation (OPD) from an external teacher: reverse KL(student ‖ teacher) on every token of
    # the student's own samples, for the whole run (λ = w0), no GRPO term; three estimators of the same KL.
    "opd": MethodSpec(objective="opd", support="vocab", **_OPD),
    "opd_topk": MethodSpec(objective="opd", support="teacher_top_k", **_OPD),
    "opd_k1": MethodSpec(objective="opd_k1", support="sampled", **_OPD),
    # Trust-region OPD (TrOPD; not the paper's): K1 on the tokens the teacher would decode too, a forward KL on the
    # teacher's top-k at the others (train.tropd); tropd also learns from teacher-written guidance prefixes.
    "tropd": MethodSpec(objective="tropd", support="sampled", rollout_policy="teacher_prefix", **_OPD),
    "tropd_noguide": MethodSpec(objective="tropd", support="sampled", **_OPD),
    # TRB (not the paper's): opd's loss on rollouts from a teacher-aligned behaviour policy kept within a KL
    # budget around the student (train.trb), annealed to 0; the loss is importance-weighted min(p/b, C) per token.
    "trb": MethodSpec(objective="opd", support="vocab", rollout_policy="trb", **_OPD),
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (config key 'methods'); choose from {sorted(METHODS)}")
    return METHODS[name]
