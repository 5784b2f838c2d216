# Names of things in the study grid: models x methods x seeds, and the benchmarks.
MODELS = list(config["models"])
METHODS = list(config["methods"])
SEEDS = list(config["seeds"])
BENCHMARKS = list(config["eval"]["benchmarks"])


def trained_policies():
    """Policy names as they appear in results/eval/<model>/<policy>/: 'base' plus every run."""
    return ["base"] + [f"{method}-seed{seed}" for method in METHODS for seed in SEEDS]


def policy_dir(wildcards):
    if wildcards.policy == "base":
        return f"results/base/{wildcards.model}"
    method, seed = wildcards.policy.rsplit("-seed", 1)
    return f"results/train/{wildcards.model}/{method}/seed{seed}/model"


def benchmark_data(wildcards):
    return f"results/data/{config['study']}/{wildcards.benchmark}.jsonl"


wildcard_constraints:
    model="[A-Za-z0-9_.-]+",
    method="[a-z0-9_]+",
    seed=r"\d+",
    benchmark="[A-Za-z0-9_]+",
