launch = _load_by_path("trace_launch", "trace/launch.py")
TRAIN_LAUNCHER = launch.train_launcher(config["train"], PYTHON)  # python | torchrun | srun + torchrun
# the job's size and placement from resources.train, its shape from train.parallel (PLAN.train_resources)
_launch_shape = launch.train_resources(config["train"])
_problem = PLAN.train_gpus_problem(_launch_shape) or PLAN.teacher_problem() or PLAN.family_problem()
if _problem:
    raise WorkflowError(f"config error: {_problem}")
TRAIN_RESOURCES = PLAN.train_resources(study_config.job_resources(config, "train", REPO), _launch_shape)


rule train:
    """One RL run (GRPO, TRACE, a baseline or OPD; '<method>@<tier>' = an annotator-tier ablation). Resumes from results/train/.../work/checkpoint."""
    input:
        unpack(lambda wc: PLAN.teacher_check_inputs(wc.model, wc.method)),
        base=lambda wc: base_folder(wc.model),
        data=TRAIN_DATA,
        val_data=VAL_DATA,
        annotator_model=lambda wc: built_model_folder(PLAN.built_annotator(wc.method)),
        teacher_model=lambda wc: built_model_folder(PLAN.built_teacher(wc.method)),  # OPD's external teacher
    output:
        model=directory("results/train/{model}/{method}/seed{seed}/model"),
        metrics="results/train/{model}/{method}/seed{seed}/metrics.jsonl",
    params:
        cfg=lambda wc: as_arg(PLAN.train_settings(wc.method, wc.seed)),
        run_dir="results/train/{model}/{method}/seed{seed}",
        teacher_check=lambda wc, input: PLAN.teacher_check_args(
            {name: input[name] for name in ("gap", "probe_batch") if name in input.keys()}),
        **({"bases": lambda wc: PLAN.train_bases(wc.model, wc.method)} if PLAN.pinned_bases else {}),
    threads: 1
    resources:
        **TRAIN_RESOURCES,
    log:
        "logs/train/{model}/{method}/seed{seed}.log",
    shell:
        "{TRAIN_LAUNCHER} -m trace train --cfg {params.cfg} --base {input.base} --train-data {input.data}"
        " --val-data {input.val_data} --run-dir {params.run_dir} {params.teacher_check} > {log} 2>&1"
