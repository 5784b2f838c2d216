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
    params:
        cfg=as_arg({"benchmarks": config["eval"]["benchmarks"]}),
    resources:
        **study_config.job_resources(config, "aggregate", REPO),
    log:
        "logs/aggregate.log",
    shell:
        "{PYTHON} -m trace aggregate --cfg {params.cfg} --evals {input.evals} --metrics {input.metrics} --teacher-gaps {input.teacher_gaps} --out-dir results/aggregate > {log} 2>&1"


def report_settings():
    settings = {"benchmarks": config["eval"]["benchmarks"], "methods": METHODS, "ablations": ABLATIONS}
    if STUDY == "paper":  # ours beside the paper's numbers (trace/paper_results.csv)
        settings["compare_to_paper"] = True
        settings["paper_models"] = {name: entry["paper_model"] for name, entry in config["models"].items()
                                    if entry.get("paper_model")}
    return settings


def report_outputs(root):
    """Every table and figure the report draws under root (results/, or a cache folder)."""
    return {
        "table_md": f"{root}/tables/main_results.md",
        "table_csv": f"{root}/tables/main_results.csv",
        "versus_grpo": [f"{root}/tables/vs_grpo.md", f"{root}/tables/vs_grpo.csv"],
        "mechanism": [f"{root}/tables/mechanism.md", f"{root}/tables/mechanism.csv"],
        "teacher_gap": [f"{root}/tables/teacher_gap.md", f"{root}/tables/teacher_gap.csv"],
        "figures": [f"{root}/figures/{name}.png" for name in
                    ("training_curves", "fig1a_entropy", "validation_curves", "fig8_dynamics", "fig6_credit_map")],
        "ablations": [f"{root}/{kind}/{name}.{ext}" for name in ("annotator_tiers", "mask_localisation")
                      if ABLATIONS.get(name)
                      for kind, ext in (("tables", "md"), ("tables", "csv"), ("figures", "png"))],
        "versus_paper": ([f"{root}/tables/main_results_vs_paper.csv"] + [f"{root}/tables/paper_figure_numbers.{ext}"
                                                                          for ext in ("md", "csv")]
                         if STUDY == "paper" else []),
    }


# `snakemake --report report.html` (docs/html-report.md): each table and figure the report rule draws, under
# the paper's table or figure it reproduces, captioned by workflow/report/<caption>.rst. Keyed by
# tables/<name> (its .md and .csv share the entry) or figures/<name>.
REPORT_ENTRIES = {  # key: (category, subcategory, caption)
    "tables/main_results": ("Table 2: main results", "ours", "main_results"),
    "tables/main_results_vs_paper": ("Table 2: main results", "beside the paper", "main_results_vs_paper"),
    "tables/vs_grpo": ("Table 2: main results", "gain over GRPO", "vs_grpo"),
    "tables/annotator_tiers": ("Table 3: annotator tiers", "table", "annotator_tiers"),
    "tables/mask_localisation": ("Table 4: mask localisation", "table", "mask_localisation"),
    "figures/fig1a_entropy": ("Fig 1a: entropy", "figure", "fig1a_entropy"),
    "figures/validation_curves": ("Fig 3: validation and training reward", "figure", "validation_curves"),
    "figures/mask_localisation": ("Fig 4: mask localisation curves", "figure", "fig4_mask_localisation"),
    "figures/fig6_credit_map": ("Fig 6: credit map", "credit map", "fig6_credit_map"),
    "tables/mechanism": ("Fig 6: credit map", "mechanism numbers", "mechanism"),
    "figures/annotator_tiers": ("Fig 7: annotator tier curves", "figure", "fig7_annotator_tiers"),
    "figures/fig8_dynamics": ("Fig 8: length, entropy, SRPO", "figure", "fig8_dynamics"),
    "tables/paper_figure_numbers": ("Figure numbers beside the paper", "table", "paper_figure_numbers"),
    "figures/training_curves": ("Training curves", "figure", "training_curves"),
    "tables/teacher_gap": ("Teacher check", "table", "teacher_gap"),
}


def in_report(outputs):
    """report_outputs with every file marked for Snakemake's report (REPORT_ENTRIES)."""

    def marked(path):
        key = f"{Path(path).parent.name}/{Path(path).stem}"
        if key not in REPORT_ENTRIES:
            raise WorkflowError(f"{path}: no entry in REPORT_ENTRIES (workflow/rules/report.smk) for the report")
        category, subcategory, caption = REPORT_ENTRIES[key]
        if not (REPO / "workflow" / "report" / f"{caption}.rst").is_file():  # Snakemake looks only at --report
            raise WorkflowError(f"{path}: its report caption workflow/report/{caption}.rst does not exist")
        return report(path, caption=f"../report/{caption}.rst", category=category, subcategory=subcategory)

    return {name: marked(value) if isinstance(value, str) else [marked(path) for path in value]
            for name, value in outputs.items()}


rule report:
    """Tables and figures, drawn only from the aggregate (no GPU needed)."""
    input:
        rules.aggregate.output,
    output:
        **in_report(report_outputs("results")),
    params:
        cfg=as_arg(report_settings()),
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
                                                            "teacher_gap.csv")],
        **report_outputs(CACHE),
    params:
        cfg=as_arg(report_settings()),
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
