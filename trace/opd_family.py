"""The opd_family ablation's table and figure (rule opd_family; beyond the paper, docs/methods.md).

GRPO, the on-policy distillation family from an external teacher (OPD, TrOPD with and without guidance, TRB)
and TRACE on one student, every method over the family's seeds on the same data, steps and evaluation:

    results/eval/<model>/<policy>/<benchmark>.json, results/train/<model>/<run>/seed<s>/metrics.jsonl
        -> results/opd_family/aggregate/{evals,training_curves,calibration}.csv
        -> results/tables/opd_family.{md,csv}, results/figures/opd_family.png

Per method: accuracy (AVG over the benchmarks) with its 95% CI over seeds and its paired difference to GRPO;
the gradient norm and the policy's entropy over training (per-seed means, then the t-interval over seeds);
early-training accuracy (steps [0, early_steps)); calibration of agreement confidence (ECE, Brier; trace/report.py
calibration_table); and where a method logs them, TRB's KL budget and the realised KL(behaviour ‖ student) while
the budget is on, TrOPD's trust-region share, and the sampled estimate of KL(student ‖ teacher).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from trace.report import (ALL_BENCHMARKS, CURVE_COLUMNS, VAL, _save, _write_markdown, aggregate, calibration_table,
                          cell_estimates, read_aggregate_csv, t_interval, versus_grpo)
from trace.settings import FamilyJob

# what the family's runs log beside the report's curve columns (trace/train/trainer.py and objectives.py)
TRB_BUDGET, TRB_REALISED = "trb/kl_budget", "trb/realised_kl"
TRUST_SHARE = "tropd/trust_frac"
TEACHER_KL = "kl/opd_sampled_k3_token_mean"  # k3 estimate of KL(student ‖ teacher) per completion token
FAMILY_CURVES = (*CURVE_COLUMNS, "accuracy", TRB_BUDGET, TRB_REALISED, "trb/eta_mean", TRUST_SHARE, TEACHER_KL,
                 "kl/opd_token_mean")
# the table's per-run training summaries: (column, curve, which steps)
SUMMARIES = (("grad_norm", "grad_norm", "all"), ("entropy", "entropy", "all"),
             ("early_accuracy", "accuracy", "early"), ("first_validation", VAL, "first"),
             ("kl_to_teacher", TEACHER_KL, "own_rollouts"), ("trust_share", TRUST_SHARE, "all"),
             ("trb_budget", TRB_BUDGET, "budget_on"), ("trb_realised_kl", TRB_REALISED, "budget_on"),
             ("trb_eta", "trb/eta_mean", "budget_on"))


def run(job: FamilyJob, eval_files: list[Path], metrics_files: list[Path], out_dir: Path) -> None:
    """The family's aggregate, table and figure under out_dir (results/)."""
    job = FamilyJob.from_mapping(job)
    aggregate_dir = out_dir / "opd_family" / "aggregate"
    aggregate(job, eval_files, metrics_files, aggregate_dir, curve_columns=FAMILY_CURVES)
    write_table_and_figure(job, aggregate_dir, out_dir)


def training_summaries(curves: pd.DataFrame, early_steps: int) -> pd.DataFrame:
    """Per (method, seed): each SUMMARIES value as the mean over its steps (early: step < early_steps; budget_on:
    steps whose TRB budget is > 0; own_rollouts: the steps whose rollouts the student sampled itself, i.e. TRB's once
    its budget is 0; first: the first step that logs it); NaN where the run does not log it."""
    rows = []
    for (method, seed), steps in curves.groupby(["method", "seed"]):
        row = {"method": method, "seed": seed}
        for name, column, which in SUMMARIES:
            if column not in steps:
                row[name] = np.nan
                continue
            values = steps[column]
            if which == "early":
                values = values[steps["step"] < early_steps]
            elif which == "budget_on" and TRB_BUDGET in steps:
                values = values[steps[TRB_BUDGET].fillna(0) > 0]
            elif which == "own_rollouts" and TRB_BUDGET in steps:  # a sampled estimate needs the student's samples
                values = values[steps[TRB_BUDGET].fillna(0) == 0]
            elif which == "first":  # the student's own held-out accuracy at its first validation
                values = values.loc[steps.loc[values.notna(), "step"].sort_values().index[:1]]
            row[name] = float(values.mean()) if values.notna().any() else np.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=["method", "seed", *[name for name, _, _ in SUMMARIES]])


def mean_and_ci(values: pd.Series) -> tuple[float, float, float]:
    """Mean over seeds and its 95% t-interval (NaN bounds with one seed or none)."""
    values = values.dropna()
    if len(values) == 0:
        return np.nan, np.nan, np.nan
    if len(values) == 1:
        return float(values.iloc[0]), np.nan, np.nan
    mean, _, half = t_interval(values)
    return mean, mean - half, mean + half


def family_table(job: FamilyJob, evals: pd.DataFrame, curves: pd.DataFrame,
                 calibration: pd.DataFrame) -> pd.DataFrame:
    """One row per method of the family (plus the base policy): the columns the module docstring lists."""
    columns = list(dict.fromkeys(job.benchmarks.values()))
    model = job.family.model
    evals, curves = evals[evals["model"] == model], curves[curves["model"] == model]
    accuracy = cell_estimates(evals, columns).query("column == 'AVG'").set_index("method")
    delta = versus_grpo(evals, columns).set_index("method")
    summaries = training_summaries(curves, job.family.early_steps)
    calibrated = calibration_table(calibration[calibration["model"] == model], list(job.benchmarks),
                                   job.calibration_bins)
    pooled = calibrated[calibrated["benchmark"] == ALL_BENCHMARKS].set_index("method")
    rows = []
    for method in ["base", *job.family.methods]:
        row = {"method": method}
        if method in accuracy.index:
            cell = accuracy.loc[method]
            row.update(n_seeds=int(cell["n_seeds"]), avg=cell["ours"], avg_ci_low=cell["ci_low"],
                       avg_ci_high=cell["ci_high"], avg_ci=cell["ci"])
        if method in delta.index:
            row.update(delta_vs_grpo=delta.loc[method, "delta_avg"], delta_vs_grpo_ci_low=delta.loc[method, "ci_low"],
                       delta_vs_grpo_ci_high=delta.loc[method, "ci_high"])
        for name, _, _ in SUMMARIES:
            mean, low, high = mean_and_ci(summaries.loc[summaries["method"] == method, name])
            row.update({name: mean, f"{name}_ci_low": low, f"{name}_ci_high": high})
        if method in pooled.index:
            for name in ("ece", "brier"):
                row.update({name: pooled.loc[method, name], f"{name}_ci_low": pooled.loc[method, f"{name}_ci_low"],
                            f"{name}_ci_high": pooled.loc[method, f"{name}_ci_high"]})
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def _with_ci(value: float, low: float, high: float, digits: int) -> str:
    if pd.isna(value):
        return "n/a"
    if pd.isna(low):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


MARKDOWN = (("AVG %", "avg", 2), ("Δ vs GRPO", "delta_vs_grpo", 2), ("grad norm", "grad_norm", 3),
            ("entropy", "entropy", 3), ("early acc", "early_accuracy", 3), ("1st val", "first_validation", 3),
            ("ECE", "ece", 3), ("Brier", "brier", 3),
            ("KL(student‖teacher)", "kl_to_teacher", 3), ("trust share", "trust_share", 3),
            ("TRB budget", "trb_budget", 3), ("TRB realised KL", "trb_realised_kl", 4), ("TRB η", "trb_eta", 3))


def family_markdown(table: pd.DataFrame) -> pd.DataFrame:
    """Each value as 'mean [95% CI]' (CI columns *_ci_low/_ci_high; 'n/a' where the method does not log it)."""
    out = pd.DataFrame(index=table.index)
    out["seeds"] = table.get("n_seeds", pd.Series(index=table.index, dtype=float)).map(
        lambda n: "" if pd.isna(n) else str(int(n)))
    for title, name, digits in MARKDOWN:
        if name not in table:
            out[title] = "n/a"
            continue
        low = table[f"{name}_ci_low"] if f"{name}_ci_low" in table else pd.Series(np.nan, index=table.index)
        high = table[f"{name}_ci_high"] if f"{name}_ci_high" in table else pd.Series(np.nan, index=table.index)
        out[title] = [_with_ci(v, lo, hi, digits) for v, lo, hi in zip(table[name], low, high)]
    return out


def write_table_and_figure(job: FamilyJob, aggregate_dir: Path, out_dir: Path) -> None:
    job = FamilyJob.from_mapping(job)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = read_aggregate_csv(aggregate_dir / "evals.csv")
    curves = read_aggregate_csv(aggregate_dir / "training_curves.csv")
    calibration = read_aggregate_csv(aggregate_dir / "calibration.csv", dtype={"id": str})
    tables, figures = out_dir / "tables", out_dir / "figures"
    tables.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    table = family_table(job, evals, curves, calibration)
    table.round(4).to_csv(tables / "opd_family.csv")
    family = job.family
    k = int(evals["k"].iloc[0])
    header = (f"The on-policy distillation family (beyond the paper; docs/methods.md) on {family.model}, teacher "
              f"{family.teacher}, seeds {', '.join(map(str, family.seeds))}: AVG = avg@{k} over the benchmarks "
              f"({', '.join(job.benchmarks)}), mean over seeds [95% t-interval over seeds]; Δ vs GRPO paired by seed; "
              f"grad norm (before clipping) and entropy (nats per token) = each run's mean over its steps, then over "
              f"seeds; early acc = training-rollout accuracy over steps [0, {family.early_steps}) (TRB: its behaviour "
              f"policy's rollouts); 1st val = the student's held-out mean@k at its first validation; ECE / Brier of "
              f"agreement confidence ({job.calibration_bins} bins; CI: bootstrap over problems); KL(student‖teacher) "
              "= the k3 sampled estimate per completion token on the training rollouts the student sampled itself "
              "(methods with an external teacher; TRB: once its budget is 0, as k3 assumes on-policy samples); "
              "trust share = TrOPD's trust-region tokens; TRB budget / realised KL = the KL budget ε_k and "
              "the realised KL(behaviour ‖ student) per generated token and the blend weight η (1 = the teacher's own "
              "distribution), over the steps with ε_k > 0. "
              "n/a: the method does not log it")
    _write_markdown(family_markdown(table), tables, "opd_family", header)
    _family_figure(plt, job, table, curves, figures / "opd_family.png")


def _family_figure(plt, job: FamilyJob, table: pd.DataFrame, curves: pd.DataFrame, path: Path) -> None:
    """Top: accuracy and ECE per method with 95% CIs; below, over steps (mean over seeds): gradient norm, entropy,
    training-rollout accuracy, and TRB's KL budget (dashed) beside its realised KL(behaviour ‖ student)."""
    methods = [m for m in ["base", *job.family.methods] if m in table.index]
    fig, axes = plt.subplot_mosaic([["avg", "avg", "ece", "ece"], ["grad_norm", "entropy", "accuracy", "trb"]],
                                   figsize=(16, 7))
    for name, title in (("avg", "AVG accuracy (%)"), ("ece", "ECE of agreement confidence")):
        ax, values = axes[name], table.reindex(methods).get(name, pd.Series(np.nan, index=methods))
        low = table.reindex(methods).get(f"{name}_ci_low", values * np.nan)
        high = table.reindex(methods).get(f"{name}_ci_high", values * np.nan)
        errors = np.vstack([(values - low).fillna(0).clip(lower=0), (high - values).fillna(0).clip(lower=0)])
        ax.bar(range(len(methods)), values.fillna(0), yerr=errors, capsize=3, color="0.65")
        ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{job.family.model}: {title}, mean over seeds [95% CI]", fontsize=9)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {method: palette[i % len(palette)] for i, method in enumerate(job.family.methods)}
    runs = curves[curves["model"] == job.family.model]
    panels = {"grad_norm": ("grad_norm", "gradient norm (before clipping)"), "entropy": ("entropy", "entropy (nats)"),
              "accuracy": ("accuracy", "training-rollout accuracy"),
              "trb": (TRB_REALISED, "TRB: realised KL(b‖p) (—) vs budget (- -)")}
    for name, (column, title) in panels.items():
        ax, drawn = axes[name], 0
        for method, group in runs.groupby("method"):
            for curve, style in ((column, "-"), *(((TRB_BUDGET, "--"),) if name == "trb" else ())):
                mean = group.groupby("step")[curve].mean().dropna() if curve in group else pd.Series(dtype=float)
                if len(mean) and (name != "trb" or mean.abs().sum() > 0 or curve == TRB_BUDGET):
                    ax.plot(mean.index, mean, style, color=colors.get(method), label=method if style == "-" else None)
                    drawn += 1
        if not drawn:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes,
                    color="0.5")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(plt, fig, path)
