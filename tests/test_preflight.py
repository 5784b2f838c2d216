"""`python -m trace preflight --profile slurm ...`: before anything is submitted, one line per finding and
exit 1 on a blocker: a model that cannot be obtained, a misplaced target, and (on the reference-shaped
SLURM of tests/test_cluster_shapes.py) a job shape its partition cannot hold."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO_ROOT, write_finished_base
from test_cluster_shapes import REFERENCE, UP, gpu_node_shape, paper_workdir
from test_slurm import _sinfo_problem, home  # noqa: F401 (fixture)

PAPER = str(REPO_ROOT / "workflow" / "configs" / "paper.yaml")


def preflight(home, workdir, *args):
    result = subprocess.run([sys.executable, "-m", "trace", "preflight", "--profile", "slurm", "--directory",
                             str(workdir), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": "", "HF_HUB_OFFLINE": "1",
                                 "HF_HOME": str(workdir / "hf"), "DASHSCOPE_API_KEY": "test"})
    print(result.stdout, result.stderr[-3000:])
    assert "Traceback" not in result.stdout + result.stderr
    return result


def findings(result, level: str) -> list[str]:
    return [line.removeprefix(level).strip() for line in result.stdout.splitlines() if line.startswith(level)]


def nothing_submitted(workdir) -> bool:
    return not (workdir / ".snakemake" / "slurm_logs").exists() and not (workdir / "logs").exists()


@pytest.mark.slow  # spawns `python -m trace preflight` (planning + SLURM queries)
def test_a_missing_model_is_a_blocker_before_anything_is_submitted(home, tmp_path):  # noqa: F811
    workdir = paper_workdir(tmp_path)
    shutil.rmtree(workdir / "results" / "base" / "qwen3-8b")  # not downloaded, hub offline
    result = preflight(home, workdir)
    assert result.returncode == 1
    assert ("model qwen3-8b (Qwen/Qwen3-8B @ b968826d9c46) is not available: the Hugging Face hub is unreachable "
            "(offline) and it is not in the local hub cache. Download it where you have internet (huggingface-cli "
            "download Qwen/Qwen3-8B --revision b968826d9c46dd6066d109eabc6255188de91218 --local-dir DIR) and set "
            "models.qwen3-8b.path: DIR in your config") in findings(result, "BLOCK")
    assert f"model qwen3-1.7b: materialised in {workdir}/results/base/qwen3-1.7b" in findings(result, "OK")
    assert result.stdout.splitlines()[-1].startswith("preflight: ") and "blocker(s)" in result.stdout.splitlines()[-1]
    assert nothing_submitted(workdir)


@pytest.mark.slow  # spawns `python -m trace preflight`
@pytest.mark.parametrize("args, blocker", [
    (["--configfile", PAPER, "main_table"], "--configfile main_table: main_table is a rule of this workflow, not a "
     "config file: put targets BEFORE --configfile (every word after it is read as a config file)"),
    (["--configfile", PAPER, "mine.yaml"], "--configfile mine.yaml: no such file"),
    (["--configfile", PAPER, "--configfile", "mine.yaml"], f"--configfile given 2 times: Snakemake keeps only the "
     f"last one (mine.yaml) and drops {PAPER}; name every file after one flag: --configfile {PAPER} mine.yaml"),
], ids=["target-after-configfile", "missing-file", "two-flags"])
def test_a_misplaced_word_is_one_blocker(home, tmp_path, args, blocker):  # noqa: F811
    result = preflight(home, tmp_path, *args)
    assert result.returncode == 1 and findings(result, "BLOCK") == [blocker]
    assert nothing_submitted(tmp_path)


@pytest.mark.slurm
def test_a_too_large_shape_is_a_blocker_and_the_others_fit(home, tmp_path):  # noqa: F811
    problem = _sinfo_problem()
    if problem:
        pytest.skip(problem)
    if gpu_node_shape() != REFERENCE:
        pytest.skip(f"the gpu partition's node is {gpu_node_shape()}, not {REFERENCE}: bring SLURM up with {UP}")
    workdir = paper_workdir(tmp_path)
    for name in ("qwen3-8b", "qwen3-1.7b", "qwen3-32b"):
        write_finished_base(workdir / "results" / "base" / name)
    big = workdir / "big.yaml"  # 8 x 64 CPUs: what the plugin's --ntasks-per-gpu=1 used to ask for
    big.write_text(yaml.safe_dump({"resources": {"train": {"cpus": 512, "mem_mb": 1000000, "runtime": 2880,
                                                           "gpus": 8}}}))
    jobs_before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    result = preflight(home, workdir, "--configfile", PAPER, str(big))
    assert result.returncode == 1
    [train] = [line for line in findings(result, "BLOCK") if line.startswith("train:")]
    assert train.startswith("train: -p gpu -t 2880 --mem 1000000 --nodes=1 --cpus-per-task=512 --gpus=8 does not "
                            "fit: sbatch --test-only says 'allocation failure: Requested node configuration is not "
                            "available'; partition gpu (UP, MaxTime UNLIMITED): 1 node(s), largest 224 CPUs, 2000000 "
                            "MB, gpu:8"), train
    ok = findings(result, "OK")
    assert any(line.startswith("evaluate: -p gpu -t 720 --mem 240000 --cpus-per-task=24 --gpus=1 fits") for line in ok)
    assert any(line.startswith("base_model: -p cpu -t 360 --mem 16000 --ntasks=1 --cpus-per-task=4 fits") for line in ok)
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == jobs_before
    assert nothing_submitted(workdir)
