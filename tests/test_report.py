"""Tables come from the aggregate CSV only; cells, AVG and gains checked against hand-made numbers."""
import pandas as pd

from trace.report import ablation_table, main_table, write_tables_and_figures

BENCHMARKS = {"arith_2op": "MATH500", "choice_ood": "GPQA-D"}


def _evals(rows):
    return pd.DataFrame([{"model": m, "method": p, "seed": s, "benchmark": b, "column": BENCHMARKS[b], "k": 4,
                          "n_problems": 8, "avg_at_k": v, "ci_low": v - 1, "ci_high": v + 1, "pass_at_1": v}
                         for m, p, s, b, v in rows])


ROWS = [
    ("small", "base", None, "arith_2op", 50.0), ("small", "base", None, "choice_ood", 20.0),
    ("small", "grpo", 0, "arith_2op", 60.0), ("small", "grpo", 0, "choice_ood", 30.0),
    ("small", "grpo", 1, "arith_2op", 70.0), ("small", "grpo", 1, "choice_ood", 30.0),
    ("small", "trace_fkl", 0, "arith_2op", 80.0), ("small", "trace_fkl", 0, "choice_ood", 30.0),
    ("small", "trace_fkl@self", 0, "arith_2op", 70.0), ("small", "trace_fkl@self", 0, "choice_ood", 26.0),
    ("small", "random25", 0, "arith_2op", 66.0), ("small", "random25", 0, "choice_ood", 30.0),
]


def test_main_table_averages_seeds_then_benchmarks():
    table = main_table(_evals(ROWS), ["MATH500", "GPQA-D"])
    grpo = table.loc[("small", "grpo")]
    assert grpo["MATH500"] == 65.0 and grpo["GPQA-D"] == 30.0 and grpo["AVG"] == 47.5
    assert table.loc[("small", "base"), "AVG"] == 35.0
    assert list(table.index.get_level_values("method"))[:2] == ["base", "grpo"]


def test_ablation_table_reports_gain_over_the_same_models_grpo():
    table = ablation_table(_evals(ROWS), ["MATH500", "GPQA-D"], "small",
                           {"strong": "trace_fkl", "self": "trace_fkl@self", "missing": "trace_fkl@static"})
    assert list(table.index) == ["strong", "self"]  # runs without results are left out, not invented
    assert table.loc["strong", "AVG"] == 55.0 and table.loc["strong", "gain_vs_grpo"] == 7.5
    assert table.loc["self", "AVG"] == 48.0 and table.loc["self", "gain_vs_grpo"] == 0.5


def test_report_writes_main_and_ablation_tables(tmp_path):
    aggregate = tmp_path / "aggregate"
    aggregate.mkdir()
    _evals(ROWS).to_csv(aggregate / "evals.csv", index=False)
    pd.DataFrame([{"model": "small", "method": "grpo", "seed": 0, "step": s, "reward_mean": 0.1 * s, "entropy": 0.5,
                   "response_length": 40, "lambda": 0.0, "grad_norm": 1.0, "span_coverage": None}
                  for s in range(3)]).to_csv(aggregate / "training_curves.csv", index=False)
    cfg = {"benchmarks": BENCHMARKS, "methods": ["grpo", "trace_fkl"],
           "ablations": {"annotator_tiers": {"model": "small", "method": "trace_fkl", "tiers": {"self": {}}},
                         "mask_localisation": {"model": "small", "methods": ["random25"]}}}
    write_tables_and_figures(cfg, aggregate, tmp_path)
    main = pd.read_csv(tmp_path / "tables" / "main_results.csv")
    assert set(main["method"]) == {"base", "grpo", "trace_fkl"}  # ablation runs stay out of Table 2
    tiers = pd.read_csv(tmp_path / "tables" / "annotator_tiers.csv")
    assert list(tiers["variant"]) == ["strong (trace_fkl, train.annotator)", "self"]
    masks = pd.read_csv(tmp_path / "tables" / "mask_localisation.csv")
    assert list(masks["variant"]) == ["annotated spans (trace_fkl)", "random25"]
    assert masks.set_index("variant").loc["random25", "gain_vs_grpo"] == 0.5
    for figure in ("training_curves", "annotator_tiers", "mask_localisation"):
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 1000


def _eval_json(path, avg):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"k": 4, "n_problems": 8, "avg_at_k": avg, "ci95_avg_at_k": [avg - 0.1, avg + 0.1],
                                "pass_at_k": {"1": avg}}))
    return path


def test_aggregate_reads_exactly_the_declared_inputs(tmp_path):
    """Stale files under results/ (a seed or run no longer in the config) never reach the tables."""
    import json

    from trace.cli import main

    results = tmp_path / "results"
    declared = [_eval_json(results / "eval" / "small" / "grpo-seed0" / "arith_2op.json", 0.6),
                _eval_json(results / "eval" / "small" / "base" / "arith_2op.json", 0.5)]
    _eval_json(results / "eval" / "small" / "grpo-seed7" / "arith_2op.json", 0.0)         # stale seed
    _eval_json(results / "eval" / "small" / "old_method-seed0" / "arith_2op.json", 0.0)   # stale run
    metrics = results / "train" / "small" / "grpo" / "seed0" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"step": 0, "reward_mean": 0.25, "entropy": 1.0}) + "\n")
    stale = results / "train" / "small" / "grpo" / "seed7" / "metrics.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"step": 0, "reward_mean": 0.99}) + "\n")
    out = tmp_path / "aggregate"
    main(["aggregate", "--cfg", json.dumps({"benchmarks": {"arith_2op": "MATH500"}}),
          "--evals", *map(str, declared), "--metrics", str(metrics), "--out-dir", str(out)])
    evals = pd.read_csv(out / "evals.csv")
    assert sorted(zip(evals["method"], evals["avg_at_k"])) == [("base", 50.0), ("grpo", 60.0)]
    assert list(evals.loc[evals["method"] == "grpo", "seed"]) == [0]
    curves = pd.read_csv(out / "training_curves.csv")
    assert list(zip(curves["seed"], curves["reward_mean"])) == [(0, 0.25)]
