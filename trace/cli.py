"""``python -m trace <stage> ...``: one subcommand per pipeline stage (the Snakemake rules call these).

Every stage takes the settings it needs as a JSON string (``--cfg``), which the Snakefile builds
from the validated config, so a job's effective settings are visible in its log and in
``snakemake --list-params-changes``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _threads_from_env() -> None:
    """Few threads and passive waiting: two processes sharing 2 cores otherwise slow down ~30x."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(int(os.environ.get("TRACE_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))))


def cmd_toy_data(args, cfg):
    from trace.toy.world import write_toy_data

    write_toy_data(cfg, Path(args.out_dir))


def cmd_toy_base(args, cfg):
    from trace.toy.world import build_toy_base

    build_toy_base(cfg, Path(args.data_dir), Path(args.out_dir))


def cmd_train(args, cfg):
    from trace.train.trainer import Trainer

    # the Trainer builds the configured annotator tier (train.annotator) itself: the self tier needs its policy
    Trainer(cfg, Path(args.base), Path(args.train_data), Path(args.run_dir),
            val_path=Path(args.val_data) if args.val_data else None).fit()


def cmd_evaluate(args, cfg):
    from trace.evaluation.run import evaluate

    evaluate(Path(args.model), args.benchmark, Path(args.data), Path(args.out), **cfg)


def cmd_prepare_benchmarks(args, cfg):
    from trace.data.benchmarks import prepare_eval_sets

    prepare_eval_sets(Path(cfg["mirror_dir"]) if cfg.get("mirror_dir") else None, Path(args.out_dir),
                      cfg["names"], gpqa_seed=cfg.get("gpqa_seed", 0))


def cmd_prepare_train(args, cfg):
    from trace.data.benchmarks import prepare_train_set

    prepare_train_set(Path(cfg["mirror_dir"]) if cfg.get("mirror_dir") else None, Path(args.out_dir),
                      cfg["max_rows"], cfg["val_rows"], cfg.get("seed", 0), source=cfg.get("source", "auto"))


def cmd_aggregate(args, cfg):
    from trace.report import aggregate

    aggregate(cfg, Path(args.results), Path(args.out_dir))


def cmd_report(args, cfg):
    from trace.report import write_tables_and_figures

    write_tables_and_figures(cfg, Path(args.aggregate_dir), Path(args.out_dir))


def cmd_bench(args, cfg):
    from trace.bench import run_from_args

    run_from_args(args)


STAGES = {
    "toy-data": (cmd_toy_data, ["--out-dir"]),
    "toy-base": (cmd_toy_base, ["--data-dir", "--out-dir"]),
    "prepare-benchmarks": (cmd_prepare_benchmarks, ["--out-dir"]),
    "prepare-train": (cmd_prepare_train, ["--out-dir"]),
    "train": (cmd_train, ["--base", "--train-data", "--run-dir"]),
    "evaluate": (cmd_evaluate, ["--model", "--benchmark", "--data", "--out"]),
    "aggregate": (cmd_aggregate, ["--results", "--out-dir"]),
    "report": (cmd_report, ["--aggregate-dir", "--out-dir"]),
}
OPTIONAL = {"train": {"--val-data": "held-out validation problems (JSONL) for train.validation"}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trace", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, (_, options) in STAGES.items():
        stage = sub.add_parser(name)
        stage.add_argument("--cfg", default="{}", help="the stage's settings as JSON (built by the Snakefile)")
        for option in options:
            stage.add_argument(option, required=True)
        for option, help_text in OPTIONAL.get(name, {}).items():
            stage.add_argument(option, default=None, help=help_text)
    from trace.bench import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="memory and time: routed vs all-token KL, TRACE vs GRPO step loss phase")
    add_bench_arguments(bench)
    bench.set_defaults(cfg="{}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = json.loads(args.cfg)
    except json.JSONDecodeError as exc:
        parser.error(f"--cfg is not valid JSON: {exc}")
    _threads_from_env()
    handler = STAGES[args.stage][0] if args.stage in STAGES else cmd_bench
    try:
        handler(args, cfg)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        # configuration and input errors: one clear line, not a traceback from deep inside a library
        logging.getLogger("trace").error("%s failed: %s: %s", args.stage, type(exc).__name__, exc)
        if os.environ.get("TRACE_DEBUG"):
            raise
        sys.exit(2)
