launch = _load_by_path("trace_launch", "trace/launch.py")
TRAIN_LAUNCHER = launch.train_launcher(config["train"], PYTHON)  # python | torchrun | srun + torchrun
# the job's size and placement from resources.train (cpus, mem, runtime, partition); its shape (nodes,
# tasks, GPUs per node) from train.parallel, which the launcher follows. resources.train's cpus, mem_mb
# and gpus are per node (SLURM's --cpus-per-task and --mem are per node with one task per node), but the
# plugin's --gpus=N counts the whole job: N = nodes x GPUs per node.
_shape = {key: value for key, value in launch.train_resources(config["train"]).items() if key in ("nodes", "tasks", "gpu")}
_requested = (config.get("resources") or {}).get("train", {}).get("gpus", 0)
if _shape["gpu"] != _requested:
    raise WorkflowError(f"config error: resources.train.gpus = {_requested} but train.parallel runs {_shape['gpu']} "
                        f"GPU process(es) per node (train.device {config['train']['device']!r}): make them equal")
TRAIN_RESOURCES = {**study_config.job_resources(config, "train", REPO), **_shape}
if _shape["gpu"]:
    TRAIN_RESOURCES["gpu"] = _shape["gpu"] * _shape["nodes"]
if _shape["nodes"] > 1:
    # the SLURM plugin's job step wraps a job's command in `srun -n1` (one node) unless the job declares
    # `mpi`: then the command runs in the batch step and its own `srun --nodes N` starts torchrun per node
    # (and the plugin asks --ntasks=N: one task per node)
    TRAIN_RESOURCES["mpi"] = "srun"


def train_settings(wildcards):
    method, annotator = method_and_annotator(wildcards.method)
    # `parallel` only shapes the launch (it may change between attempts without rerunning a run)
    train = {key: value for key, value in config["train"].items() if key != "parallel"}
    settings = {**train, "method": method, "annotator": annotator, "seed": int(wildcards.seed),
                "thinking": config["thinking"], "teacher_check_on_worse": TEACHER_CHECK["on_worse"]}
    if STUDY != "toy":  # trained only on the data source the config asks for (checked against the manifest)
        settings["train_source"] = config["real_data"]["train_source"]
    return as_arg(settings)


def teacher_check_inputs(wildcards):
    """The run's teacher check (a run with a teacher) and the probe's fixed batch (probing on)."""
    context = teacher_context_of(wildcards.method)
    inputs = {"gap": f"results/teacher_gap/{wildcards.model}/{context}.json"} if context else {}
    if PROBING:
        inputs["probe_batch"] = f"results/teacher_gap/{wildcards.model}/label.probe.pt"
    return inputs


def teacher_check_args(wildcards, input):
    return " ".join(f"--{'teacher-gap' if name == 'gap' else 'probe-batch'} {input[name]}"
                    for name in ("gap", "probe_batch") if name in input.keys())


def annotator_model(wildcards):
    """A frozen annotator's model folder, when this workflow builds it (e.g. the toy-large base)."""
    model = method_and_annotator(wildcards.method)[1].get("model")
    if model and model.startswith("results/base/"):
        return [base_folder(model.removeprefix("results/base/"))]
    return [model] if model and model.startswith("results/") else []


def train_bases(wildcards):
    """Identity of the base models a run starts from and is annotated by (see base_folder)."""
    annotator = method_and_annotator(wildcards.method)[1].get("model") or ""
    return base_identity(wildcards.model, *([annotator.removeprefix("results/base/")]
                                            if annotator.startswith("results/base/") else []))


rule train:
    """One RL run (GRPO, TRACE or a baseline; '<method>@<tier>' = an annotator-tier ablation). Resumes from results/train/.../work/checkpoint."""
    input:
        unpack(teacher_check_inputs),
        base=lambda wildcards: base_folder(wildcards.model),
        data=TRAIN_DATA,
        val_data=VAL_DATA,
        annotator_model=annotator_model,
    output:
        model=directory("results/train/{model}/{method}/seed{seed}/model"),
        metrics="results/train/{model}/{method}/seed{seed}/metrics.jsonl",
    params:
        cfg=train_settings,
        run_dir="results/train/{model}/{method}/seed{seed}",
        teacher_check=teacher_check_args,
        **({"bases": train_bases} if STUDY != "toy" else {}),
    threads: 1
    resources:
        **TRAIN_RESOURCES,
    log:
        "logs/train/{model}/{method}/seed{seed}.log",
    shell:
        "{TRAIN_LAUNCHER} -m trace train --cfg {params.cfg} --base {input.base} --train-data {input.data}"
        " --val-data {input.val_data} --run-dir {params.run_dir} {params.teacher_check} > {log} 2>&1"
