"""``python -m trace preflight --profile slurm [--configfile FILE ...] [TARGET ...]``: on the login node,
before any GPU-hour is spent, one line per finding and a non-zero exit on any blocker:

* the command line (two --configfile flags, a target written after --configfile);
* the study's config (schema, cross references);
* per rule of the planned study, its sbatch line exactly as the pinned SLURM plugin writes it, tried with
  ``sbatch --test-only`` against its partition and compared with ``scontrol show partition/node``;
* every base model: already materialised, or its local folder complete and hash-checked, or the hub;
* the prepared data against their manifest's sha256 (or where they will come from);
* the API annotator's key variable; the venv that runs the jobs (``--probe-nodes``: from a compute node).

Nothing is submitted and nothing is written (the planning runs as a dry run, TRACE_PREFLIGHT=1).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

from trace import base_model, study_config
from trace.settings import PretrainedModel

REPO = Path(__file__).resolve().parents[1]
USAGE = "python -m trace preflight --profile NAME [--configfile FILE ...] [TARGET ...] [--probe-nodes]"


class Report:
    def __init__(self):
        self.lines: list[str] = []

    def add(self, level: str, text: str) -> None:
        line = f"{level:<5} {text}"
        self.lines.append(line)
        print(line, flush=True)

    @property
    def blockers(self) -> int:
        return sum(line.startswith("BLOCK") for line in self.lines)


def parse(argv: list[str]) -> SimpleNamespace:
    """Snakemake's own words: --profile, --configfile(s), --directory, targets."""
    args = SimpleNamespace(profile="slurm", configfiles=[], targets=[], probe_nodes=False, directory=".")
    words = iter(argv)
    in_configfiles = False
    for word in words:
        flag, equals, value = word.partition("=")
        if flag in study_config.CONFIGFILE_FLAGS:
            in_configfiles = True
            if equals:
                args.configfiles.append(value)
        elif flag in ("--profile", "--directory", "-d"):
            in_configfiles = False
            setattr(args, "directory" if flag != "--profile" else "profile", value if equals else next(words, ""))
        elif word == "--probe-nodes":
            in_configfiles = False
            args.probe_nodes = True
        elif word.startswith("-"):
            raise SystemExit(f"preflight: unknown option {word}; usage: {USAGE}")
        elif in_configfiles:
            args.configfiles.append(word)
        else:
            args.targets.append(word)
    return args


def profile_dir(name: str) -> Path | None:
    """Where Snakemake 9 looks for --profile NAME (a path, then the user's and the system's folders)."""
    candidates = [Path(name)]
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    candidates += [config_home / "snakemake" / name, Path("/etc/xdg/snakemake") / name]
    return next((path for path in candidates if (path / "config.yaml").is_file()), None)


def check_command_line(args, argv, report: Report) -> bool:
    """What Snakemake would do with the words: refuse (in the Snakefile) or trip over (a missing file)."""
    problem = study_config.command_line_problem(argv, args.configfiles, REPO) or next(
        (f"--configfile {word}: no such file" for word in args.configfiles if not Path(word).exists()), None)
    if problem:
        report.add("BLOCK", problem)
        return False
    return True


def load(args, profile: Path, report: Report) -> dict | None:
    settings = yaml.safe_load((profile / "config.yaml").read_text()) or {}
    configfiles = args.configfiles or [str(REPO / f) for f in settings.get("configfile") or []]
    try:
        study = study_config.load_study(REPO, configfiles, None)
        config = study_config.validate(study, REPO / "workflow" / "schemas" / "config.schema.yaml")
    except study_config.StudyConfigError as error:
        report.add("BLOCK", f"config: {error}")
        return None
    report.add("OK", f"config: study {config['study']!r} from {', '.join(configfiles) or study_config.DEFAULT_STUDY_FILE}"
               f" is valid")
    return config


# ---- job shapes ----------------------------------------------------------------------------------------
def planned_resources(args, report: Report) -> dict[str, list[dict]] | None:
    """rule -> the distinct resources of its jobs, from a dry run of exactly the user's command."""
    command = [sys.executable, "-m", "snakemake", "-n", "--forceall", "--profile", args.profile,
               "--directory", args.directory, *args.targets]
    if args.configfiles:
        command += ["--configfile", *args.configfiles]
    env = {**os.environ, "TRACE_PREFLIGHT": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("config error")), None) or next(
            (f"{line} {lines[i + 1]}" for i, line in enumerate(lines[:-1]) if re.search(r"(Error|Exception)\b", line)),
            lines[-1] if lines else "failed")
        report.add("BLOCK", f"plan: {reason} (snakemake {' '.join(shlex.quote(w) for w in command[3:])})")
        return None
    planned: dict[str, list[dict]] = {}
    rule = None
    for line in output.splitlines():
        if re.match(r"^(local)?rule \w+:", line):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("resources:") and rule:
            fields = dict(item.split("=", 1) for item in line.strip().removeprefix("resources: ").split(", "))
            resources = {key: int(value) if value.isdigit() else value for key, value in fields.items()
                         if key in SLURM_RESOURCES}
            if resources not in planned.setdefault(rule, []):
                planned[rule].append(resources)
            rule = None
    return planned


SLURM_RESOURCES = ("mem_mb", "runtime", "cpus_per_task", "slurm_partition", "slurm_account", "gpu", "gpu_model",
                   "tasks_per_gpu", "nodes", "tasks")


class _Resources(dict):
    __getattr__ = dict.__getitem__


def sbatch_line(rule: str, resources: dict, workdir: Path) -> str:
    """The sbatch line the pinned plugin (snakemake-executor-plugin-slurm 2.6.1) writes for these resources,
    built by its own functions (up to the wrapped command)."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = SimpleNamespace(resources=_Resources(resources), threads=1, name=rule)
    params = {"run_uuid": "preflight", "slurm_logfile": "/dev/null", "comment_str": f"rule_{rule}",
              "account": f"-A {shlex.quote(resources['slurm_account'])}" if resources.get("slurm_account") else "",
              "partition": f"-p {resources['slurm_partition']}" if resources.get("slurm_partition") else "",
              "workdir": str(workdir)}
    return get_submit_command(job, params) + set_gres_string(job)


def scontrol(*args: str) -> list[dict[str, str]]:
    text = subprocess.run(["scontrol", "show", "-o", *args], capture_output=True, text=True).stdout
    return [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in text.splitlines() if line]


def partition_summary(partition: str | None) -> str:
    """'partition gpu: 1 node(s), largest 224 CPUs, 2000000 MB, gpu:8' (scontrol show partition/node)."""
    name = partition or next((p.get("PartitionName") for p in scontrol("partition") if p.get("Default") == "YES"), "")
    found = scontrol("partition", name) if name else []
    if not found:
        return f"partition {name or '(default)'}: not found (sinfo lists the partitions)"
    nodes = [node for node in scontrol("node") if name in node.get("Partitions", "").split(",")]
    if not nodes:
        return f"partition {name}: no nodes"
    big = max(nodes, key=lambda node: (int(node.get("CPUTot", 0)), int(node.get("RealMemory", 0))))
    return (f"partition {name} ({found[0].get('State')}, MaxTime {found[0].get('MaxTime')}): {len(nodes)} node(s), "
            f"largest {big.get('CPUTot')} CPUs, {big.get('RealMemory')} MB, {big.get('Gres') or 'no GRES'}")


def shape(line: str) -> str:
    return " ".join(re.findall(r"(-p \S+|-t \S+|--mem \d+|--nodes=\d+|--ntasks\S*|--cpus-per-\S+|--gpus=\S+)", line))


def check_shapes(planned: dict[str, list[dict]], workdir: Path, report: Report) -> None:
    if shutil.which("sbatch") is None:
        report.add("BLOCK", "shapes: sbatch is not on PATH: run preflight on the cluster's login node")
        return
    for rule, requests in sorted(planned.items()):
        for resources in requests:
            if rule == "all" or not resources.get("runtime"):
                continue
            line = sbatch_line(rule, resources, workdir)
            test = f"{line.replace('--parsable', '--test-only', 1)} --wrap=true"
            answer = subprocess.run(test, shell=True, capture_output=True, text=True, timeout=60)
            said = (answer.stderr + answer.stdout).strip().replace("\n", " ")
            where = partition_summary(resources.get("slurm_partition"))
            if answer.returncode == 0 and "to start at" in said:
                report.add("OK", f"{rule}: {shape(line)} fits ({said.removeprefix('sbatch: ')})")
            else:
                report.add("BLOCK", f"{rule}: {shape(line)} does not fit: sbatch --test-only says {said!r}; {where}")


# ---- models, data, key, venv ---------------------------------------------------------------------------
def check_models(config: dict, workdir: Path, report: Report) -> None:
    if config.get("study") == "toy":  # toy bases are built by the toy_base rule from config.yaml's sizes
        report.add("OK", "models: toy bases, built by the toy_base rule")
        return
    entries = {**{n: ("models", e) for n, e in (config.get("models") or {}).items()},
               **{n: ("annotator_models", e) for n, e in (config.get("annotator_models") or {}).items()}}
    for name, (section, entry) in entries.items():
        entry = dict(entry)
        if entry.get("path"):
            entry["path"] = str((REPO / Path(entry["path"]).expanduser()).resolve())
        out = workdir / "results" / "base" / name
        if out.exists():
            broken = base_model.repair_problem(name, out)
            if not broken:
                report.add("OK", f"model {name}: materialised in {out}")
                continue
            report.add("WARN", f"{broken}: its base_model job will rebuild it")
        problem = base_model.availability_problem(name, PretrainedModel.from_mapping(entry, f"{section}.{name}"), out,
                                                  section)  # absent or broken: the source
        if problem:
            report.add("BLOCK", problem)
        elif entry.get("init"):
            report.add("OK", f"model {name}: random init + SFT ({section}.{name}.init)")
        elif entry.get("path"):
            report.add("OK", f"model {name}: {entry['path']} complete, {len(entry.get('sha256') or {})} file hash(es) "
                             f"match")
        else:
            report.add("OK", f"model {name}: {entry['repo']} @ {entry['revision'][:12]} from the hub (reachable or "
                             f"cached), hashes checked by its base_model job")


def check_data(config: dict, workdir: Path, report: Report) -> None:
    real = config.get("real_data")
    if not real:
        return
    for folder in (workdir / "results" / "data" / "real", workdir / "results" / "data" / "real" / "train"):
        manifest = folder / "manifest.json"
        if not manifest.exists():
            mirror = real.get("mirror_dir")
            if mirror is not None:
                mirror_path = (REPO / mirror).resolve()
                report.add("OK" if mirror_path.is_dir() else "BLOCK",
                           f"data {folder}: not prepared yet; real_data.mirror_dir {mirror_path} "
                           f"{'exists' if mirror_path.is_dir() else 'does not exist'}")
            else:
                report.add("OK" if base_model.hub_reachable() else "BLOCK",
                           f"data {folder}: not prepared yet; from the Hugging Face hub "
                           f"({'reachable' if base_model.hub_reachable() else 'unreachable: set real_data.mirror_dir'})")
            continue
        try:
            files = json.loads(manifest.read_text()).get("files") or {}
        except json.JSONDecodeError as error:
            report.add("BLOCK", f"data {manifest}: not valid JSON ({error.msg}, line {error.lineno})")
            continue
        bad = [name for name, entry in sorted(files.items())
               if not (folder / name).is_file() or base_model.sha256_of(folder / name) != entry.get("sha256")]
        if bad:
            report.add("BLOCK", f"data {folder}: {', '.join(bad)} missing or not matching {manifest}'s sha256 "
                                f"(rerun its data rule)")
        else:
            report.add("OK", f"data {folder}: {len(files)} file(s) match {manifest.name}'s sha256")


def check_api_key(config: dict, report: Report) -> None:
    annotator = (config.get("train") or {}).get("annotator") or {}
    if annotator.get("tier") != "api":
        return
    variable = (annotator.get("http") or {}).get("api_key_env")
    if variable and os.environ.get(variable):
        report.add("OK", f"annotator: ${variable} is set (jobs get it through sbatch --export=ALL)")
    else:
        report.add("BLOCK", f"annotator: ${variable} (train.annotator.http.api_key_env) is not set in this shell; "
                            f"export it before snakemake")


def check_venv(config: dict, probe: bool, report: Report) -> None:
    python = Path(os.environ.get("TRACE_PYTHON", sys.executable))
    if not os.access(python, os.X_OK):
        report.add("BLOCK", f"venv: {python} (the jobs' interpreter) is not executable")
        return
    if not probe:
        report.add("OK", f"venv: jobs run {python}; it must exist at this path on the compute nodes "
                         f"(--probe-nodes checks from one)")
        return
    partition = study_config.cluster_settings(REPO)["cpu_partition"]
    command = ["srun", *(["-p", partition] if partition else []), "-N1", "-n1", "-t", "5", str(python), "-c",
               "import snakemake, torch, trace.launch"]
    answer = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    report.add("OK" if answer.returncode == 0 else "BLOCK",
               f"venv: {python} {'imports' if answer.returncode == 0 else 'does not import'} snakemake, torch and "
               f"trace on a node of {partition or 'the default partition'}"
               + ("" if answer.returncode == 0 else f" ({answer.stderr.strip().splitlines()[-1:]})"))


def run_preflight(argv: list[str]) -> int:
    args = parse(argv)
    report = Report()
    workdir = (REPO / args.directory).resolve()
    profile = profile_dir(args.profile)
    if profile is None:
        report.add("BLOCK", f"profile {args.profile!r} not found in ~/.config/snakemake or /etc/xdg/snakemake "
                            f"(bash scripts/install_profile.sh installs profiles/slurm)")
    elif check_command_line(args, argv, report):
        config = load(args, profile, report)
        if config is not None:
            check_models(config, workdir, report)
            check_data(config, workdir, report)
            check_api_key(config, report)
            check_venv(config, args.probe_nodes, report)
            planned = planned_resources(args, report)
            if planned is not None:
                check_shapes(planned, workdir, report)
    print(f"preflight: {report.blockers} blocker(s)" + ("" if report.blockers else "; nothing submitted, ready"))
    return 1 if report.blockers else 0
