"""Which study the DAG runs, and its config checked key by key before any job starts.

A *study file* is a complete study: it has a top-level ``study:`` key (``config.yaml`` = the toy
study, ``workflow/configs/paper.yaml`` = the paper's, ``workflow/configs/paper_smoke.yaml`` = its
CPU smoke). Any other config file or ``--config`` item is an *override* layered over a study:

    snakemake --cores 2                                         # config.yaml (toy)
    snakemake --configfile workflow/configs/paper.yaml          # the paper study, nothing of the toy
    snakemake --configfile workflow/configs/skeleton.yaml       # toy study + overrides
    snakemake --configfile workflow/configs/paper.yaml mine.yaml --config seeds=[0,1]
    snakemake main_table --configfile workflow/configs/paper.yaml mine.yaml   # targets BEFORE --configfile

Every file goes after ONE ``--configfile`` flag: Snakemake keeps only the last flag's files, so a second
flag would silently drop the study (refused while planning, :func:`command_line_problem`), and every word
after the flag is read as a config file, so a target placed there is one too.

Layers merge dict by dict (a nested key replaces only itself; ``null`` switches a section off).
Every key is validated against ``workflow/schemas/config.schema.yaml``; an error is one line that
names the key, the offending value and the file (or ``--config``) that set it.

Self-contained (stdlib + yaml + jsonschema): the Snakefile loads this file by path, because the
package name ``trace`` is also a stdlib module that Snakemake's interpreter may have imported.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

DEFAULT_STUDY_FILE = "config.yaml"


class StudyConfigError(ValueError):
    """A config problem, as one line naming the key and where its value came from."""


def deep_merge(base: Mapping, override: Mapping) -> dict:
    """``override`` over ``base``: nested dicts merge key by key, everything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise StudyConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise StudyConfigError(f"config file {path}{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise StudyConfigError(f"config file {path}: expected a mapping of keys, got {type(data).__name__}")
    return data


class Study:
    """The merged config plus, for every key, the layer (file or '--config') that set it."""

    def __init__(self, layers: Sequence[tuple[str, Mapping]]):
        self.layers = [(name, dict(values)) for name, values in layers]
        self.config: dict = {}
        for _, values in self.layers:
            self.config = deep_merge(self.config, values)
        if isinstance(self.config.get("models"), dict):  # `models: {NAME: null}` leaves a model out of the study
            self.config["models"] = {name: entry for name, entry in self.config["models"].items() if entry is not None}

    def source_of(self, path: Sequence[Any]) -> str:
        """The last layer that sets ``path`` (or one of its parents: a replaced section)."""
        for name, values in reversed(self.layers):
            node: Any = values
            for depth, key in enumerate(path):
                if not isinstance(node, Mapping) or key not in node:
                    break
                node = node[key]
                if depth == len(path) - 1 or not isinstance(node, Mapping):
                    return name
        return self.layers[0][0] if self.layers else "config"


def load_study(repo: Path, configfiles: Sequence[str | Path], cli_config: Mapping | None) -> Study:
    """The study file (config.yaml unless a --configfile is a complete study) + the overrides."""
    files = [(str(path), read_yaml(Path(path))) for path in configfiles]
    cli = dict(cli_config or {})
    layers: list[tuple[str, Mapping]] = []
    if not any("study" in values for _, values in files) and "study" not in cli:
        default = Path(repo) / DEFAULT_STUDY_FILE
        layers.append((DEFAULT_STUDY_FILE, read_yaml(default)))
    layers += files
    if cli:
        layers.append(("--config", cli))
    return Study(layers)


CONFIGFILE_FLAGS = ("--configfile", "--configfiles")


def configfile_flag_values(argv: Sequence[str]) -> list[list[str]]:
    """The words after each --configfile flag of a Snakemake command line (up to the next option)."""
    groups: list[list[str]] = []
    current: list[str] | None = None
    for word in argv:
        flag, equals, value = word.partition("=")
        if flag in CONFIGFILE_FLAGS:
            current = [value] if equals else []
            groups.append(current)
        elif word.startswith("-"):
            current = None
        elif current is not None:
            current.append(word)
    return groups


def rule_names(repo: Path) -> set[str]:
    """Rule names of the workflow (Snakefile + workflow/rules/*.smk), read from their text."""
    import re

    files = [Path(repo) / "Snakefile", *sorted((Path(repo) / "workflow" / "rules").glob("*.smk"))]
    return {name for path in files for name in re.findall(r"^\s*rule (\w+):", path.read_text(), re.MULTILINE)}


def command_line_problem(argv: Sequence[str], configfiles: Sequence[str | Path], repo: Path) -> str | None:
    """One line for the command-line slips that Snakemake does not catch: a second --configfile flag
    (Snakemake keeps the last flag's files only) and a target written after --configfile (read as a
    config file)."""
    groups = configfile_flag_values(argv)
    if len(groups) > 1:
        kept, dropped = groups[-1], [f for group in groups[:-1] for f in group]
        return (f"--configfile given {len(groups)} times: Snakemake keeps only the last one ({' '.join(kept)}) and "
                f"drops {' '.join(dropped)}; name every file after one flag: --configfile "
                f"{' '.join(f for group in groups for f in group)}")
    rules = rule_names(repo)
    for name in configfiles:  # absolute here: Snakemake resolved them against the working directory
        word = os.path.relpath(Path(name).resolve(), Path.cwd())
        if Path(word).name in rules or Path(word).parts[:1] in (("results",), ("logs",)):
            return (f"--configfile {word}: {word} is a {'rule' if Path(word).name in rules else 'workflow output'} of "
                    f"this workflow, not a config file: put targets BEFORE --configfile (every word after it is "
                    f"read as a config file)")
    return None


def _key(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def validate(study: Study, schema_path: Path) -> dict:
    """Raise StudyConfigError (one line) for the first problem, in document order; return the config
    with `device: auto` resolved from the study's GPU requests."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(study.config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        error = _most_specific(errors[0])
        path = list(error.absolute_path)
        if error.validator == "additionalProperties":
            unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            known = sorted(error.schema.get("properties", {}))
            key = _key(path + unknown[:1])
            raise StudyConfigError(f"config key {key} (from {study.source_of(path + unknown[:1])}): unknown key; "
                                   f"known keys here: {', '.join(known)}")
        if error.validator == "required":
            raise StudyConfigError(f"config key {_key(path)} (from {study.source_of(path)}): {error.message}")
        value = repr(error.instance) if not isinstance(error.instance, dict) else "{…}"
        value = value if len(value) <= 80 else value[:77] + "…"
        raise StudyConfigError(f"config key {_key(path)} = {value} (from {study.source_of(path)}): "
                               f"{_short(error)}")
    _check_cross_references(study)
    _resolve_auto_devices(study)
    _check_vllm_cpu_head_dim(study)
    return study.config


def _most_specific(error):
    """For oneOf/anyOf/if-then failures, the deepest sub-error says what is actually wrong."""
    while error.context:
        error = max(error.context, key=lambda e: len(e.absolute_path))
    return error


def _short(error) -> str:
    if error.validator == "enum":
        return f"must be one of {', '.join(map(str, error.validator_value))}"
    return error.message


def _check_cross_references(study: Study) -> None:
    """What a schema cannot say: names that must refer to other parts of the study."""
    config = study.config
    models = set(config.get("models") or {})
    for name, section in (config.get("ablations") or {}).items():
        if section and section.get("model") not in models:
            path = ["ablations", name, "model"]
            raise StudyConfigError(f"config key {_key(path)} = {section.get('model')!r} (from "
                                   f"{study.source_of(path)}): not one of the study's models ({', '.join(sorted(models))})")
    if config.get("study") == "paper" and "toy" in config:
        raise StudyConfigError(f"config key toy (from {study.source_of(['toy'])}): the paper study has no toy "
                               f"world; remove the key (did an override file add it?)")


VLLM_CPU_MIN_HEAD_DIM = 32  # as trace/rollout (not imported here: Snakemake loads this file on its own)


def _check_vllm_cpu_head_dim(study: Study) -> None:
    """vLLM rollouts on CPU: every model's attention heads must be wide enough for vLLM's CPU kernels
    (it would fail deep inside the first forward of each training job)."""
    config = study.config
    rollout = (config.get("train") or {}).get("rollout") or {}
    if rollout.get("engine") == "vllm" and (config.get("train") or {}).get("device") == "cpu":
        for name, model in (config.get("models") or {}).items():
            model = model or {}
            size_key = f"models.{name}.size" if "size" in model else f"models.{name}.init.size"
            size = model.get("size") or (model.get("init") or {}).get("size") or {}
            head_dim = size.get("head_dim") or (size["hidden_size"] // size["num_heads"] if "num_heads" in size
                                                else None)
            if head_dim is not None and head_dim < VLLM_CPU_MIN_HEAD_DIM:
                path = ["train", "rollout", "engine"]
                raise StudyConfigError(
                    f"config key {_key(path)} = 'vllm' (from {study.source_of(path)}): vLLM's CPU attention needs "
                    f"head_dim >= {VLLM_CPU_MIN_HEAD_DIM}, but models.{name} has head_dim {head_dim}; set "
                    f"{size_key}.head_dim (workflow/configs/toy_vllm.yaml) or use engine 'hf'")


# ---- What each job asks its executor for ------------------------------------------------------------
# A study's `resources:` section says what a rule's jobs NEED (cpus, mem_mb, runtime in minutes, gpus);
# profiles/slurm/cluster.yaml says WHERE they go on your cluster (partitions, account, GPU type) and, for
# GPU jobs, the node's share per GPU (cpus_per_gpu, mem_mb_per_gpu: a GPU job that gives no cpus/mem_mb
# gets gpus x these). Rules pass `**job_resources(config, "<rule>", REPO)`; a rule the study does not list
# gets the executor's defaults (the profile's default-resources). Only the SLURM executor reads the
# slurm_* and tasks_per_gpu names.
CLUSTER_FILE = "profiles/slurm/cluster.yaml"
CLUSTER_NAMES = ("account", "cpu_partition", "gpu_partition", "gpu_model")
CLUSTER_COUNTS = ("cpus_per_gpu", "mem_mb_per_gpu", "tasks_per_gpu")
CLUSTER_KEYS = CLUSTER_NAMES + CLUSTER_COUNTS
# snakemake-executor-plugin-slurm 2.6.1 adds --ntasks-per-gpu=<tasks_per_gpu, else tasks, else 1> to every
# GPU job: 8 GPUs x --cpus-per-task then asks for 8 tasks' CPUs. 0 drops the flag (one task per node,
# torchrun starts the ranks).
DEFAULT_TASKS_PER_GPU = 0


def cluster_settings(repo: Path) -> dict:
    """profiles/slurm/cluster.yaml: the one file a cluster user edits (null = the cluster's default)."""
    path = Path(repo) / CLUSTER_FILE
    settings = read_yaml(path) if path.exists() else {}
    for key, value in settings.items():
        if key not in CLUSTER_KEYS:
            raise StudyConfigError(f"{path}: unknown key {key}; known keys: {', '.join(CLUSTER_KEYS)}")
        if key in CLUSTER_COUNTS:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0
                                      or (value == 0 and key != "tasks_per_gpu")):
                raise StudyConfigError(f"{path}: {key} = {value!r} must be a whole number"
                                       f"{' >= 0' if key == 'tasks_per_gpu' else ' >= 1'}, or null")
        elif value is not None and not (isinstance(value, str) and value.strip() and "'" not in value
                                        and '"' not in value and " " not in value):
            raise StudyConfigError(f"{path}: {key} = {value!r} must be a name without spaces or quotes, or null")
    merged = {key: settings.get(key) for key in CLUSTER_KEYS}
    if merged["tasks_per_gpu"] is None:
        merged["tasks_per_gpu"] = DEFAULT_TASKS_PER_GPU
    return merged


def job_resources(config: Mapping, rule: str, repo: Path) -> dict:
    """Snakemake resources of one rule's jobs: the study's request + where the cluster runs it. GPU jobs
    without their own cpus/mem_mb get gpus x cluster.yaml's cpus_per_gpu / mem_mb_per_gpu (per node)."""
    request = (config.get("resources") or {}).get(rule)
    if not request:
        return {}
    cluster = cluster_settings(repo)
    gpus = request.get("gpus", 0)
    resources = {"runtime": request["runtime"]}
    for key, per_gpu in (("cpus", "cpus_per_gpu"), ("mem_mb", "mem_mb_per_gpu")):
        if key in request:
            resources[key] = request[key]
        elif gpus and cluster[per_gpu]:
            resources[key] = gpus * cluster[per_gpu]
        else:
            raise StudyConfigError(f"config key resources.{rule} gives no {key} and {Path(repo) / CLUSTER_FILE} sets no "
                                   f"{per_gpu}: set one of them")
    resources["cpus_per_task"] = resources.pop("cpus")
    partition = cluster["gpu_partition"] if gpus else cluster["cpu_partition"]
    if partition:
        resources["slurm_partition"] = partition
    if cluster["account"]:
        resources["slurm_account"] = cluster["account"]
    if gpus:  # the plugin turns gpu (+ gpu_model) into --gpus=[model:]N; never set gres as well
        resources["gpu"] = gpus
        resources["tasks_per_gpu"] = cluster["tasks_per_gpu"]
        if cluster["gpu_model"]:
            resources["gpu_model"] = cluster["gpu_model"]
    return resources


def _resolve_auto_devices(study: Study) -> None:
    """`device: auto` becomes cuda or cpu while planning, from the GPUs the rule's jobs request, so a
    job never discovers after submission that it has (or lacks) a GPU; a contradiction is an error."""
    config = study.config
    requests = config.get("resources") or {}
    for section, rule in (("train", "train"), ("eval", "evaluate")):
        if rule not in requests or section not in config:
            continue
        gpus = requests[rule].get("gpus", 0)
        device = config[section].get("device", "auto")
        if device == "auto":
            config[section]["device"] = "cuda" if gpus else "cpu"
        elif device == "cuda" and not gpus:
            path = [section, "device"]
            raise StudyConfigError(f"config key {_key(path)} = 'cuda' (from {study.source_of(path)}): resources.{rule} "
                                   f"requests no GPU (gpus: 0, from {study.source_of(['resources', rule])})")
    if requests.get("evaluate", {}).get("gpus") and "eval" in config:
        tp, gpus = config["eval"].get("tensor_parallel_size", 1), requests["evaluate"]["gpus"]
        if config["eval"].get("backend") == "vllm" and tp > gpus:
            path = ["eval", "tensor_parallel_size"]
            raise StudyConfigError(f"config key {_key(path)} = {tp} (from {study.source_of(path)}): more than the "
                                   f"{gpus} GPU(s) resources.evaluate.gpus requests")
