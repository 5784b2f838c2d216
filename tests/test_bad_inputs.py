"""What a cluster user gets wrong, caught while Snakemake plans, as one line, with nothing finished lost:
two --configfile flags, a target written after --configfile, a local model folder with a corrupt
config.json or without weights, and a finished base folder whose weights went missing (its base_model job
reruns; the runs and evaluations finished on it stay)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import QWEN3_TOKENIZER, REPO_ROOT, write_finished_base, write_teacher_checks

PAPER = REPO_ROOT / "workflow" / "configs" / "paper.yaml"
SMOKE = REPO_ROOT / "workflow" / "configs" / "paper_smoke.yaml"
BENCHMARKS = ["math500", "aime24", "aime25", "amc23", "gpqa_diamond"]


def snakemake(workdir, *args, timeout=300):
    """Snakemake from the workdir (as a user types it there), the repo's Snakefile; offline."""
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), *args],
                          cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(Path(workdir) / "hf"),
                               "PYTHONPATH": str(REPO_ROOT)})


def config_error(result) -> str:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("config error")]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


def files_of(root: Path) -> dict[str, float]:
    """Every result file and its mtime (the base rebuild markers, written while planning, aside)."""
    return {str(p.relative_to(root)): p.stat().st_mtime for p in sorted(root.rglob("*"))
            if p.is_file() and ".rebuild" not in p.parts}


@pytest.fixture
def finished(tmp_path):
    """A paper-study workdir with finished work: a base, its teacher check, one training run and the base's
    evaluation."""
    for name in ("qwen3-8b", "qwen3-1.7b", "qwen3-32b"):
        write_finished_base(tmp_path / "results" / "base" / name)
    write_teacher_checks(tmp_path, "qwen3-1.7b")
    run = tmp_path / "results" / "train" / "qwen3-1.7b" / "grpo" / "seed0"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_text("trained")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    for name in BENCHMARKS:
        out = tmp_path / "results" / "eval" / "qwen3-1.7b" / "base" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("{}")
    return tmp_path


def test_two_configfile_flags_are_refused_naming_what_would_be_dropped(finished):
    mine = finished / "mine.yaml"
    mine.write_text("seeds: [0]\n")
    before = files_of(finished / "results")
    result = snakemake(finished, "-n", "--cores", "1", "--configfile", str(SMOKE), "--configfile", "mine.yaml")
    assert config_error(result) == (
        f"config error: --configfile given 2 times: Snakemake keeps only the last one (mine.yaml) and drops {SMOKE}; "
        f"name every file after one flag: --configfile {SMOKE} mine.yaml")
    # one flag with both files plans the smoke study (the paper path), not the toy study
    merged = snakemake(finished, "-n", "--cores", "1", "--quiet", "rules", "--configfile", str(SMOKE), "mine.yaml")
    assert merged.returncode == 0 and "toy_base" not in merged.stdout, merged.stderr[-2000:]
    assert files_of(finished / "results") == before


def test_a_target_after_configfile_is_named_as_such(finished):
    """A finished output (a JSON mapping) would be merged into the config as an override. A name that is no
    file (`main_table`) makes Snakemake itself fail before the Snakefile is read; `python -m trace
    preflight` names that one (tests/test_preflight.py)."""
    target = "results/eval/qwen3-1.7b/base/math500.json"
    (finished / target).write_text('{"k": 8}')
    before = files_of(finished / "results")
    result = snakemake(finished, "-n", "--cores", "1", "--configfile", str(PAPER), target)
    assert config_error(result) == (
        f"config error: --configfile {target}: {target} is a workflow output of this workflow, not a config file: "
        f"put targets BEFORE --configfile (every word after it is read as a config file)")
    assert files_of(finished / "results") == before


def local_models(root: Path, damage) -> Path:
    """An override file pointing qwen3-1.7b at a local folder (the real config and tokenizer), damaged."""
    if not (QWEN3_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"the real Qwen3 files are not at {QWEN3_TOKENIZER}")
    folder = root / "Qwen3-1.7B"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (folder / name).symlink_to(QWEN3_TOKENIZER / name)
    (folder / "config.json").write_text((QWEN3_TOKENIZER / "config.Qwen3-1.7B.json").read_text())
    (folder / "model.safetensors").write_bytes(b"")
    damage(folder)
    override = root / "models.yaml"
    override.write_text(yaml.safe_dump({"models": {"qwen3-1.7b": {"path": str(folder)}}}))
    return folder


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").write_text('{"model_type": "qwen3",'),
     "model qwen3-1.7b: models.qwen3-1.7b.path = {folder}/config.json line 1: not valid JSON (Expecting property "
     "name enclosed in double quotes)"),
    (lambda f: (f / "model.safetensors").unlink(),
     "model qwen3-1.7b: models.qwen3-1.7b.path = {folder} has no weights (no *.safetensors or pytorch_model*.bin)"),
    (lambda f: (f / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})),
     "model qwen3-1.7b: models.qwen3-1.7b.path = {folder}: 2 of 2 weight files in model.safetensors.index.json "
     "missing (model-00001-of-00002.safetensors)"),
], ids=["corrupt-config", "no-weights", "missing-shards"])
def test_a_broken_local_model_folder_fails_the_plan_in_one_line(tmp_path, damage, message):
    for name in ("qwen3-8b", "qwen3-32b"):  # the other bases finished: only the local folder is checked
        write_finished_base(tmp_path / "results" / "base" / name)
    folder = local_models(tmp_path, damage)
    result = snakemake(tmp_path, "-n", "--cores", "1", "--configfile", str(PAPER), "models.yaml")
    assert config_error(result) == "config error: " + message.format(folder=folder)
    assert not (tmp_path / "results" / "base" / "qwen3-1.7b").exists()


@pytest.mark.slow  # a real (non-dry) Snakemake run rebuilds the base
def test_missing_base_weights_rerun_the_base_and_keep_what_was_finished_on_it(finished):
    folder = local_models(finished, lambda f: None)
    # the base was materialised from that folder (links), then its weights went missing
    base = finished / "results" / "base" / "qwen3-1.7b"
    (base / "model.safetensors").unlink()
    targets = ["results/train/qwen3-1.7b/grpo/seed0/metrics.jsonl", "results/eval/qwen3-1.7b/base/math500.json"]
    data = finished / "results" / "data" / "real"
    (data / "train").mkdir(parents=True)
    for name in ("train/train.jsonl", "train/val.jsonl", "train/manifest.json", "manifest.json",
                 *[f"{b}.jsonl" for b in BENCHMARKS]):
        (data / name).write_text("{}\n")
        os.utime(data / name, (1, 1))  # written before the finished run that read them
    finished_before = {k: v for k, v in files_of(finished / "results").items() if not k.startswith("base/")}
    result = snakemake(finished, *targets, "--cores", "1", "--configfile", str(PAPER), "models.yaml")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert (f"rebuilding: model qwen3-1.7b: results/base/qwen3-1.7b has no weights (no *.safetensors or pytorch_model*.bin); its "
            f"base_model job reruns, finished runs and evaluations on it are kept") in output
    assert "rule base_model:" in output and "rule train:" not in output and "rule evaluate:" not in output, output
    assert (base / "model.safetensors").resolve() == (folder / "model.safetensors").resolve()
    after = files_of(finished / "results")
    assert {k: after[k] for k in finished_before} == finished_before  # nothing finished rewritten
    again = snakemake(finished, *targets, "-n", "--cores", "1", "--configfile", str(PAPER), "models.yaml")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stderr[-2000:]
