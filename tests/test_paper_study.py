"""The paper study as a configuration of the same DAG: its grid through the installed SLURM profile,
its targets, its offline failure mode, config errors that name key and file, and (slow) the CPU
smoke of the whole paper path executed end to end."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, write_finished_base

PAPER = REPO_ROOT / "workflow" / "configs" / "paper.yaml"
PAPER_MODELS = ["qwen3-8b", "qwen3-1.7b", "qwen3-32b"]


def snakemake(*args, workdir, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"),
                           "--directory", str(workdir), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def job_counts(output: str) -> dict[str, int]:
    counts, in_stats = {}, False
    for line in output.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_stats = True
        elif in_stats and len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture
def slurm_profile_home(tmp_path):
    """HOME with the profile installed by the README's command (run twice: it must be idempotent)."""
    home = tmp_path / "home"
    home.mkdir()
    for _ in range(2):
        subprocess.run(["bash", str(REPO_ROOT / "scripts" / "install_profile.sh")], check=True, capture_output=True,
                       env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": ""})
    assert not (REPO_ROOT / "profiles" / "slurm" / "slurm").exists()
    assert (home / ".config" / "snakemake" / "slurm" / "config.yaml").exists()
    return home


@pytest.fixture
def materialised_models(tmp_path):
    """A workdir whose results/base/<model> folders exist (as after the base_model jobs), so planning
    needs no hub; --forceall still lists their jobs."""
    workdir = tmp_path / "work"
    for name in PAPER_MODELS:
        write_finished_base(workdir / "results" / "base" / name)
    return workdir


def test_profile_dry_run_lists_exactly_the_paper_grid(slurm_profile_home, materialised_models):
    result = snakemake("-n", "--profile", "slurm", "--forceall", "--quiet", "rules",
                       workdir=materialised_models, env={"HOME": str(slurm_profile_home), "XDG_CONFIG_HOME": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    counts = job_counts(result.stdout + result.stderr)
    # 2 models x 6 Table 2 methods + 3 tiers (8B) + 3 masks (1.7B) = 18 runs; one evaluation job per
    # policy: 2 bases + 18 runs; 3 base models (8B, 1.7B, the frozen 32B annotator); no toy job; one teacher
    # check per student base and teacher context (label for TRACE and the probe, reference for SDPO/SRPO/RLSD)
    assert counts == {"base_model": 3, "benchmark_data": 1, "train_data": 1, "teacher_gap": 4, "train": 18,
                      "evaluate": 20, "aggregate": 1, "report": 1, "all": 1}, counts


def test_paper_tables_are_targets_of_their_own(slurm_profile_home, materialised_models):
    env = {"HOME": str(slurm_profile_home), "XDG_CONFIG_HOME": ""}

    def dry_run(target, *flags):
        result = snakemake(target, "-n", "--profile", "slurm", "--forceall", *flags, workdir=materialised_models,
                           env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    # Qwen3-1.7B only: grpo, trace_fkl and the three masks; its base, its label teacher check and 6 evaluations
    result = dry_run("mask_localisation", "--quiet", "rules")
    assert job_counts(result.stdout + result.stderr) == {
        "base_model": 1, "benchmark_data": 1, "train_data": 1, "teacher_gap": 1, "train": 5, "evaluate": 6,
        "mask_localisation": 1}
    result = dry_run("annotator_tiers", "-p")
    runs = sorted(line.split("--run-dir ")[1].split()[0] for line in result.stdout.splitlines() if "-m trace train" in line)
    assert runs == [f"results/train/qwen3-8b/{run}/seed0" for run in
                    ["grpo", "trace_fkl", "trace_fkl@frozen", "trace_fkl@self", "trace_fkl@static"]]
    frozen = next(line for line in result.stdout.splitlines() if "trace_fkl@frozen" in line and "-m trace train" in line)
    assert '"model": "results/base/qwen3-32b"' in frozen and '"train_source": "openthoughts"' in frozen
    # beyond the paper: the opd_family on Qwen3-1.7B from the Qwen3-8B base, 6 methods x 3 seeds
    result = dry_run("opd_family", "--quiet", "rules")
    assert job_counts(result.stdout + result.stderr) == {
        "base_model": 2, "benchmark_data": 1, "train_data": 1, "teacher_gap": 1, "train": 18, "evaluate": 19,
        "opd_family": 1}
    result = dry_run("opd_family", "-p")
    trains = [line for line in result.stdout.splitlines() if "-m trace train" in line]
    external = [line for line in trains if any(f'"method": "{m}"' in line for m in ("opd", "tropd", "tropd_noguide", "trb"))]
    assert len(external) == 12 and all('"teacher_model": "results/base/qwen3-8b"' in line for line in external)
    assert not any('"teacher_model"' in line for line in trains if line not in external)
    # the behaviour-policy runs (TRB's blend, TrOPD's teacher prefix) sample with HF generate, the others with vLLM
    behaviour = [line for line in trains if any(f'"method": "{m}"' in line for m in ("tropd", "trb"))]
    assert len(behaviour) == 6 and all('"engine": "hf"' in line for line in behaviour)
    assert all('"engine": "vllm"' in line for line in trains if line not in behaviour)


def test_offline_dry_run_fails_fast_naming_the_missing_model(tmp_path):
    started = time.time()
    result = snakemake("-n", "--cores", "1", "--configfile", str(PAPER), workdir=tmp_path,
                       env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode != 0
    assert time.time() - started < 60
    line = next(line for line in (result.stdout + result.stderr).splitlines() if line.startswith("config error"))
    assert "model qwen3-8b (Qwen/Qwen3-8B @ b968826d9c46)" in line and "models.qwen3-8b.path" in line


def test_a_local_folder_replaces_the_hub_and_is_hash_checked(tmp_path):
    from trace.base_model import ModelUnavailableError, materialise
    from trace.settings import PretrainedModel

    shared = REPO_ROOT.parent / "shared" / "models" / "qwen3"
    if not shared.exists():
        pytest.skip(f"{shared} is not beside the repo")
    entry = yaml.safe_load(PAPER.read_text())["models"]["qwen3-1.7b"]
    folder = tmp_path / "Qwen3-1.7B"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (folder / name).symlink_to(shared / name)
    (folder / "config.json").symlink_to(shared / "config.Qwen3-1.7B.json")
    (folder / "model.safetensors").write_bytes(b"")  # the weights (their content is not read here)
    out = materialise("qwen3-1.7b", PretrainedModel.from_mapping({**entry, "path": str(folder)}),
                      tmp_path / "results" / "base" / "qwen3-1.7b")
    record = json.loads((out / "base_model.json").read_text())
    assert record["origin"] == f"local:{folder}" and set(record["sha256_checked"]) == set(entry["sha256"])
    wrong = tmp_path / "Qwen3-8B-as-1.7B"
    wrong.mkdir()
    (wrong / "config.json").symlink_to(shared / "config.Qwen3-8B.json")
    (wrong / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelUnavailableError, match=r"config.json has sha256 f7c4eadfbbf5…, expected 1ddb5b89ebc9…"):
        materialise("qwen3-1.7b", PretrainedModel.from_mapping({**entry, "path": str(wrong)}),
                    tmp_path / "results" / "base" / "x")
    assert not (tmp_path / "results" / "base" / "x").exists()  # nothing half-made is left behind


@pytest.mark.parametrize("override, expected", [
    ({"train": {"kl": {"warmup": "ten"}}}, "config key train.kl.warmup = 'ten' (from {file}): 'ten' is not of type 'integer'"),
    ({"train": {"adam_betas": [0.9]}}, "config key train.adam_betas = [0.9] (from {file}): [0.9] is too short"),
    ({"train": {"kl": {"alpha": 1.5}}}, "config key train.kl.alpha = 1.5 (from {file}): 1.5 is greater than the maximum of 1"),
    ({"train": {"sampling": {"temprature": 0.6}}}, "config key train.sampling.temprature (from {file}): unknown key"),
    ({"models": {"qwen3-8b": {"size": {"hidden_size": 64}}}}, "config key models.qwen3-8b.size (from {file}): unknown key"),
    ({"ablations": {"mask_localisation": {"model": "qwen3-4b"}}}, "config key ablations.mask_localisation.model = 'qwen3-4b' (from {file}): not one of the study's models"),
])
def test_config_errors_are_one_line_naming_key_and_file(tmp_path, override, expected):
    from trace.study_config import StudyConfigError, load_study, validate

    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(override))
    study = load_study(REPO_ROOT, [PAPER, mine], None)
    with pytest.raises(StudyConfigError) as raised:
        validate(study, REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml")
    message = str(raised.value)
    assert "\n" not in message and message.startswith(expected.format(file=mine)), message


def test_study_files_do_not_mix(tmp_path):
    """A complete study file replaces config.yaml; an override file is layered over config.yaml."""
    from trace.study_config import load_study

    paper = load_study(REPO_ROOT, [PAPER], {"seeds": [0, 1]}).config
    assert paper["study"] == "paper" and "toy" not in paper and set(paper["models"]) == {"qwen3-8b", "qwen3-1.7b"}
    assert paper["seeds"] == [0, 1] and list(paper["eval"]["benchmarks"])[0] == "math500"
    skeleton = load_study(REPO_ROOT, [REPO_ROOT / "workflow" / "configs" / "skeleton.yaml"], None).config
    assert skeleton["study"] == "toy" and skeleton["methods"] == ["grpo"] and skeleton["ablations"] is None


@pytest.mark.slow
def test_paper_smoke_study_runs_end_to_end_on_cpu(tmp_path):
    """The smoke command (docs/paper-study.md): every rule of the paper path executed with tiny models."""
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "trace", "smoke", "--cores", "2", "--directory", str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500)
    elapsed = time.time() - started
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    print(f"paper smoke: {elapsed:.0f} s")
    results = tmp_path / "results"
    smoke = yaml.safe_load((REPO_ROOT / "workflow" / "configs" / "paper_smoke.yaml").read_text())
    rows = {}
    for path in sorted((results / "train").glob("*/*/seed0/metrics.jsonl")):
        rows[f"{path.parts[-4]}/{path.parts[-3]}"] = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 18, sorted(rows)
    assert all(len(steps) == smoke["train"]["steps"] for steps in rows.values())
    # rollouts came from vLLM (the paper study's engine), colocated in every training job; with top-p 0.95 its
    # log-prob of a sample is the truncated policy's, above the trainer's by −log(kept mass) ≥ 0
    for name in rows:
        assert "vLLM engine for" in (tmp_path / "logs" / "train" / name / "seed0.log").read_text(), name
    # (tests/test_workflow_vllm.py checks the untruncated case to 1e-4)
    assert all(0 <= step["rollout_logprob_gap"] < float("inf") for steps in rows.values() for step in steps)
    # reward signal reaches the loss: some groups have rollouts of different reward
    assert max(step["groups_with_signal"] for steps in rows.values() for step in steps) > 0
    # TRACE routes key AND error tokens (API tier = the heuristic server), then switches its teacher off
    trace_steps = [step for name, steps in rows.items() if name.endswith("/trace_fkl") or name.endswith("/trace_rkl")
                   for step in steps]
    assert sum(step.get("tokens_key", 0) for step in trace_steps) > 0
    assert sum(step.get("tokens_error", 0) for step in trace_steps) > 0
    assert {step["teacher_active"] for step in trace_steps} == {0, 1}
    # every policy evaluated on the five real benchmarks, one lm-eval job each; the paper report drawn
    evals = sorted((results / "eval").glob("*/*/math500.json"))
    assert len(evals) == 20
    for name in smoke["eval"]["benchmarks"]:
        result_json = json.loads((evals[0].parent / f"{name}.json").read_text())
        assert result_json["n_problems"] == smoke["eval"]["limit"]
        assert len(result_json["calibration"]["per_problem"]) == smoke["eval"]["limit"]  # agreement confidence
    table = (results / "tables" / "main_results.md").read_text()
    assert "qwen3-8b-smoke" in table and "GPQA-D" in table
    assert "qwen3-8b-smoke" in (results / "tables" / "calibration.md").read_text()
    assert (results / "figures" / "calibration.png").is_file()
    # the teacher check ran on every student stand-in and context through the same rule, and is reported
    # (random stand-ins: any verdict, typically 'uninformative'; on_worse: warn keeps the smoke going)
    gaps = {(path.parent.name, path.stem): json.loads(path.read_text())
            for path in (results / "teacher_gap").glob("*/*.json")}
    assert set(gaps) == {(model, context) for model in ("qwen3-8b-smoke", "qwen3-1.7b-smoke")
                         for context in ("label", "reference")}
    assert all(gap["verdict"] in ("better", "worse", "uninformative") and gap["n_rollouts"] > 0
               for gap in gaps.values())
    assert "qwen3-1.7b-smoke" in (results / "tables" / "teacher_gap.md").read_text()
    # the study's HTML report (docs/html-report.md), from the smoke's results and Snakemake's records of them
    from test_html_report import check_html_report, make_html_report

    check_html_report(make_html_report(tmp_path, REPO_ROOT / "workflow" / "configs" / "paper_smoke.yaml"), results,
                      "paper")
