if STUDY == "toy":

    rule toy_base:
        """Tokenizer + tiny Qwen3 + SFT: the toy world's base policy for one model size."""
        input:
            f"{DATA_DIR}/sft.jsonl",
        output:
            directory("results/base/{model}"),
        params:
            cfg=lambda wc: as_arg(PLAN.toy_base_settings(wc.model)),
        threads: 1
        resources:
            **study_config.job_resources(config, "toy_base", REPO),
        log:
            "logs/toy_base/{model}.log",
        shell:
            "{PYTHON} -m trace toy-base --cfg {params.cfg} --data-dir {DATA_DIR} --out-dir {output} > {log} 2>&1"

else:
    base_model_lib = _load_by_path("trace_base_model", "trace/base_model.py")
    settings_lib = _load_by_path("trace_settings", "trace/settings.py")

    # Fail while planning (seconds), not in a job hours later: every model must be obtainable here (a
    # local path: config, weights and hashes checked). A finished base folder that lost its weights or
    # config is rebuilt: its marker input (study_plan.REBUILD_MARKER) is touched, which makes its base_model
    # job rerun; what was trained and evaluated on it stays (common.smk base_folder). PLAN.check_bases.
    try:
        PLAN.check_bases(base_model_lib.availability_problem, base_model_lib.repair_problem, preflight=PREFLIGHT,
                         main_process=workflow.is_main_process, note=lambda text: print(text, file=sys.stderr),
                         typed_entry=settings_lib.PretrainedModel.from_mapping)
    except study_plan.StudyPlanError as error:
        raise WorkflowError(f"config error: {error}") from None

    rule base_model:
        """A base policy or frozen annotator as a local folder: local path, hub download at a pinned
        revision, or (CPU smoke) random init + SFT; config/tokenizer hashes checked."""
        input:
            lambda wc: PLAN.base_model_inputs(wc.model, PREFLIGHT),
        output:
            directory("results/base/{model}"),
        params:
            cfg=lambda wc: as_arg(PLAN.base_model_settings(wc.model)),
            train_data=lambda wc: PLAN.base_model_data_arg(wc.model),
        wildcard_constraints:
            model=PLAN.base_model_pattern(),
        threads: 1
        resources:
            **study_config.job_resources(config, "base_model", REPO),
        log:
            "logs/base_model/{model}.log",
        shell:
            "{PYTHON} -m trace base-model --cfg {params.cfg} --out-dir {output} {params.train_data} > {log} 2>&1"
