if STUDY == "toy":

    rule toy_base:
        """Tokenizer + tiny Qwen3 + SFT: the toy world's base policy for one model size."""
        input:
            f"{DATA_DIR}/sft.jsonl",
        output:
            directory("results/base/{model}"),
        params:
            cfg=lambda wc: as_arg({**config["models"][wc.model], "seed": config["toy"]["seed"],
                                   "thinking": config["thinking"],
                                   "tokenizer_vocab": config["toy"]["tokenizer_vocab"]}),
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

    def _resolved(entry):
        """Relative paths in a model entry are relative to the repo root (like real_data.mirror_dir)."""
        entry = json.loads(json.dumps(entry))
        if entry.get("path"):
            entry["path"] = str((REPO / Path(entry["path"]).expanduser()).resolve())
        if entry.get("init"):
            for key in ("config", "tokenizer"):
                entry["init"][key] = str((REPO / entry["init"][key]).resolve())
        return entry

    BASE_ENTRIES = {name: _resolved(entry) for name, entry in {**config["models"], **ANNOTATOR_MODELS}.items()}
    # Fail while planning (seconds), not in a job hours later: every model must be obtainable here (a
    # local path: config, weights and hashes checked). A finished base folder that lost its weights or
    # config is rebuilt: its marker input (REBUILD) is touched, which makes its base_model job rerun
    # (Snakemake's --forcerun is not settable from here); what was trained and evaluated on it stays
    # (common.smk base_folder).
    REBUILD = "results/.rebuild/base_model/{model}"
    for _name, _entry in BASE_ENTRIES.items():
        _section = "models" if _name in config["models"] else "annotator_models"
        _problem = base_model_lib.availability_problem(
            _name, settings_lib.PretrainedModel.from_mapping(_entry, f"{_section}.{_name}"), Path("results/base") / _name,
            _section)
        if _problem and not PREFLIGHT:
            raise WorkflowError(f"config error: {_problem}")
        _marker = Path(REBUILD.format(model=_name))
        if not _marker.exists() and not PREFLIGHT:  # older than any base folder: no rerun by itself
            _marker.parent.mkdir(parents=True, exist_ok=True)
            _marker.touch()
            os.utime(_marker, (0, 0))
        _broken = base_model_lib.repair_problem(_name, Path("results/base") / _name)
        if _broken and workflow.is_main_process and not PREFLIGHT:
            print(f"rebuilding: {_broken}; its base_model job reruns, finished runs and evaluations on it are kept",
                  file=sys.stderr)
            _marker.touch()

    def base_model_inputs(wildcards):
        """A random-init smoke model is SFT'd on the training set; real models need no input."""
        return [*([] if PREFLIGHT else [REBUILD.format(model=wildcards.model)]), *([TRAIN_DATA] if BASE_ENTRIES[wildcards.model].get("init") else [])]

    rule base_model:
        """A base policy or frozen annotator as a local folder: local path, hub download at a pinned
        revision, or (CPU smoke) random init + SFT; config/tokenizer hashes checked."""
        input:
            base_model_inputs,
        output:
            directory("results/base/{model}"),
        params:
            cfg=lambda wc: as_arg({"name": wc.model, "entry": BASE_ENTRIES[wc.model], "thinking": config["thinking"],
                                   "section": "models" if wc.model in config["models"] else "annotator_models"}),
            train_data=lambda wc, input: f"--train-data {input[-1]}" if BASE_ENTRIES[wc.model].get("init") else "",
        wildcard_constraints:
            model="|".join(re.escape(name) for name in BASE_ENTRIES),
        threads: 1
        resources:
            **study_config.job_resources(config, "base_model", REPO),
        log:
            "logs/base_model/{model}.log",
        shell:
            "{PYTHON} -m trace base-model --cfg {params.cfg} --out-dir {output} {params.train_data} > {log} 2>&1"
