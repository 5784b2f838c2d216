def train_settings(wildcards):
    method, annotator = method_and_annotator(wildcards.method)
    settings = {**config["train"], "method": method, "annotator": annotator, "seed": int(wildcards.seed),
                "thinking": config["thinking"]}
    if STUDY != "toy":  # trained only on the data source the config asks for (checked against the manifest)
        settings["train_source"] = config["real_data"]["train_source"]
    return as_arg(settings)


def annotator_model(wildcards):
    """A frozen annotator's model folder, when this workflow builds it (e.g. the toy-large base)."""
    model = method_and_annotator(wildcards.method)[1].get("model")
    return [model] if model and model.startswith("results/") else []


rule train:
    """One RL run (GRPO, TRACE or a baseline; '<method>@<tier>' = an annotator-tier ablation). Resumes from results/train/.../work/checkpoint."""
    input:
        base="results/base/{model}",
        data=TRAIN_DATA,
        annotator_model=annotator_model,
    output:
        model=directory("results/train/{model}/{method}/seed{seed}/model"),
        metrics="results/train/{model}/{method}/seed{seed}/metrics.jsonl",
    params:
        cfg=train_settings,
        run_dir="results/train/{model}/{method}/seed{seed}",
    threads: 1
    resources:
        **study_config.job_resources(config, "train", REPO),
    log:
        "logs/train/{model}/{method}/seed{seed}.log",
    shell:
        "{PYTHON} -m trace train --cfg {params.cfg} --base {input.base} --train-data {input.data}"
        " --run-dir {params.run_dir} > {log} 2>&1"
