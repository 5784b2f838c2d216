"""``python -m trace <stage> ...``: one subcommand per pipeline stage (the Snakemake rules call these).

Every stage takes the settings it needs as a JSON string (``--cfg``), which the Snakefile builds
from the validated config, so a job's effective settings are visible in its log and in
``snakemake --list-params-changes``. Each stage turns it into its typed settings (trace/settings.py:
defaults and checks from the schema) once, here, before anything runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from trace import settings
from trace.bench import add_arguments as add_bench_arguments
from trace.runtime import skip_sklearn_in_transformers, threads_from_env


def cmd_toy_data(args, cfg):
    from trace.toy.world import write_toy_data

    write_toy_data(cfg, Path(args.out_dir))


def cmd_toy_base(args, cfg):
    from trace.toy.world import build_toy_base

    build_toy_base(cfg, Path(args.data_dir), Path(args.out_dir))


def cmd_base_model(args, job):
    from trace.base_model import materialise

    materialise(job.name, job.entry, Path(args.out_dir), train_data=Path(args.train_data) if args.train_data else None,
                thinking=job.thinking, section=job.section)


def cmd_train(args, run):
    from trace.train.trainer import Trainer

    if run.train_source:  # a real-data run trains only on the source its config asks for
        from trace.data.benchmarks import check_train_source

        logging.getLogger("trace").info("training data %s from %s", args.train_data,
                                        check_train_source(Path(args.train_data), run.train_source))
    if args.teacher_gap:  # a distillation run: is its teacher better than the student where it matters?
        from trace.methods import get_method
        from trace.train.teacher_gap import check_teacher

        if get_method(run.method).self_teacher:  # an external teacher (OPD) is another model: not checked
            check_teacher(Path(args.teacher_gap), run.method, run.teacher_check_on_worse)
    # the Trainer builds the configured annotator tier (train.annotator) itself: the self tier needs its policy
    Trainer(run, Path(args.base), Path(args.train_data), Path(args.run_dir),
            val_path=Path(args.val_data) if args.val_data else None,
            probe_batch=Path(args.probe_batch) if args.probe_batch else None).fit()


def cmd_teacher_gap(args, cfg):
    from trace.train.teacher_gap import run_teacher_gap

    run_teacher_gap(cfg, Path(args.base), Path(args.train_data), Path(args.out),
                    Path(args.probe_batch) if args.probe_batch else None)


def cmd_evaluate(args, cfg):
    """All of one policy's benchmarks in ONE lm-eval call: the model loads once."""
    from trace.evaluation.run import evaluate_many

    data = {}
    for item in args.data:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--data {item!r}: expected BENCHMARK=PATH")
        data[name] = Path(path)
    evaluate_many(Path(args.model), data, Path(args.out_dir), **cfg)


def cmd_prepare_benchmarks(args, job):
    from trace.data.benchmarks import prepare_eval_sets

    prepare_eval_sets(Path(job.mirror_dir) if job.mirror_dir else None, Path(args.out_dir), list(job.names),
                      gpqa_seed=job.gpqa_seed)


def cmd_prepare_train(args, job):
    from trace.data.benchmarks import prepare_train_set

    prepare_train_set(Path(job.mirror_dir) if job.mirror_dir else None, Path(args.out_dir), job.max_rows,
                      job.val_rows, job.seed, source=job.source)


def cmd_aggregate(args, cfg):
    from trace.report import aggregate

    aggregate(cfg, [Path(p) for p in args.evals], [Path(p) for p in args.metrics], Path(args.out_dir),
              [Path(p) for p in args.teacher_gaps or []])


def cmd_report(args, cfg):
    from trace.report import write_tables_and_figures

    write_tables_and_figures(cfg, Path(args.aggregate_dir), Path(args.out_dir))


def cmd_export_cache(args, cfg):
    from trace.cache import export_cache

    export_cache(cfg, Path(args.aggregate_dir), Path(args.out_dir))


def cmd_opd_family(args, job):
    from trace.cache import export_family_cache
    from trace.opd_family import run

    run(job, [Path(p) for p in args.evals], [Path(p) for p in args.metrics], Path(args.out_dir))
    export_family_cache(job, Path(args.out_dir) / "opd_family" / "aggregate", Path(args.cache_dir))


def cmd_redraw(args, cfg):
    from trace.cache import redraw

    out = redraw(Path(args.cache_dir), Path(args.out_dir) if args.out_dir else None)
    logging.getLogger("trace").info("redrew %s/tables and %s/figures from the cache %s", out, out, args.cache_dir)


def cmd_bench(args, cfg):
    from trace.bench import run_from_args

    run_from_args(args)


# stage -> (handler, the typed settings its --cfg becomes (None: evaluate's keyword arguments), options)
STAGES = {
    "toy-data": (cmd_toy_data, settings.ToyWorld, ["--out-dir"]),
    "toy-base": (cmd_toy_base, settings.ToyBaseJob, ["--data-dir", "--out-dir"]),
    "prepare-benchmarks": (cmd_prepare_benchmarks, settings.BenchmarkDataJob, ["--out-dir"]),
    "prepare-train": (cmd_prepare_train, settings.TrainDataJob, ["--out-dir"]),
    "base-model": (cmd_base_model, settings.BaseModelJob, ["--out-dir", "--train-data?"]),
    "train": (cmd_train, settings.TrainRun,
              ["--base", "--train-data", "--run-dir", "--val-data?", "--teacher-gap?", "--probe-batch?"]),
    "teacher-gap": (cmd_teacher_gap, settings.TeacherGapJob, ["--base", "--train-data", "--out", "--probe-batch?"]),
    "evaluate": (cmd_evaluate, None, ["--model", "--data+", "--out-dir"]),
    "aggregate": (cmd_aggregate, settings.ReportJob, ["--evals*", "--metrics*", "--teacher-gaps*?", "--out-dir"]),
    "report": (cmd_report, settings.ReportJob, ["--aggregate-dir", "--out-dir"]),
    "export-cache": (cmd_export_cache, settings.ReportJob, ["--aggregate-dir", "--out-dir"]),
    "opd-family": (cmd_opd_family, settings.FamilyJob, ["--evals*", "--metrics*", "--out-dir", "--cache-dir"]),
}
NO_TORCH = {"aggregate", "report", "export-cache", "redraw", "opd-family"}  # tables and figures only: no torch import


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["smoke"]:  # everything after `smoke` belongs to Snakemake
        from trace.smoke import run_smoke

        sys.exit(run_smoke(argv[1:]))
    if argv[:1] == ["preflight"]:  # Snakemake's own words (--profile, --configfile, targets)
        from trace.preflight import run_preflight

        sys.exit(run_preflight(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m trace", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, (_, _, options) in STAGES.items():
        stage = sub.add_parser(name)
        stage.add_argument("--cfg", default="{}", help="the stage's settings as JSON (built by the Snakefile)")
        for option in options:  # "--name?" optional; "--name+" / "--name*" one or more / any number of values
            values = option.rstrip("?")[-1]  # "--name*?": an optional list
            stage.add_argument(option.rstrip("?+*"), required=not option.endswith("?"),
                               nargs=values if values in "+*" else None)

    sub.add_parser("smoke", help="the paper path on CPU: start the smoke's annotator server, run "
                                 "workflow/configs/paper_smoke.yaml through Snakemake, stop the server; "
                                 "further arguments go to Snakemake (default: --cores 2)")
    sub.add_parser("preflight", help="before submitting: per rule whether its sbatch line fits its partition "
                                     "(sbatch --test-only), models, data, API key and venv; one line per finding, "
                                     "exit 1 on a blocker. Takes Snakemake's --profile, --configfile and targets")
    bench = sub.add_parser("bench", help="memory and time: routed vs all-token KL, TRACE vs GRPO step loss phase")
    add_bench_arguments(bench)
    bench.set_defaults(cfg="{}", handler=cmd_bench)
    redraw = sub.add_parser("redraw", help="every table and figure from a results cache alone (no training, model, "
                                           "GPU or Snakemake): CACHE_DIR/report_settings.json + aggregate/*.csv")
    redraw.add_argument("cache_dir", metavar="CACHE_DIR")
    redraw.add_argument("--out-dir", help="where tables/ and figures/ go (default: CACHE_DIR itself)")
    redraw.set_defaults(cfg="{}", handler=cmd_redraw)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = json.loads(args.cfg)
    except json.JSONDecodeError as exc:
        parser.error(f"--cfg is not valid JSON: {exc}")
    if args.stage not in NO_TORCH:
        threads_from_env()
        skip_sklearn_in_transformers()
    handler, kind, _ = STAGES[args.stage] if args.stage in STAGES else (args.handler, None, None)
    try:
        handler(args, kind.from_mapping(cfg, f"{args.stage} --cfg") if kind is not None else cfg)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        # configuration and input errors: one clear line, not a traceback from deep inside a library
        logging.getLogger("trace").error("%s failed: %s: %s", args.stage, type(exc).__name__, exc)
        if os.environ.get("TRACE_DEBUG"):
            raise
        sys.exit(2)
