"""Aggregate per-run results into tidy CSVs, then draw every table and figure from those CSVs only.

    results/eval/<model>/<policy>/<benchmark>.json      -> results/aggregate/evals.csv
    results/train/<model>/<method>/seed<s>/metrics.jsonl -> results/aggregate/training_curves.csv
    aggregate CSVs -> results/tables/*.md|csv, results/figures/*.png   (no GPU, no model)
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

CURVE_COLUMNS = ("reward_mean", "entropy", "response_length", "lambda", "grad_norm", "span_coverage")


def _policy_method_seed(policy: str) -> tuple[str, int | None]:
    if policy == "base":
        return "base", None
    method, seed = policy.rsplit("-seed", 1)
    return method, int(seed)


def aggregate(cfg: dict, eval_files: list[Path], metrics_files: list[Path], out_dir: Path) -> None:
    """Exactly the given per-run files (the rule's declared inputs) -> two CSVs; nothing is globbed,
    so results of runs or seeds no longer in the config never reach a table."""
    benchmarks = cfg["benchmarks"]
    eval_rows = []
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
    if not eval_rows:
        raise FileNotFoundError(f"no evaluation results given (--evals) for benchmarks {list(benchmarks)}")
    curve_rows = []
    for path in metrics_files:
        model, method, seed = path.parts[-4], path.parts[-3], int(path.parts[-2].removeprefix("seed"))
        for line in _existing(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                curve_rows.append({"model": model, "method": method, "seed": seed, "step": row["step"],
                                   **{c: row.get(c) for c in CURVE_COLUMNS}})
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(eval_rows).to_csv(out_dir / "evals.csv", index=False)
    pd.DataFrame(curve_rows, columns=["model", "method", "seed", "step", *CURVE_COLUMNS]).to_csv(
        out_dir / "training_curves.csv", index=False)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"declared input {path} does not exist")
    return path


def main_table(evals: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Table 2's shape: rows (model, method), columns the paper's benchmarks + AVG (mean over seeds)."""
    cells = evals.groupby(["model", "method", "column"])["avg_at_k"].mean().unstack("column")
    cells = cells.reindex(columns=columns)
    cells["AVG"] = cells[columns].mean(axis=1)  # unweighted mean of the benchmark columns, as in the paper
    order = {"base": 0, "grpo": 1}
    return cells.sort_index(key=lambda idx: idx.map(lambda v: (order.get(v, 2), v)) if idx.name == "method" else idx)


def ablation_table(evals: pd.DataFrame, columns: list[str], model: str, rows: dict[str, str]) -> pd.DataFrame:
    """Rows = {label: run name} on one model: benchmark columns, AVG, and AVG gain over that model's GRPO."""
    table = main_table(evals[evals["model"] == model], columns).droplevel("model")
    present = {label: run for label, run in rows.items() if run in table.index}
    out = table.loc[list(present.values())]
    out.index = pd.Index(list(present), name="variant")
    if "grpo" in table.index:
        out["gain_vs_grpo"] = out["AVG"] - table.loc["grpo", "AVG"]
    return out


def _write_table(table: pd.DataFrame, tables: Path, name: str, header: str) -> None:
    table.to_csv(tables / f"{name}.csv")
    (tables / f"{name}.md").write_text(header + "\n\n" + table.reset_index().to_markdown(index=False) + "\n")


def write_tables_and_figures(cfg: dict, aggregate_dir: Path, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = pd.read_csv(aggregate_dir / "evals.csv")
    curves = pd.read_csv(aggregate_dir / "training_curves.csv")
    columns = list(dict.fromkeys(cfg["benchmarks"].values()))
    tables, figures = out_dir / "tables", out_dir / "figures"
    tables.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    k = int(evals["k"].iloc[0])
    legend = (f"avg@{k}, %; benchmark columns are the paper's, filled by this study's benchmarks: "
              f"{', '.join(f'{b} → {c}' for b, c in cfg['benchmarks'].items())}")
    main_runs = ["base", *cfg.get("methods", evals["method"].unique())]
    table = main_table(evals[evals["method"].isin(main_runs)], columns).round(2)
    _write_table(table, tables, "main_results", f"Main results (Table 2 shape; {legend})")

    ablations = cfg.get("ablations") or {}
    if tiers := ablations.get("annotator_tiers"):
        # the main run of the same method uses train.annotator: the strongest tier (API / toy oracle)
        rows = {f"strong ({tiers['method']}, train.annotator)": tiers["method"],
                **{tier: f"{tiers['method']}@{tier}" for tier in tiers["tiers"]}}
        _write_table(ablation_table(evals, columns, tiers["model"], rows).round(2), tables, "annotator_tiers",
                     f"Annotator tiers (Table 3 shape) on {tiers['model']}; gain_vs_grpo = AVG − GRPO's AVG ({legend})")
    if masks := ablations.get("mask_localisation"):
        rows = {"annotated spans (trace_fkl)": "trace_fkl", **{m: m for m in masks["methods"]}}
        _write_table(ablation_table(evals, columns, masks["model"], rows).round(2), tables, "mask_localisation",
                     f"Mask localisation (Table 4 shape) on {masks['model']} ({legend})")

    main_panels = [("reward_mean", "training reward"), ("entropy", "per-token entropy (nats)"),
                   ("response_length", "response length (tokens)")]
    main_figure_runs = {model: [m for m in main_runs if m != "base"] for model in sorted(curves["model"].unique())}
    _curve_figure(plt, curves, main_figure_runs, main_panels, figures / "training_curves.png")
    ablation_panels = [("reward_mean", "training reward"), ("entropy", "per-token entropy (nats)"),
                       ("span_coverage", "routed-token coverage")]
    if tiers:
        runs = ["grpo", tiers["method"], *(f"{tiers['method']}@{tier}" for tier in tiers["tiers"])]
        _curve_figure(plt, curves, {tiers["model"]: runs}, ablation_panels, figures / "annotator_tiers.png")
    if masks:
        runs = ["grpo", "trace_fkl", *masks["methods"]]
        _curve_figure(plt, curves, {masks["model"]: runs}, ablation_panels, figures / "mask_localisation.png")


def _curve_figure(plt, curves: pd.DataFrame, runs_by_model: dict[str, list[str]], panels, path: Path) -> None:
    """One row per model, one panel per metric, one line per run (EMA-smoothed as in Fig. 1a); the
    annealed KL window (λ_k > 0) shaded as in Fig. 4."""
    models = list(runs_by_model) or ["(none)"]
    # one colour per run across all panels (a run without a metric must not shift the others' colours)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(run for runs in runs_by_model.values() for run in runs))
    colors = {run: palette[i % len(palette)] for i, run in enumerate(names)}
    fig, axes = plt.subplots(len(models), len(panels), figsize=(4 * len(panels), 3 * len(models)), squeeze=False)
    for r, model in enumerate(models):
        runs = curves[(curves["model"] == model) & curves["method"].isin(runs_by_model.get(model, []))]
        # the annealed KL window: λ > 0 in runs whose λ reaches 0 (SDPO/SRPO keep a constant λ)
        annealed = runs.groupby("method").filter(lambda g: g.sort_values("step")["lambda"].fillna(0).iloc[-1] == 0)
        kl_steps = annealed.loc[annealed["lambda"].fillna(0) > 0, "step"]
        for c, (column, title) in enumerate(panels):
            ax = axes[r][c]
            if len(kl_steps):
                ax.axvspan(kl_steps.min(), kl_steps.max(), color="0.92", zorder=0)
            for method, group in runs.groupby("method"):
                mean = group.groupby("step")[column].mean().dropna()  # e.g. no coverage once λ = 0
                if len(mean):
                    ax.plot(mean.index, mean.ewm(alpha=0.15).mean(), label=method, color=colors[method])
            ax.set_title(f"{model}: {title}", fontsize=9)
            ax.set_xlabel("step")
            if c == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
