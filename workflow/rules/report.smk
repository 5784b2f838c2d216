rule aggregate:
    """All per-run result files -> two tidy CSVs (evaluations, training curves)."""
    input:
        evals=all_evaluations(),
        metrics=all_training_metrics(),
    output:
        evals="results/aggregate/evals.csv",
        curves="results/aggregate/training_curves.csv",
        credit_maps="results/aggregate/credit_maps.csv",
    params:
        cfg=as_arg({"benchmarks": config["eval"]["benchmarks"]}),
    resources:
        **study_config.job_resources(config, "aggregate", REPO),
    log:
        "logs/aggregate.log",
    shell:
        "{PYTHON} -m trace aggregate --cfg {params.cfg} --evals {input.evals} --metrics {input.metrics} --out-dir results/aggregate > {log} 2>&1"


def report_settings():
    settings = {"benchmarks": config["eval"]["benchmarks"], "methods": METHODS, "ablations": ABLATIONS}
    if STUDY == "paper":  # ours beside the paper's numbers (trace/paper_results.csv)
        settings["compare_to_paper"] = True
        settings["paper_models"] = {name: entry["paper_model"] for name, entry in config["models"].items()
                                    if entry.get("paper_model")}
    return settings


rule report:
    """Tables and figures, drawn only from the aggregate (no GPU needed)."""
    input:
        rules.aggregate.output,
    output:
        table_md="results/tables/main_results.md",
        table_csv="results/tables/main_results.csv",
        versus_grpo=["results/tables/vs_grpo.md", "results/tables/vs_grpo.csv"],
        mechanism=["results/tables/mechanism.md", "results/tables/mechanism.csv"],
        figures=[f"results/figures/{name}.png" for name in
                 ("training_curves", "fig1a_entropy", "validation_curves", "fig8_dynamics", "fig6_credit_map")],
        ablations=[f"results/{kind}/{name}.{ext}" for name in ("annotator_tiers", "mask_localisation")
                   if ABLATIONS.get(name) for kind, ext in (("tables", "md"), ("figures", "png"))],
        versus_paper=(["results/tables/main_results_vs_paper.csv", "results/tables/paper_figure_numbers.md"]
                      if STUDY == "paper" else []),
    params:
        cfg=as_arg(report_settings()),
    resources:
        **study_config.job_resources(config, "report", REPO),
    log:
        "logs/report.log",
    shell:
        "{PYTHON} -m trace report --cfg {params.cfg} --aggregate-dir results/aggregate --out-dir results > {log} 2>&1"


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
