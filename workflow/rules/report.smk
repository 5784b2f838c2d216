rule aggregate:
    """All per-run result files -> two tidy CSVs (evaluations, training curves)."""
    input:
        evals=all_evaluations(),
        metrics=all_training_metrics(),
        teacher_gaps=all_teacher_gaps(),
    output:
        evals="results/aggregate/evals.csv",
        curves="results/aggregate/training_curves.csv",
        credit_maps="results/aggregate/credit_maps.csv",
        teacher_gaps="results/aggregate/teacher_gap.csv",
        calibration="results/aggregate/calibration.csv",
    params:
        cfg=as_arg({"benchmarks": config["eval"]["benchmarks"]}),
    resources:
        **study_config.job_resources(config, "aggregate", REPO),
    log:
        "logs/aggregate.log",
    shell:
        "{PYTHON} -m trace aggregate --cfg {params.cfg} --evals {input.evals} --metrics {input.metrics} --teacher-gaps {input.teacher_gaps} --out-dir results/aggregate > {log} 2>&1"


def in_report(outputs):
    """Report outputs with every file marked for Snakemake's report (PLAN.report_entry: category, caption); an
    optional one (calibration) only where it exists (PLAN.in_html_report)."""

    def marked(path):
        if not PLAN.in_html_report(path):
            return path
        try:
            category, subcategory, caption = PLAN.report_entry(path)
        except study_plan.StudyPlanError as error:
            raise WorkflowError(str(error)) from None
        return report(path, caption=caption, category=category, subcategory=subcategory)

    return {name: marked(value) if isinstance(value, str) else [marked(path) for path in value]
            for name, value in outputs.items()}


rule report:
    """Tables and figures, drawn only from the aggregate (no GPU needed)."""
    input:
        rules.aggregate.output,
    output:
        **in_report(PLAN.report_outputs("results")),
    params:
        cfg=as_arg(PLAN.report_settings()),
    resources:
        **study_config.job_resources(config, "report", REPO),
    log:
        "logs/report.log",
    shell:
        "{PYTHON} -m trace report --cfg {params.cfg} --aggregate-dir results/aggregate --out-dir results > {log} 2>&1"


CACHE = f"results/cache/{STUDY}"


rule export_cache:
    """The study's results as a cache (aggregate CSVs + the report's settings) in results/cache/<study>/,
    redrawn there from the cache alone; `python -m trace redraw DIR` redraws a copy anywhere (README)."""
    input:
        rules.aggregate.output,
    output:
        settings=f"{CACHE}/report_settings.json",
        aggregate=[f"{CACHE}/aggregate/{name}" for name in ("evals.csv", "training_curves.csv", "credit_maps.csv",
                                                            "teacher_gap.csv", "calibration.csv")],
        **PLAN.report_outputs(CACHE),
    params:
        cfg=as_arg(PLAN.report_settings()),
    resources:
        **study_config.job_resources(config, "report", REPO),
    log:
        f"logs/export_cache/{STUDY}.log",
    shell:
        "{PYTHON} -m trace export-cache --cfg {params.cfg} --aggregate-dir results/aggregate --out-dir {CACHE} > {log} 2>&1"


# Targets for one part of the study (trained and evaluated, no report): e.g.
#   snakemake --cores 2 mask_localisation     # the Table 4 runs on their model (paper: Qwen3-1.7B)
rule main_table:
    input:
        [evaluations_of(model, METHODS) for model in MODELS],


if TIER_RUNS:

    rule annotator_tiers:
        input:
            evaluations_of(TIER_RUNS["model"], ["grpo", TIER_RUNS["method"]]
                           + [f"{TIER_RUNS['method']}@{tier}" for tier in TIER_RUNS["tiers"]]),


if MASK_RUNS:

    rule mask_localisation:
        input:
            evaluations_of(MASK_RUNS["model"], ["grpo", "trace_fkl", *MASK_RUNS["methods"]]),


if PLAN.family:

    rule opd_family:
        """Beyond the paper (docs/methods.md): GRPO, OPD, TrOPD, TRB and TRACE on one student over the family's seeds,
        on the same data, steps and evaluation -> its table (accuracy with CIs, gradient norm, entropy, calibration,
        TRB's realised KL budget) and figure. Not part of `all`: `snakemake --cores 2 opd_family`."""
        input:
            evals=PLAN.family_evaluations(),
            metrics=PLAN.family_training_metrics(),
        output:
            **PLAN.family_outputs("results"),
            cache=directory(f"results/cache/{STUDY}-opd-family"),  # redraw a copy: python -m trace redraw DIR
        params:
            cfg=as_arg(PLAN.family_settings()),
        resources:
            **study_config.job_resources(config, "report", REPO),
        log:
            "logs/opd_family.log",
        shell:
            "{PYTHON} -m trace opd-family --cfg {params.cfg} --evals {input.evals} --metrics {input.metrics}"
            " --out-dir results --cache-dir {output.cache} > {log} 2>&1"
