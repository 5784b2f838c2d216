# TRACE reproduction pipeline. Default: the embedded toy study (config.yaml).
#   snakemake --cores 2                    # whole study on this machine
#   snakemake --profile profiles/slurm     # on a SLURM cluster (see README)
#   snakemake --cores 2 report             # tables and figures from cached results
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

configfile: os.path.join(workflow.basedir, "config.yaml")
validate(config, "workflow/schemas/config.schema.yaml")

REPO = Path(workflow.basedir).resolve()
# Our package `trace` shadows the stdlib module of that name: jobs run `python -m trace` with the
# repo first on the path. Few threads + passive waiting keep two jobs from starving 2 cores.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PYTHON = os.environ.get("TRACE_PYTHON", sys.executable)  # the venv that runs snakemake runs the jobs


def as_arg(settings) -> str:
    """Settings for a `python -m trace` stage, shell-quoted JSON (params changes trigger reruns)."""
    return shlex.quote(json.dumps(settings, sort_keys=True))


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/base.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.report.output,
