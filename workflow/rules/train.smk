def train_settings(wildcards):
    return as_arg({**config["train"], "method": wildcards.method, "seed": int(wildcards.seed),
                   "thinking": config["thinking"]})


rule train:
    """One RL run (GRPO, TRACE or a baseline). Resumes from results/train/.../work/checkpoint."""
    input:
        base="results/base/{model}",
        data=f"results/data/{config['study']}/train.jsonl",
    output:
        model=directory("results/train/{model}/{method}/seed{seed}/model"),
        metrics="results/train/{model}/{method}/seed{seed}/metrics.jsonl",
    params:
        cfg=train_settings,
        run_dir="results/train/{model}/{method}/seed{seed}",
    threads: 1
    resources:
        gpu=lambda wc: 1 if config["train"]["device"] == "cuda" else 0,
        runtime=24 * 60,
    log:
        "logs/train/{model}/{method}/seed{seed}.log",
    shell:
        "{PYTHON} -m trace train --cfg {params.cfg} --base {input.base} --train-data {input.data}"
        " --run-dir {params.run_dir} > {log} 2>&1"
