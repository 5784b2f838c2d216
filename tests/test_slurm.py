"""The toy study through `--profile slurm` on a real SLURM (docs/cluster.md, "On a SLURM cluster"): jobs are
submitted with the study's per-rule resources, complete, and leave their outputs; a failing job
prints its rule log; a GPU request lands on the GPU partition with --gpus. The `slurm` tests run
whenever `sinfo` answers (else they skip, saying why); the others check the requests while planning. a single-node SLURM for this machine: `bash ../shared/tools/slurm/up.sh` (as root; add
WITH_DBD=1 for accounting, FAKE_GPUS=1 for a fake GPU), `bash ../shared/tools/slurm/down.sh` after."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

# A small toy world: toy_data + the toy-small base with a few SFT steps (seconds, not minutes)
SMALL = {"toy": {"n_train": 64, "n_sft_choice": 8, "n_val": 8, "n_test": 8},
         "models": {"toy-small": {"sft": {"steps": 3, "batch_size": 8}}}}


def _sinfo_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "no SLURM here: `sinfo` is not on PATH (bring one up: bash ../shared/tools/slurm/up.sh)"
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "no SLURM here: `sinfo` did not answer within 20 s"
    if answer.returncode != 0:
        return f"no SLURM here: `sinfo` failed ({(answer.stderr or answer.stdout).strip()[:200]})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _sinfo_problem()
    if problem:
        pytest.skip(problem)
    return subprocess.run(["sinfo", "-h", "-o", "%P %G"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """HOME with the profile installed by the README's command."""
    home = tmp_path_factory.mktemp("home")
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install_profile.sh")], check=True, capture_output=True,
                   env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": ""})
    return home


def write_yaml(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def through_slurm(home, workdir, target, *overrides, options=(), timeout=900):
    """The toy command of docs/cluster.md, `snakemake --profile slurm --configfile config.yaml`, for one target
    in a scratch workdir, with override files."""
    return subprocess.run([sys.executable, "-m", "snakemake", target, *options, "--directory", str(workdir),
                           "--profile", "slurm", "--configfile", "config.yaml", *overrides], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": ""})


def slurm_jobs(output: str) -> dict[str, str]:
    """rule name -> SLURM job id, from 'Job N has been submitted with SLURM jobid X (log: .../rule_<rule>/...)'."""
    return {rule: jobid for jobid, rule in
            re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/slurm_logs/rule_(\w+)/", output)}


def job_record(jobid: str) -> dict[str, str]:
    """`scontrol show job` fields (kept MinJobAge seconds after the end; no accounting needed)."""
    text = subprocess.run(["scontrol", "show", "job", "-o", jobid], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


@pytest.fixture(scope="module")
def toy_run(cluster, home, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm_toy")
    small = write_yaml(workdir / "small.yaml", SMALL)
    result = through_slurm(home, workdir, "results/base/toy-small", small)
    print(result.stdout[-3000:], result.stderr[-6000:])
    return workdir, small, result


@pytest.mark.slurm
def test_toy_target_runs_through_the_installed_profile(toy_run):
    workdir, _, result = toy_run
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    jobs = slurm_jobs(output)
    assert set(jobs) == {"toy_data", "toy_base"}, output[-4000:]
    assert (workdir / "results" / "data" / "toy" / "manifest.json").exists()
    assert (workdir / "results" / "base" / "toy-small" / "config.json").exists()
    # each job asked for what config.yaml's resources section says, on the CPU partition
    requested = yaml.safe_load((REPO_ROOT / "config.yaml").read_text())["resources"]
    for rule, jobid in jobs.items():
        record = job_record(jobid)
        assert record["JobState"] == "COMPLETED" and record["Partition"] == "cpu", record
        assert record["NumCPUs"] == str(requested[rule]["cpus"]), record
        assert record["MinMemoryNode"] == f"{requested[rule]['mem_mb']}M", record
        assert record["TimeLimit"] == f"{requested[rule]['runtime'] // 60:02d}:{requested[rule]['runtime'] % 60:02d}:00"
    # SLURM's own log of each job is kept (profile: slurm-keep-successful-logs)
    assert list((workdir / ".snakemake" / "slurm_logs" / "rule_toy_data").glob("*.log"))


@pytest.mark.slurm
def test_a_failing_job_prints_its_log_and_deletes_nothing_finished(toy_run, home):
    workdir, small, first = toy_run
    assert first.returncode == 0
    finished = sorted(p for p in (workdir / "results").rglob("*") if p.is_file())
    # 4 heads do not divide into 3 key/value heads: the model constructor raises inside the job
    broken = write_yaml(workdir / "broken.yaml", {"models": {"toy-large": {"size": {"num_kv_heads": 3}}}})
    result = through_slurm(home, workdir, "results/base/toy-large", small, broken, options=["--retries", "0"])
    output = result.stdout + result.stderr
    print(output[-5000:])
    assert result.returncode != 0 and "submitted with SLURM jobid" in output
    log = workdir / "logs" / "toy_base" / "toy-large.log"
    last_line = log.read_text().strip().splitlines()[-1]
    # show-failed-logs: the rule log's path and contents (here a traceback), then SLURM's job log
    shown = output.index("Logfile logs/toy_base/toy-large.log:")
    assert last_line in output[shown:] and "RuntimeError" in last_line, output[-4000:]
    assert sorted(p for p in (workdir / "results").rglob("*") if p.is_file()) == finished
    assert not (workdir / "results" / "base" / "toy-large").exists()


@pytest.mark.slurm
def test_a_gpu_request_goes_to_the_gpu_partition_with_gpus(cluster, home, tmp_path):
    if not re.search(r"^gpu\s+gpu", cluster, re.MULTILINE):
        pytest.skip(f"no GPU GRES on partition gpu (sinfo: {cluster.strip()!r}); "
                    "bring SLURM up with FAKE_GPUS=1 bash ../shared/tools/slurm/up.sh")
    gpu = write_yaml(tmp_path / "gpu.yaml", {**SMALL, "resources": {"toy_data": {"cpus": 1, "mem_mb": 1000,
                                                                                "runtime": 5, "gpus": 1}}})
    result = through_slurm(home, tmp_path, "results/data/toy/manifest.json", gpu)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    record = job_record(slurm_jobs(output)["toy_data"])
    assert record["JobState"] == "COMPLETED" and record["Partition"] == "gpu", record
    assert "gpu:1" in record.get("TresPerJob", ""), record  # sbatch --gpus=1
    assert (tmp_path / "results" / "data" / "toy" / "manifest.json").exists()


def dry_run_requests(output: str) -> dict[str, set[str]]:
    """rule -> the distinct `resources:` lines of its jobs in a dry run."""
    requests, rule = {}, None
    for line in output.splitlines():
        if line.startswith("rule "):
            rule = line.split()[1].rstrip(":")
        elif line.strip().startswith("resources:") and rule:
            requests.setdefault(rule, set()).add(line.strip().removeprefix("resources: "))
    return requests


def test_paper_dry_run_requests_gpus_for_train_and_evaluate_only(home, tmp_path):
    from conftest import write_finished_base
    from test_paper_study import PAPER_MODELS

    for name in PAPER_MODELS:  # as after the base_model jobs: planning needs no hub
        write_finished_base(tmp_path / "results" / "base" / name)
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "--directory", str(tmp_path),
                             "--profile", "slurm"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    requests = dry_run_requests(result.stdout + result.stderr)
    wired = ["base_model", "benchmark_data", "train_data", "train", "evaluate"]  # rules passing job_resources
    assert all(len(requests[rule]) == 1 for rule in wired), requests  # every job of a rule asks the same
    fields = {rule: dict(item.split("=", 1) for item in requests[rule].pop().split(", ")) for rule in wired}
    assert {rule: (f["slurm_partition"], f.get("gpu")) for rule, f in fields.items()} == {
        "base_model": ("cpu", None), "benchmark_data": ("cpu", None), "train_data": ("cpu", None),
        "train": ("gpu", "8"), "evaluate": ("gpu", "1")}
    # one node of 8 GPUs per training run (train.parallel: 8 FSDP2 ranks under torchrun), CPUs and memory
    # from cluster.yaml's share per GPU (24, 240000 MB), no --ntasks-per-gpu (tasks_per_gpu 0)
    assert (fields["train"]["cpus_per_task"], fields["train"]["mem_mb"], fields["train"]["runtime"],
            fields["train"]["nodes"], fields["train"]["tasks"], fields["train"]["tasks_per_gpu"]) == (
        "192", "1920000", "2880", "1", "1", "0")
    assert (fields["evaluate"]["cpus_per_task"], fields["evaluate"]["mem_mb"], fields["evaluate"]["runtime"],
            fields["evaluate"]["tasks_per_gpu"]) == ("24", "240000", "720", "0")


@pytest.mark.parametrize("study, override, train_device", [
    ("workflow/configs/paper.yaml", {"train": {"device": "auto"}}, "cuda"),   # the paper requests a GPU
    ("config.yaml", {}, "cpu"),                                                # the toy study requests none
    ("config.yaml", {"resources": {"train": {"cpus": 1, "mem_mb": 1000, "runtime": 5, "gpus": 1}}}, "cuda"),
])
def test_device_auto_resolves_while_planning_from_the_gpu_request(tmp_path, study, override, train_device):
    from trace.study_config import load_study, validate

    mine = write_yaml(tmp_path / "mine.yaml", override)
    config = validate(load_study(REPO_ROOT, [REPO_ROOT / study, mine], None),
                      REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml")
    assert config["train"]["device"] == train_device


def test_cuda_without_a_gpu_request_is_one_line_naming_both_keys(tmp_path):
    from trace.study_config import StudyConfigError, load_study, validate

    mine = write_yaml(tmp_path / "mine.yaml", {"train": {"device": "cuda"}})
    with pytest.raises(StudyConfigError) as raised:
        validate(load_study(REPO_ROOT, [REPO_ROOT / "config.yaml", mine], None),
                 REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml")
    assert str(raised.value) == (f"config key train.device = 'cuda' (from {mine}): resources.train requests no GPU "
                                 f"(gpus: 0, from {REPO_ROOT / 'config.yaml'})")


def test_cluster_file_sets_where_jobs_go_and_names_a_bad_key(tmp_path):
    from trace.study_config import StudyConfigError, job_resources

    (tmp_path / "profiles" / "slurm").mkdir(parents=True)
    cluster = tmp_path / "profiles" / "slurm" / "cluster.yaml"
    cluster.write_text("account: ci\ncpu_partition: short\ngpu_partition: a100q\ngpu_model: a100\n")
    config = {"resources": {"train": {"cpus": 4, "mem_mb": 9000, "runtime": 90, "gpus": 2},
                            "report": {"cpus": 1, "mem_mb": 100, "runtime": 5}}}
    assert job_resources(config, "train", tmp_path) == {
        "cpus_per_task": 4, "mem_mb": 9000, "runtime": 90, "slurm_partition": "a100q", "slurm_account": "ci",
        "gpu": 2, "tasks_per_gpu": 0, "gpu_model": "a100"}
    assert job_resources(config, "report", tmp_path) == {
        "cpus_per_task": 1, "mem_mb": 100, "runtime": 5, "slurm_partition": "short", "slurm_account": "ci"}
    assert job_resources(config, "evaluate", tmp_path) == {}  # not in the study: the executor's defaults
    # a GPU job without its own cpus / mem_mb gets the site's share per GPU (an 8xA100, 128 threads, 1 TB)
    cluster.write_text("gpu_partition: a100q\ncpus_per_gpu: 16\nmem_mb_per_gpu: 120000\ntasks_per_gpu: 1\n")
    config["resources"]["evaluate"] = {"runtime": 60, "gpus": 8}
    assert job_resources(config, "evaluate", tmp_path) == {
        "cpus_per_task": 128, "mem_mb": 960000, "runtime": 60, "slurm_partition": "a100q", "gpu": 8,
        "tasks_per_gpu": 1}
    cluster.write_text("gpu_partition: a100q\n")
    with pytest.raises(StudyConfigError, match=r"^config key resources.evaluate gives no cpus and \S+cluster.yaml "
                                               r"sets no cpus_per_gpu: set one of them$"):
        job_resources(config, "evaluate", tmp_path)
    cluster.write_text("cpus_per_gpu: 0\n")
    with pytest.raises(StudyConfigError, match=r"cluster.yaml: cpus_per_gpu = 0 must be a whole number >= 1, or null$"):
        job_resources(config, "evaluate", tmp_path)
    cluster.write_text("partition: gpu\n")
    with pytest.raises(StudyConfigError, match=r"cluster.yaml: unknown key partition; known keys: account, "
                                               r"cpu_partition, gpu_partition, gpu_model, cpus_per_gpu, "
                                               r"mem_mb_per_gpu, tasks_per_gpu$"):
        job_resources(config, "train", tmp_path)
