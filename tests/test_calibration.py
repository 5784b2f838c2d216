"""Calibration of agreement confidence (issue 23): the per-problem majority vote over the k samples' final
answers (trace/evaluation/calibration.py), the results JSON's ``calibration`` entry, the aggregate's
calibration.csv and the report's calibration table and reliability diagram, with values computed by hand;
caches without calibration data redraw without them."""
import json
import logging
import shutil

import pandas as pd
import pytest

from conftest import REPO_ROOT
from test_report_paper import step, write_metrics
from trace.cache import AGGREGATE_FILES, OPTIONAL_AGGREGATE_FILES, export_cache, redraw
from trace.evaluation.calibration import calibration_summary, problem_calibration
from trace.report import aggregate, write_tables_and_figures
from trace.settings import ReportJob

BENCHMARKS = {"math500": "MATH500", "aime24": "AIME24"}
JOB = {"benchmarks": BENCHMARKS, "methods": ["grpo", "trace_fkl", "sdpo", "srpo"]}


def boxed(answer):
    return f"so \\boxed{{{answer}}}" if answer is not None else "I ran out of ideas."


def rows_of(problems, kind="math"):
    """[(gold, [k answers, None = no answer])] -> samples-log rows; a sample is graded right iff it says the gold."""
    return [{"doc_id": i, "id": f"p{i}", "answer": gold, "kind": kind, "prompt": "?",
             "responses": [boxed(a) for a in answers], "grades": [a == gold for a in answers]}
            for i, (gold, answers) in enumerate(problems)]


# the hand example of tests/test_metrics.py: confidences 0.75, 0.5, 0.25; majority right, wrong, right
HAND = [("1", ["1", "1", "1", "2"]), ("4", ["3", "4", "3", None]), ("5", ["5", "6", "7", "8"])]
AGREE_RIGHT = [("9", ["9"] * 4), ("10", ["10"] * 4)]
AGREE_WRONG = [("9", ["8"] * 4), ("10", ["11"] * 4)]


def write_result(results, model, policy, benchmark, problems, calibrated=True, samples=False):
    """An evaluation's results JSON (with the calibration entry the evaluation writes, or without it as
    before issue 23) and optionally its samples log beside it."""
    rows = rows_of(problems)
    folder = results / "eval" / model / policy
    folder.mkdir(parents=True, exist_ok=True)
    scores = [sum(row["grades"]) / len(row["grades"]) for row in rows]
    result = {"k": 4, "n_problems": len(rows), "avg_at_k": sum(scores) / len(scores),
              "pass_at_k": {"1": sum(scores) / len(scores)}, "ci95_avg_at_k": [0.0, 1.0],
              "per_problem": [{"id": row["id"], "score": s, "n_correct": sum(row["grades"])}
                              for row, s in zip(rows, scores)]}
    if calibrated:
        result["calibration"] = calibration_summary(problem_calibration(rows), 10, n_boot=200, seed=0, level=0.95)
    (folder / f"{benchmark}.json").write_text(json.dumps(result))
    if samples:
        (folder / f"{benchmark}.samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder / f"{benchmark}.json"


# --------------------------------------------------------------------------- per problem, per evaluation

def test_the_majority_is_taken_over_extracted_answers():
    rows = [{"id": "a", "kind": "math", "responses": ["\\boxed{025}", "so \\boxed{ 25 }", "\\boxed{24}", "25"],
             "grades": [True, True, False, False]},
            {"id": "b", "kind": "mc", "responses": ["The answer is (B)", "\\boxed{B}", "\\boxed{C}", "<think> (B)"],
             "grades": [True, True, False, False]},
            {"id": "c", "kind": "math", "responses": ["<think> \\boxed{3}", "none", "\\boxed{3}", "nothing"],
             "grades": [False, False, True, False]}]
    assert problem_calibration(rows) == [
        # 025 and 25 are one answer; the unboxed "25" is no answer
        {"id": "a", "majority_answer": "25", "confidence": 0.5, "majority_correct": True, "n_no_answer": 1},
        {"id": "b", "majority_answer": "B", "confidence": 0.5, "majority_correct": True, "n_no_answer": 1},
        # three samples without an answer (one never closed its thinking) outvote the right one
        {"id": "c", "majority_answer": None, "confidence": 0.75, "majority_correct": False, "n_no_answer": 3}]


def test_the_results_json_entry_by_hand():
    block = calibration_summary(problem_calibration(rows_of(HAND)), 10, n_boot=500, seed=0, level=0.95)
    assert block["n_bins"] == 10
    assert block["ece"] == pytest.approx(0.5)  # (|1 − 0.75| + |0 − 0.5| + |1 − 0.25|) / 3
    assert block["brier"] == pytest.approx(0.875 / 3)
    assert block["mean_confidence"] == pytest.approx(0.5) and block["majority_accuracy"] == pytest.approx(2 / 3)
    assert [b["count"] for b in block["reliability"]] == [0, 0, 1, 0, 1, 0, 0, 1, 0, 0]
    assert [(p["confidence"], p["majority_correct"]) for p in block["per_problem"]] == [
        (0.75, True), (0.5, False), (0.25, True)]
    for name in ("ece", "brier", "mean_confidence", "majority_accuracy"):
        low, high = block["ci95"][name]
        assert low <= block[name] <= high
    assert json.loads(json.dumps(block)) == block  # JSON as written
    right = calibration_summary(problem_calibration(rows_of(AGREE_RIGHT)), 10, n_boot=50, seed=0, level=0.95)
    wrong = calibration_summary(problem_calibration(rows_of(AGREE_WRONG)), 10, n_boot=50, seed=0, level=0.95)
    assert (right["mean_confidence"], right["ece"], right["brier"], right["ci95"]["ece"]) == (1.0, 0.0, 0.0, [0.0, 0.0])
    assert (wrong["mean_confidence"], wrong["ece"], wrong["brier"], wrong["ci95"]["ece"]) == (1.0, 1.0, 1.0, [1.0, 1.0])


# --------------------------------------------------------------------------- aggregate and report

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Result files of one model: base (the hand example on math500, two agreeing right answers on aime24),
    grpo with 2 seeds agreeing and right, trace_fkl agreeing and wrong, sdpo written before issue 23 (its
    samples log beside it), srpo with neither; aggregated and drawn by the real code."""
    root = tmp_path_factory.mktemp("calibration")
    results = root / "results"
    files = [write_result(results, "m", "base", "math500", HAND), write_result(results, "m", "base", "aime24", AGREE_RIGHT)]
    for seed in (0, 1):
        files += [write_result(results, "m", f"grpo-seed{seed}", b, AGREE_RIGHT) for b in BENCHMARKS]
    files += [write_result(results, "m", "trace_fkl-seed0", b, AGREE_WRONG) for b in BENCHMARKS]
    files += [write_result(results, "m", "sdpo-seed0", "math500", HAND, calibrated=False, samples=True),
              write_result(results, "m", "sdpo-seed0", "aime24", AGREE_RIGHT, calibrated=False, samples=True)]
    files += [write_result(results, "m", "srpo-seed0", b, AGREE_RIGHT, calibrated=False) for b in BENCHMARKS]
    for run in ("grpo", "trace_fkl", "sdpo", "srpo"):
        write_metrics(results, "m", run, [step(0), step(1)])
    aggregate(JOB, files, sorted(results.glob("train/*/*/seed*/metrics.jsonl")), results / "aggregate")
    write_tables_and_figures(JOB, results / "aggregate", results)
    return results


def _table(study):
    table = pd.read_csv(study / "tables" / "calibration.csv")
    return table.set_index(["method", "benchmark"])


def test_the_aggregate_holds_every_problem_with_its_confidence(study):
    calibration = pd.read_csv(study / "aggregate" / "calibration.csv", dtype={"id": str})
    assert list(calibration.columns) == ["model", "method", "seed", "benchmark", "column", "k", "id", "confidence",
                                         "majority_correct", "accuracy"]
    base = calibration[(calibration["method"] == "base") & (calibration["benchmark"] == "math500")]
    assert base[["id", "confidence", "majority_correct", "accuracy"]].values.tolist() == [
        ["p0", 0.75, 1, 0.75], ["p1", 0.5, 0, 0.25], ["p2", 0.25, 1, 0.25]]
    # sdpo's problems come from its samples log, scored exactly as the evaluation would have; srpo has none
    sdpo = calibration[calibration["method"] == "sdpo"].drop(columns=["method", "seed"]).reset_index(drop=True)
    assert sdpo.equals(calibration[calibration["method"] == "base"].drop(columns=["method", "seed"]).reset_index(drop=True))
    assert "srpo" not in set(calibration["method"])
    assert len(calibration) == 5 + 2 * 4 + 4 + 5


def test_the_aggregate_names_results_without_calibration(tmp_path, caplog):
    files = [write_result(tmp_path, "m", "base", b, AGREE_RIGHT, calibrated=False) for b in BENCHMARKS]
    with caplog.at_level(logging.WARNING, logger="trace.report"):
        aggregate(JOB, files, [], tmp_path / "aggregate")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("2 evaluation result(s) have no calibration entry") and "base/math500.json" in warning
    assert pd.read_csv(tmp_path / "aggregate" / "calibration.csv").empty  # written, with its header


def test_the_calibration_table_by_hand(study):
    table = _table(study)
    base = table.loc[("base", "all")]
    # pooled over 5 problems: confidences 0.75 0.5 0.25 1 1, majority right 1 0 1 1 1, accuracies .75 .25 .25 1 1
    # ECE (10 bins) = (0.25 + 0.5 + 0.75 + 0) / 5; Brier = (0.0625 + 0.25 + 0.5625 + 0 + 0) / 5
    assert (base["n_problems"], base["n_seeds"], base["k"], base["n_bins"]) == (5, 1, 4, 10)
    assert base["ece"] == pytest.approx(0.3) and base["brier"] == pytest.approx(0.175)
    assert base["mean_confidence"] == pytest.approx(0.7) and base["majority_accuracy"] == pytest.approx(0.8)
    assert base["avg_at_k"] == pytest.approx(0.65)
    assert base["ece_ci_low"] <= 0.3 <= base["ece_ci_high"] and base["ece_ci_low"] < base["ece_ci_high"]
    assert table.loc[("base", "math500"), "ece"] == pytest.approx(0.5)
    assert table.loc[("base", "aime24"), "ece"] == 0.0
    # all samples agree and are right: confidence 1, ECE 0, every CI a point; agree and wrong: ECE 1
    grpo, fkl = table.loc[("grpo", "all")], table.loc[("trace_fkl", "all")]
    assert (grpo["n_seeds"], grpo["n_problems"]) == (2, 4)
    assert [grpo[c] for c in ("mean_confidence", "majority_accuracy", "ece", "ece_ci_low", "ece_ci_high", "brier")] == [
        1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert [fkl[c] for c in ("mean_confidence", "majority_accuracy", "ece", "ece_ci_low", "ece_ci_high", "brier",
                             "avg_at_k")] == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert table.loc[("sdpo", "all"), "ece"] == pytest.approx(0.3)  # from its samples log
    assert "srpo" not in table.index.get_level_values("method")
    # rows: base, grpo, then the others by name; pooled first, then the benchmarks in the study's order
    assert list(table.index) == [(m, b) for m in ("base", "grpo", "sdpo", "trace_fkl") for b in ("all", "math500",
                                                                                                  "aime24")]


def test_the_markdown_shows_the_pooled_rows_and_the_figure_is_drawn(study):
    text = (study / "tables" / "calibration.md").read_text()
    assert "ECE over 10 equal-width confidence bins" in text and "k = 4" in text
    rows = [line for line in text.splitlines() if line.startswith("| m ")]
    assert len(rows) == 4 and "| base " in rows[0] and "| 0.300 [" in rows[0] and "| 0.650 [" in rows[0]
    assert "| 1.000 [1.000, 1.000] |" in rows[3]  # trace_fkl: ECE and Brier 1
    assert (study / "figures" / "calibration.png").stat().st_size > 10_000


def test_the_bins_are_a_report_setting(study, tmp_path):
    write_tables_and_figures({**JOB, "calibration_bins": 2}, study / "aggregate", tmp_path)
    base = pd.read_csv(tmp_path / "tables" / "calibration.csv").set_index(["method", "benchmark"]).loc[("base", "math500")]
    assert base["n_bins"] == 2 and base["ece"] == pytest.approx(1 / 6, abs=1e-4)  # by hand in tests/test_metrics.py
    assert ReportJob.from_mapping({"benchmarks": BENCHMARKS}).calibration_bins == 10  # the schema's default


# --------------------------------------------------------------------------- caches

def _files(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_a_cache_carries_calibration_and_redraws_it_byte_for_byte(study, tmp_path):
    cache = tmp_path / "cache"
    export_cache(JOB, study / "aggregate", cache)
    assert set(_files(cache / "aggregate")) == {*AGGREGATE_FILES, *OPTIONAL_AGGREGATE_FILES}
    # the same numbers as the study's report (the cache's settings list the benchmarks sorted: rows in that order)
    cached, drawn = (pd.read_csv(folder / "tables" / "calibration.csv").sort_values(["method", "benchmark"])
                     .reset_index(drop=True) for folder in (cache, study))
    pd.testing.assert_frame_equal(cached, drawn)
    redraw(cache, tmp_path / "again")
    for kind in ("tables", "figures"):
        assert _files(tmp_path / "again" / kind) == _files(cache / kind), kind
    assert "calibration.png" in _files(cache / "figures")


def test_a_cache_without_calibration_redraws_without_its_table_and_figure(study, tmp_path):
    """Caches exported before issue 23 (the shipped ones) have no calibration.csv: nothing of it is drawn, the
    rest is as before; exporting such an aggregate over a newer cache leaves no stale calibration.csv."""
    cache = tmp_path / "cache"
    export_cache(JOB, study / "aggregate", cache)
    before = {kind: _files(cache / kind) for kind in ("tables", "figures")}
    old = shutil.copytree(study / "aggregate", tmp_path / "old_aggregate")
    (old / "calibration.csv").unlink()
    export_cache(JOB, old, cache)
    assert set(_files(cache / "aggregate")) == set(AGGREGATE_FILES)
    assert "calibration.md" not in _files(cache / "tables") and "calibration.png" not in _files(cache / "figures")
    for kind in ("tables", "figures"):
        assert _files(cache / kind) == {name: data for name, data in before[kind].items()
                                        if not name.startswith("calibration.")}, kind


def test_a_malformed_calibration_csv_is_named(study, tmp_path):
    cache = tmp_path / "cache"
    export_cache(JOB, study / "aggregate", cache)
    path = cache / "aggregate" / "calibration.csv"
    path.write_text(path.read_text().replace(",0.75,1,0.75", ",high,1,0.75", 1))
    with pytest.raises(ValueError, match=r"calibration\.csv line 2: column confidence = 'high' is not a number"):
        redraw(cache, tmp_path / "out")


def test_the_html_report_shows_calibration_only_where_it_was_drawn(tmp_path, monkeypatch):
    from trace.study_plan import OPTIONAL_REPORT_ENTRIES, REPORT_ENTRIES, StudyPlan

    monkeypatch.chdir(tmp_path)
    assert set(OPTIONAL_REPORT_ENTRIES) <= set(REPORT_ENTRIES)
    assert StudyPlan.in_html_report("results/tables/main_results.md")  # always: Snakemake names a missing one
    assert not StudyPlan.in_html_report("results/tables/calibration.md")
    (tmp_path / "results" / "tables").mkdir(parents=True)
    (tmp_path / "results" / "tables" / "calibration.md").write_text("drawn")
    assert StudyPlan.in_html_report("results/tables/calibration.md")
    assert (REPO_ROOT / "workflow" / "report" / "calibration_figure.rst").is_file()
