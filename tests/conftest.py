"""Shared fixtures: a tiny toy world (data, tokenizer, model) built once per test session; and what
keeps the fast test set fast (below)."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

TINY_SIZE = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    from trace.toy.world import write_toy_data

    out = tmp_path_factory.mktemp("toy_data")
    write_toy_data({"seed": 0, "n_train": 200, "n_sft_choice": 20, "sft_slip_rate": 0.0, "n_val": 8, "n_test": 8,
                    "tokenizer_vocab": 400}, out)
    return out


@pytest.fixture(scope="session")
def tiny_base(toy_data, tmp_path_factory) -> Path:
    """A tiny Qwen3 'base' after a few SFT steps: real weights on disk, loaded like any HF model."""
    import torch

    from trace.toy.world import build_toy_base

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny_base")
    build_toy_base({"size": TINY_SIZE, "seed": 0, "thinking": False, "tokenizer_vocab": 400,
                    "sft": {"steps": 300, "batch_size": 16, "lr": 1e-2, "warmup": 2, "weight_decay": 0.0}},
                   toy_data, out)
    return out


QWEN3_TOKENIZER = REPO_ROOT.parent / "shared" / "models" / "qwen3"


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A tiny random Qwen3 (hidden 64, 2 layers, head_dim 32) with the REAL Qwen3 tokenizer and chat
    template, whose turns end (trace/tiny_qwen3.py): the paper-scale path (vLLM, 151,936-token
    vocabulary) on CPU."""
    from trace.tiny_qwen3 import build_tiny_qwen3

    if not (QWEN3_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"the real Qwen3 tokenizer is not at {QWEN3_TOKENIZER}")
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), QWEN3_TOKENIZER)


def write_finished_base(folder: Path, config_name: str = "config.Qwen3-1.7B.json") -> Path:
    """A base-model folder as the base_model job leaves it, without 3.4 GB of weights: the real Qwen3
    config (a minimal one without ../shared) and an empty weights file, which the planning check requires."""
    folder.mkdir(parents=True, exist_ok=True)
    real = QWEN3_TOKENIZER / config_name
    (folder / "config.json").write_text(real.read_text() if real.exists() else '{"model_type": "qwen3"}')
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def write_teacher_checks(root: Path, model: str, contexts=("label",)) -> None:
    """The teacher_gap job's outputs for one base (a training run waits for them), as if it had run."""
    for context in contexts:
        folder = root / "results" / "teacher_gap" / model
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{context}.json").write_text("{}")
        (folder / f"{context}.probe.pt").write_bytes(b"")


# ----------------------------------------------------------------------------- the fast set and the full set
# `pytest` runs the fast set (pyproject.toml's addopts: -m "not slow"); `pytest -m "slow or not slow"` runs
# every test (.ci/run). A test is slow by what it does, so a new slow test cannot slip into the fast set:
#  * it uses a fixture that trains or builds a model (MODEL_FIXTURES, directly or through another fixture),
#    or it needs a real SLURM (`slurm`): marked slow here, at collection;
#  * it spawns anything but a cheap command (`cheap_command`, or lm-eval recording the environment):
#    a fast test that does fails, naming it;
#  * it uses more than FAST_TEST_CPU_S of this process's CPU time, its fixtures' setup included: it fails.
# Everything else that is slow (training or evaluating in a subprocess, Snakemake runs, torchrun,
# gpu_check, vLLM) carries @pytest.mark.slow, which the two checks above ask for.
MODEL_FIXTURES = {"tiny_base": "trains a tiny model", "tiny_qwen3": "builds a Qwen3 with the real vocabulary"}
FAST_TEST_CPU_S = 30.0


def cheap_command(argv) -> str | None:
    """What a fast test may spawn, in words; None when the command is not cheap."""
    args = shlex.split(argv) if isinstance(argv, (str, bytes)) else [os.fsdecode(a) for a in argv]
    names = [Path(a).name for a in args]
    if "snakemake" in names and {"-n", "--dry-run"} & set(args):
        return "a Snakemake dry run"  # planning only: how the fast set checks both studies' DAGs and config errors
    if names[:1] in (["sinfo"], ["scontrol"], ["squeue"]):
        return "a SLURM query"
    if "install_profile.sh" in names:
        return "the SLURM profile installer"
    if any("trace.verify" in a and "worker_loop" in a for a in args):
        return "the grader's worker"  # trace/verify.py grades in worker processes (math-verify's timeouts)
    return None


# lm-eval records the environment with every result: `git describe`, `pip list` and the like, through these
ENVIRONMENT_REPORTS = ("lm_eval/loggers/utils.py", "torch/utils/collect_env.py")


def spawned_for_an_environment_report() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.replace(os.sep, "/").endswith(ENVIRONMENT_REPORTS):
            return True
        frame = frame.f_back
    return False


def slow_reason(item) -> str | None:
    """Why collection marks ``item`` slow (None: it does not)."""
    used = [name for name in MODEL_FIXTURES if name in getattr(item, "fixturenames", ())]
    if used:
        return f"uses {used[0]} ({MODEL_FIXTURES[used[0]]})"
    if item.get_closest_marker("slurm"):
        return "runs jobs on a real SLURM"
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = slow_reason(item)
        if reason and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow(reason=reason))


_RUNNING: dict = {"item": None, "cpu": 0.0}  # the test being run (fixtures of any scope included)
_POPEN_INIT = subprocess.Popen.__init__


def _guarded_popen_init(self, args, *more, **options):
    item = _RUNNING["item"]
    if (item is not None and not item.get_closest_marker("slow") and cheap_command(args) is None
            and not spawned_for_an_environment_report()):
        shown = args if isinstance(args, (str, bytes)) else shlex.join(os.fsdecode(a) for a in args)
        pytest.fail(f"{item.nodeid}: a fast test spawned `{str(shown)[:300]}`; mark it @pytest.mark.slow "
                    "(the fast set spawns only Snakemake dry runs, SLURM queries, the profile installer, the "
                    "grader's workers and lm-eval's environment report: tests/conftest.py)", pytrace=False)
    _POPEN_INIT(self, args, *more, **options)


def pytest_sessionstart(session):
    # matplotlib builds its font cache on first use by running fc-list: build it here, before the guard, so a
    # fresh machine's first report test is not charged with it (nor fails the fast set's spawn rule)
    import matplotlib.font_manager  # noqa: F401
    subprocess.Popen.__init__ = _guarded_popen_init


def pytest_sessionfinish(session):
    subprocess.Popen.__init__ = _POPEN_INIT


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _RUNNING.update(item=item, cpu=time.process_time())
    yield
    _RUNNING.update(item=None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if call.when == "call" and report.passed and not item.get_closest_marker("slow"):
        used = time.process_time() - _RUNNING["cpu"]
        if used > FAST_TEST_CPU_S:
            report.outcome = "failed"
            report.longrepr = (f"a fast test used {used:.0f} s of CPU time, its fixtures' setup included (budget "
                               f"{FAST_TEST_CPU_S:.0f} s): mark it @pytest.mark.slow (tests/conftest.py)")
