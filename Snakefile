# TRACE reproduction pipeline.
#   snakemake --cores 2                                            # the toy study (config.yaml), on this machine
#   snakemake --cores 2 --configfile workflow/configs/paper_smoke.yaml   # the paper path on CPU (see README)
#   snakemake --profile slurm                                      # the paper study on a SLURM cluster (see README)
#   snakemake --cores 2 report                                     # tables and figures from the aggregate
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

min_version("9.0")

report: "workflow/report/workflow.rst"  # `snakemake --report report.html` (docs/html-report.md)

REPO = Path(workflow.basedir).resolve()


def _load_by_path(name, relative):
    """Our package `trace` shares its name with a stdlib module Snakemake may have imported: load by path."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded  # dataclasses look their module up while the class is built
    spec.loader.exec_module(loaded)
    return loaded


study_config = _load_by_path("trace_study_config", "trace/study_config.py")
# The study: config.yaml (toy), unless a --configfile is a complete study (has `study:`); the
# other --configfile files and --config items are overrides on top (trace/study_config.py).
try:
    if workflow.is_main_process:  # jobs get the files in one --configfiles flag
        _slip = study_config.command_line_problem(sys.argv[1:], workflow.config_settings.configfiles, REPO)
        if _slip:
            raise study_config.StudyConfigError(_slip)
    _study = study_config.load_study(REPO, workflow.config_settings.configfiles, workflow.config_settings.config)
    study_config.validate(_study, REPO / "workflow/schemas/config.schema.yaml")
    for _rule in _study.config.get("resources") or {}:  # cluster.yaml's per-GPU share: checked here, in one line
        study_config.job_resources(_study.config, _rule, REPO)
except study_config.StudyConfigError as error:
    raise WorkflowError(f"config error: {error}") from None
config.clear()
config.update(_study.config)
STUDY = config["study"]

# Jobs run `python -m trace` with the repo first on the path (the stdlib-shadowing note above).
# Few threads + passive waiting keep two jobs from starving 2 cores.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's caches, shared by the study's jobs (beside Snakemake's own metadata in the working directory):
# vLLM inspects the model class in a subprocess that imports vLLM again (~15 s of every CPU training job)
# unless its cache already holds the answer; compiled graphs (enforce_eager: false) are reused too.
os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(".snakemake/vllm-cache/vllm").resolve()))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(".snakemake/vllm-cache/inductor").resolve()))
if STUDY == "toy":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the toy world never needs the hub
# `python -m trace preflight` plans with this set: it reports model problems itself, and nothing is written
PREFLIGHT = os.environ.get("TRACE_PREFLIGHT") == "1"
PYTHON = os.environ.get("TRACE_PYTHON", sys.executable)  # the venv that runs snakemake runs the jobs


def as_arg(settings) -> str:
    """Settings for a `python -m trace` stage, shell-quoted JSON (params changes trigger reruns)."""
    return shlex.quote(json.dumps(settings, sort_keys=True))


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/teacher_gap.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.report.output,
