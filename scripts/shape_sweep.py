"""The study-shape sweep of issue 19: how the KL channel's settings change TRACE vs GRPO on one toy base.

  python scripts/shape_sweep.py --study-dir DIR [--model toy-small] [--seeds 0 1] [--jobs 2]

DIR is a finished (or partly finished) toy study's working folder: the sweep reads its base
(results/base/<model>), data and the teacher check's fixed probe batch, and trains each variant below with
`python -m trace train` (the trainer of the DAG, config.yaml's train settings + the variant's overrides)
into DIR/results/sweep/<variant>/seed<s>/. Per run it reads the final held-out validation mean@k (all
n_val problems, k = 8) and the fixed batch's first-error margin after the last step; per variant the mean
over seeds with a t-interval, and Δ vs GRPO paired by seed. Writes DIR/results/sweep/shape_sweep.{csv,md}.
Runs that already have a metrics.jsonl are not retrained (delete the folder to redo one).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trace.report import t_interval  # noqa: E402  (after the path: the package shares its name with the stdlib)

# variant -> (method, overrides of train.kl); the default study's schedule is config.yaml's
VARIANTS = {
    "grpo": ("grpo", {}),
    "trace_fkl": ("trace_fkl", {}),
    "trace_fkl.no_clip": ("trace_fkl", {"entry_clip": None}),
    "trace_fkl.w0_1": ("trace_fkl", {"w0": 1.0}),
    "trace_fkl.window_all": ("trace_fkl", {"warmup": 10, "end": 20}),
    "trace_fkl.full_grpo_on_spans": ("trace_fkl", {"full_grpo_on_spans_without_kl": True}),
    # the α cap keeps a span's earliest tokens: at α 0.25 a ~27-token completion routes ≤ 6 tokens and
    # about a quarter of the first-error tokens (a line's last digit) fall outside the routed error span
    "trace_rkl": ("trace_rkl", {}),
    "trace_rkl.alpha_0.5": ("trace_rkl", {"alpha": 0.5}),
    "trace_fkl.alpha_0.5": ("trace_fkl", {"alpha": 0.5}),
}


def settings(method: str, kl: dict, seed: int) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    train = {k: v for k, v in config["train"].items() if k != "parallel"}
    train.update(method=method, seed=seed, thinking=config["thinking"], annotator=train["annotator"],
                 kl={**train["kl"], **kl}, validation={"every": train["steps"], "n_problems": None, "k": 8},
                 teacher_check_on_worse=config["teacher_check"]["on_worse"])
    train["probe"] = {"steps": [train["steps"] - 1]}  # the fixed batch after the last step only (cheap)
    return train


def train(study: Path, model: str, variant: str, seed: int) -> Path:
    method, kl = VARIANTS[variant]
    run = study / "results" / "sweep" / model / variant / f"seed{seed}"
    if (run / "metrics.jsonl").exists():
        return run
    data = study / "results" / "data" / "toy"
    command = [sys.executable, "-m", "trace", "train", "--cfg", json.dumps(settings(method, kl, seed)),
               "--base", str(study / "results" / "base" / model), "--train-data", str(data / "train.jsonl"),
               "--val-data", str(data / "val.jsonl"), "--run-dir", str(run),
               "--probe-batch", str(study / "results" / "teacher_gap" / model / "label.probe.pt")]
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "train.log", "w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"})
    return run


def outcome(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1]
    return {"val_mean_at_k": last["val/mean_at_k"], "margin_last": last.get("probe/fixed_margin_first_error"),
            "reward_last5": sum(r["reward_mean"] for r in rows[-5:]) / len(rows[-5:])}


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per variant: mean ± t half-width over seeds of each outcome, and Δ vs GRPO paired by seed."""
    rows = []
    grpo = results[results["variant"] == "grpo"].set_index("seed")
    for variant, runs in results.groupby("variant", sort=False):
        runs = runs.set_index("seed")
        row = {"variant": variant, "n_seeds": len(runs)}
        for column in ("val_mean_at_k", "margin_last", "reward_last5"):
            mean, _, half = t_interval(runs[column]) if len(runs) > 1 else (runs[column].mean(), 0, float("nan"))
            row[column] = f"{mean:.3f} ± {half:.3f}"
        paired = (runs["val_mean_at_k"] - grpo["val_mean_at_k"]).dropna()
        if variant != "grpo" and len(paired) > 1:
            mean, _, half = t_interval(paired)
            row["val_vs_grpo"] = f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study-dir", type=Path, required=True)
    parser.add_argument("--model", default="toy-small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    for needed in (f"results/base/{args.model}", f"results/teacher_gap/{args.model}/label.probe.pt"):
        if not (args.study_dir / needed).exists():
            sys.exit(f"shape_sweep: {args.study_dir / needed} does not exist: run the toy study there first "
                     f"(snakemake --cores 2 --directory {args.study_dir})")
    todo = [(variant, seed) for variant in args.variants for seed in args.seeds]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda vs: train(args.study_dir, args.model, *vs), todo))
    results = pd.DataFrame([{"variant": v, "seed": s, **outcome(run)} for (v, s), run in zip(todo, runs)])
    out = args.study_dir / "results" / "sweep" / args.model
    results.to_csv(out / "shape_sweep.csv", index=False)
    table = summarise(results)
    (out / "shape_sweep.md").write_text(
        f"Study-shape sweep on {args.model} (scripts/shape_sweep.py): final validation mean@8 on all held-out "
        "problems, the fixed batch's first-error margin after the last step, training reward over the last 5 "
        "steps; mean ± t half-width over seeds; val_vs_grpo: Δ mean@8 paired by seed, 95% t-interval\n\n"
        + table.to_markdown(index=False) + "\n")
    print((out / "shape_sweep.md").read_text())


if __name__ == "__main__":
    main()
