if STUDY == "toy":

    rule toy_data:
        """The synthetic task's splits (train/val/sft + 4 in-distribution tests + choice_ood)."""
        output:
            expand("results/data/toy/{split}.jsonl", split=["train", "sft", "val", *BENCHMARKS]),
            manifest="results/data/toy/manifest.json",
        params:
            cfg=as_arg(config["toy"]),
        resources:
            **study_config.job_resources(config, "toy_data", REPO),
        log:
            "logs/toy_data.log",
        shell:
            "{PYTHON} -m trace toy-data --cfg {params.cfg} --out-dir results/data/toy > {log} 2>&1"


def mirror_dir():
    """config real_data.mirror_dir, resolved against the repo root (null: read from the hub)."""
    mirror = config["real_data"]["mirror_dir"]
    return None if mirror is None else str((REPO / mirror).resolve())


if config.get("real_data"):

    rule benchmark_data:
        """Normalised evaluation sets (MATH-500, AIME24/25, AMC23, GPQA-Diamond) + manifest with sha256."""
        output:
            expand("results/data/real/{name}.jsonl", name=config["real_data"]["eval_sets"]),
            manifest="results/data/real/manifest.json",
        params:
            cfg=as_arg({"mirror_dir": mirror_dir(), "names": config["real_data"]["eval_sets"],
                        "gpqa_seed": config["real_data"]["gpqa_seed"]}),
            out_dir="results/data/real",
        resources:
            **study_config.job_resources(config, "benchmark_data", REPO),
        log:
            "logs/benchmark_data.log",
        shell:
            "{PYTHON} -m trace prepare-benchmarks --cfg {params.cfg} --out-dir {params.out_dir} > {log} 2>&1"

    rule train_data:
        """Training problems with reference solutions: OpenThoughts-114k math (paper) or MATH train
        (only when real_data.train_source says so); the source used is in the manifest."""
        output:
            "results/data/real/train/train.jsonl",
            "results/data/real/train/val.jsonl",
            manifest="results/data/real/train/manifest.json",
        params:
            cfg=as_arg({"mirror_dir": mirror_dir(), "max_rows": config["real_data"]["train_max_rows"],
                        "val_rows": config["real_data"]["val_rows"], "seed": config["real_data"]["seed"],
                        "source": config["real_data"]["train_source"]}),
            out_dir="results/data/real/train",
        resources:
            **study_config.job_resources(config, "train_data", REPO),
        log:
            "logs/train_data.log",
        shell:
            "{PYTHON} -m trace prepare-train --cfg {params.cfg} --out-dir {params.out_dir} > {log} 2>&1"

    rule real_data:
        """Convenience target: every real data set."""
        input:
            rules.benchmark_data.output,
            rules.train_data.output,
