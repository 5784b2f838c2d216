if STUDY == "toy":

    rule toy_data:
        """The synthetic task's splits (train/val/sft + 4 in-distribution tests + choice_ood)."""
        output:
            PLAN.toy_data_files(),
            manifest="results/data/toy/manifest.json",
        params:
            cfg=as_arg(config["toy"]),
        resources:
            **study_config.job_resources(config, "toy_data", REPO),
        log:
            "logs/toy_data.log",
        shell:
            "{PYTHON} -m trace toy-data --cfg {params.cfg} --out-dir results/data/toy > {log} 2>&1"


if config.get("real_data"):

    rule benchmark_data:
        """Normalised evaluation sets (MATH-500, AIME24/25, AMC23, GPQA-Diamond) + manifest with sha256."""
        output:
            PLAN.real_benchmark_files(),
            manifest="results/data/real/manifest.json",
        params:
            cfg=as_arg(PLAN.benchmark_data_settings()),
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
            cfg=as_arg(PLAN.train_data_settings()),
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
