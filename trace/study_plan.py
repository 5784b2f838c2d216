"""The study grid: which runs, which files, which settings each job gets.

The workflow's rule files (workflow/rules/*.smk) only wire: every name, path, check and settings
dict they pass to a job comes from a :class:`StudyPlan` built from the validated study config
(trace/study_config.py). A *run* is (model, run name, seed); a run name is a method
(trace/methods.py) or, for the annotator-tier ablation, ``'<method>@<tier>'``. A *policy* (what an
evaluation scores) is ``'base'`` or ``'<run>-seed<s>'``.

Everything here takes and returns plain values (config mappings, names, paths as strings, dicts);
what only Snakemake knows (``ancient()``, ``directory()``, wildcards objects, ``WorkflowError``) stays
in the rule files, which turn a :class:`StudyPlanError` or a ``*_problem`` line into
``config error: ...``.

Self-contained (stdlib only): the Snakefile loads this file by path, because the package name
``trace`` is also a stdlib module that Snakemake's interpreter may have imported. What it needs from
other modules (the method registry, the launcher's job shape, the base-model checks) is passed in.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

# Global wildcard constraints of the workflow (common.smk): what a model, run, seed and benchmark name may be.
WILDCARD_CONSTRAINTS = {
    "model": "[A-Za-z0-9_.-]+",
    "method": "[a-z0-9_]+(@[a-z0-9_]+)?",  # a run name: '<method>' or '<method>@<tier>'
    "seed": r"\d+",
    "benchmark": "[A-Za-z0-9_]+",
}
TEACHER_CONTEXT_PATTERN = "label|reference"  # the teacher_gap rule's {context}
BASE_DIR = "results/base"
# A base folder that lost its weights or config is rebuilt: touching this marker (an input of its
# base_model job) makes the job rerun; what was trained and evaluated on it stays (base inputs are ancient).
REBUILD_MARKER = "results/.rebuild/base_model/{model}"


class StudyPlanError(ValueError):
    """A study that cannot be planned, as one line (the rule files prefix 'config error: ')."""


class StudyPlan:
    """The grid of one validated study config: its runs, their files, and each job's settings.

    ``get_method`` is trace/methods.py's ``get_method`` (run name -> MethodSpec with ``teacher``,
    ``self_teacher``, ``teacher_context`` and ``support``): passed in, so this file stays loadable on its own."""

    def __init__(self, config: Mapping, repo: str | Path, get_method: Callable[[str], Any]):
        self.config = config
        self.repo = Path(repo)
        self.get_method = get_method
        self.study = config["study"]
        self.models = list(config["models"])
        self.annotator_models = dict(config.get("annotator_models") or {})
        self.methods = list(config["methods"])
        self.seeds = list(config["seeds"])
        self.benchmarks = list(config["eval"]["benchmarks"])
        self.ablations = config.get("ablations") or {}
        self.tier_runs = self.ablations.get("annotator_tiers") or {}
        self.mask_runs = self.ablations.get("mask_localisation") or {}
        self.family = self.ablations.get("opd_family") or {}  # its own target (rule opd_family), not `all`'s
        self.teacher_check = config["teacher_check"]
        self.probing = bool((config["train"].get("probe") or {}).get("steps"))
        # The paper study's bases are pinned, hash-checked models: a base re-materialised because its
        # weights went missing is the same model, so the runs and evaluations finished on it are kept
        # (its folder is an ancient input) and what the base IS enters their params (base_identity).
        # The toy study's bases are built here from its own data: plain inputs.
        self.pinned_bases = self.study != "toy"
        # One data convention for every study: the files each rule reads are where the data rules write them.
        if self.study == "toy":
            self.data_dir = "results/data/toy"
            self.train_data, self.val_data = f"{self.data_dir}/train.jsonl", f"{self.data_dir}/val.jsonl"
        else:
            self.data_dir = "results/data/real"
            self.train_data = f"{self.data_dir}/train/train.jsonl"
            self.val_data = f"{self.data_dir}/train/val.jsonl"

    # ---- problems found while planning (one line each; None: fine) -----------------------------------
    def data_problem(self) -> str | None:
        """Benchmarks evaluated but never prepared (real data only: the toy world writes every benchmark)."""
        if self.study == "toy":
            return None
        missing = [b for b in self.benchmarks if b not in self.config["real_data"]["eval_sets"]]
        if missing:
            return f"eval.benchmarks {missing} are not prepared: add them to real_data.eval_sets"
        return None

    def teacher_problem(self) -> str | None:
        """A run distilling from an external teacher (OPD) needs train.teacher_model, and one on the teacher's
        top-K (opd_topk) train.kl.top_k."""
        train = self.config["train"]
        runs = [run for model in self.models for run in self.runs_of(model)] + list(self.family.get("methods", []))
        for run in runs:
            name = self.method_and_annotator(run)[0]
            method = self.get_method(name)
            if method.teacher == "external" and not self.teacher_model_of(run):
                return (f"method {name} distils from an external teacher: set train.teacher_model (a model "
                        "folder with the student's tokenizer, e.g. results/base/<larger base>)")
            if method.support == "teacher_top_k" and train["kl"].get("top_k") is None:
                return f"method {name} distils on the teacher's top-K: set train.kl.top_k (it is null)"
        return None

    def family_problem(self) -> str | None:
        """ablations.opd_family: a run it shares with the main grid must not distil from another teacher there (one
        run folder, one teacher)."""
        if not self.family:  # (its model is one of the study's: checked with the config, study_config.py)
            return None
        model = self.family["model"]
        teacher = self.config["train"].get("teacher_model")
        for run in self.family["methods"]:
            external = self.get_method(self.method_and_annotator(run)[0]).teacher == "external"
            if external and run in self.runs_of(model) and teacher and teacher != self.family["teacher"]:
                return (f"method {run} on {model} is both a main run (teacher train.teacher_model {teacher}) and an "
                        f"opd_family run (teacher {self.family['teacher']}): one run folder cannot have two teachers; "
                        "make them equal or drop it from one list")
        return None

    def train_gpus_problem(self, launch_resources: Mapping) -> str | None:
        """resources.train.gpus must equal the GPU processes per node that train.parallel starts
        (``launch_resources``: trace/launch.py ``train_resources(config['train'])``)."""
        requested = (self.config.get("resources") or {}).get("train", {}).get("gpus", 0)
        if launch_resources["gpu"] != requested:
            return (f"resources.train.gpus = {requested} but train.parallel runs {launch_resources['gpu']} "
                    f"GPU process(es) per node (train.device {self.config['train']['device']!r}): make them equal")
        return None

    # ---- names and files of the grid --------------------------------------------------------------------
    def benchmark_file(self, benchmark: str) -> str:
        return f"{self.data_dir}/{benchmark}.jsonl"

    def runs_of(self, model: str) -> list[str]:
        """Run names trained on one model: the main methods, plus the ablations assigned to it."""
        runs = list(self.methods)
        if self.tier_runs.get("model") == model:
            runs += [f"{self.tier_runs['method']}@{tier}" for tier in self.tier_runs["tiers"]]
        if self.mask_runs.get("model") == model:
            runs += [method for method in self.mask_runs["methods"] if method not in runs]
        return runs

    @staticmethod
    def evaluation_file(model: str, policy: str, benchmark: str) -> str:
        return f"results/eval/{model}/{policy}/{benchmark}.json"

    def evaluations_of(self, model: str, runs) -> list[str]:
        """Result files of the base and the given runs on one model; policy names as they appear in
        results/eval/<model>/<policy>/: 'base' and '<run>-seed<s>'."""
        policies = ["base"] + [f"{run}-seed{seed}" for run in runs for seed in self.seeds]
        return [self.evaluation_file(model, policy, benchmark) for policy in policies for benchmark in self.benchmarks]

    def all_evaluations(self) -> list[str]:
        return [path for model in self.models for path in self.evaluations_of(model, self.runs_of(model))]

    def all_training_metrics(self) -> list[str]:
        return [f"results/train/{model}/{run}/seed{seed}/metrics.jsonl"
                for model in self.models for run in self.runs_of(model) for seed in self.seeds]

    @staticmethod
    def base_dir(model: str) -> str:
        return f"{BASE_DIR}/{model}"

    @staticmethod
    def base_of(path: str | None) -> str | None:
        """'results/base/<name>' -> '<name>' (a base this workflow builds); anything else -> None."""
        return path.removeprefix(f"{BASE_DIR}/") if path and path.startswith(f"{BASE_DIR}/") else None

    @staticmethod
    def trained_model_of(model: str, policy: str) -> str | None:
        """The model folder a policy is evaluated from: None for 'base' (the base folder), else the run's."""
        if policy == "base":
            return None
        run, seed = policy.rsplit("-seed", 1)
        return f"results/train/{model}/{run}/seed{seed}/model"

    # ---- runs ---------------------------------------------------------------------------------------------
    def method_and_annotator(self, run: str) -> tuple[str, dict]:
        """'trace_fkl@self' -> ('trace_fkl', train.annotator with the tier's overrides)."""
        method, _, tier = run.partition("@")
        annotator = dict(self.config["train"]["annotator"])
        if tier:
            if tier not in self.tier_runs.get("tiers", {}):
                raise ValueError(f"run {run!r}: tier {tier!r} is not in ablations.annotator_tiers.tiers")
            annotator.update(self.tier_runs["tiers"][tier])
        return method, annotator

    def built_annotator(self, run: str | None = None) -> str | None:
        """The annotator's model when this workflow builds it (a path under results/, e.g. the toy-large
        base for the frozen tier), for a run or (None) for train.annotator itself; else None."""
        annotator = self.method_and_annotator(run)[1] if run is not None else self.config["train"]["annotator"]
        model = annotator.get("model")
        return model if model and model.startswith("results/") else None

    def teacher_model_of(self, run: str) -> str | None:
        """The external teacher's folder of a run (OPD-type methods: ablations.opd_family.teacher for a method of
        that family, else train.teacher_model), else None: a self-teacher is the student's own network."""
        method = self.get_method(self.method_and_annotator(run)[0])
        if method.teacher != "external":
            return None
        if run in self.family.get("methods", []):
            return self.family["teacher"]
        return self.config["train"].get("teacher_model")

    def built_teacher(self, run: str) -> str | None:
        """A run's external teacher when this workflow builds it (a path under results/: a base such as
        results/base/toy-large, or a trained run's model/ folder), so the run waits for it; else None."""
        model = self.teacher_model_of(run)
        return model if model and model.startswith("results/") else None

    def base_identity(self, *models: str) -> str:
        """A short hash of the config entries of these base models ('' in the toy study)."""
        if not self.pinned_bases:
            return ""
        entries = {**self.config["models"], **self.annotator_models}
        text = json.dumps([entries.get(model) for model in models], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def train_bases(self, model: str, run: str) -> str:
        """Identity of the base models a run starts from, is annotated by and (OPD) distils from."""
        annotator = self.base_of(self.method_and_annotator(run)[1].get("model") or "")
        teacher = self.base_of(self.teacher_model_of(run))
        return self.base_identity(model, *[base for base in (annotator, teacher) if base is not None])

    def train_settings(self, run: str, seed) -> dict:
        """The settings of one training run (`python -m trace train --cfg`)."""
        method, annotator = self.method_and_annotator(run)
        # `parallel` only shapes the launch (it may change between attempts without rerunning a run); the keys
        # a method never reads (`teacher_model` without an external teacher, `tropd`, `guidance`, `trb`) are left
        # out, so a new teacher or trust region reruns only the runs that use it; the teacher is the run's own
        spec = self.get_method(method)
        dropped = {"parallel", "teacher_model", *spec.unused_train_keys}
        train = {key: value for key, value in self.config["train"].items() if key not in dropped}
        if spec.rollout_policy != "student" and train["rollout"]["engine"] != "hf":
            # a behaviour policy (TRB's per-token blend of two models, TrOPD's teacher prefix) samples with
            # Hugging Face generate: vLLM cannot blend another model's logits into its sampler (docs/methods.md)
            train["rollout"] = {**train["rollout"], "engine": "hf"}
        teacher = self.teacher_model_of(run)  # the family's teacher for its runs, else train.teacher_model
        settings = {**train, **({"teacher_model": teacher} if teacher is not None else {}), "method": method,
                    "annotator": annotator, "seed": int(seed),
                    "thinking": self.config["thinking"], "teacher_check_on_worse": self.teacher_check["on_worse"]}
        if self.study != "toy":  # trained only on the data source the config asks for (checked against the manifest)
            settings["train_source"] = self.config["real_data"]["train_source"]
        return settings

    def train_resources(self, job_resources: Mapping, launch_resources: Mapping) -> dict:
        """The train rule's resources: the job's size and placement from resources.train (``job_resources``:
        trace/study_config.py ``job_resources(config, 'train', repo)``: cpus, mem, runtime, partition),
        its shape (nodes, tasks, GPUs per node) from train.parallel (``launch_resources``: trace/launch.py
        ``train_resources``), which the launcher follows. resources.train's cpus, mem_mb and gpus are per
        node (SLURM's --cpus-per-task and --mem are per node with one task per node), but the plugin's
        --gpus=N counts the whole job: N = nodes x GPUs per node."""
        shape = {key: value for key, value in launch_resources.items() if key in ("nodes", "tasks", "gpu")}
        resources = {**job_resources, **shape}
        if shape["gpu"]:
            resources["gpu"] = shape["gpu"] * shape["nodes"]
        if shape["nodes"] > 1:
            # the SLURM plugin's job step wraps a job's command in `srun -n1` (one node) unless the job declares
            # `mpi`: then the command runs in the batch step and its own `srun --nodes N` starts torchrun per node
            # (and the plugin asks --ntasks=N: one task per node)
            resources["mpi"] = "srun"
        return resources

    # ---- the teacher check ---------------------------------------------------------------------------------
    def teacher_context_of(self, run: str) -> str | None:
        """The private context of a run's self-teacher (label | reference), or None for a run without one:
        no teacher (GRPO), or an external teacher (OPD), which the teacher check does not concern (it
        compares the student's own network with and without a private turn)."""
        method = self.get_method(self.method_and_annotator(run)[0])
        return method.teacher_context if method.self_teacher else None

    def teacher_contexts(self, model: str) -> list[str]:
        """The contexts checked on one model: those of its runs, plus label for the probe's fixed batch."""
        contexts = {self.teacher_context_of(run) for run in self.runs_of(model)} - {None}
        return sorted(contexts | ({"label"} if self.probing else set()))

    def all_teacher_gaps(self) -> list[str]:
        return [f"results/teacher_gap/{model}/{context}.json"
                for model in self.models for context in self.teacher_contexts(model)]

    def teacher_check_inputs(self, model: str, run: str) -> dict[str, str]:
        """The run's teacher check (a run with a teacher) and the probe's fixed batch (probing on)."""
        context = self.teacher_context_of(run)
        inputs = {"gap": f"results/teacher_gap/{model}/{context}.json"} if context else {}
        if self.probing:
            inputs["probe_batch"] = f"results/teacher_gap/{model}/label.probe.pt"
        return inputs

    @staticmethod
    def teacher_check_args(inputs: Mapping[str, str]) -> str:
        """The train command's flags for the teacher_check_inputs it got (by input name)."""
        return " ".join(f"--{'teacher-gap' if name == 'gap' else 'probe-batch'} {inputs[name]}"
                        for name in ("gap", "probe_batch") if name in inputs)

    def teacher_gap_settings(self, model: str, context: str) -> dict:
        """The check samples the base and reads its self-teacher: it reads none of the train keys only some methods
        read (those GRPO never reads: teacher_model, tropd, guidance, trb), so changing one reruns no check."""
        method_only = {"parallel", *self.get_method("grpo").unused_train_keys}
        return {"train": {**{k: v for k, v in self.config["train"].items() if k not in method_only},
                          "seed": 0, "thinking": self.config["thinking"]},
                "teacher_check": self.teacher_check, "context": context, "model": model}

    # ---- the opd_family ablation (its own target: rule opd_family) ------------------------------------------
    def family_policies(self) -> list[str]:
        return ["base"] + [f"{run}-seed{seed}" for run in self.family["methods"] for seed in self.family["seeds"]]

    def family_evaluations(self) -> list[str]:
        return [self.evaluation_file(self.family["model"], policy, benchmark)
                for policy in self.family_policies() for benchmark in self.benchmarks]

    def family_training_metrics(self) -> list[str]:
        return [f"results/train/{self.family['model']}/{run}/seed{seed}/metrics.jsonl"
                for run in self.family["methods"] for seed in self.family["seeds"]]

    @staticmethod
    def family_outputs(root: str = "results") -> dict[str, str]:
        return {"table_md": f"{root}/tables/opd_family.md", "table_csv": f"{root}/tables/opd_family.csv",
                "figure": f"{root}/figures/opd_family.png",
                **{f"aggregate_{name}": f"{root}/opd_family/aggregate/{name}.csv"
                   for name in ("evals", "training_curves", "calibration")}}

    def family_settings(self) -> dict:
        """The --cfg of `python -m trace opd-family` (trace.settings.FamilyJob)."""
        settings = {"benchmarks": self.config["eval"]["benchmarks"], "family": self.family}
        if "calibration_bins" in self.config["eval"]:
            settings["calibration_bins"] = self.config["eval"]["calibration_bins"]
        return settings

    # ---- evaluation ------------------------------------------------------------------------------------------
    def evaluation_settings(self) -> dict:
        ev = self.config["eval"]
        settings = {"k": ev["k"], "backend": ev["backend"], "batch_size": ev["batch_size"], "limit": ev["limit"],
                    "thinking": self.config["thinking"], "seed": 0,
                    "gen": {key: ev[key] for key in ("temperature", "top_p", "top_k", "max_new_tokens")},
                    "device": ev.get("device", "cpu"), "dtype": ev.get("dtype", "float32"),
                    "tensor_parallel_size": ev.get("tensor_parallel_size", 1)}
        if "calibration_bins" in ev:  # only when set: left out, the job takes the schema's default and the
            settings["calibration_bins"] = ev["calibration_bins"]  # finished evaluations keep their params
        if ev["backend"] == "vllm":
            settings["model_options"] = {key: ev[key] for key in ("max_model_len", "gpu_memory_utilization")
                                         if ev.get(key) is not None}
        return settings

    def evaluation_outputs(self, model: str = "{model}", policy: str = "{policy}") -> list[str]:
        """One policy's result files (by default the evaluate rule's output patterns)."""
        return [self.evaluation_file(model, policy, benchmark) for benchmark in self.benchmarks]

    def evaluation_data_arg(self) -> str:
        return " ".join(f"{benchmark}={self.benchmark_file(benchmark)}" for benchmark in self.benchmarks)

    def evaluation_bases(self, model: str, policy: str) -> str:
        """What the evaluated base is (base policies only: a run's identity is in its own params)."""
        return self.base_identity(model) if policy == "base" else ""

    # ---- data ---------------------------------------------------------------------------------------------
    def toy_data_files(self) -> list[str]:
        return [f"results/data/toy/{split}.jsonl" for split in ["train", "sft", "val", *self.benchmarks]]

    def real_benchmark_files(self) -> list[str]:
        return [f"results/data/real/{name}.jsonl" for name in self.config["real_data"]["eval_sets"]]

    def mirror_dir(self) -> str | None:
        """config real_data.mirror_dir, resolved against the repo root (null: read from the hub)."""
        mirror = self.config["real_data"]["mirror_dir"]
        return None if mirror is None else str((self.repo / mirror).resolve())

    def benchmark_data_settings(self) -> dict:
        real = self.config["real_data"]
        return {"mirror_dir": self.mirror_dir(), "names": real["eval_sets"], "gpqa_seed": real["gpqa_seed"]}

    def train_data_settings(self) -> dict:
        real = self.config["real_data"]
        return {"mirror_dir": self.mirror_dir(), "max_rows": real["train_max_rows"], "val_rows": real["val_rows"],
                "seed": real["seed"], "source": real["train_source"]}

    # ---- base models -----------------------------------------------------------------------------------
    def toy_base_settings(self, model: str) -> dict:
        return {**self.config["models"][model], "seed": self.config["toy"]["seed"],
                "thinking": self.config["thinking"], "tokenizer_vocab": self.config["toy"]["tokenizer_vocab"]}

    def resolved_entry(self, entry: Mapping) -> dict:
        """Relative paths in a model entry are relative to the repo root (like real_data.mirror_dir)."""
        entry = json.loads(json.dumps(entry))
        if entry.get("path"):
            entry["path"] = str((self.repo / Path(entry["path"]).expanduser()).resolve())
        if entry.get("init"):
            for key in ("config", "tokenizer"):
                entry["init"][key] = str((self.repo / entry["init"][key]).resolve())
        return entry

    @functools.cached_property
    def base_entries(self) -> dict[str, dict]:
        """Every base model and frozen annotator of a pinned-bases study, paths resolved."""
        return {name: self.resolved_entry(entry)
                for name, entry in {**self.config["models"], **self.annotator_models}.items()}

    def section_of(self, model: str) -> str:
        """The config section a base model is set in."""
        return "models" if model in self.config["models"] else "annotator_models"

    def base_model_pattern(self) -> str:
        """The base_model rule's {model}: exactly the study's bases and annotators."""
        return "|".join(re.escape(name) for name in self.base_entries)

    def base_model_inputs(self, model: str, preflight: bool = False) -> list[str]:
        """Its rebuild marker (not while preflight plans), and the training set for a random-init smoke
        model (SFT'd on it); real models need no other input."""
        return [*([] if preflight else [REBUILD_MARKER.format(model=model)]),
                *([self.train_data] if self.base_entries[model].get("init") else [])]

    def base_model_settings(self, model: str) -> dict:
        return {"name": model, "entry": self.base_entries[model], "thinking": self.config["thinking"],
                "section": self.section_of(model)}

    def base_model_data_arg(self, model: str) -> str:
        return f"--train-data {self.train_data}" if self.base_entries[model].get("init") else ""

    def check_bases(self, availability_problem: Callable, repair_problem: Callable, *, preflight: bool,
                    main_process: bool, note: Callable[[str], None],
                    typed_entry: Callable[[Mapping, str], Any] = lambda entry, where: entry) -> None:
        """Fail while planning (seconds), not in a job hours later: every model must be obtainable here (a
        local path: config, weights and hashes checked); raise StudyPlanError naming the first that is not
        (not while preflight plans: it reports them itself). A finished base folder that lost its weights or
        config gets its rebuild marker touched, which makes its base_model job rerun (Snakemake's --forcerun
        is not settable from a Snakefile); ``note`` says so (main process only). Markers are created older than
        any base folder, so a new marker alone reruns nothing. ``availability_problem``/``repair_problem``:
        trace/base_model.py's; ``typed_entry(entry, 'models.<name>')``: the entry as it takes it
        (trace.settings.PretrainedModel.from_mapping); paths are relative to the working directory."""
        for name, entry in self.base_entries.items():
            section = self.section_of(name)
            problem = availability_problem(name, typed_entry(entry, f"{section}.{name}"), Path(BASE_DIR) / name, section)
            if problem and not preflight:
                raise StudyPlanError(problem)
            marker = Path(REBUILD_MARKER.format(model=name))
            if not marker.exists() and not preflight:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                os.utime(marker, (0, 0))
            broken = repair_problem(name, Path(BASE_DIR) / name)
            if broken and main_process and not preflight:
                note(f"rebuilding: {broken}; its base_model job reruns, finished runs and evaluations on it are kept")
                marker.touch()

    # ---------------------------------------------------------------------------------- report
    def report_settings(self) -> dict:
        """The --cfg of the aggregate's report and of a results cache (trace.settings.ReportJob); the opd_family
        ablation has its own target and table (family_settings), so it stays out of the main report's settings."""
        settings = {"benchmarks": self.config["eval"]["benchmarks"], "methods": self.methods,
                    "ablations": {name: value for name, value in self.ablations.items() if name != "opd_family"}}
        if "calibration_bins" in self.config["eval"]:  # else ReportJob's default (the schema's)
            settings["calibration_bins"] = self.config["eval"]["calibration_bins"]
        if self.study == "paper":  # ours beside the paper's numbers (trace/paper_results.csv)
            settings["compare_to_paper"] = True
            settings["paper_models"] = {name: entry["paper_model"] for name, entry in self.config["models"].items()
                                        if entry.get("paper_model")}
        return settings

    def report_outputs(self, root: str) -> dict[str, str | list[str]]:
        """Every table and figure the report draws under root (results/, or a cache folder)."""
        ablations = [name for name in ("annotator_tiers", "mask_localisation") if self.ablations.get(name)]
        paper = ([f"{root}/tables/main_results_vs_paper.csv"]
                 + [f"{root}/tables/paper_figure_numbers.{ext}" for ext in ("md", "csv")]) if self.study == "paper" else []
        return {
            "table_md": f"{root}/tables/main_results.md",
            "table_csv": f"{root}/tables/main_results.csv",
            "versus_grpo": [f"{root}/tables/vs_grpo.md", f"{root}/tables/vs_grpo.csv"],
            "mechanism": [f"{root}/tables/mechanism.md", f"{root}/tables/mechanism.csv"],
            "teacher_gap": [f"{root}/tables/teacher_gap.md", f"{root}/tables/teacher_gap.csv"],
            "figures": [f"{root}/figures/{name}.png" for name in
                        ("training_curves", "fig1a_entropy", "validation_curves", "fig8_dynamics", "fig6_credit_map")],
            "ablations": [f"{root}/{kind}/{name}.{ext}" for name in ablations
                          for kind, ext in (("tables", "md"), ("tables", "csv"), ("figures", "png"))],
            "versus_paper": paper,
            "calibration": [f"{root}/tables/calibration.md", f"{root}/tables/calibration.csv",
                            f"{root}/figures/calibration.png"],
        }

    def report_entry(self, path: str) -> tuple[str, str, str]:
        """(category, subcategory, caption file) of one report output in ``snakemake --report`` (REPORT_ENTRIES);
        the caption file must exist under workflow/report/."""
        key = f"{Path(path).parent.name}/{Path(path).stem}"
        if key not in REPORT_ENTRIES:
            raise StudyPlanError(f"{path}: no entry in REPORT_ENTRIES (trace/study_plan.py) for the report")
        category, subcategory, caption = REPORT_ENTRIES[key]
        if not (self.repo / "workflow" / "report" / f"{caption}.rst").is_file():  # Snakemake looks only at --report
            raise StudyPlanError(f"{path}: its report caption workflow/report/{caption}.rst does not exist")
        return category, subcategory, f"../report/{caption}.rst"

    @staticmethod
    def in_html_report(path: str) -> bool:
        """Whether `snakemake --report` shows this report output: every one, except an OPTIONAL_REPORT_ENTRIES
        file that is not there (Snakemake refuses a report whose marked files are missing)."""
        return f"{Path(path).parent.name}/{Path(path).stem}" not in OPTIONAL_REPORT_ENTRIES or Path(path).exists()


# `snakemake --report report.html` (docs/html-report.md): each table and figure the report rule draws, under
# the paper's table or figure it reproduces, captioned by workflow/report/<caption>.rst. Keyed by
# tables/<name> (its .md and .csv share the entry) or figures/<name>.
REPORT_ENTRIES = {  # key: (category, subcategory, caption)
    "tables/main_results": ("Table 2: main results", "ours", "main_results"),
    "tables/main_results_vs_paper": ("Table 2: main results", "beside the paper", "main_results_vs_paper"),
    "tables/vs_grpo": ("Table 2: main results", "gain over GRPO", "vs_grpo"),
    "tables/annotator_tiers": ("Table 3: annotator tiers", "table", "annotator_tiers"),
    "tables/mask_localisation": ("Table 4: mask localisation", "table", "mask_localisation"),
    "figures/fig1a_entropy": ("Fig 1a: entropy", "figure", "fig1a_entropy"),
    "figures/validation_curves": ("Fig 3: validation and training reward", "figure", "validation_curves"),
    "figures/mask_localisation": ("Fig 4: mask localisation curves", "figure", "fig4_mask_localisation"),
    "figures/fig6_credit_map": ("Fig 6: credit map", "credit map", "fig6_credit_map"),
    "tables/mechanism": ("Fig 6: credit map", "mechanism numbers", "mechanism"),
    "figures/annotator_tiers": ("Fig 7: annotator tier curves", "figure", "fig7_annotator_tiers"),
    "figures/fig8_dynamics": ("Fig 8: length, entropy, SRPO", "figure", "fig8_dynamics"),
    "tables/paper_figure_numbers": ("Figure numbers beside the paper", "table", "paper_figure_numbers"),
    "figures/training_curves": ("Training curves", "figure", "training_curves"),
    "tables/teacher_gap": ("Teacher check", "table", "teacher_gap"),
    "tables/calibration": ("Calibration: agreement over k samples", "table", "calibration"),
    "figures/calibration": ("Calibration: agreement over k samples", "reliability diagram", "calibration_figure"),
}
# Drawn only from an aggregate with calibration.csv: every aggregate this workflow writes has one (so the report
# rule declares them), but results redrawn from a cache made before it existed have none; the HTML report shows
# these only where they exist.
OPTIONAL_REPORT_ENTRIES = ("tables/calibration", "figures/calibration")
