def evaluation_settings():
    ev = config["eval"]
    settings = {"k": ev["k"], "backend": ev["backend"], "batch_size": ev["batch_size"], "limit": ev["limit"],
                "thinking": config["thinking"], "seed": 0,
                "gen": {key: ev[key] for key in ("temperature", "top_p", "top_k", "max_new_tokens")},
                "device": ev.get("device", "cpu"), "dtype": ev.get("dtype", "float32"),
                "tensor_parallel_size": ev.get("tensor_parallel_size", 1)}
    if ev["backend"] == "vllm":
        settings["model_options"] = {key: ev[key] for key in ("max_model_len", "gpu_memory_utilization")
                                     if ev.get(key) is not None}
    return settings


rule evaluate:
    """lm-eval on one policy, all benchmarks in ONE call (the model loads once): avg@k, pass@k,
    bootstrap CI + per-sample log per benchmark."""
    input:
        model=policy_dir,
        data=[benchmark_file(benchmark) for benchmark in BENCHMARKS],
    output:
        [f"results/eval/{{model}}/{{policy}}/{benchmark}.json" for benchmark in BENCHMARKS],
    params:
        cfg=as_arg(evaluation_settings()),
        data=" ".join(f"{benchmark}={benchmark_file(benchmark)}" for benchmark in BENCHMARKS),
        out_dir="results/eval/{model}/{policy}",
        **({"bases": lambda wc: base_identity(wc.model) if wc.policy == "base" else ""} if STUDY != "toy" else {}),
    threads: 1
    resources:
        **study_config.job_resources(config, "evaluate", REPO),
    log:
        "logs/evaluate/{model}/{policy}.log",
    shell:
        "{PYTHON} -m trace evaluate --cfg {params.cfg} --model {input.model} --data {params.data}"
        " --out-dir {params.out_dir} > {log} 2>&1"
