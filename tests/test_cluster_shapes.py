"""The paper study's GPU jobs on a SLURM node shaped like the paper's reference node (8 GPUs, 224 hardware
threads, 2 TB): the sbatch lines the pinned plugin (snakemake-executor-plugin-slurm 2.6.1) writes, and
what SLURM does with them. Needs `FAKE_GPUS=8 FAKE_CPUS=224 FAKE_MEM_MB=2000000 bash
../shared/tools/slurm/up.sh` (as root); skipped, saying why, where `sinfo` does not answer or the node has
another shape. The jobs really start (8 fake GPUs, no CUDA): each must fail for lack of CUDA, naming
the GPUs SLURM gave it."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, write_finished_base, write_teacher_checks
from test_slurm import _sinfo_problem, home, job_record, slurm_jobs, write_yaml  # noqa: F401 (home: fixture)

REFERENCE = {"gpus": 8, "cpus": 224, "mem_mb": 2_000_000}
UP = "FAKE_GPUS=8 FAKE_CPUS=224 FAKE_MEM_MB=2000000 bash ../shared/tools/slurm/up.sh"
MODEL = "qwen3-1.7b"
TRAIN_TARGET = f"results/train/{MODEL}/grpo/seed0/metrics.jsonl"
EVAL_TARGET = f"results/eval/{MODEL}/base/math500.json"
BENCHMARKS = ["math500", "aime24", "aime25", "amc23", "gpqa_diamond"]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def gpu_node_shape() -> dict | None:
    """CPUs, memory and GPUs of the gpu partition's largest node (`scontrol show node`)."""
    nodes = subprocess.run(["sinfo", "-h", "-p", "gpu", "-o", "%N"], capture_output=True, text=True).stdout.split()
    shapes = []
    for node in nodes:
        text = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True).stdout
        fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
        gpus = re.search(r"gpu(?::[^:,(]+)?:(\d+)", fields.get("Gres", ""))
        shapes.append({"cpus": int(fields.get("CPUTot", 0)), "mem_mb": int(fields.get("RealMemory", 0)),
                       "gpus": int(gpus.group(1)) if gpus else 0})
    return max(shapes, key=lambda s: (s["gpus"], s["cpus"]), default=None)


@pytest.fixture(scope="module")
def reference_node():
    problem = _sinfo_problem()
    if problem:
        pytest.skip(problem)
    shape = gpu_node_shape()
    if shape != REFERENCE:
        pytest.skip(f"the gpu partition's node is {shape}, not the reference {REFERENCE}: bring SLURM up with {UP}")
    return shape


def paper_workdir(root: Path) -> Path:
    """A workdir as after the base_model, data and teacher_gap jobs of the paper study (real Qwen3-1.7B config,
    a weights placeholder, one training problem, the five benchmark files): only train and evaluate remain."""
    for name in ("qwen3-8b", MODEL, "qwen3-32b"):
        write_finished_base(root / "results" / "base" / name)
    train = root / "results" / "data" / "real" / "train"
    train.mkdir(parents=True)
    record = json.dumps({"problem": "1+1?", "solution": "2", "answer": "2"})
    for split in ("train", "val"):
        (train / f"{split}.jsonl").write_text(record + "\n")
    (train / "manifest.json").write_text(json.dumps({"files": {"train.jsonl": {"train_source": "openthoughts",
                                                                               "source": "test"}}}))
    for name in BENCHMARKS:
        (root / "results" / "data" / "real" / f"{name}.jsonl").write_text(record + "\n")
    (root / "results" / "data" / "real" / "manifest.json").write_text("{}")
    write_teacher_checks(root, MODEL)  # the probe's fixed batch (a GPU job of its own), made after the data
    return root


def sbatch_lines(output: str) -> dict[str, str]:
    """rule -> the sbatch line the plugin ran (its debug log, `--verbose`), up to the wrapped command."""
    lines = {}
    for call in re.findall(r"sbatch call: (sbatch .*?) --wrap=", output):
        rule = re.search(r"--comment '?rule_(\w+?)(?:_wildcards_|'| )", call).group(1)
        lines[rule] = call
    return lines


def shape_of(line: str) -> str:
    """The resource part of an sbatch line: what decides whether it fits a node."""
    return " ".join(re.findall(r"(-p \S+|-t \S+|--mem \d+|--nodes=\d+|--ntasks\S*|--cpus-per-\S+|--gpus=\S+)", line))


def snakemake_cmd(workdir, *args):
    return [sys.executable, "-m", "snakemake", "--directory", str(workdir), "--profile", "slurm", "--retries", "0",
            "--verbose", *args]


@pytest.fixture(scope="module")
def paper_jobs(reference_node, home, tmp_path_factory):
    """The paper study's train (qwen3-1.7b grpo seed 0) and evaluate (qwen3-1.7b base) jobs, submitted
    through the installed profile; both start and fail for lack of CUDA."""
    workdir = paper_workdir(tmp_path_factory.mktemp("paper_jobs"))
    result = subprocess.run(snakemake_cmd(workdir, TRAIN_TARGET, EVAL_TARGET), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=1200, env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": ""})
    output = result.stdout + result.stderr
    print(output[-6000:])
    return workdir, result.returncode, output


def test_train_and_evaluate_sbatch_lines_fit_the_reference_node(paper_jobs):
    _, _, output = paper_jobs
    lines = sbatch_lines(output)
    print(json.dumps(lines, indent=1))
    assert set(lines) == {"train", "evaluate"}, output[-4000:]
    # 8 GPUs x cluster.yaml's 24 CPUs / 240000 MB per GPU; no --ntasks-per-gpu (tasks_per_gpu: 0), so
    # SLURM counts one task of 192 CPUs, not 8 tasks of 192
    assert shape_of(lines["train"]) == "-p gpu -t 2880 --mem 1920000 --nodes=1 --cpus-per-task=192 --gpus=8"
    assert shape_of(lines["evaluate"]) == "-p gpu -t 720 --mem 240000 --cpus-per-task=24 --gpus=1"
    assert "ntasks" not in lines["train"] + lines["evaluate"]


def test_train_job_starts_one_rank_per_gpu_and_fails_only_for_lack_of_cuda(paper_jobs):
    workdir, returncode, output = paper_jobs
    assert returncode != 0  # both jobs fail: no CUDA here
    jobs = slurm_jobs(output)
    assert set(jobs) == {"train", "evaluate"}, output[-4000:]
    assert output.count("submitted with SLURM jobid") == 2  # each submitted once (no retry)
    record = job_record(jobs["train"])
    # scheduled and run on the GPU partition with the whole shape: not left PENDING (PartitionConfig)
    assert (record["JobState"], record["Reason"], record["Partition"]) == ("FAILED", "NonZeroExitCode", "gpu"), record
    assert (record["NumCPUs"], record["NumNodes"], record["Restarts"]) == ("192", "1", "0"), record
    assert (record["MinMemoryNode"], record["TresPerJob"]) == ("1875G", "gres:gpu:8"), record  # 1920000 MB
    log = (workdir / "logs" / "train" / MODEL / "grpo" / "seed0.log").read_text()
    # torchrun ran once (one failure report) with 8 local ranks, one per GPU
    assert log.count("Root Cause (first observed failure)") == 1, log[-4000:]
    assert sorted(re.findall(r"rank +: (\d) \(local_rank: \1\)", log)) == [str(r) for r in range(8)], log[-4000:]
    # each rank that got as far as choosing its device saw all 8 GPUs SLURM allocated, and no CUDA
    # (torchrun stops the others once one fails: usually all 8 get there)
    seen = re.findall(r"train failed: ValueError: train\.device is 'cuda' but no CUDA device is usable "
                      r"\(rank (\d) of 8, host \S+, CUDA_VISIBLE_DEVICES=([\d,]+)\)", log)
    assert seen and {devices for _, devices in seen} == {"0,1,2,3,4,5,6,7"}, log[-4000:]
    assert len({rank for rank, _ in seen}) == len(seen), log[-4000:]
    assert log.count("Traceback (most recent call last)") == 1, log[-4000:]  # torchrun's; the ranks': one line


def test_evaluate_job_gets_one_gpu_and_fails_only_for_lack_of_cuda(paper_jobs):
    workdir, _, output = paper_jobs
    record = job_record(slurm_jobs(output)["evaluate"])
    assert (record["JobState"], record["Reason"], record["Partition"]) == ("FAILED", "NonZeroExitCode", "gpu"), record
    assert (record["NumCPUs"], record["Restarts"]) == ("24", "0"), record
    assert (record["MinMemoryNode"], record["TresPerJob"]) == ("240000M", "gres:gpu:1"), record
    log = (workdir / "logs" / "evaluate" / MODEL / "base.log").read_text()
    failures = re.findall(r"evaluate failed: ValueError: eval\.device is 'cuda' but no CUDA device is usable "
                          r"\(host \S+, CUDA_VISIBLE_DEVICES=(\d+)\)", log)
    assert len(failures) == 1, log[-4000:]  # the command ran once, with one GPU


def test_two_node_train_line_asks_for_two_nodes_of_eight_gpus(reference_node, home, tmp_path):
    """On one node a 2-node job can only be accepted and wait (PartitionConfig: the partition has one
    node); its line must ask for 16 GPUs over 2 nodes with each node's share, and one node of it fits."""
    workdir = paper_workdir(tmp_path)
    two = write_yaml(tmp_path / "two_nodes.yaml", {"train": {"parallel": {"nodes": 2, "procs_per_node": 8}}})
    process = subprocess.Popen(snakemake_cmd(workdir, TRAIN_TARGET, "--configfile",
                                             str(REPO_ROOT / "workflow" / "configs" / "paper.yaml"), two),
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": ""}, start_new_session=True)
    output, deadline = "", time.time() + 300
    try:
        for line in process.stdout:  # until SLURM has the job
            output += line
            if "submitted with SLURM jobid" in line or time.time() > deadline:
                break
        jobid = slurm_jobs(output)["train"]
        time.sleep(2)
        record = job_record(jobid)
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Snakemake cancels its job
        try:
            rest, _ = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # interrupted inside a status check (sacct retries on a loaded machine):
            os.killpg(process.pid, signal.SIGKILL)  # stop it harder and cancel what it submitted ourselves
            rest, _ = process.communicate()
            for stuck in slurm_jobs(output).values():
                subprocess.run(["scancel", str(stuck)], capture_output=True)
        print(output[-3000:], rest[-2000:])
    line = sbatch_lines(output)["train"]
    print(line)
    # 16 GPUs over 2 nodes: one task per node with each node's share of CPUs and memory
    assert shape_of(line) == "-p gpu -t 2880 --mem 1920000 --nodes=2 --ntasks=2 --cpus-per-task=192 --gpus=16"
    assert (record["JobState"], record["Reason"], record["NumNodes"]) == ("PENDING", "PartitionConfig", "2-2"), record
    one_node = line.replace("--nodes=2", "--nodes=1").replace("--ntasks=2", "--ntasks=1").replace("--gpus=16", "--gpus=8")
    test = subprocess.run(f"{one_node.replace('--parsable', '--test-only')} --wrap=true", shell=True,
                          capture_output=True, text=True)
    assert re.search(r"to start at .* using 192 processors on nodes \S+ in partition gpu", test.stderr), test.stderr
