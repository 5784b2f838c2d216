# The teacher check (trace/train/teacher_gap.py): before any RL, is each base model's self-teacher,
# given its private context, better than the student at the first-error tokens? One job per base
# model and teacher context used on it; distillation runs refuse to start on a worse teacher
# (teacher_check.on_worse), and every run's mechanism probe scores the label job's fixed batch.
methods_lib = _load_by_path("trace_methods", "trace/methods.py")
TEACHER_CHECK = config["teacher_check"]
PROBING = bool((config["train"].get("probe") or {}).get("steps"))


def teacher_context_of(run):
    """The private context of a run's teacher (label | reference), or None for a run without one."""
    method = methods_lib.get_method(method_and_annotator(run)[0])
    return method.teacher_context if method.uses_teacher else None


def teacher_contexts(model):
    """The contexts checked on one model: those of its runs, plus label for the probe's fixed batch."""
    contexts = {teacher_context_of(run) for run in runs_of(model)} - {None}
    return sorted(contexts | ({"label"} if PROBING else set()))


def all_teacher_gaps():
    return [f"results/teacher_gap/{model}/{context}.json" for model in MODELS for context in teacher_contexts(model)]


rule teacher_gap:
    """Teacher vs student on a fixed batch of the base's own rollouts, annotated by train.annotator: Δ log-prob
    at first-error and key-span tokens, unclipped KL, accuracy with the teacher's prompt (bootstrap CIs)."""
    input:
        base=lambda wc: base_folder(wc.model),  # ancient in the paper study: a rebuilt base keeps the checks
        data=TRAIN_DATA,
        annotator_model=lambda wc: [base_folder(m.removeprefix("results/base/")) if m.startswith("results/base/") else m
                                    for m in [config["train"]["annotator"].get("model")]
                                    if m and m.startswith("results/")],
    output:
        gap="results/teacher_gap/{model}/{context}.json",
        probe_batch="results/teacher_gap/{model}/{context}.probe.pt",
    params:
        cfg=lambda wc: as_arg({"train": {**{k: v for k, v in config["train"].items() if k != "parallel"},
                                         "seed": 0, "thinking": config["thinking"]},
                               "teacher_check": TEACHER_CHECK, "context": wc.context, "model": wc.model}),
        **({"bases": lambda wc: base_identity(wc.model)} if STUDY != "toy" else {}),
    wildcard_constraints:
        context="label|reference",
    threads: 1
    resources:
        **study_config.job_resources(config, "teacher_gap", REPO),
    log:
        "logs/teacher_gap/{model}/{context}.log",
    shell:
        "{PYTHON} -m trace teacher-gap --cfg {params.cfg} --base {input.base} --train-data {input.data}"
        " --out {output.gap} --probe-batch {output.probe_batch} > {log} 2>&1"
