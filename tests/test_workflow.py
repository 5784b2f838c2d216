"""The Snakemake DAG: the default study lists every stage; bad config is rejected by the schema."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT


def snakemake(*args, workdir):
    """Snakemake on the repo's Snakefile, with a scratch working directory (results go there)."""
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"),
                           "--directory", str(workdir), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_dry_run_lists_the_whole_toy_study(tmp_path):
    result = snakemake(workdir=tmp_path, *("-n", "--cores", "2", "--forceall", "--quiet", "rules"))
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    # runs: the 6 Table 2 methods on each model + 3 annotator tiers + 3 mask ablations on toy-small = 18;
    # evaluations: one lm-eval job per policy (all 5 benchmarks in one call): 2 bases + 18 runs
    for rule, count in [("toy_data", 1), ("toy_base", 2), ("train", 18), ("evaluate", 20),
                        ("aggregate", 1), ("report", 1)]:
        assert any(line.split() == [rule, str(count)] for line in out.splitlines()), (rule, out[-1500:])


def test_more_methods_and_seeds_widen_the_grid(tmp_path):
    no_ablations = tmp_path / "no_ablations.yaml"
    no_ablations.write_text("ablations: null\n")
    result = snakemake(workdir=tmp_path, *("-n", "--cores", "2", "--forceall", "--quiet", "rules",
                       "--configfile", str(no_ablations), "--config", "methods=[grpo,trace_fkl,sdpo]", "seeds=[0,1]"))
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    # 2 models x 3 methods x 2 seeds runs; evaluations: 2 models x (1 base + 6 runs), one job per policy
    assert any(line.split() == ["train", "12"] for line in out.splitlines()), out[-1500:]
    assert any(line.split() == ["evaluate", "14"] for line in out.splitlines()), out[-1500:]


def test_annotator_tier_runs_get_their_tier_and_the_frozen_annotator_model(tmp_path):
    result = snakemake(workdir=tmp_path, *("-n", "-p", "--cores", "2", "--forceall",
                                           "results/train/toy-small/trace_fkl@frozen/seed0/metrics.jsonl"))
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    # the frozen annotator (the toy-large base) is built before the run that reads it
    assert "output: results/base/toy-large" in out, out[-3000:]
    command = next(line for line in out.splitlines() if "-m trace train" in line)
    assert '"method": "trace_fkl"' in command and '"tier": "frozen"' in command
    assert '"model": "results/base/toy-large"' in command
    assert "--run-dir results/train/toy-small/trace_fkl@frozen/seed0" in command


def test_an_opd_run_waits_for_its_external_teacher_and_has_no_teacher_check(tmp_path):
    """train.teacher_model = a trained run's model/: that run trains first; the OPD run's settings name the
    teacher, and it gets no --teacher-gap (the check concerns self-teachers), only the probe's fixed batch."""
    override = tmp_path / "opd.yaml"
    override.write_text("methods: [grpo, opd]\ntrain: {teacher_model: results/train/toy-large/grpo/seed0/model}\n")
    result = snakemake(workdir=tmp_path, *("-n", "-p", "--cores", "2", "--forceall",
                                           "results/train/toy-small/opd/seed0/metrics.jsonl", "--configfile", str(override)))
    assert result.returncode == 0, result.stderr[-2000:]
    commands = [line for line in (result.stdout + result.stderr).splitlines() if "-m trace train" in line]
    teacher_run = next(c for c in commands if "--run-dir results/train/toy-large/grpo/seed0" in c)
    opd_run = next(c for c in commands if "--run-dir results/train/toy-small/opd/seed0" in c)
    assert '"teacher_model"' not in teacher_run and "--teacher-gap" not in teacher_run
    assert '"method": "opd"' in opd_run and '"teacher_model": "results/train/toy-large/grpo/seed0/model"' in opd_run
    assert "--teacher-gap" not in opd_run and "--probe-batch results/teacher_gap/toy-small/label.probe.pt" in opd_run
    no_teacher = tmp_path / "no_teacher.yaml"  # the default study's opd_family names its own teacher: off here
    no_teacher.write_text("methods: [grpo, opd]\nablations: {opd_family: null}\n")
    missing = snakemake(workdir=tmp_path, *("-n", "--cores", "1", "--configfile", str(no_teacher)))
    assert missing.returncode != 0
    assert "config error: method opd distils from an external teacher: set train.teacher_model" in (
        missing.stdout + missing.stderr)


def test_ablation_targets_build_only_their_runs(tmp_path):
    result = snakemake(workdir=tmp_path, *("-n", "--cores", "2", "--forceall", "mask_localisation", "--quiet", "rules"))
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    # toy-small only: grpo, trace_fkl and the 3 mask ablations; 1 base + 5 runs evaluated
    for rule, count in [("toy_base", 1), ("train", 5), ("evaluate", 6)]:
        assert any(line.split() == [rule, str(count)] for line in out.splitlines()), (rule, out[-1500:])


def test_invalid_config_names_the_offending_key(tmp_path):
    result = snakemake("-n", "--cores", "1", "--config", "methods=[grpo,not_a_method]", workdir=tmp_path)
    assert result.returncode != 0
    assert "not_a_method" in result.stdout + result.stderr


@pytest.mark.slow  # runs Snakemake jobs
def test_real_data_rules_prepare_the_five_benchmarks_offline(tmp_path):
    import json

    import pytest

    from conftest import SHARED_DATA

    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} (the benchmark mirror) is not beside the repo")
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(json.dumps({"real_data": {
        "mirror_dir": str(SHARED_DATA), "gpqa_seed": 0, "train_source": "math_train", "train_max_rows": 200,
        "val_rows": 20, "seed": 0, "eval_sets": ["math500", "aime24", "aime25", "amc23", "gpqa_diamond"]}}))
    result = snakemake("--cores", "1", "real_data", "--configfile", str(overlay), workdir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    real = tmp_path / "results" / "data" / "real"
    rows = {name: len((real / f"{name}.jsonl").read_text().splitlines())
            for name in ["math500", "aime24", "aime25", "amc23", "gpqa_diamond"]}
    assert rows == {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "gpqa_diamond": 198}
    manifest = json.loads((real / "manifest.json").read_text())
    assert set(manifest["files"]) >= {f"{name}.jsonl" for name in rows}
    assert len((real / "train" / "train.jsonl").read_text().splitlines()) == 200
    assert len((real / "train" / "val.jsonl").read_text().splitlines()) == 20


def test_export_cache_writes_the_report_settings_and_redraws_in_the_study_cache(tmp_path):
    import re

    result = snakemake(workdir=tmp_path, *("-n", "-p", "--cores", "1", "--forceall", "export_cache", "report"))
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    commands = {stage: line for line in out.splitlines() for stage in ("report", "export-cache")
                if f"-m trace {stage} " in line}
    cfg = {stage: re.search(r"--cfg ('[^']*')", line).group(1) for stage, line in commands.items()}
    assert cfg["export-cache"] == cfg["report"]  # report_settings.json holds exactly the report's settings
    assert "--aggregate-dir results/aggregate --out-dir results/cache/toy" in commands["export-cache"]
    assert "logs/export_cache/toy.log" in commands["export-cache"]
    for path in ("results/cache/toy/report_settings.json", "results/cache/toy/aggregate/credit_maps.csv",
                 "results/cache/toy/tables/vs_grpo.csv", "results/cache/toy/figures/fig6_credit_map.png",
                 "results/tables/vs_grpo.md"):
        assert path in out, path


def test_the_three_seed_config_trains_toy_small_only(tmp_path):
    """workflow/configs/seeds3_small.yaml: `models: {toy-large: null}` leaves toy-large out of the study."""
    result = snakemake(workdir=tmp_path, *("-n", "--cores", "2", "--forceall", "--quiet", "rules", "--configfile",
                                           str(REPO_ROOT / "workflow" / "configs" / "seeds3_small.yaml")))
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    # 6 Table 2 methods x 3 seeds on toy-small; evaluations: its base + 18 runs; one base built
    for rule, count in [("toy_base", 1), ("train", 18), ("evaluate", 19), ("report", 1)]:
        assert any(line.split() == [rule, str(count)] for line in out.splitlines()), (rule, out[-1500:])


def test_vllm_rollouts_on_cpu_refuse_heads_narrower_than_32(tmp_path):
    """toy-large's head_dim 24 (toy-small's 16) fails inside vLLM's CPU attention: the plan stops first,
    naming the model; workflow/configs/toy_vllm.yaml widens both models' heads and plans."""
    overlay = tmp_path / "vllm.yaml"
    overlay.write_text("train:\n  rollout: {engine: vllm}\n")
    refused = snakemake("-n", "--cores", "1", "--configfile", str(overlay), workdir=tmp_path)
    message = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "models.toy-large has head_dim 24" in message and "config key train.rollout.engine" in message
    widened = snakemake("-n", "--cores", "1", "--quiet", "rules", "--configfile",
                        str(REPO_ROOT / "workflow" / "configs" / "toy_vllm.yaml"), workdir=tmp_path)
    assert widened.returncode == 0, widened.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is for vLLM's CPU attention")
def test_the_engine_refuses_a_narrow_head_before_loading_vllm(tmp_path):
    from trace.rollout import check_vllm_head_dim

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(ValueError, match="head_dim >= 32.*has head_dim 16"):
        check_vllm_head_dim(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32}))
    check_vllm_head_dim(tmp_path)  # wide enough: no error
