# Names of things in the study grid, from trace/study_plan.py (the rule files only wire). A run is
# (model, run name, seed); a run name is a method (trace/methods.py) or, for the annotator-tier
# ablation, '<method>@<tier>'.
study_plan = _load_by_path("trace_study_plan", "trace/study_plan.py")
methods_lib = _load_by_path("trace_methods", "trace/methods.py")
PLAN = study_plan.StudyPlan(config, REPO, methods_lib.get_method)

MODELS = PLAN.models
ANNOTATOR_MODELS = PLAN.annotator_models
METHODS = PLAN.methods
SEEDS = PLAN.seeds
BENCHMARKS = PLAN.benchmarks
ABLATIONS = PLAN.ablations
TIER_RUNS = PLAN.tier_runs
MASK_RUNS = PLAN.mask_runs

# One data convention for every study: the files each rule reads are where the data rules write them.
DATA_DIR, TRAIN_DATA, VAL_DATA = PLAN.data_dir, PLAN.train_data, PLAN.val_data
_problem = PLAN.data_problem()
if _problem:
    raise WorkflowError(f"config error: {_problem}")

benchmark_file = PLAN.benchmark_file
runs_of = PLAN.runs_of
evaluations_of = PLAN.evaluations_of
all_evaluations = PLAN.all_evaluations
all_training_metrics = PLAN.all_training_metrics
method_and_annotator = PLAN.method_and_annotator
base_identity = PLAN.base_identity


def base_folder(model):
    """results/base/<model> as an input. Ancient where the bases are pinned (the paper study): a base
    re-materialised because its weights went missing (base.smk) is the same pinned, hash-checked model, so
    the runs and evaluations finished on it are kept; what the base IS enters their params instead
    (base_identity), so a changed models.<name> entry still reruns them."""
    path = PLAN.base_dir(model)
    return ancient(path) if PLAN.pinned_bases else path


def built_model_folder(path):
    """A model the workflow builds for a job (PLAN.built_annotator, PLAN.built_teacher) as an input: a base
    folder as base_folder gives it, another result (a trained run's model/) as is; none: no input."""
    base = PLAN.base_of(path)
    return [base_folder(base)] if base is not None else [path] if path else []


def policy_dir(wildcards):
    return PLAN.trained_model_of(wildcards.model, wildcards.policy) or base_folder(wildcards.model)


wildcard_constraints:
    **study_plan.WILDCARD_CONSTRAINTS,
