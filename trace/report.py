"""Aggregate per-run results into tidy CSVs, then draw every table and figure from those CSVs only.

    results/eval/<model>/<policy>/<benchmark>.json      -> results/aggregate/evals.csv, calibration.csv
    results/train/<model>/<method>/seed<s>/metrics.jsonl -> results/aggregate/training_curves.csv
    aggregate CSVs -> results/tables/*.md|csv, results/figures/*.png   (no GPU, no model)

The paper study (``compare_to_paper``) prints the paper's reported numbers
(trace/paper_results.csv, values exactly as TRACE.md §7 gives them) beside ours.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from trace.evaluation.calibration import problem_calibration, read_samples_log
from trace.evaluation.metrics import (CALIBRATION_STATISTICS, bootstrap_calibration_ci, bootstrap_ci,
                                      calibration_statistics, reliability_bins)
from trace.settings import ReportJob

VAL = "val/mean_at_k"  # validation mean@k after a step (trainer.validate), logged every validation.every steps
CONCENTRATION, LIFT = "probe/credit_concentration", "probe/logprob_lift_key_supported"  # trace/train/probe.py
# the fixed probe batch (the same base rollouts for every method; trace/train/probe.py)
MARGIN, MARGIN_CHANGE, FIXED_LIFT = ("probe/fixed_margin_first_error", "probe/fixed_margin_change",
                                     "probe/fixed_lift_key_supported")
# the KL channel per routed class: clipped (what the loss uses), unclipped, and how often the clip binds
KL_COLUMNS = tuple(f"kl/{name}_{metric}" for name in ("fkl_key", "rkl_error", "distill")
                   for metric in ("token_mean", "unclipped_token_mean", "clip_binds_frac"))
CURVE_COLUMNS = ("reward_mean", "entropy", "response_length", "lambda", "grad_norm", "span_coverage",
                 "teacher_entropy", "srpo_weight_raw_mean", VAL, "val/ci95_low", "val/ci95_high",
                 CONCENTRATION, LIFT, "probe/credit_inside", "probe/credit_outside",
                 MARGIN, MARGIN_CHANGE, FIXED_LIFT, *KL_COLUMNS)
MAP_COLUMNS = ["model", "method", "seed", "step", "position", "token", "credit", "span"]
PAPER_RESULTS = Path(__file__).with_name("paper_results.csv")
Z95 = 1.959964  # two-sided 95% normal quantile
EMA = 0.85      # curve smoothing of Fig. 1a: exponentially weighted mean, decay 0.85 (pandas ewm, alpha 0.15)


def _policy_method_seed(policy: str) -> tuple[str, int | None]:
    if policy == "base":
        return "base", None
    method, seed = policy.rsplit("-seed", 1)
    return method, int(seed)


def aggregate(job: ReportJob, eval_files: list[Path], metrics_files: list[Path], out_dir: Path,
              gap_files: list[Path] = (), curve_columns: tuple[str, ...] = CURVE_COLUMNS) -> None:
    """Exactly the given per-run files (the rule's declared inputs) -> the aggregate CSVs; nothing is
    globbed, so results of runs or seeds no longer in the config never reach a table. ``job``: anything with
    ``benchmarks`` ({benchmark: paper column}); ``curve_columns``: the metrics kept per training step."""
    benchmarks = job.benchmarks if hasattr(job, "benchmarks") else ReportJob.from_mapping(job).benchmarks
    eval_rows, calibration_rows, uncalibrated = [], [], []
    for path in eval_files:
        model, policy, benchmark = path.parts[-3], path.parts[-2], path.stem
        if benchmark not in benchmarks:
            raise ValueError(f"evaluation file {path}: benchmark {benchmark!r} is not in eval.benchmarks "
                             f"{sorted(benchmarks)}")
        result = json.loads(_existing(path).read_text())
        method, seed = _policy_method_seed(policy)
        low, high = result["ci95_avg_at_k"]
        eval_rows.append({"model": model, "method": method, "seed": seed, "benchmark": benchmark,
                          "column": benchmarks[benchmark], "k": result["k"], "n_problems": result["n_problems"],
                          "avg_at_k": 100 * result["avg_at_k"], "ci_low": 100 * low, "ci_high": 100 * high,
                          "pass_at_1": 100 * result["pass_at_k"]["1"]})
        problems = calibration_of(result, path)
        if problems is None:
            uncalibrated.append(str(path))
        calibration_rows += [{"model": model, "method": method, "seed": seed, "benchmark": benchmark,
                              "column": benchmarks[benchmark], "k": result["k"], **problem}
                             for problem in problems or []]
    if uncalibrated:
        logging.getLogger(__name__).warning(
            "%d evaluation result(s) have no calibration entry and no samples log beside them, so their problems "
            "are not in calibration.csv: %s%s", len(uncalibrated), ", ".join(uncalibrated[:3]),
            ", …" if len(uncalibrated) > 3 else "")
    if not eval_rows:
        raise FileNotFoundError(f"no evaluation results given (--evals) for benchmarks {list(benchmarks)}")
    curve_rows, map_rows = [], []
    for path in metrics_files:
        model, method, seed = path.parts[-4], path.parts[-3], int(path.parts[-2].removeprefix("seed"))
        for line in _existing(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                curve_rows.append({"model": model, "method": method, "seed": seed, "step": row["step"],
                                   **{c: row.get(c) for c in curve_columns}})
                if credit_map := row.get("probe/map"):  # Fig 6: one probed rollout, token by token
                    map_rows += [dict(zip(MAP_COLUMNS, (model, method, seed, row["step"], i, *token)))
                                 for i, token in enumerate(zip(credit_map["tokens"], credit_map["credit"],
                                                               credit_map["span"]))]
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(eval_rows).to_csv(out_dir / "evals.csv", index=False)
    pd.DataFrame(curve_rows, columns=["model", "method", "seed", "step", *curve_columns]).to_csv(
        out_dir / "training_curves.csv", index=False)
    pd.DataFrame(map_rows, columns=MAP_COLUMNS).to_csv(out_dir / "credit_maps.csv", index=False)
    pd.DataFrame(calibration_rows, columns=CALIBRATION_COLUMNS).to_csv(out_dir / "calibration.csv", index=False)
    gap_rows = [teacher_gap_row(json.loads(_existing(path).read_text()), path) for path in gap_files]
    pd.DataFrame(gap_rows, columns=GAP_COLUMNS).to_csv(out_dir / "teacher_gap.csv", index=False)


# calibration of agreement confidence (trace/evaluation/calibration.py): one row per (policy, benchmark, problem)
CALIBRATION_COLUMNS = ["model", "method", "seed", "benchmark", "column", "k", "id", "confidence",
                       "majority_correct", "accuracy"]


def calibration_of(result: dict, path: Path) -> list[dict] | None:
    """One evaluation's problems: id, agreement confidence, majority_correct (0/1) and accuracy (the problem's
    avg@k score). From the results JSON's ``calibration`` entry; a result written before it existed is
    scored from its samples log beside it (``<benchmark>.samples.jsonl``: answers and grades, no regrading);
    None without either."""
    scores = {str(entry["id"]): entry["score"] for entry in result.get("per_problem") or []}
    if block := result.get("calibration"):
        problems = block["per_problem"]
    elif (samples := path.with_name(f"{path.stem}.samples.jsonl")).is_file():
        rows = read_samples_log(samples)
        problems = problem_calibration(rows)
        scores = scores or {str(row["id"]): sum(row["grades"]) / len(row["grades"]) for row in rows}
    else:
        return None
    return [{"id": str(p["id"]), "confidence": p["confidence"], "majority_correct": int(p["majority_correct"]),
             "accuracy": scores.get(str(p["id"]))} for p in problems]


# the teacher check (trace/train/teacher_gap.py): one row per (model, teacher context), each statistic as
# mean / ci_low / ci_high / n; the markdown table's column title for each
GAP_STATS = {"first_error_correct": "Δ correct @1st error", "first_error_sampled": "Δ sampled @1st error",
             "first_error_sampled_relative": "Δ sampled @1st error − off-span Δ",
             "share_correct_up": "share correct ↑", "key_span": "Δ key span", "share_key_q_above_p": "share key q>p",
             "kl_span": "KL span", "kl_span_clipped": "KL span clipped", "clip_binds_span": "clip binds",
             "kl_off_span": "KL off span", "first_error_in_routed_span": "1st error routed",
             "accuracy_plain": "acc plain", "accuracy_teacher_prompt": "acc teacher prompt"}
GAP_COLUMNS = ["model", "context", "verdict", "verdict_basis", "annotator", "n_rollouts",
               *[f"{stat}_{part}" for stat in GAP_STATS for part in ("mean", "ci_low", "ci_high", "n")]]


def teacher_gap_row(gap: dict, path: Path) -> dict:
    row = {"model": gap.get("model", path.parent.name), "context": gap["context"], "verdict": gap["verdict"],
           "verdict_basis": gap["verdict_basis"], "annotator": gap.get("annotator"), "n_rollouts": gap["n_rollouts"]}
    for stat in GAP_STATS:
        row.update({f"{stat}_{part}": (gap.get(stat) or {}).get(part) for part in ("mean", "ci_low", "ci_high", "n")})
    return row


def teacher_gap_table(gaps: pd.DataFrame) -> pd.DataFrame:
    """Markdown shape: verdict and each statistic as 'mean [ci_low, ci_high]' (n/a without values)."""
    table = gaps[["model", "context", "verdict", "n_rollouts"]].copy()
    for stat, title in GAP_STATS.items():
        table[title] = [f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" if pd.notna(m) else "n/a"
                        for m, lo, hi in zip(gaps[f"{stat}_mean"], gaps[f"{stat}_ci_low"], gaps[f"{stat}_ci_high"])]
    return table.sort_values(["model", "context"]).set_index(["model", "context"])


# what the report reads from each aggregate CSV (a column it may do without is not listed)
AGGREGATE_COLUMNS = {"evals.csv": ("model", "method", "seed", "column", "k", "avg_at_k", "ci_low", "ci_high"),
                     "training_curves.csv": ("model", "method", "seed", "step", "lambda"),
                     "credit_maps.csv": tuple(MAP_COLUMNS),
                     "teacher_gap.csv": ("model", "context", "verdict", "first_error_correct_mean"),
                     "calibration.csv": tuple(CALIBRATION_COLUMNS)}
NUMERIC_COLUMNS = {"k", "avg_at_k", "ci_low", "ci_high", "step", "credit", "confidence", "majority_correct",
                   "accuracy"}


def read_aggregate_csv(path: Path, **read_csv) -> pd.DataFrame:
    """One aggregate CSV (AGGREGATE_COLUMNS by its name), checked: a missing or malformed file is one error
    naming the file, not a traceback from inside the drawing code."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    _check_rows(path)
    try:
        table = pd.read_csv(path, **read_csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not a readable CSV table ({str(exc).strip()})") from None
    needed = AGGREGATE_COLUMNS[path.name]
    if missing := [column for column in needed if column not in table]:
        raise ValueError(f"{path} lacks the column(s) {', '.join(missing)} (python -m trace aggregate writes them)")
    if text := [c for c in needed if c in NUMERIC_COLUMNS and len(table)
                and not pd.api.types.is_numeric_dtype(table[c])]:
        raise ValueError(f"{path}: column(s) {', '.join(text)} hold non-numbers")
    if path.name == "evals.csv" and table.empty:
        raise ValueError(f"{path} has no rows")
    return table


def _check_rows(path: Path) -> None:
    """Every row as wide as the header and a number wherever a number belongs, or one error naming the file
    and line: pandas pads a short row with NaN at its END, so a row missing a middle field would shift its
    values one column left and be drawn."""
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        try:
            header = next(rows, None)
            if header is None:
                return  # empty: read_csv's own error
            numeric = [(index, name) for index, name in enumerate(header) if name in NUMERIC_COLUMNS | {"seed"}]
            for row in rows:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path} line {rows.line_num}: {len(row)} fields, the header has {len(header)} "
                                     f"({', '.join(header)})")
                for index, name in numeric:
                    value = row[index]
                    try:
                        float(value) if value else None
                    except ValueError:
                        raise ValueError(f"{path} line {rows.line_num}: column {name} = {value!r} is not a number") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} line {rows.line_num}: not a readable CSV row ({exc})") from None


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"declared input {path} does not exist")
    return path


def main_table(evals: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Table 2's shape: rows (model, method), columns the paper's benchmarks + AVG (mean over seeds)."""
    cells = evals.groupby(["model", "method", "column"])["avg_at_k"].mean().unstack("column")
    cells = cells.reindex(columns=columns)
    cells["AVG"] = cells[columns].mean(axis=1)  # unweighted mean of the benchmark columns, as in the paper
    return _in_table_order(cells)


def _in_table_order(table: pd.DataFrame) -> pd.DataFrame:
    """Rows (model, method) sorted by model, then base, grpo, the other methods by name."""
    order = {"base": 0, "grpo": 1}
    return table.sort_index(key=lambda idx: idx.map(lambda v: (order.get(v, 2), v)) if idx.name == "method" else idx)


def with_avg_ci(table: pd.DataFrame, evals: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """main_table's rows plus the AVG's 95% CI (cell_estimates) and each row's number of seeds."""
    avg = cell_estimates(evals, columns).query("column == 'AVG'").set_index(["model", "method"])
    seeds = evals.groupby(["model", "method"])["seed"].nunique().clip(lower=1)  # the base has no seed: one
    return table.assign(AVG_ci_low=avg["ci_low"], AVG_ci_high=avg["ci_high"], n_seeds=seeds)


def ablation_table(evals: pd.DataFrame, columns: list[str], model: str, rows: dict[str, str]) -> pd.DataFrame:
    """Rows = {label: run name} on one model: benchmark columns, AVG, and AVG gain over that model's GRPO."""
    table = main_table(evals[evals["model"] == model], columns).droplevel("model")
    present = {label: run for label, run in rows.items() if run in table.index}
    out = table.loc[list(present.values())]
    out.index = pd.Index(list(present), name="variant")
    if "grpo" in table.index:
        out["gain_vs_grpo"] = out["AVG"] - table.loc["grpo", "AVG"]
    return out


def read_paper_results(path: Path = PAPER_RESULTS) -> pd.DataFrame:
    """The paper's reported numbers; ``value`` stays text (e.g. the range "1.0–1.1"), ``number`` is
    the value as a float where the paper states it exactly (relation "=")."""
    paper = pd.read_csv(path, dtype=str, keep_default_na=False)
    paper["number"] = pd.to_numeric(paper["value"].where(paper["relation"] == "="), errors="coerce")
    return paper


def t_quantile_95(df: int) -> float:
    """t_{0.975, df}, the two-sided 95% quantile of Student's t with df (≥ 1) degrees of freedom: bisection on
    the closed-form P(|T| ≤ t) for integer df (Abramowitz & Stegun 26.7.3/26.7.4); no scipy needed."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom, got {df}")

    def central(t: float) -> float:  # P(|T| ≤ t)
        theta = math.atan(t / math.sqrt(df))
        cos2, term, total = math.cos(theta) ** 2, 1.0, 0.0
        if df % 2 == 0:  # sinθ · [1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + … + cos^(df−2)θ term]
            for j in range(df // 2):
                total += term
                term *= (2 * j + 1) / (2 * j + 2) * cos2
            return math.sin(theta) * total
        term = math.cos(theta)  # (2/π)·(θ + sinθ · [cosθ + 2/3 cos³θ + … + cos^(df−2)θ term])
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= 2 * j / (2 * j + 1) * cos2
        return 2 / math.pi * (theta + math.sin(theta) * total)

    low, high = 0.0, 2.0
    while central(high) < 0.95:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if central(middle) < 0.95 else (low, middle)
    return (low + high) / 2


def _pooled_se(se: pd.Series) -> float:
    """se of the mean of independent estimates."""
    return float(np.sqrt((se ** 2).sum())) / len(se)


def per_seed_estimates(evals: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One row per (model, method, seed, column), AVG included: value, bootstrap se (CI width / 3.92), and the
    seed's own 95% CI (a benchmark cell: its percentile bootstrap; AVG: normal from the cells' bootstrap SEs,
    benchmarks independent). AVG is the mean of the seed's benchmark columns, only where it has all of them.
    The base policy (no seed) counts as one seed."""
    rows = evals[evals["column"].isin(columns)]
    rows = rows.assign(se=(rows["ci_high"] - rows["ci_low"]) / (2 * Z95))
    keys = ["model", "method", "seed"]
    cells = (rows.groupby([*keys, "column"], dropna=False)
             .agg(value=("avg_at_k", "mean"), se=("se", _pooled_se), ci_low=("ci_low", "mean"),
                  ci_high=("ci_high", "mean")).reset_index())
    by_seed = cells.groupby(keys, dropna=False)
    avg = by_seed.agg(value=("value", "mean"), se=("se", _pooled_se), n_columns=("column", "size")).reset_index()
    avg = avg[avg.pop("n_columns") == len(columns)].assign(column="AVG")
    avg = avg.assign(ci_low=avg["value"] - Z95 * avg["se"], ci_high=avg["value"] + Z95 * avg["se"])
    return pd.concat([cells, avg], ignore_index=True)


def t_interval(values: pd.Series) -> tuple[float, float, float]:
    """mean, se = sd/√n and the half-width t_{0.975, n−1}·se of n ≥ 2 values (seeds)."""
    n = len(values)
    mean, se = float(values.mean()), float(values.std(ddof=1)) / math.sqrt(n)
    return mean, se, t_quantile_95(n - 1) * se


CI_KINDS = {"cell": "bootstrap", "AVG": "normal (bootstrap SEs)", "seeds": "t over seeds"}


def cell_estimates(evals: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Our value and 95% CI per (model, method, column), AVG included (only for seeds with every column);
    columns ours, n_seeds, se, ci_low, ci_high and ci (the CI's kind, CI_KINDS).

    n ≥ 2 seeds: the mean over seeds and the t-interval over seeds, mean ± t_{0.975, n−1}·sd/√n (AVG: per
    seed first, then across seeds); it covers seed-to-seed variance (and evaluation sampling within it).
    One seed: a benchmark cell's percentile-bootstrap CI as evaluated; AVG a normal CI from the cells'
    bootstrap standard errors (evaluation sampling only)."""
    rows = []
    for (model, method, column), seeds in per_seed_estimates(evals, columns).groupby(["model", "method", "column"]):
        row = {"model": model, "method": method, "column": column, "n_seeds": len(seeds)}
        if len(seeds) == 1:
            one = seeds.iloc[0]
            row.update(ours=one["value"], se=one["se"], ci_low=one["ci_low"], ci_high=one["ci_high"],
                       ci=CI_KINDS["AVG" if column == "AVG" else "cell"])
        else:
            mean, se, half = t_interval(seeds["value"])
            row.update(ours=mean, se=se, ci_low=mean - half, ci_high=mean + half, ci=CI_KINDS["seeds"])
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "method", "column", "ours", "n_seeds", "se", "ci_low", "ci_high",
                                       "ci"])


def versus_grpo(evals: pd.DataFrame, columns: list[str], paper: pd.DataFrame | None = None,
                paper_models: dict[str, str] | None = None) -> pd.DataFrame:
    """Δ AVG = run − GRPO on the same model, for every run but base and grpo, with a 95% CI: paired by seed
    (the t-interval of the per-seed differences) where both have ≥ 2 common seeds, else a normal CI from
    the two AVG standard errors (independent). significant: the CI excludes 0. With the paper's results,
    paper_delta_avg: its AVG difference (Table 2) or, for a '<method>@<tier>' run, its Table 3 gain."""
    per_seed = per_seed_estimates(evals, columns).query("column == 'AVG'").set_index(["model", "method"])
    avg = cell_estimates(evals, columns).query("column == 'AVG'").set_index(["model", "method"])
    rows = []
    for (model, method), run in avg.iterrows():
        if method in ("base", "grpo") or (model, "grpo") not in avg.index:
            continue
        grpo = avg.loc[(model, "grpo")]
        mine, theirs = (per_seed.loc[[(model, m)]].set_index("seed")["value"] for m in (method, "grpo"))
        common = sorted(set(mine.index.dropna()) & set(theirs.index.dropna()))
        if len(common) >= 2:
            delta, _, half = t_interval(mine[common] - theirs[common])
            kind = f"paired t over seeds {' '.join(str(int(s)) for s in common)}"
        else:
            delta, half = run["ours"] - grpo["ours"], Z95 * math.hypot(run["se"], grpo["se"])
            kind = "normal (independent AVG SEs)"
        rows.append({"model": model, "method": method, "avg": run["ours"], "grpo_avg": grpo["ours"],
                     "delta_avg": delta, "ci_low": delta - half, "ci_high": delta + half,
                     "significant": bool(delta - half > 0 or delta + half < 0), "n_seeds": int(run["n_seeds"]),
                     "n_seeds_grpo": int(grpo["n_seeds"]), "ci": kind})
    out = pd.DataFrame(rows, columns=["model", "method", "avg", "grpo_avg", "delta_avg", "ci_low", "ci_high",
                                      "significant", "n_seeds", "n_seeds_grpo", "ci"])
    if paper is not None:
        out["paper_delta_avg"] = [_paper_delta(paper, (paper_models or {}).get(m, m), method)
                                  for m, method in zip(out["model"], out["method"])]
    return out.sort_values(["model", "method"], ignore_index=True)


def _paper_delta(paper: pd.DataFrame, paper_model: str, run: str) -> float:
    """The paper's AVG gain of a run over GRPO: Table 3's for a tier run, else the Table 2 AVG difference."""
    method, _, tier = run.partition("@")
    mine = paper["model"] == paper_model
    if tier:
        gain = paper[mine & (paper["item"] == "table3") & (paper["method"] == tier)]["number"]
        return float(gain.iloc[0]) if len(gain) else np.nan
    table2 = paper[mine & (paper["item"] == "table2") & (paper["metric"] == "AVG")].set_index("method")["number"]
    return float(table2.get(method, np.nan) - table2.get("grpo", np.nan))


def paper_comparison(evals: pd.DataFrame, columns: list[str], paper: pd.DataFrame,
                     paper_models: dict[str, str]) -> pd.DataFrame:
    """Table 2 side by side, one row per (model, method, column): ours with CI, the paper's value
    where TRACE.md has one, and diff = ours − paper where the paper states it exactly."""
    ours = cell_estimates(evals, columns)
    ours["paper_model"] = ours["model"].map(lambda m: paper_models.get(m, m))
    known = paper[paper["item"] == "table2"].rename(columns={"model": "paper_model", "metric": "column",
                                                             "value": "paper"})
    out = ours.merge(known[["paper_model", "method", "column", "relation", "paper", "number", "source"]],
                     on=["paper_model", "method", "column"], how="left")
    out["diff"] = out["ours"] - out.pop("number")
    return out


def _cell_text(row) -> str:
    """'ours [lo, hi]', then the paper's value and ours − paper where the paper has one."""
    text = f"{row['ours']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"
    if isinstance(row.get("paper"), str) and row["paper"]:
        relation = "" if row["relation"] == "=" else row["relation"]
        text += f" · paper {relation}{row['paper']}"
        if pd.notna(row["diff"]):
            text += f" · Δ {row['diff']:+.2f}"
    return text


def side_by_side(comparison: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Wide table of cell texts, rows (model, method) in main_table's order."""
    cells = comparison.assign(text=comparison.apply(_cell_text, axis=1))
    wide = cells.pivot(index=["model", "method"], columns="column", values="text")
    wide = wide.reindex(columns=[*columns, "AVG"]).fillna("—")
    wide["n_seeds"] = comparison.groupby(["model", "method"])["n_seeds"].max()
    return _in_table_order(wide)


def tier_comparison(evals: pd.DataFrame, columns: list[str], model: str, rows: dict[str, str],
                    paper_keys: dict[str, str], paper: pd.DataFrame, paper_model: str) -> pd.DataFrame:
    """Table 3 as the paper reports it: AVG gain over the same model's GRPO, ours with versus_grpo's 95% CI
    (paired by seed, else from the two AVGs' standard errors) beside the paper's gain. A row's paper key
    is paper_keys[label], else the label itself (the tier name: self, frozen, static)."""
    table = ablation_table(evals, columns, model, rows)
    if "gain_vs_grpo" not in table:
        return table
    versus = versus_grpo(evals[evals["model"] == model], columns).set_index("method")
    gains = versus.reindex([rows[label] for label in table.index]).set_index(table.index)
    table["gain_ci_low"], table["gain_ci_high"] = gains["ci_low"], gains["ci_high"]
    paper_gains = paper[(paper["item"] == "table3") & (paper["model"] == paper_model)].set_index("method")["number"]
    table["paper_gain_vs_grpo"] = [paper_gains.get(paper_keys.get(label, label), np.nan) for label in table.index]
    table["diff_gain"] = table["gain_vs_grpo"] - table["paper_gain_vs_grpo"]
    return table


def _ema_ends(curves: pd.DataFrame, model: str, method: str, column: str, smooth: bool = True) -> tuple[float, float]:
    """First and last value of a run's seed-mean curve as drawn (EMA 0.85 unless smooth is False)."""
    runs = curves[(curves["model"] == model) & (curves["method"] == method)]
    mean = runs.groupby("step")[column].mean().dropna() if column in runs else pd.Series(dtype=float)
    if mean.empty:
        return np.nan, np.nan
    drawn = mean.ewm(alpha=1 - EMA).mean() if smooth else mean
    return float(drawn.iloc[0]), float(drawn.iloc[-1])


def figure_numbers(curves: pd.DataFrame, paper: pd.DataFrame, tier_runs: dict[str, str] | None) -> pd.DataFrame:
    """The paper's figure and mechanism numbers beside ours per model where the aggregate supports
    them (ends of the EMA-smoothed curves as drawn); '—' where it does not (yet)."""
    # TRACE.md's "TRACE" in Fig. 8 names no variant: compared with the default corner, TRACE-FKL
    method_of = {"trace": "trace_fkl"}

    def ours(row, model):
        method = method_of.get(row["method"], row["method"])
        metric = row["metric"]
        if metric.startswith(("response_length_", "srpo_weight_")):
            column = "response_length" if metric.startswith("response_length_") else "srpo_weight_raw_mean"
            first, last = _ema_ends(curves, model, method, column)
            return first if metric.endswith("_start") else last
        if metric == "entropy":
            return _ema_ends(curves, model, method, "entropy")[1]
        if metric == "entropy_ratio_vs_grpo":
            return _ema_ends(curves, model, method, "entropy")[1] / _ema_ends(curves, model, "grpo", "entropy")[1]
        if metric in ("credit_concentration", "logprob_lift_key_tokens") and method != "others":
            column = CONCENTRATION if metric == "credit_concentration" else LIFT
            runs = curves[(curves["model"] == model) & (curves["method"] == method)]
            return runs[column].mean() if column in runs else np.nan
        if metric == "final_val_gap_vs_strong" and tier_runs and row["method"] in tier_runs:
            return 100 * (_ema_ends(curves, model, tier_runs[row["method"]], VAL, smooth=False)[1] -
                          _ema_ends(curves, model, tier_runs["strong"], VAL, smooth=False)[1])
        return np.nan

    figures = paper[paper["item"].str.startswith(("fig", "mechanism"))]
    rows = []
    for _, row in figures.iterrows():
        for model in sorted(curves["model"].unique()):
            value = ours(row, model)
            rows.append({"item": row["item"], "metric": row["metric"], "method": row["paper_name"],
                         "model": model, "ours": value,
                         "paper": ("" if row["relation"] == "=" else row["relation"]) + row["value"],
                         "unit": row["unit"], "note": row["note"], "source": row["source"]})
    return pd.DataFrame(rows)


# the paper's mechanism numbers per method (TRACE.md §7; its "TRACE" is compared with TRACE-FKL)
PAPER_MECHANISM = {CONCENTRATION: {"trace_fkl": "8.5", **dict.fromkeys(["grpo", "sdpo", "srpo", "rlsd"], "1.0–1.1")},
                   LIFT: {"trace_fkl": "0.145", "grpo": "0.054"}}


def mechanism_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Credit concentration (Fig 6) and one-step log-prob lift per (model, method): at step 0 (every
    method probes the same rollouts of the same base policy) and the mean over all probed steps and
    seeds, beside the paper's values (TRACE.md §7, Qwen3; no model stated)."""
    columns = [c for c in (CONCENTRATION, LIFT, MARGIN) if c in curves]
    probed = curves.dropna(subset=columns, how="all") if columns else curves.iloc[0:0]
    rows = []
    for (model, method), runs in probed.groupby(["model", "method"]):
        first = runs[runs["step"] == runs["step"].min()]
        row = {"model": model, "method": method, "probe_steps": " ".join(map(str, sorted(runs["step"].unique())))}
        for column, name in ((CONCENTRATION, "credit_concentration"), (LIFT, "logprob_lift")):
            row[f"{name}_first_step"] = first[column].mean() if column in runs else np.nan
            row[f"{name}_mean"] = runs[column].mean() if column in runs else np.nan
            row[f"paper_{name}"] = PAPER_MECHANISM[column].get(method, "")
        # the fixed batch: one update's margin change (mean over probed steps), and the margin itself at
        # the first and the last probed step (how much of the base's first errors training has fixed)
        fixed = runs.dropna(subset=[MARGIN]) if MARGIN in runs else runs.iloc[0:0]
        last = fixed[fixed["step"] == fixed["step"].max()]
        row["margin_change_mean"] = fixed[MARGIN_CHANGE].mean() if len(fixed) else np.nan
        row["margin_first_step"] = fixed[fixed["step"] == fixed["step"].min()][MARGIN].mean() if len(fixed) else np.nan
        row["margin_last_step"] = last[MARGIN].mean() if len(fixed) else np.nan
        row["fixed_lift_mean"] = fixed[FIXED_LIFT].mean() if len(fixed) and FIXED_LIFT in fixed else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "method", "probe_steps", "credit_concentration_first_step",
                                       "credit_concentration_mean", "paper_credit_concentration",
                                       "logprob_lift_first_step", "logprob_lift_mean", "paper_logprob_lift",
                                       "margin_change_mean", "margin_first_step", "margin_last_step",
                                       "fixed_lift_mean"])


CALIBRATION_BOOTSTRAP = 2000  # resamples of the calibration table's CIs (over problems)
ALL_BENCHMARKS = "all"        # the calibration table's rows pooled over every benchmark's problems
CALIBRATION_VALUES = ("avg_at_k", "majority_accuracy", "mean_confidence", "ece", "brier")


def _method_order(method: str) -> tuple[int, str]:
    return {"base": 0, "grpo": 1}.get(method, 2), method


def calibration_table(calibration: pd.DataFrame, benchmarks: list[str], n_bins: int,
                      n_boot: int = CALIBRATION_BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """Per (model, method), pooled over its benchmarks' problems (benchmark 'all') and per benchmark: avg@k
    (the problems' mean accuracy over the k samples), majority accuracy, mean agreement confidence, ECE
    (n_bins equal-width bins) and Brier score. Each value is the mean over seeds (the base: one), its 95% CI a
    percentile bootstrap over problems that draws one set of problems for every seed: it covers which problems
    were drawn, not seed-to-seed variance. A problem enters only where every seed has it."""
    columns = ["model", "method", "benchmark", "n_seeds", "n_problems", "k", "n_bins",
               *[f"{name}{part}" for name in CALIBRATION_VALUES for part in ("", "_ci_low", "_ci_high")]]
    rows = []
    data = calibration.assign(seed=calibration["seed"].fillna(-1).astype(int), id=calibration["id"].astype(str))
    for (model, method), policy in data.groupby(["model", "method"]):
        found = set(policy["benchmark"])
        scopes = [ALL_BENCHMARKS, *[b for b in benchmarks if b in found], *sorted(found - set(benchmarks))]
        for scope in scopes:
            part = policy if scope == ALL_BENCHMARKS else policy[policy["benchmark"] == scope]
            wide = (part.set_index(["benchmark", "id", "seed"])[["confidence", "majority_correct", "accuracy"]]
                    .unstack("seed"))
            wide = wide[wide[["confidence", "majority_correct"]].notna().all(axis=1)]  # in every seed
            confidence, correct = wide["confidence"].to_numpy().T, wide["majority_correct"].to_numpy().T
            if confidence.size == 0:
                continue
            row = {"model": model, "method": method, "benchmark": scope, "n_seeds": confidence.shape[0],
                   "n_problems": confidence.shape[1], "k": int(part["k"].max()), "n_bins": int(n_bins)}
            accuracy = wide["accuracy"].to_numpy().T
            if np.isnan(accuracy).any():
                row.update(avg_at_k=np.nan, avg_at_k_ci_low=np.nan, avg_at_k_ci_high=np.nan)
            else:  # the same resamples as below (same seed, size and count)
                low, high = bootstrap_ci(accuracy.mean(axis=0), n_boot=n_boot, seed=seed)
                row.update(avg_at_k=float(accuracy.mean()), avg_at_k_ci_low=low, avg_at_k_ci_high=high)
            values = calibration_statistics(confidence, correct, n_bins)
            ci = bootstrap_calibration_ci(confidence, correct, n_bins, n_boot=n_boot, seed=seed)
            for name in CALIBRATION_STATISTICS:
                row.update({name: float(values[name].mean()), f"{name}_ci_low": ci[name][0],
                            f"{name}_ci_high": ci[name][1]})
            rows.append(row)
    order = {b: i for i, b in enumerate([ALL_BENCHMARKS, *benchmarks])}
    rows.sort(key=lambda r: (r["model"], _method_order(r["method"]), order.get(r["benchmark"], len(order)),
                             r["benchmark"]))
    return pd.DataFrame(rows, columns=columns)


def calibration_markdown(table: pd.DataFrame) -> pd.DataFrame:
    """The pooled rows (benchmark 'all'), each value as 'value [ci_low, ci_high]'."""
    pooled = table[table["benchmark"] == ALL_BENCHMARKS]
    out = pooled[["model", "method", "n_seeds", "n_problems"]].copy()
    titles = {"avg_at_k": "avg@k", "majority_accuracy": "majority acc", "mean_confidence": "confidence",
              "ece": "ECE", "brier": "Brier"}
    for name, title in titles.items():
        out[title] = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if pd.notna(v) else "n/a"
                      for v, lo, hi in zip(pooled[name], pooled[f"{name}_ci_low"], pooled[f"{name}_ci_high"])]
    return out.set_index(["model", "method"])


def _write_calibration(plt, job: ReportJob, calibration: pd.DataFrame, runs: list[str], tables: Path,
                       figures: Path) -> None:
    """tables/calibration.{md,csv} and figures/calibration.png (the reliability diagram)."""
    table = calibration_table(calibration, list(job.benchmarks), job.calibration_bins)
    table.round(4).to_csv(tables / "calibration.csv", index=False)
    k = sorted({int(v) for v in table["k"]}) if len(table) else []
    header = (f"Calibration of agreement confidence over the k samples (k = {', '.join(map(str, k)) or 'n/a'}; "
              "trace/evaluation/calibration.py): a problem's confidence is the share of its samples whose final "
              "answer is the majority answer (no answer counts as one answer), its correctness the grader's verdict "
              f"on the majority answer. ECE over {job.calibration_bins} equal-width confidence bins "
              "(eval.calibration_bins), Brier = mean (confidence − correct)², all in [0, 1], beside avg@k (the "
              "mean per-problem accuracy over the k samples). Rows pooled over every benchmark's problems; the .csv "
              "also per benchmark. Mean over seeds [95% percentile bootstrap CI over problems, "
              f"{CALIBRATION_BOOTSTRAP} resamples, one draw of problems for every seed: not seed-to-seed variance]")
    if table.empty:
        header += ". No calibration data in the aggregate (evaluations without a calibration entry or samples log)"
    _write_markdown(calibration_markdown(table), tables, "calibration", header)
    _calibration_figure(plt, calibration, table, runs, job.calibration_bins, figures / "calibration.png")


def _calibration_figure(plt, calibration: pd.DataFrame, table: pd.DataFrame, runs: list[str], n_bins: int,
                        path: Path) -> None:
    """Reliability diagram per model (pooled over benchmarks and seeds): majority accuracy against mean
    agreement confidence per non-empty bin, one line per run (base and the main methods), the diagonal is
    perfect calibration; below, each run's share of problems per bin."""
    data = calibration[calibration["method"].isin(runs)]
    if data.empty:
        _placeholder_figure(plt, "no calibration data in the aggregate", path)
        return
    models = sorted(data["model"].unique())
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {run: palette[i % len(palette)] for i, run in enumerate(runs)}
    pooled = table[table["benchmark"] == ALL_BENCHMARKS].set_index(["model", "method"])
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 6.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.2]})
    for c, model in enumerate(models):
        diagram, shares = axes[0][c], axes[1][c]
        diagram.plot([0, 1], [0, 1], ":", color="0.5", lw=1)
        of_model = data[data["model"] == model]
        for method in sorted(set(of_model["method"]), key=_method_order):
            part = of_model[of_model["method"] == method]
            bins = [b for b in reliability_bins(part["confidence"], part["majority_correct"], n_bins) if b["count"]]
            ece = pooled["ece"].get((model, method), np.nan)
            diagram.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "-o", markersize=4,
                         color=colors.get(method), label=f"{method} (ECE {ece:.3f})")
            shares.plot([(b["low"] + b["high"]) / 2 for b in bins], [b["count"] / len(part) for b in bins], "-o",
                        markersize=3, color=colors.get(method))
        diagram.set(xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), xlabel="agreement confidence", ylabel="majority accuracy")
        diagram.set_title(f"{model}: reliability ({n_bins} bins; benchmarks, seeds pooled)", fontsize=9)
        diagram.legend(fontsize=7)
        shares.set(xlim=(-0.03, 1.03), ylim=(0, 1.05), xlabel="agreement confidence (bin centre)",
                   ylabel="share of problems")
        shares.set_title(f"{model}: problems per bin", fontsize=9)
    fig.tight_layout()
    _save(plt, fig, path)


def _write_table(table: pd.DataFrame, tables: Path, name: str, header: str) -> None:
    table.to_csv(tables / f"{name}.csv")
    _write_markdown(table, tables, name, header)


@dataclasses.dataclass(frozen=True)
class Panel:
    """One subplot: a curve column (or several, e.g. actor vs teacher entropy), optionally for a few
    runs only; sparse series (validation) are drawn unsmoothed with markers."""
    columns: tuple[str, ...]
    title: str
    runs: tuple[str, ...] | None = None
    smooth: bool = True
    band: tuple[str, str] | None = None  # columns of a shaded interval around the line (e.g. a 95% CI)


TRAIN_REWARD = Panel(("reward_mean",), "training reward")
ENTROPY = Panel(("entropy",), f"per-token entropy (nats), EMA {EMA}")
LENGTH = Panel(("response_length",), "response length (tokens)")
VALIDATION = Panel((VAL,), "validation mean@k (held-out), 95% CI", smooth=False,
                   band=("val/ci95_low", "val/ci95_high"))


def write_tables_and_figures(job: ReportJob, aggregate_dir: Path, out_dir: Path) -> None:
    """job: benchmarks {benchmark: paper column}, methods, ablations; for the paper study also
    compare_to_paper: true and paper_models {our model name: the paper's, e.g. Qwen3-8B}."""
    job = ReportJob.from_mapping(job)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = read_aggregate_csv(aggregate_dir / "evals.csv")
    curves = read_aggregate_csv(aggregate_dir / "training_curves.csv")
    columns = list(dict.fromkeys(job.benchmarks.values()))
    tables, figures = out_dir / "tables", out_dir / "figures"
    tables.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    compare = job.compare_to_paper
    paper = read_paper_results() if compare else None
    paper_models = job.paper_models
    k = int(evals["k"].iloc[0])
    legend = (f"avg@{k}, %; benchmark columns are the paper's, filled by this study's benchmarks: "
              f"{', '.join(f'{b} → {c}' for b, c in job.benchmarks.items())}")
    main_runs = ["base", *(job.methods if job.methods is not None else evals["method"].unique())]
    main_evals = evals[evals["method"].isin(main_runs)]
    table = with_avg_ci(main_table(main_evals, columns), main_evals, columns).round(2)
    if compare:
        comparison = paper_comparison(main_evals, columns, paper, paper_models)
        comparison.round(4).to_csv(tables / "main_results_vs_paper.csv", index=False)
        table.to_csv(tables / "main_results.csv")  # ours, numeric; the markdown shows the paper beside it
        _write_markdown(side_by_side(comparison, columns), tables, "main_results",
                        f"Main results (Table 2) beside the paper's: ours [95% CI] · paper (TRACE.md §7) · "
                        f"Δ = ours − paper; {legend}; {CI_NOTE}")
    else:
        _write_table(table, tables, "main_results", f"Main results (Table 2 shape; {legend}); AVG_ci_*: {CI_NOTE}")
    versus = versus_grpo(evals, columns, paper, paper_models)
    _write_table(versus.round(2).set_index(["model", "method"]), tables, "vs_grpo",
                 f"Δ AVG = run − GRPO on the same model (avg@{k}, points), every trained run; 95% CI paired by "
                 "seed (t-interval of the per-seed AVG differences) where both runs have ≥ 2 common seeds, else "
                 "normal from the two AVGs' standard errors (ci says which); significant: the CI excludes 0"
                 + ("; paper_delta_avg: the paper's AVG difference (TRACE.md §7 Table 2; tier runs: Table 3 gain)"
                    if compare else ""))

    ablations = job.ablations
    tier_runs = None
    if tiers := ablations.annotator_tiers:
        # the main run of the same method uses train.annotator: the strongest tier (API / toy oracle)
        strong = f"strong ({tiers.method}, train.annotator)"
        rows = {strong: tiers.method, **{tier: f"{tiers.method}@{tier}" for tier in tiers.tiers}}
        tier_runs = {"strong": tiers.method, **{tier: run for tier, run in rows.items() if tier != strong}}
        header = f"Annotator tiers (Table 3 shape) on {tiers.model}; gain_vs_grpo = AVG − GRPO's AVG ({legend})"
        if compare:
            tier_table = tier_comparison(evals, columns, tiers.model, rows, {strong: "strong"}, paper,
                                         paper_models.get(tiers.model, tiers.model))
            header += ("; gain 95% CI from the two AVGs' CIs; paper_gain_vs_grpo from TRACE.md §7 Table 3; "
                       "diff_gain = ours − paper")
        else:
            tier_table = ablation_table(evals, columns, tiers.model, rows)
        _write_table(tier_table.round(2), tables, "annotator_tiers", header)
    if masks := ablations.mask_localisation:
        rows = {"annotated spans (trace_fkl)": "trace_fkl", **{m: m for m in masks.methods}}
        header = f"Mask localisation (Table 4 shape) on {masks.model} ({legend})"
        if compare:
            header += ("; the paper (TRACE.md §7 Table 4) reports only the order annotated spans > random 25% > "
                       "all-token, inverted 25%: no numbers to compare")
        _write_table(ablation_table(evals, columns, masks.model, rows).round(2), tables, "mask_localisation",
                     header)
    mechanism = mechanism_table(curves).round(4).set_index(["model", "method"])
    _write_table(mechanism, tables, "mechanism",
                 "Mechanism measurements (trace/train/probe.py) on train.probe.steps: credit concentration = mean "
                 "|Δ log π(y_t)| of one update inside the annotated spans / outside (Fig 6); log-prob lift = mean "
                 "Δ log π(y_t) on key-span tokens the teacher supports (nats). first_step: the first probed step "
                 "(step 0: every method updates from the same rollouts); mean: over probed steps and seeds. paper_*: "
                 "TRACE.md §7 (Qwen3; its 'TRACE' compared with trace_fkl, '1.0–1.1' for the other methods), a "
                 "reference, not a like-for-like target in the toy world. On the FIXED probe batch (the teacher "
                 "check's base rollouts, the same for every method): margin = log π(correct) − log π(sampled wrong) "
                 "at the first error token of incorrect rollouts, at the first and the last probed step (higher: "
                 "closer to fixing the base's errors), margin_change_mean = its change over one update, mean over "
                 "probed steps; fixed_lift_mean = one update's mean Δ log π on key tokens the label teacher "
                 "supports")
    maps_path = aggregate_dir / "credit_maps.csv"
    maps = (read_aggregate_csv(maps_path, keep_default_na=False) if maps_path.exists()
            else pd.DataFrame(columns=MAP_COLUMNS))
    _credit_map_figure(plt, maps, main_runs, figures / "fig6_credit_map.png")
    gaps_path = aggregate_dir / "teacher_gap.csv"
    if gaps_path.exists():  # caches from before the teacher check have none
        gaps = read_aggregate_csv(gaps_path)
        _write_markdown(teacher_gap_table(gaps), tables, "teacher_gap",
                        "Teacher check before RL (trace/train/teacher_gap.py): the base given its teacher's private "
                        "context (label | reference) vs the same base on the plain prompt, on a fixed batch of its own "
                        "rollouts annotated by train.annotator; mean [95% bootstrap CI over rollouts] in nats unless a "
                        "share or an accuracy. Δ = log q − log p; 1st error: the first error token of an incorrect "
                        "rollout (correct: the correct token there, sampled: the wrong one); KL(q‖p) per token, "
                        "unclipped, beside the clipped value the loss would use and the share of tokens the clip "
                        "binds. verdict: better / worse when the CI of Δ correct excludes 0; distillation runs refuse "
                        "a worse teacher (teacher_check.on_worse)", disable_numparse=True)
        gaps.to_csv(tables / "teacher_gap.csv", index=False)
    if compare:
        numbers = figure_numbers(curves, paper, tier_runs).round(4).set_index("item")
        numbers.to_csv(tables / "paper_figure_numbers.csv")
        _write_markdown(numbers.astype(object).where(numbers.notna(), None), tables, "paper_figure_numbers",
                        "The paper's figure and mechanism numbers (TRACE.md §7) beside ours. Ours: the first / last "
                        "value of our EMA-smoothed curve as drawn (start / end; entropy: last; entropy ratio: last "
                        "over GRPO's last; validation gap: last points, unsmoothed), mean over seeds; the paper's "
                        "unnamed 'TRACE' is compared with trace_fkl; — where the aggregate has no such quantity",
                        missingval="—")

    main_figure_runs = {model: [m for m in main_runs if m != "base"] for model in sorted(curves["model"].unique())}
    _curve_figure(plt, curves, main_figure_runs, [TRAIN_REWARD, ENTROPY, LENGTH], figures / "training_curves.png")
    # Fig. 1a: entropy vs step; Fig. 3: validation mean@k (and training reward) vs step, all methods
    _curve_figure(plt, curves, main_figure_runs, [ENTROPY], figures / "fig1a_entropy.png")
    _curve_figure(plt, curves, main_figure_runs, [VALIDATION, TRAIN_REWARD], figures / "validation_curves.png")
    # Fig. 8: (a) length, (b) entropy, (c) SRPO actor vs its EMA teacher's entropy, (d) SRPO suppression weight
    _curve_figure(plt, curves, main_figure_runs,
                  [LENGTH, ENTROPY, Panel(("entropy", "teacher_entropy"), "SRPO: actor vs teacher entropy", ("srpo",)),
                   Panel(("srpo_weight_raw_mean",), "SRPO weight mean exp(−β·H_teacher)", ("srpo",))],
                  figures / "fig8_dynamics.png")
    # Figs. 4 and 7: the ablations' validation curves, KL window shaded
    ablation_panels = [TRAIN_REWARD, ENTROPY, Panel(("span_coverage",), "routed-token coverage"), VALIDATION]
    if tiers:
        runs = ["grpo", tiers.method, *(f"{tiers.method}@{tier}" for tier in tiers.tiers)]
        _curve_figure(plt, curves, {tiers.model: runs}, ablation_panels, figures / "annotator_tiers.png")
    if masks:
        runs = ["grpo", "trace_fkl", *masks.methods]
        _curve_figure(plt, curves, {masks.model: runs}, ablation_panels, figures / "mask_localisation.png")
    calibration_path = aggregate_dir / "calibration.csv"
    if calibration_path.exists():  # caches from before issue 23 have none: no calibration table or figure
        _write_calibration(plt, job, read_aggregate_csv(calibration_path, dtype={"id": str}), main_runs, tables,
                           figures)


def _placeholder_figure(plt, text: str, path: Path) -> None:
    """A figure the aggregate has no data for: one grey line saying so."""
    fig, ax = plt.subplots(figsize=(6, 1.5))
    ax.text(0.5, 0.5, text, ha="center", va="center", color="0.5")
    ax.axis("off")
    _save(plt, fig, path)


def _credit_map_figure(plt, maps: pd.DataFrame, runs: list[str], path: Path) -> None:
    """Fig 6: one probed rollout, one row per method, each token coloured by its share of the row's
    largest |Δ log π| and the annotated spans boxed. Drawn for the first model and the first probed
    step, where every method updates from the same rollout."""
    maps = maps[maps["method"].isin(runs)]
    if maps.empty:
        _placeholder_figure(plt, "no credit map in the aggregate (train.probe.steps)", path)
        return
    model = sorted(maps["model"].unique())[0]
    maps = maps[(maps["model"] == model) & (maps["seed"] == maps["seed"].min())]
    step = _most_different_step(maps)
    maps = maps[maps["step"] == step]
    methods = [m for m in runs if m in set(maps["method"])]
    width = int(maps["position"].max()) + 1
    fig, axes = plt.subplots(len(methods), 1, figsize=(max(6, 0.14 * width), 0.9 * len(methods) + 0.8),
                             squeeze=False)
    for ax, method in zip(axes[:, 0], methods):
        row = maps[maps["method"] == method].sort_values("position")
        credit = row["credit"].to_numpy(dtype=float)
        ax.imshow((credit / max(credit.max(), 1e-12))[None, :], aspect="auto", cmap="Reds", vmin=0, vmax=1)
        for start, stop in _runs_of_ones(row["span"].to_numpy(dtype=int)):
            ax.add_patch(plt.Rectangle((start - 0.5, -0.5), stop - start, 1, fill=False, edgecolor="tab:blue", lw=1.5))
        inside, outside = credit[row["span"] == 1].mean(), credit[row["span"] == 0].mean()
        ax.set_yticks([0], [f"{method}\n{inside / outside:.1f}×" if outside > 0 else method], fontsize=7)
        ax.set_xticks([])
    per_method = [tuple(maps[maps["method"] == m].sort_values("position")["token"]) for m in methods]
    if len(set(per_method)) == 1:  # the same rollout for every method (step 0): label its tokens
        tokens = [str(t).replace("Ġ", "␣").replace("Ċ", "⏎") for t in per_method[0]]
        axes[-1, 0].set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=5)
    import textwrap

    title = (f"{model}, step {step}: per-token |Δ log π| of one update (row-normalised), annotated spans boxed; "
             "inside/outside ratio under each name")
    axes[0, 0].set_title("\n".join(textwrap.wrap(title, int(fig.get_figwidth() * 13))), fontsize=8)
    fig.tight_layout()
    _save(plt, fig, path)


def _most_different_step(maps: pd.DataFrame) -> int:
    """The probed step whose credit maps differ most between methods: the largest spread (max − min over
    methods) of log inside/outside credit ratio; the first step on ties or with one method."""
    spread = {}
    for step, at_step in maps.groupby("step"):
        ratios = []
        for _, row in at_step.groupby("method"):
            inside, outside = row.loc[row["span"] == 1, "credit"].mean(), row.loc[row["span"] == 0, "credit"].mean()
            if inside > 0 and outside > 0:
                ratios.append(math.log(inside / outside))
        spread[int(step)] = max(ratios) - min(ratios) if len(ratios) > 1 else 0.0
    return max(sorted(spread), key=lambda s: spread[s])


def texts_outside_canvas(fig) -> list[str]:
    """What of a drawn figure reaches past its canvas (a title or label cut off in the PNG): the sides of
    the canvas that the figure's tight bounding box (every drawn artist; ticks outside the view are not
    drawn and not counted) crosses by more than 1/20 inch, with the titles, for the message."""
    fig.canvas.draw()
    tight, canvas = fig.get_tightbbox(fig.canvas.get_renderer()), fig.bbox_inches
    sides = [side for side, past in (("left", canvas.x0 - tight.x0), ("right", tight.x1 - canvas.x1),
                                     ("bottom", canvas.y0 - tight.y0), ("top", tight.y1 - canvas.y1)) if past > 0.05]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    return [f"{side} edge (titles: {titles[:1]})" for side in sides]


def fit_titles(fig) -> None:
    """Wrap (at spaces) each subplot title that is wider than its subplot until it fits, then lay the figure
    out again: a long model or panel name (the paper smoke's 'qwen3-1.7b-smoke: SRPO weight …') neither runs
    into the next panel's title nor past the canvas. A figure whose titles fit is left exactly as it was."""
    import textwrap

    for _ in range(3):  # the new layout can narrow the subplots a little: check again
        renderer, changed = fig.canvas.get_renderer(), False
        for ax in fig.axes:
            room = ax.get_window_extent(renderer).width
            if ax.title.get_window_extent(renderer).width <= room:
                continue
            # first the model's name on a line of its own, then narrower lines (never inside a word)
            lines = ax.get_title().replace(": ", ":\n", 1).splitlines()
            width = max(map(len, lines))
            ax.title.set_text("\n".join(lines))
            while width > 12 and ax.title.get_window_extent(renderer).width > room:
                width -= 1
                ax.title.set_text("\n".join(textwrap.fill(line, width, break_long_words=False,
                                                           break_on_hyphens=False) for line in lines))
            changed = True
        if not changed:
            return
        fig.tight_layout()


def _save(plt, fig, path: Path) -> None:
    """PNG without the matplotlib version in its metadata: the same figure gives the same bytes. Titles too
    wide for their subplot are wrapped (fit_titles); a text still cut off at the canvas's edge is logged
    (naming the figure), not silently clipped."""
    fit_titles(fig)
    if cut := texts_outside_canvas(fig):
        logging.getLogger(__name__).warning("figure %s: text reaches past the canvas: %s", path.name, cut[:3])
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)


def _runs_of_ones(flags) -> list[tuple[int, int]]:
    """[start, stop) of each run of consecutive 1s."""
    padded = np.concatenate([[0], flags, [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2]))


CI_NOTE = ("95% CIs: with one seed (n_seeds 1) a benchmark cell's is its percentile bootstrap over problems and "
           "AVG's a normal CI from the cells' bootstrap standard errors (evaluation sampling only); with n_seeds ≥ 2 "
           "a cell is the mean over seeds with the t-interval over seeds, mean ± t(0.975, n−1)·sd/√n (AVG per "
           "seed first, then across seeds)")


def _write_markdown(table: pd.DataFrame, tables: Path, name: str, header: str, **tabulate) -> None:
    (tables / f"{name}.md").write_text(header + "\n\n" + table.reset_index().to_markdown(index=False, **tabulate)
                                       + "\n")


def _curve_figure(plt, curves: pd.DataFrame, runs_by_model: dict[str, list[str]], panels: list[Panel],
                  path: Path) -> None:
    """One row per model, one panel per metric, one line per run (EMA-smoothed as in Fig. 1a); the
    annealed KL window (λ_k > 0) shaded as in Fig. 4. A metric the aggregate lacks leaves its panel
    empty, saying so."""
    models = list(runs_by_model) or ["(none)"]
    # one colour per run across all panels (a run without a metric must not shift the others' colours)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(run for runs in runs_by_model.values() for run in runs))
    colors = {run: palette[i % len(palette)] for i, run in enumerate(names)}
    styles = ["-", "--", ":"]
    fig, axes = plt.subplots(len(models), len(panels), figsize=(4 * len(panels), 3 * len(models)), squeeze=False)
    for r, model in enumerate(models):
        runs = curves[(curves["model"] == model) & curves["method"].isin(runs_by_model.get(model, []))]
        # the annealed KL window: λ > 0 in runs whose λ reaches 0 (SDPO/SRPO keep a constant λ)
        annealed = runs.groupby("method").filter(lambda g: g.sort_values("step")["lambda"].fillna(0).iloc[-1] == 0)
        kl_steps = annealed.loc[annealed["lambda"].fillna(0) > 0, "step"]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            if len(kl_steps):
                ax.axvspan(kl_steps.min(), kl_steps.max(), color="0.92", zorder=0)
            drawn = 0
            for method, group in runs.groupby("method"):
                if panel.runs is not None and method not in panel.runs:
                    continue
                for column, style in zip(panel.columns, styles):
                    if column not in group:
                        continue
                    mean = group.groupby("step")[column].mean().dropna()  # e.g. no coverage once λ = 0
                    if not len(mean):
                        continue
                    label = method if len(panel.columns) == 1 else f"{method}: {column}"
                    y, marker = (mean.ewm(alpha=1 - EMA).mean(), None) if panel.smooth else (mean, "o")
                    ax.plot(mean.index, y, style, marker=marker, markersize=3, label=label, color=colors[method])
                    if panel.band and set(panel.band) <= set(group):
                        band = group.groupby("step")[list(panel.band)].mean().dropna()
                        ax.fill_between(band.index, band[panel.band[0]], band[panel.band[1]], alpha=0.15,
                                        color=colors[method], linewidth=0)
                    drawn += 1
            if not drawn:
                ax.text(0.5, 0.5, "not in the aggregate", ha="center", va="center", transform=ax.transAxes,
                        color="0.5")
            ax.set_title(f"{model}: {panel.title}", fontsize=9)
            ax.set_xlabel("step")
            if drawn and (c == 0 or panel.runs is not None or len(panel.columns) > 1):
                ax.legend(fontsize=7)
    fig.tight_layout()
    _save(plt, fig, path)
