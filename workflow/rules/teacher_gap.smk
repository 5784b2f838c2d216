# The teacher check (trace/train/teacher_gap.py): before any RL, is each base model's self-teacher,
# given its private context, better than the student at the first-error tokens? One job per base
# model and teacher context used on it (PLAN.teacher_contexts); distillation runs refuse to start on a
# worse teacher (teacher_check.on_worse), and every run's mechanism probe scores the label job's fixed batch.
all_teacher_gaps = PLAN.all_teacher_gaps


rule teacher_gap:
    """Teacher vs student on a fixed batch of the base's own rollouts, annotated by train.annotator: Δ log-prob
    at first-error and key-span tokens, unclipped KL, accuracy with the teacher's prompt (bootstrap CIs)."""
    input:
        base=lambda wc: base_folder(wc.model),  # ancient in the paper study: a rebuilt base keeps the checks
        data=TRAIN_DATA,
        annotator_model=lambda wc: built_model_folder(PLAN.built_annotator()),
    output:
        gap="results/teacher_gap/{model}/{context}.json",
        probe_batch="results/teacher_gap/{model}/{context}.probe.pt",
    params:
        cfg=lambda wc: as_arg(PLAN.teacher_gap_settings(wc.model, wc.context)),
        **({"bases": lambda wc: base_identity(wc.model)} if PLAN.pinned_bases else {}),
    wildcard_constraints:
        context=study_plan.TEACHER_CONTEXT_PATTERN,
    threads: 1
    resources:
        **study_config.job_resources(config, "teacher_gap", REPO),
    log:
        "logs/teacher_gap/{model}/{context}.log",
    shell:
        "{PYTHON} -m trace teacher-gap --cfg {params.cfg} --base {input.base} --train-data {input.data}"
        " --out {output.gap} --probe-batch {output.probe_batch} > {log} 2>&1"
