"""The opd_family ablation (beyond the paper): its grid on the toy and paper configs, its own target with the
teacher's run upstream of the student's, and its table on a hand-made aggregate whose every number is
computed here by hand."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from conftest import REPO_ROOT
from test_study_plan import plan_of
from trace.opd_family import family_markdown, family_table, training_summaries
from trace.report import t_quantile_95
from trace.settings import FamilyJob

FAMILY = {"model": "toy-small", "teacher": "results/train/toy-large/grpo/seed0/model",
          "methods": ["grpo", "opd", "trace_fkl"], "seeds": [0, 1, 2], "early_steps": 2}


def test_the_family_grid_has_its_own_seeds_and_teacher_and_stays_out_of_the_main_report():
    plan = plan_of()
    family = plan.family
    assert family["model"] == "toy-small" and len(family["seeds"]) >= 3
    assert plan.family_training_metrics()[:2] == [f"results/train/toy-small/{family['methods'][0]}/seed{s}/metrics.jsonl"
                                                  for s in family["seeds"][:2]]
    assert len(plan.family_evaluations()) == (1 + len(family["methods"]) * len(family["seeds"])) * len(plan.benchmarks)
    # the family's OPD-type runs distil from its teacher; its other runs (GRPO, TRACE) have none
    assert plan.teacher_model_of("opd") == plan.built_teacher("opd") == family["teacher"]
    assert plan.train_settings("opd", 1)["teacher_model"] == family["teacher"]
    assert plan.teacher_model_of("grpo") is None and "teacher_model" not in plan.train_settings("trace_fkl", 2)
    # the main report's settings do not carry the family (its table has its own rule); the main grid is unchanged
    assert "opd_family" not in plan.report_settings()["ablations"]
    assert "opd" not in plan.runs_of("toy-small") and plan.all_training_metrics() == plan_of(
        ablations={"opd_family": None}).all_training_metrics()


def test_a_family_student_outside_the_study_or_a_shared_run_with_two_teachers_is_one_line():
    from trace.study_config import StudyConfigError

    with pytest.raises(StudyConfigError, match=r"ablations.opd_family.model = 'toy-tiny' \(from --config\): not one "
                                               r"of the study's models \(toy-large, toy-small\)"):
        plan_of(ablations={"opd_family": {**FAMILY, "model": "toy-tiny"}})
    clash = plan_of(methods=["grpo", "opd"], train={"teacher_model": "results/base/toy-large"},
                    ablations={"opd_family": FAMILY})
    assert clash.family_problem().startswith("method opd on toy-small is both a main run (teacher train.teacher_model "
                                             "results/base/toy-large) and an opd_family run")
    assert plan_of(ablations={"opd_family": FAMILY}).family_problem() is None


def test_the_paper_config_plans_the_family_on_qwen3_1p7b_from_qwen3_8b():
    paper = plan_of("paper.yaml")
    assert paper.family["model"] == "qwen3-1.7b" and paper.family["teacher"] == "results/base/qwen3-8b"
    assert paper.train_bases("qwen3-1.7b", "opd") == paper.base_identity("qwen3-1.7b", "qwen3-8b")
    assert paper.family_problem() is None and paper.teacher_problem() is None


# ----------------------------------------------------------------------------------------------- the table by hand
def hand_aggregate():
    """Two benchmarks, k = 4; per (method, seed) AVG values chosen so their means and t-intervals are easy."""
    benchmarks = {"arith_2op": "MATH500", "arith_3op": "AMC23"}
    avg = {("grpo", 0): 40.0, ("grpo", 1): 44.0, ("grpo", 2): 42.0,
           ("opd", 0): 50.0, ("opd", 1): 56.0, ("opd", 2): 53.0}
    evals = [{"model": "toy-small", "method": "base", "seed": None, "benchmark": b, "column": c, "k": 4,
              "n_problems": 8, "avg_at_k": 20.0, "ci_low": 10.0, "ci_high": 30.0, "pass_at_1": 20.0}
             for b, c in benchmarks.items()]
    for (method, seed), value in avg.items():  # both benchmarks at value ± 5: AVG = value
        for (b, c), shift in zip(benchmarks.items(), (-5.0, 5.0)):
            evals.append({"model": "toy-small", "method": method, "seed": seed, "benchmark": b, "column": c, "k": 4,
                          "n_problems": 8, "avg_at_k": value + shift, "ci_low": value + shift - 9,
                          "ci_high": value + shift + 9, "pass_at_1": value})
    curves = []
    for (method, seed) in avg:
        for step in range(4):
            row = {"model": "toy-small", "method": method, "seed": seed, "step": step, "lambda": 0.5,
                   "grad_norm": (1.0 if method == "grpo" else 0.5) + seed + step,  # run mean: base + seed + 1.5
                   "entropy": 0.8, "accuracy": 0.1 * step + 0.01 * seed}
            if method == "opd":  # a TRB-like budget on steps 0–1, realised KL below it
                row.update({"trb/kl_budget": [0.1, 0.05, 0.0, 0.0][step], "trb/realised_kl": [0.08, 0.04, 0, 0][step]})
            curves.append(row)
    calibration = [{"model": "toy-small", "method": method, "seed": seed, "benchmark": "arith_2op",
                    "column": "MATH500", "k": 4, "id": str(i), "confidence": 1.0, "majority_correct": i % 2,
                    "accuracy": 0.5}
                   for (method, seed) in [*avg, ("base", None)] for i in range(8)]
    return benchmarks, pd.DataFrame(evals), pd.DataFrame(curves), pd.DataFrame(calibration)


def test_the_family_table_equals_its_hand_computed_values():
    benchmarks, evals, curves, calibration = hand_aggregate()
    job = FamilyJob.from_mapping({"benchmarks": benchmarks, "family": {**FAMILY, "methods": ["grpo", "opd"]}})
    table = family_table(job, evals, curves, calibration)
    t2 = t_quantile_95(2)
    assert t2 == pytest.approx(4.302653, abs=1e-5)
    # AVG over seeds: opd 53 ± t·3/√3 (sd of 50, 56, 53 is 3); grpo 42 ± t·2/√3
    assert table.loc["opd", "avg"] == pytest.approx(53.0)
    assert table.loc["opd", "avg_ci_high"] - 53.0 == pytest.approx(t2 * 3 / math.sqrt(3))
    assert table.loc["grpo", "avg_ci_low"] == pytest.approx(42.0 - t2 * 2 / math.sqrt(3))
    # Δ vs GRPO paired by seed: 10, 12, 11 -> 11 ± t·1/√3
    assert table.loc["opd", "delta_vs_grpo"] == pytest.approx(11.0)
    assert table.loc["opd", "delta_vs_grpo_ci_high"] == pytest.approx(11.0 + t2 / math.sqrt(3))
    # grad norm: each run's mean over steps is base + seed + 1.5; over seeds base + 2.5, sd 1
    assert table.loc["opd", "grad_norm"] == pytest.approx(3.0)
    assert table.loc["grpo", "grad_norm_ci_low"] == pytest.approx(3.5 - t2 / math.sqrt(3))
    # early accuracy (early_steps 2): steps 0–1 -> 0.05 + 0.01·seed, over seeds 0.06
    assert table.loc["grpo", "early_accuracy"] == pytest.approx(0.06)
    # TRB columns over the steps with a budget > 0 only (0.075 and 0.06), n/a for a method without them
    assert table.loc["opd", "trb_budget"] == pytest.approx(0.075)
    assert table.loc["opd", "trb_realised_kl"] == pytest.approx(0.06)
    assert math.isnan(table.loc["grpo", "trb_realised_kl"])
    # every problem at confidence 1, half of them right: ECE = |1 − 0.5| = 0.5, Brier = 0.5
    assert table.loc["opd", "ece"] == pytest.approx(0.5) and table.loc["base", "brier"] == pytest.approx(0.5)
    shown = family_markdown(table)
    assert shown.loc["opd", "AVG %"] == f"53.00 [{53 - t2 * math.sqrt(3):.2f}, {53 + t2 * math.sqrt(3):.2f}]"
    assert shown.loc["grpo", "TRB realised KL"] == "n/a" and shown.loc["base", "seeds"] == "1"
    assert shown.loc["opd", "Δ vs GRPO"] == f"11.00 [{11 - t2 / math.sqrt(3):.2f}, {11 + t2 / math.sqrt(3):.2f}]"


def test_training_summaries_ignore_steps_outside_their_window():
    curves = pd.DataFrame({"method": "trb", "seed": 0, "step": [2, 0, 1], "grad_norm": [6.0, 1.0, 2.0],
                           "entropy": [0.5, 0.5, 0.5], "accuracy": [1.0, 0.0, 0.5], "val/mean_at_k": [0.7, None, 0.4],
                           "trb/kl_budget": [0.0, 0.2, 0.0], "trb/realised_kl": [0.0, 0.1, 0.0],
                           "kl/opd_sampled_k3_token_mean": [0.3, 9.0, 0.5]})
    row = training_summaries(curves, early_steps=2).iloc[0]
    assert row["grad_norm"] == pytest.approx(3.0) and row["early_accuracy"] == pytest.approx(0.25)
    assert row["trb_realised_kl"] == pytest.approx(0.1) and row["trb_budget"] == pytest.approx(0.2)
    assert row["kl_to_teacher"] == pytest.approx(0.4)  # steps 2 and 1 (budget 0), not step 0 (TRB sampled it)
    assert row["first_validation"] == pytest.approx(0.4)  # step 1's, the first step that validated
    assert math.isnan(row["trust_share"])


def test_the_opd_family_target_trains_the_teacher_before_the_student(tmp_path):
    """A dry run of `snakemake opd_family`: the teacher's GRPO run on toy-large is a job, and the student's OPD run
    reads its model folder (the DAG dependency), for every seed of the family."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    out = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "opd_family", "-n", "-p",
                          "--directory", str(tmp_path), "--snakefile", str(REPO_ROOT / "Snakefile")],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "results/train/toy-large/grpo/seed0/model" in text
    for seed in plan_of().family["seeds"]:
        assert f"--run-dir results/train/toy-small/opd/seed{seed}" in text
    opd_jobs = [block for block in text.split("\n\n") if "--run-dir results/train/toy-small/opd/seed" in block]
    assert opd_jobs and all(json.dumps("results/train/toy-large/grpo/seed0/model") in block.replace("'", "")
                            or "toy-large/grpo/seed0/model" in block for block in opd_jobs)


def test_a_method_only_setting_reruns_only_the_runs_of_that_method():
    """Changing TRB's budget (or TrOPD's threshold, or guidance) changes the settings, hence the params, of the runs
    that read it only: no other run, and no teacher check, which every run reads through its probe batch."""
    before = plan_of()
    changes = {"trb": ({"trb": {"kl_budget": 0.003}}, {"trb"}),
               "tropd": ({"tropd": {"agreement_threshold": 0.3}}, {"tropd", "tropd_noguide"}),
               "guidance": ({"guidance": {"prefix_tokens": 8}}, {"tropd"})}
    for name, (train, readers) in changes.items():
        after = plan_of(train=train)
        changed = {run for run in after.family["methods"]
                   if after.train_settings(run, 0) != before.train_settings(run, 0)}
        assert changed == readers, name
        assert all(after.teacher_gap_settings(model, "label") == before.teacher_gap_settings(model, "label")
                   for model in after.models), name


SHIPPED_FAMILY = REPO_ROOT / "results" / "shipped" / "toy-opd-family"


def test_the_shipped_family_cache_redraws_to_its_committed_table(tmp_path):
    """results/shipped/toy-opd-family (the toy opd_family run's aggregate, 3 seeds): `redraw` gives its table byte for
    byte and its figure; the README shows that table."""
    from trace.cache import redraw

    out = redraw(SHIPPED_FAMILY, tmp_path / "out")
    for name in ("opd_family.md", "opd_family.csv"):
        assert (out / "tables" / name).read_bytes() == (SHIPPED_FAMILY / "tables" / name).read_bytes(), name
    assert (out / "figures" / "opd_family.png").stat().st_size > 50_000
    table = pd.read_csv(SHIPPED_FAMILY / "tables" / "opd_family.csv", index_col="method")
    assert set(table.index) == {"base", *plan_of().family["methods"]} and (table["n_seeds"].drop("base") == 3).all()
    rows = [line for line in (SHIPPED_FAMILY / "tables" / "opd_family.md").read_text().splitlines()
            if line.startswith("| ")]
    shown = (REPO_ROOT / "docs" / "methods.md").read_text().splitlines()
    assert rows and all(row in shown for row in rows), "re-copy the shipped opd_family table into docs/methods.md"
