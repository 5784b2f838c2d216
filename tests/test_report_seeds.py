"""Seeds as an axis: several seeds give the mean over seeds with a t-interval over seeds (AVG per seed
first), one seed keeps the evaluation's bootstrap CI, and Δ AVG vs GRPO is paired by seed where it can be.
Every expected number is computed by hand from the tiny tables below."""
import math

import pandas as pd
import pytest

from trace.report import (Z95, cell_estimates, per_seed_estimates, t_quantile_95, versus_grpo,
                          write_tables_and_figures)

COLUMNS = ["A", "B"]
T2 = 4.302652729749  # t(0.975, 2): three seeds


def _evals(rows):
    """rows: (method, seed, column, avg@k, bootstrap half-width) on model m."""
    return pd.DataFrame([{"model": "m", "method": method, "seed": seed, "benchmark": column.lower(), "column": column,
                          "k": 4, "n_problems": 10, "avg_at_k": value, "ci_low": value - half,
                          "ci_high": value + half, "pass_at_1": value}
                         for method, seed, column, value, half in rows])


ROWS = [
    ("base", None, "A", 40.0, 4.0), ("base", None, "B", 10.0, 4.0),
    # grpo, 3 seeds: A 60 70 80, B 30 30 36 -> per-seed AVG 45 50 58
    ("grpo", 0, "A", 60.0, 5.0), ("grpo", 0, "B", 30.0, 5.0),
    ("grpo", 1, "A", 70.0, 5.0), ("grpo", 1, "B", 30.0, 5.0),
    ("grpo", 2, "A", 80.0, 5.0), ("grpo", 2, "B", 36.0, 5.0),
    # trace_fkl, the same 3 seeds: per-seed AVG 55 51 62 -> differences to grpo 10 1 4
    ("trace_fkl", 0, "A", 70.0, 5.0), ("trace_fkl", 0, "B", 40.0, 5.0),
    ("trace_fkl", 1, "A", 72.0, 5.0), ("trace_fkl", 1, "B", 30.0, 5.0),
    ("trace_fkl", 2, "A", 86.0, 5.0), ("trace_fkl", 2, "B", 38.0, 5.0),
    # sdpo, one seed: A 50 ± 5, B 20 ± 2
    ("sdpo", 0, "A", 50.0, 5.0), ("sdpo", 0, "B", 20.0, 2.0),
    # rlsd, 2 seeds but only seed 2 shared with grpo: not paired. Per-seed AVG 52, 60
    ("rlsd", 2, "A", 70.0, 5.0), ("rlsd", 2, "B", 34.0, 5.0),
    ("rlsd", 7, "A", 80.0, 5.0), ("rlsd", 7, "B", 40.0, 5.0),
]


@pytest.fixture(scope="module")
def cells():
    return cell_estimates(_evals(ROWS), COLUMNS).set_index(["method", "column"])


def test_t_quantiles_match_the_table():
    for df, t in [(1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (4, 2.776445105), (9, 2.262157163),
                  (10, 2.228138852), (30, 2.042272456), (100, 1.983971519)]:
        assert t_quantile_95(df) == pytest.approx(t, abs=1e-8), df
    assert t_quantile_95(5000) == pytest.approx(Z95, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile_95(0)


def test_several_seeds_give_the_mean_and_the_t_interval_over_seeds(cells):
    a = cells.loc[("grpo", "A")]
    # 60 70 80: mean 70, sd 10, se 10/√3
    assert a["ours"] == 70.0 and a["n_seeds"] == 3 and a["ci"] == "t over seeds"
    assert a["se"] == pytest.approx(10 / math.sqrt(3))
    assert (a["ci_low"], a["ci_high"]) == pytest.approx((70 - T2 * 10 / math.sqrt(3), 70 + T2 * 10 / math.sqrt(3)))
    # AVG per seed first (45 50 58), then across seeds: mean 51, variance (36 + 1 + 49) / 2 = 43
    avg = cells.loc[("grpo", "AVG")]
    assert avg["ours"] == pytest.approx(51.0) and avg["se"] == pytest.approx(math.sqrt(43 / 3))
    assert avg["ci_high"] - 51 == pytest.approx(T2 * math.sqrt(43 / 3))
    assert avg["ci_low"] == pytest.approx(51 - T2 * math.sqrt(43 / 3))
    assert cells.loc[("trace_fkl", "AVG"), "ours"] == pytest.approx((55 + 51 + 62) / 3)
    # two seeds: t(0.975, 1); rlsd AVG 52 and 60: mean 56, sd √32, se 4
    rlsd = cells.loc[("rlsd", "AVG")]
    assert rlsd["ours"] == 56.0 and rlsd["se"] == pytest.approx(4.0)
    assert rlsd["ci_high"] == pytest.approx(56 + 12.706204736 * 4)


def test_one_seed_keeps_the_bootstrap_ci_and_the_pooled_avg(cells):
    a = cells.loc[("sdpo", "A")]
    assert (a["ours"], a["ci_low"], a["ci_high"], a["n_seeds"], a["ci"]) == (50.0, 45.0, 55.0, 1, "bootstrap")
    # AVG 35 from two independent cells of se 5/z and 2/z: half-width z·√((5/z)² + (2/z)²)/2 = √29/2
    avg = cells.loc[("sdpo", "AVG")]
    assert avg["ours"] == 35.0 and avg["ci"] == "normal (bootstrap SEs)"
    assert (avg["ci_low"], avg["ci_high"]) == pytest.approx((35 - math.sqrt(29) / 2, 35 + math.sqrt(29) / 2))
    base = cells.loc[("base", "AVG")]  # the base has no seed: one
    assert base["n_seeds"] == 1 and base["ours"] == 25.0
    assert base["ci_high"] - 25 == pytest.approx(math.sqrt(32) / 2)


def test_avg_needs_every_column_of_a_seed():
    rows = ROWS + [("grpo", 3, "A", 99.0, 5.0)]  # seed 3 has no B: no AVG for it
    per_seed = per_seed_estimates(_evals(rows), COLUMNS).query("method == 'grpo' and column == 'AVG'")
    assert sorted(per_seed["seed"]) == [0, 1, 2]
    cells = cell_estimates(_evals(rows), COLUMNS).set_index(["method", "column"])
    assert cells.loc[("grpo", "AVG"), "ours"] == pytest.approx(51.0)
    assert cells.loc[("grpo", "A"), "n_seeds"] == 4


def test_versus_grpo_pairs_by_seed_else_uses_the_two_standard_errors():
    versus = versus_grpo(_evals(ROWS), COLUMNS).set_index("method")
    assert list(versus.index) == ["rlsd", "sdpo", "trace_fkl"]  # neither base nor grpo itself
    # paired: differences 10 1 4 -> mean 5, variance (25 + 16 + 1) / 2 = 21, se √7
    fkl = versus.loc["trace_fkl"]
    assert fkl["delta_avg"] == pytest.approx(5.0) and fkl["ci"] == "paired t over seeds 0 1 2"
    assert (fkl["ci_low"], fkl["ci_high"]) == pytest.approx((5 - T2 * math.sqrt(7), 5 + T2 * math.sqrt(7)))
    assert not fkl["significant"] and fkl["n_seeds"] == 3 and fkl["n_seeds_grpo"] == 3
    # one seed against three: normal, se² = (√29/2/z)² + 43/3; Δ = 35 − 51 = −16, significant
    sdpo = versus.loc["sdpo"]
    half = Z95 * math.sqrt((math.sqrt(29) / 2 / Z95) ** 2 + 43 / 3)
    assert sdpo["delta_avg"] == pytest.approx(-16.0) and sdpo["ci"] == "normal (independent AVG SEs)"
    assert (sdpo["ci_low"], sdpo["ci_high"]) == pytest.approx((-16 - half, -16 + half))
    assert sdpo["significant"] and sdpo["n_seeds"] == 1
    # one common seed only (2): not paired; Δ = 56 − 51 from the AVGs, se² = 4² + 43/3
    rlsd = versus.loc["rlsd"]
    assert rlsd["delta_avg"] == pytest.approx(5.0) and rlsd["ci"].startswith("normal")
    assert rlsd["ci_high"] == pytest.approx(5 + Z95 * math.sqrt(16 + 43 / 3))


def test_paired_ci_excluding_zero_is_significant():
    rows = [r for r in ROWS if r[0] in ("grpo", "trace_fkl")]
    rows = [(m, s, c, v + 10 if m == "trace_fkl" else v, h) for m, s, c, v, h in rows]  # differences 20 11 14
    fkl = versus_grpo(_evals(rows), COLUMNS).set_index("method").loc["trace_fkl"]
    assert fkl["delta_avg"] == pytest.approx(15.0) and fkl["ci_low"] == pytest.approx(15 - T2 * math.sqrt(7))
    assert fkl["significant"]


def test_the_written_tables_say_which_ci_each_row_has(tmp_path):
    aggregate = tmp_path / "aggregate"
    aggregate.mkdir()
    _evals(ROWS).to_csv(aggregate / "evals.csv", index=False)
    pd.DataFrame([{"model": "m", "method": "grpo", "seed": 0, "step": 0, "reward_mean": 0.5, "lambda": 0.0}]).to_csv(
        aggregate / "training_curves.csv", index=False)
    write_tables_and_figures({"benchmarks": {"a": "A", "b": "B"}, "methods": ["grpo", "trace_fkl", "sdpo"]},
                             aggregate, tmp_path)
    main = pd.read_csv(tmp_path / "tables" / "main_results.csv").set_index("method")
    assert main.loc["grpo", "n_seeds"] == 3 and main.loc["sdpo", "n_seeds"] == 1 and main.loc["base", "n_seeds"] == 1
    assert main.loc["grpo", "AVG_ci_high"] == pytest.approx(round(51 + T2 * math.sqrt(43 / 3), 2))
    assert "rlsd" not in main.index  # not a configured method: only in vs_grpo
    header = (tmp_path / "tables" / "main_results.md").read_text().splitlines()[0]
    assert "t-interval over seeds" in header and "percentile bootstrap" in header
    versus = pd.read_csv(tmp_path / "tables" / "vs_grpo.csv").set_index("method")
    assert list(versus.index) == ["rlsd", "sdpo", "trace_fkl"]
    assert versus.loc["trace_fkl", "ci_low"] == pytest.approx(round(5 - T2 * math.sqrt(7), 2))
    assert bool(versus.loc["sdpo", "significant"]) and "paper_delta_avg" not in versus
    assert "paired" in (tmp_path / "tables" / "vs_grpo.md").read_text().splitlines()[0]
