rule aggregate:
    """All per-run result files -> two tidy CSVs (evaluations, training curves)."""
    input:
        evals=all_evaluations(),
        metrics=all_training_metrics(),
    output:
        evals="results/aggregate/evals.csv",
        curves="results/aggregate/training_curves.csv",
    params:
        cfg=as_arg({"benchmarks": config["eval"]["benchmarks"]}),
    log:
        "logs/aggregate.log",
    shell:
        "{PYTHON} -m trace aggregate --cfg {params.cfg} --results results --out-dir results/aggregate > {log} 2>&1"


rule report:
    """Tables and figures, drawn only from the aggregate (no GPU needed)."""
    input:
        rules.aggregate.output,
    output:
        table_md="results/tables/main_results.md",
        table_csv="results/tables/main_results.csv",
        curves="results/figures/training_curves.png",
        ablations=[f"results/tables/{name}.md" for name in ("annotator_tiers", "mask_localisation")
                   if ABLATIONS.get(name)],
    params:
        cfg=as_arg({"benchmarks": config["eval"]["benchmarks"], "methods": METHODS, "ablations": ABLATIONS}),
    log:
        "logs/report.log",
    shell:
        "{PYTHON} -m trace report --cfg {params.cfg} --aggregate-dir results/aggregate --out-dir results > {log} 2>&1"
