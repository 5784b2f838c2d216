rule toy_base:
    """Tokenizer + tiny Qwen3 + SFT: the toy world's base policy for one model size."""
    input:
        "results/data/toy/sft.jsonl",
    output:
        directory("results/base/{model}"),
    params:
        cfg=lambda wc: as_arg({**config["models"][wc.model], "seed": config["toy"]["seed"],
                               "thinking": config["thinking"],
                               "tokenizer_vocab": config["toy"]["tokenizer_vocab"]}),
    threads: 1
    resources:
        runtime=60,
    log:
        "logs/toy_base/{model}.log",
    shell:
        "{PYTHON} -m trace toy-base --cfg {params.cfg} --data-dir results/data/toy --out-dir {output} > {log} 2>&1"
