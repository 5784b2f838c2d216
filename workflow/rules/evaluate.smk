rule evaluate:
    """lm-eval on one (model, policy, benchmark): avg@k, pass@k, bootstrap CI + per-sample log."""
    input:
        model=policy_dir,
        data=benchmark_data,
    output:
        result="results/eval/{model}/{policy}/{benchmark}.json",
        samples="results/eval/{model}/{policy}/{benchmark}.samples.jsonl",
    params:
        cfg=lambda wc: as_arg({
            "k": config["eval"]["k"], "backend": config["eval"]["backend"],
            "batch_size": config["eval"]["batch_size"], "limit": config["eval"]["limit"],
            "thinking": config["thinking"], "seed": 0,
            "gen": {key: config["eval"][key] for key in ("temperature", "top_p", "top_k", "max_new_tokens")},
        }),
    threads: 1
    resources:
        gpu=lambda wc: 1 if config["eval"]["backend"] == "vllm" else 0,
        runtime=12 * 60,
    log:
        "logs/evaluate/{model}/{policy}/{benchmark}.log",
    shell:
        "{PYTHON} -m trace evaluate --cfg {params.cfg} --model {input.model} --benchmark {wildcards.benchmark}"
        " --data {input.data} --out {output.result} > {log} 2>&1"
