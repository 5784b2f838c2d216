"""The paper study's report: our numbers beside the paper's (trace/paper_results.csv), with CIs and
ours − paper, and the figures the aggregate supports. The aggregate CSVs are written by the real
aggregate code from small per-run files; every expected value below is computed by hand."""
import json
import math
import re

import pandas as pd
import pytest

from trace.report import Z95, aggregate, read_paper_results, write_tables_and_figures

BENCHMARKS = {"aime24": "AIME24", "aime25": "AIME25", "amc23": "AMC23", "math500": "MATH500",
              "gpqa_diamond": "GPQA-D"}
PAPER_MODELS = {"big": "Qwen3-8B", "small": "Qwen3-1.7B"}
HALF = 5.0  # every evaluated cell's bootstrap CI is ours ± 5 points


def write_eval(results, model, policy, scores):
    """scores: {benchmark: avg@k in %} -> results/eval/<model>/<policy>/<benchmark>.json"""
    for benchmark, score in scores.items():
        path = results / "eval" / model / policy / f"{benchmark}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        value = score / 100
        path.write_text(json.dumps({"k": 4, "n_problems": 10, "avg_at_k": value, "pass_at_k": {"1": value},
                                    "ci95_avg_at_k": [value - HALF / 100, value + HALF / 100]}))


def write_metrics(results, model, run, rows, seed=0):
    path = results / "train" / model / run / f"seed{seed}" / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def cells(aime24, aime25, amc23, math500, gpqa):
    return dict(zip(BENCHMARKS, (aime24, aime25, amc23, math500, gpqa)))


def step(s, lam=0.0, **extra):
    return {"step": s, "reward_mean": 0.5, "entropy": 0.4, "response_length": 50.0, "lambda": lam,
            "grad_norm": 1.0, **extra}


def probe(concentration, lift, credit, span):
    """A probe step's entries (trace/train/probe.py), with a credit map over the tokens a b c d."""
    return {"probe/credit_concentration": concentration, "probe/logprob_lift_key_supported": lift,
            "probe/map": {"rollout": 0, "tokens": ["a", "Ġb", "c", "d"], "credit": credit, "span": span}}


CFG = {"benchmarks": BENCHMARKS, "methods": ["grpo", "sdpo", "srpo", "trace_fkl", "trace_rkl"],
       "compare_to_paper": True, "paper_models": PAPER_MODELS,
       "ablations": {"annotator_tiers": {"model": "big", "method": "trace_fkl", "tiers": {"self": {}}},
                     "mask_localisation": {"model": "small", "methods": ["random25"]}}}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_report")
    results = root / "results"
    write_eval(results, "big", "base", cells(60, 60, 80, 90, 60))
    write_eval(results, "big", "grpo-seed0", cells(70, 70, 90, 95, 55))           # AVG 76.0
    write_eval(results, "big", "sdpo-seed0", cells(70, 70, 90, 95, 50))
    write_eval(results, "big", "srpo-seed0", cells(70, 70, 90, 95, 50))
    write_eval(results, "big", "trace_fkl-seed0", cells(73, 73, 93, 98, 58))      # AVG 79.0
    write_eval(results, "big", "trace_fkl@self-seed0", cells(71, 71, 91, 96, 56))  # AVG 77.0
    write_eval(results, "small", "base", cells(60, 60, 60, 60, 60))
    write_eval(results, "small", "grpo-seed0", cells(50, 50, 50, 50, 50))
    write_eval(results, "small", "grpo-seed1", cells(60, 60, 60, 60, 60))          # 2 seeds: cells 55
    write_eval(results, "small", "trace_fkl-seed0", cells(58, 58, 58, 58, 58))
    write_eval(results, "small", "random25-seed0", cells(52, 52, 52, 52, 52))
    write_metrics(results, "big", "grpo", [
        step(0, entropy=0.2, **probe(1.1, 0.05, [0.1, 0.1, 0.2, 0.2], [0, 1, 1, 0])),
        step(1, entropy=0.2, **{"val/mean_at_k": 0.40})])
    write_metrics(results, "big", "srpo", [
        step(0, lam=0.5, entropy=1.0, response_length=100.0, teacher_entropy=0.9, srpo_weight_raw_mean=0.8),
        step(1, lam=0.5, entropy=1.0, response_length=60.0, teacher_entropy=0.7, srpo_weight_raw_mean=0.4,
             **{"val/mean_at_k": 0.30, "val/ci95_low": 0.2, "val/ci95_high": 0.4})])
    write_metrics(results, "big", "trace_fkl", [
        step(0, lam=0.5, span_coverage=0.2, **probe(6.0, 0.2, [0.0, 0.6, 0.6, 0.1], [0, 1, 1, 0])),
        step(1, **{"val/mean_at_k": 0.50, "probe/credit_concentration": 4.0, "probe/logprob_lift_key_supported": None})])
    write_metrics(results, "big", "trace_fkl@self", [step(0, lam=0.5), step(1, **{"val/mean_at_k": 0.48})])
    cfg = {"benchmarks": BENCHMARKS}
    aggregate(cfg, sorted(results.glob("eval/*/*/*.json")), sorted(results.glob("train/*/*/seed*/metrics.jsonl")),
              results / "aggregate")
    write_tables_and_figures(CFG, results / "aggregate", results)
    return results


def test_the_paper_csv_holds_tracemd_values_with_their_source():
    paper = read_paper_results()
    assert set(paper["source"].str.split(" §7").str[0]) == {"TRACE.md"}
    table2 = paper[paper["item"] == "table2"].set_index(["model", "method", "metric"])["value"]
    assert table2[("Qwen3-8B", "trace_fkl", "AVG")] == "81.51" and table2[("Qwen3-8B", "grpo", "AIME25")] == "68.96"
    assert table2[("Qwen3-1.7B", "trace_rkl", "AVG")] == "60.16" and table2[("Qwen3-8B", "base", "GPQA-D")] == "58.27"
    assert ("Qwen3-8B", "grpo", "MATH500") not in table2  # unknown cells are absent, not invented
    gains = paper[paper["item"] == "table3"].set_index("method")["number"]
    assert gains.to_dict() == {"strong": 2.76, "self": 1.90, "frozen": 1.09, "static": 0.92}
    assert paper.loc[paper["method"] == "others", "value"].item() == "1.0–1.1"  # a range stays text


def test_main_table_side_by_side_values_cis_and_differences(report):
    vs = pd.read_csv(report / "tables" / "main_results_vs_paper.csv", dtype={"paper": str})
    vs = vs.set_index(["model", "method", "column"]).sort_index()
    grpo = vs.loc[("big", "grpo")]
    assert grpo.loc["AIME25", "ours"] == pytest.approx(70.0)
    assert grpo.loc["AIME25", "paper"] == "68.96" and grpo.loc["AIME25", "diff"] == pytest.approx(1.04)
    assert grpo.loc["GPQA-D", "diff"] == pytest.approx(55 - 53.85)
    # one seed: the cell's bootstrap CI as evaluated
    assert (grpo.loc["AIME25", "ci_low"], grpo.loc["AIME25", "ci_high"]) == pytest.approx((65.0, 75.0))
    # AVG = 76; its CI from five independent cells of se = 5/z: half-width z·sqrt(5·(5/z)²)/5 = sqrt(5)
    assert grpo.loc["AVG", "ours"] == pytest.approx(76.0) and grpo.loc["AVG", "diff"] == pytest.approx(76 - 78.75)
    assert grpo.loc["AVG", "ci_high"] - 76.0 == pytest.approx(math.sqrt(5), abs=1e-4)
    assert pd.isna(grpo.loc["MATH500", "paper"]) and pd.isna(grpo.loc["MATH500", "diff"])  # paper unknown
    assert vs.loc[("big", "base", "GPQA-D"), "diff"] == pytest.approx(1.73)
    sdpo = vs.loc[("big", "sdpo", "GPQA-D")]
    assert sdpo["relation"] == "<" and sdpo["paper"] == "58.27" and pd.isna(sdpo["diff"])  # "below base"
    # two seeds (50 and 60): cell 55, the t-interval over seeds: sd = sqrt(50), se = sd/sqrt(2) = 5,
    # half-width t(0.975, 1)·5 = 12.7062·5; AVG per seed (50, 60) the same
    small = vs.loc[("small", "grpo")]
    assert small.loc["MATH500", "ours"] == pytest.approx(55.0)
    assert small.loc["MATH500", "ci_high"] - 55 == pytest.approx(12.7062047 * 5, abs=1e-3)
    assert small.loc["AVG", "ci_high"] - 55 == pytest.approx(12.7062047 * 5, abs=1e-3)
    assert small.loc["AVG", "n_seeds"] == 2 and small.loc["AVG", "ci"] == "t over seeds"
    assert grpo.loc["AVG", "ci"] == "normal (bootstrap SEs)" and grpo.loc["AIME25", "ci"] == "bootstrap"
    assert small.loc["AVG", "diff"] == pytest.approx(55 - 57.73)
    assert vs.loc[("small", "base", "AVG"), "diff"] == pytest.approx(60 - 58.77)
    # the markdown prints the same numbers in each cell
    md = (report / "tables" / "main_results.md").read_text()
    assert "70.00 [65.00, 75.00] · paper 68.96 · Δ +1.04" in md
    assert "76.00 [73.76, 78.24] · paper 78.75 · Δ -2.75" in md
    assert re.search(r"\| 50\.00 \[45\.00, 55\.00\] · paper <58\.27 +\|", md)  # no Δ: not an exact value
    assert "Table 2" in md.splitlines()[0] and "TRACE.md" in md.splitlines()[0]
    ours = pd.read_csv(report / "tables" / "main_results.csv").set_index(["model", "method"])
    assert ours.loc[("big", "grpo"), "AVG"] == pytest.approx(76.0)  # our numeric table stays as before


def test_tiers_table_gives_gain_over_grpo_beside_the_papers(report):
    tiers = pd.read_csv(report / "tables" / "annotator_tiers.csv").set_index("variant")
    strong = tiers.loc["strong (trace_fkl, train.annotator)"]
    assert strong["gain_vs_grpo"] == pytest.approx(3.0) and strong["paper_gain_vs_grpo"] == 2.76
    assert strong["diff_gain"] == pytest.approx(0.24)
    # gain CI: two independent AVGs of half-width sqrt(5) each -> sqrt(10)
    assert strong["gain_ci_high"] - 3.0 == pytest.approx(math.sqrt(10), abs=0.01)
    assert tiers.loc["self", "gain_vs_grpo"] == pytest.approx(1.0)
    assert tiers.loc["self", "paper_gain_vs_grpo"] == 1.90 and tiers.loc["self", "diff_gain"] == pytest.approx(-0.9)
    masks = (report / "tables" / "mask_localisation.md").read_text()
    assert "no numbers to compare" in masks


def test_figure_numbers_come_from_the_aggregate_curves(report):
    numbers = pd.read_csv(report / "tables" / "paper_figure_numbers.csv", dtype={"paper": str})
    big = numbers[numbers["model"] == "big"].set_index(["metric", "method"]).sort_index()
    assert big.loc[("response_length_start", "SRPO"), "ours"] == pytest.approx(100.0)
    # the EMA as drawn (pandas ewm, alpha 0.15): the last of [100, 60] is (60 + 0.85·100) / 1.85
    assert big.loc[("response_length_end", "SRPO"), "ours"] == pytest.approx((60 + 85) / 1.85, abs=1e-3)
    assert big.loc[("response_length_end", "SRPO"), "paper"] == "759"
    assert big.loc[("srpo_weight_end", "SRPO"), "ours"] == pytest.approx((0.4 + 0.85 * 0.8) / 1.85, abs=1e-4)
    assert big.loc[("entropy_ratio_vs_grpo", "SDPO"), "paper"] == ">4"
    assert big.loc[("entropy_ratio_vs_grpo", "SRPO"), "ours"] == pytest.approx(5.0)  # 1.0 / 0.2
    # Fig. 7: last validation point of the self tier minus the strong tier's, in points
    assert big.loc[("final_val_gap_vs_strong", "online self-annotation"), "ours"] == pytest.approx(-2.0)
    assert pd.isna(big.loc[("credit_concentration", "the other methods"), "ours"])  # a range: not compared


def test_aggregate_carries_validation_and_srpo_columns(report):
    curves = pd.read_csv(report / "aggregate" / "training_curves.csv")
    val = curves.dropna(subset=["val/mean_at_k"])
    assert sorted(zip(val["method"], val["step"], val["val/mean_at_k"])) == [
        ("grpo", 1, 0.40), ("srpo", 1, 0.30), ("trace_fkl", 1, 0.50), ("trace_fkl@self", 1, 0.48)]
    srpo = curves[curves["method"] == "srpo"].set_index("step")
    assert srpo.loc[1, "val/ci95_low"] == 0.2 and srpo.loc[0, "srpo_weight_raw_mean"] == 0.8
    assert srpo.loc[1, "teacher_entropy"] == 0.7


def test_mechanism_table_and_credit_maps(report):
    maps = pd.read_csv(report / "aggregate" / "credit_maps.csv", keep_default_na=False)
    fkl = maps[maps["method"] == "trace_fkl"]
    assert fkl["token"].tolist() == ["a", "Ġb", "c", "d"] and fkl["span"].tolist() == [0, 1, 1, 0]
    assert fkl["credit"].tolist() == [0.0, 0.6, 0.6, 0.1] and set(fkl["step"]) == {0}
    table = pd.read_csv(report / "tables" / "mechanism.csv", dtype={"paper_credit_concentration": str,
                                                                   "paper_logprob_lift": str})
    table = table.set_index(["model", "method"])
    fkl = table.loc[("big", "trace_fkl")]
    assert fkl["credit_concentration_first_step"] == 6.0 and fkl["credit_concentration_mean"] == 5.0
    assert fkl["logprob_lift_first_step"] == 0.2 and fkl["logprob_lift_mean"] == 0.2  # a null step is skipped
    assert fkl["paper_credit_concentration"] == "8.5" and fkl["paper_logprob_lift"] == "0.145"
    grpo = table.loc[("big", "grpo")]
    assert grpo["credit_concentration_mean"] == 1.1 and grpo["paper_credit_concentration"] == "1.0–1.1"
    assert grpo["paper_logprob_lift"] == "0.054" and fkl["probe_steps"] == "0 1"
    numbers = pd.read_csv(report / "tables" / "paper_figure_numbers.csv").query("model == 'big'")
    numbers = numbers.set_index(["metric", "method"])
    assert numbers.loc[("credit_concentration", "TRACE"), "ours"] == 5.0
    assert numbers.loc[("logprob_lift_key_tokens", "GRPO"), "ours"] == 0.05


def test_figures_are_drawn(report):
    for name in ("training_curves", "fig1a_entropy", "validation_curves", "fig8_dynamics", "annotator_tiers",
                 "mask_localisation", "fig6_credit_map"):
        assert (report / "figures" / f"{name}.png").stat().st_size > 5000, name


def test_the_toy_study_report_has_no_paper_columns(report, tmp_path):
    cfg = {key: value for key, value in CFG.items() if key not in ("compare_to_paper", "paper_models")}
    write_tables_and_figures(cfg, report / "aggregate", tmp_path)
    assert not (tmp_path / "tables" / "main_results_vs_paper.csv").exists()
    assert "paper" not in (tmp_path / "tables" / "main_results.md").read_text().split("\n", 1)[1]
    assert "paper_gain_vs_grpo" not in pd.read_csv(tmp_path / "tables" / "annotator_tiers.csv")
    assert not (tmp_path / "tables" / "paper_figure_numbers.csv").exists()


def test_vs_grpo_puts_the_papers_gain_beside_ours(report):
    versus = pd.read_csv(report / "tables" / "vs_grpo.csv").set_index(["model", "method"])
    fkl = versus.loc[("big", "trace_fkl")]
    # one seed each: Δ 79 − 76 = 3, normal CI from two AVG half-widths of √5: half-width √10 > 3
    assert fkl["delta_avg"] == pytest.approx(3.0) and fkl["ci_high"] == pytest.approx(3 + math.sqrt(10), abs=0.01)
    assert not fkl["significant"] and fkl["paper_delta_avg"] == pytest.approx(81.51 - 78.75)
    assert versus.loc[("big", "trace_fkl@self"), "paper_delta_avg"] == pytest.approx(1.90)  # Table 3's self tier
    assert pd.isna(versus.loc[("small", "random25"), "paper_delta_avg"])  # Table 4 has no numbers
    assert versus.loc[("small", "trace_fkl"), "n_seeds_grpo"] == 2
