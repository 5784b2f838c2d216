rule evaluate:
    """lm-eval on one policy, all benchmarks in ONE call (the model loads once): avg@k, pass@k,
    bootstrap CI + per-sample log per benchmark."""
    input:
        model=policy_dir,
        data=[benchmark_file(benchmark) for benchmark in BENCHMARKS],
    output:
        PLAN.evaluation_outputs(),
    params:
        cfg=as_arg(PLAN.evaluation_settings()),
        data=PLAN.evaluation_data_arg(),
        out_dir="results/eval/{model}/{policy}",
        **({"bases": lambda wc: PLAN.evaluation_bases(wc.model, wc.policy)} if PLAN.pinned_bases else {}),
    threads: 1
    resources:
        **study_config.job_resources(config, "evaluate", REPO),
    log:
        "logs/evaluate/{model}/{policy}.log",
    shell:
        "{PYTHON} -m trace evaluate --cfg {params.cfg} --model {input.model} --data {params.data}"
        " --out-dir {params.out_dir} > {log} 2>&1"
