# Names of things in the study grid. A run is (model, run name, seed); a run name is a method
# (trace/methods.py) or, for the annotator-tier ablation, '<method>@<tier>'.
MODELS = list(config["models"])
ANNOTATOR_MODELS = dict(config.get("annotator_models") or {})
METHODS = list(config["methods"])
SEEDS = list(config["seeds"])
BENCHMARKS = list(config["eval"]["benchmarks"])
ABLATIONS = config.get("ablations") or {}
TIER_RUNS = ABLATIONS.get("annotator_tiers") or {}
MASK_RUNS = ABLATIONS.get("mask_localisation") or {}

# One data convention for every study: the files each rule reads are where the data rules write them.
if STUDY == "toy":
    DATA_DIR = "results/data/toy"
    TRAIN_DATA, VAL_DATA = f"{DATA_DIR}/train.jsonl", f"{DATA_DIR}/val.jsonl"
else:
    DATA_DIR = "results/data/real"
    TRAIN_DATA, VAL_DATA = f"{DATA_DIR}/train/train.jsonl", f"{DATA_DIR}/train/val.jsonl"
    _missing = [b for b in BENCHMARKS if b not in config["real_data"]["eval_sets"]]
    if _missing:
        raise WorkflowError(f"config error: eval.benchmarks {_missing} are not prepared: add them to real_data.eval_sets")


def benchmark_file(benchmark):
    return f"{DATA_DIR}/{benchmark}.jsonl"


def runs_of(model):
    """Run names trained on one model: the main methods, plus the ablations assigned to it."""
    runs = list(METHODS)
    if TIER_RUNS.get("model") == model:
        runs += [f"{TIER_RUNS['method']}@{tier}" for tier in TIER_RUNS["tiers"]]
    if MASK_RUNS.get("model") == model:
        runs += [method for method in MASK_RUNS["methods"] if method not in runs]
    return runs


def evaluations_of(model, runs):
    """Result files of the base and the given runs on one model; policy names as they appear in
    results/eval/<model>/<policy>/: 'base' and '<run>-seed<s>'."""
    policies = ["base"] + [f"{run}-seed{seed}" for run in runs for seed in SEEDS]
    return [f"results/eval/{model}/{policy}/{benchmark}.json" for policy in policies for benchmark in BENCHMARKS]


def all_evaluations():
    return [path for model in MODELS for path in evaluations_of(model, runs_of(model))]


def all_training_metrics():
    return [f"results/train/{model}/{run}/seed{seed}/metrics.jsonl"
            for model in MODELS for run in runs_of(model) for seed in SEEDS]


def method_and_annotator(run):
    """'trace_fkl@self' -> ('trace_fkl', train.annotator with the tier's overrides)."""
    method, _, tier = run.partition("@")
    annotator = dict(config["train"]["annotator"])
    if tier:
        if tier not in TIER_RUNS.get("tiers", {}):
            raise ValueError(f"run {run!r}: tier {tier!r} is not in ablations.annotator_tiers.tiers")
        annotator.update(TIER_RUNS["tiers"][tier])
    return method, annotator


def base_folder(model):
    """results/base/<model> as an input. Ancient in the paper study: a base re-materialised because its
    weights went missing (base.smk) is the same pinned, hash-checked model, so the runs and evaluations
    finished on it are kept; what the base IS enters their params instead (base_identity), so a changed
    models.<name> entry still reruns them."""
    path = f"results/base/{model}"
    return path if STUDY == "toy" else ancient(path)


def base_identity(*models):
    """A short hash of the config entries of these base models ('' in the toy study)."""
    if STUDY == "toy":
        return ""
    entries = {**config["models"], **ANNOTATOR_MODELS}
    text = json.dumps([entries.get(model) for model in models], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def policy_dir(wildcards):
    if wildcards.policy == "base":
        return base_folder(wildcards.model)
    run, seed = wildcards.policy.rsplit("-seed", 1)
    return f"results/train/{wildcards.model}/{run}/seed{seed}/model"


wildcard_constraints:
    model="[A-Za-z0-9_.-]+",
    method="[a-z0-9_]+(@[a-z0-9_]+)?",
    seed=r"\d+",
    benchmark="[A-Za-z0-9_]+",
