rule toy_data:
    """The synthetic task's splits (train/val/sft + 4 in-distribution tests + choice_ood)."""
    output:
        expand("results/data/toy/{split}.jsonl",
               split=["train", "sft", "val", *config["eval"]["benchmarks"]]),
        manifest="results/data/toy/manifest.json",
    params:
        cfg=as_arg(config["toy"]),
    log:
        "logs/toy_data.log",
    shell:
        "{PYTHON} -m trace toy-data --cfg {params.cfg} --out-dir results/data/toy > {log} 2>&1"
