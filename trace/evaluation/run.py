"""Evaluate a checkpoint on a benchmark with lm-eval and write one results JSON per (model, benchmark).

The pipeline: write the lm-eval task YAML (:mod:`trace.evaluation.lmeval_tasks`) into a fresh
directory next to the results, call ``lm_eval.simple_evaluate`` with the model's own chat
template, take every doc's k responses and grades from lm-eval's logged samples, and
summarise them (:mod:`trace.evaluation.metrics`): avg@k, pass@1 and pass@k, a bootstrap 95% CI
of avg@k over problems, per-problem scores, and the calibration of agreement confidence over the k
samples (:mod:`trace.evaluation.calibration`: ECE, reliability bins, Brier score, under the key
``calibration``). The per-sample log (prompt, k responses, k grades per problem) goes to a JSONL file
beside the results.

Thinking mode reaches the chat template differently per lm-eval backend (lm-eval 0.4.13):

* ``hf``: ``chat_template_args={"enable_thinking": thinking}``. The ``enable_thinking`` model
  argument would also work but demands ``think_end_token``, and lm-eval then cuts the thinking
  out of the response before we see it; we want the raw response (the grader itself looks
  past ``</think>`` and fails an unclosed ``<think>``, exactly as the RL reward does).
* ``vllm``: its wrapper drops ``enable_thinking`` from ``chat_template_args``, so thinking off
  is the model argument ``enable_thinking=False``; thinking on leaves it unset (Qwen3's
  template then renders the thinking prompt; ``True`` would again require ``think_end_token``).

Command line: ``python -m trace.evaluation.run --help`` (run from the repository root).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from trace.evaluation.calibration import calibration_summary, problem_calibration
from trace.evaluation.lmeval_tasks import FILTER_NAME, check_gen, write_task_config
from trace.evaluation.metrics import avg_at_k, bootstrap_ci, mean_pass_at_k, per_problem_accuracy
from trace.settings import schema_default

BACKENDS = ("hf", "vllm")
BOOTSTRAP_RESAMPLES = 10_000
CI_LEVEL = 0.95
VERSIONED_PACKAGES = ("lm_eval", "torch", "transformers", "datasets", "math-verify", "vllm")


class EvaluationError(RuntimeError):
    """lm-eval could not evaluate the model, or its output was not what the task config implies."""


@dataclasses.dataclass(frozen=True)
class _Job:
    """One benchmark of an lm-eval call and where its outputs go."""
    benchmark: str
    data_path: Path
    out_json: Path
    samples_path: Path

    @property
    def task_name(self) -> str:
        return f"trace_{self.benchmark}"


def evaluate(model_dir: Path, benchmark: str, data_path: Path, out_json: Path, *, k: int, gen: dict,
             thinking: bool, backend: str = "hf", batch_size: int | str = 64, limit: int | None = None,
             seed: int = 0, samples_path: Path | None = None, device: str = "cpu", dtype: str = "float32",
             tensor_parallel_size: int = 1, data_parallel_size: int = 1,
             model_options: Mapping[str, Any] | None = None, calibration_bins: int | None = None,
             lm=None) -> dict:
    """Sample k responses per problem of ``data_path`` (normalised JSONL) and write the results.

    gen: ``{"temperature", "top_p", "top_k", "max_new_tokens"}``. ``samples_path`` defaults to
    ``<out_json without .json>.samples.jsonl``; the task YAML lands in ``<...>.lmeval_task/``.
    ``model_options`` are extra lm-eval model arguments (e.g. ``{"gpu_memory_utilization": 0.85,
    "max_model_len": 40960}`` for vLLM). ``calibration_bins``: the ECE's equal-width bins (None: the
    schema's default of ``eval.calibration_bins``). ``lm``: an already built lm-eval ``LM`` to use instead
    of loading ``model_dir`` (tests; ``model_dir`` is then only recorded). Returns the results
    dict that was written to ``out_json``.

    ``backend="vllm"`` (tensor/data parallel on a GPU machine) only builds lm-eval's model
    arguments; it is not exercised by the CPU test suite.
    """
    out_json = Path(out_json)
    job = _Job(benchmark, Path(data_path), out_json,
               Path(samples_path) if samples_path else _sibling(out_json, ".samples.jsonl"))
    return _evaluate_jobs(model_dir, [job], k=k, gen=gen, thinking=thinking, backend=backend,
                          batch_size=batch_size, limit=limit, seed=seed, device=device, dtype=dtype,
                          tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                          model_options=model_options, calibration_bins=calibration_bins, lm=lm)[benchmark]


def evaluate_many(model_dir: Path, data_paths: Mapping[str, Path], out_dir: Path, *, k: int, gen: dict,
                  thinking: bool, backend: str = "hf", batch_size: int | str = 64, limit: int | None = None,
                  seed: int = 0, device: str = "cpu", dtype: str = "float32", tensor_parallel_size: int = 1,
                  data_parallel_size: int = 1, model_options: Mapping[str, Any] | None = None,
                  calibration_bins: int | None = None, lm=None) -> dict[str, dict]:
    """Several benchmarks ({name: JSONL path}) in ONE lm-eval call, so the model loads once.

    Same settings as :func:`evaluate`; writes ``out_dir/<name>.json`` and
    ``out_dir/<name>.samples.jsonl`` per benchmark (task YAMLs in ``out_dir/lmeval_tasks/``).
    The recorded wall time is that of the whole call.
    """
    if device == "cuda" and lm is None:  # before lm-eval and the engine start: one line, not a deep traceback
        import torch

        if not torch.cuda.is_available():
            from trace.launch import no_cuda_message

            raise ValueError(no_cuda_message("eval.device"))
    out_dir = Path(out_dir)
    jobs = [_Job(name, Path(path), out_dir / f"{name}.json", out_dir / f"{name}.samples.jsonl")
            for name, path in data_paths.items()]
    return _evaluate_jobs(model_dir, jobs, k=k, gen=gen, thinking=thinking, backend=backend,
                          batch_size=batch_size, limit=limit, seed=seed, device=device, dtype=dtype,
                          tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                          model_options=model_options, calibration_bins=calibration_bins, lm=lm)


# ---------------------------------------------------------------------------------------
# The lm-eval call
# ---------------------------------------------------------------------------------------

def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name.removesuffix(".json") + suffix)


def model_arguments(backend: str, model_dir: Path, *, thinking: bool, seed: int, dtype: str,
                    tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                    model_options: Mapping[str, Any] | None = None) -> dict:
    """lm-eval ``model_args`` for a local checkpoint (see the module docstring on thinking)."""
    if backend == "hf":
        args = {"pretrained": str(model_dir), "dtype": dtype,
                "chat_template_args": {"enable_thinking": bool(thinking)}}
    elif backend == "vllm":
        args = {"pretrained": str(model_dir), "dtype": dtype, "seed": seed,
                "tensor_parallel_size": int(tensor_parallel_size),
                "data_parallel_size": int(data_parallel_size)}
        if not thinking:
            args["enable_thinking"] = False
    else:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return args | dict(model_options or {})


def _check_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise EvaluationError(f"model directory {model_dir} has no config.json; expected a Hugging Face "
                              f"checkpoint folder (save_pretrained output)")
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise EvaluationError(f"model directory {model_dir} has no tokenizer files")


def _evaluate_jobs(model_dir: Path, jobs: list[_Job], *, k: int, gen: dict, thinking: bool, backend: str,
                   batch_size: int | str, limit: int | None, seed: int, device: str, dtype: str,
                   tensor_parallel_size: int, data_parallel_size: int, model_options: Mapping[str, Any] | None,
                   calibration_bins: int | None, lm) -> dict[str, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_dir = Path(model_dir).resolve()
    if lm is None:
        _check_model_dir(model_dir)
    gen = check_gen(gen)
    if calibration_bins is None:
        calibration_bins = schema_default("#/$defs/calibration_bins")
    if int(calibration_bins) < 1:
        raise ValueError(f"calibration_bins must be >= 1, got {calibration_bins}")
    if len({job.benchmark for job in jobs}) != len(jobs):
        raise ValueError(f"duplicate benchmark names in {[job.benchmark for job in jobs]}")

    # One fresh task directory per call: lm-eval indexes every YAML under include_path.
    if len(jobs) == 1:
        task_dir = _sibling(jobs[0].out_json, ".lmeval_task")
    else:
        task_dir = jobs[0].out_json.parent / "lmeval_tasks"
    shutil.rmtree(task_dir, ignore_errors=True)
    task_files = {job.benchmark: write_task_config(job.task_name, job.data_path, task_dir, k=k, gen=gen,
                                                   thinking=thinking) for job in jobs}

    if backend == "hf":
        from trace.rollout.hf import install_fast_top_p

        install_fast_top_p()  # the same samples without sorting the vocabulary at every token
    model_args = model_arguments(backend, model_dir, thinking=thinking, seed=seed, dtype=dtype,
                                 tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                                 model_options=model_options)
    started = time.time()
    try:
        output = lm_eval.simple_evaluate(
            model=backend if lm is None else lm,
            model_args=model_args,
            tasks=[job.task_name for job in jobs],
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
            batch_size=batch_size if backend == "hf" else "auto",
            device=device if backend == "hf" else None,
            limit=limit,
            bootstrap_iters=0,  # our own bootstrap (over problems) is below
            log_samples=True,
            apply_chat_template=True,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except Exception as error:  # noqa: BLE001 - re-raised with the model and data named
        raise EvaluationError(
            f"lm-eval failed evaluating model {model_dir} on {[str(job.data_path) for job in jobs]} "
            f"(backend {backend}; task configs in {task_dir}): {type(error).__name__}: {error}") from error
    wall_time_s = time.time() - started
    if output is None:  # not rank 0 of a multi-process run: rank 0 writes the files
        return {}

    shared = {
        "model_dir": str(model_dir),
        "backend": backend,
        "model_args": model_args,
        "thinking": bool(thinking),
        "k": int(k),
        "sampling": {**gen, "do_sample": True},
        "seed": seed,
        "batch_size": batch_size,
        "limit": limit,
        "device": device,
        "dtype": dtype,
        "versions": package_versions(),
        "wall_time_s": round(wall_time_s, 2),
        "benchmarks_in_call": [job.benchmark for job in jobs],
        "lm_eval_repo_git_hash": output.get("git_hash"),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return {job.benchmark: _summarise(job, output, shared, task_files[job.benchmark], int(k), int(calibration_bins))
            for job in jobs}


# ---------------------------------------------------------------------------------------
# From lm-eval's logged samples to our files
# ---------------------------------------------------------------------------------------

def per_sample_rows(samples: list[dict], k: int, where: str) -> list[dict]:
    """One row per problem (doc order): id, prompt, the k responses and their grades."""
    rows = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = sample["doc"]
        responses, grades = list(sample["resps"][0]), list(sample["sample_grades"])
        if len(responses) != k or len(grades) != k:
            raise EvaluationError(f"{where}: doc {doc['id']!r} has {len(responses)} responses and "
                                  f"{len(grades)} grades, expected k={k}")
        if list(sample["filtered_resps"][0]) != responses:
            raise EvaluationError(f"{where}: the {FILTER_NAME!r} filter changed the responses of doc {doc['id']!r}")
        rows.append({"doc_id": sample["doc_id"], "id": doc["id"], "answer": doc["answer"], "kind": doc["kind"],
                     "prompt": sample["arguments"][0][0], "responses": responses,
                     "grades": [bool(grade) for grade in grades]})
    return rows


def _summarise(job: _Job, output: dict, shared: dict, task_file: Path, k: int, calibration_bins: int) -> dict:
    where = f"lm-eval output for {job.data_path}"
    try:
        samples = output["samples"][job.task_name]
        lm_eval_metrics = output["results"][job.task_name]
    except KeyError as missing:
        raise EvaluationError(f"{where}: no {missing} entry for task {job.task_name!r}") from None
    rows = per_sample_rows(samples, k, where)
    correct = [row["grades"] for row in rows]
    scores = per_problem_accuracy(correct)
    score = avg_at_k(correct)
    # lm-eval aggregated the same grades; a mismatch means samples were lost or reordered.
    reported = lm_eval_metrics.get(f"avg_at_k,{FILTER_NAME}")
    if reported is None or abs(reported - score) > 1e-9:
        raise EvaluationError(f"{where}: avg@k from the logged samples ({score}) differs from lm-eval's "
                              f"aggregate ({reported})")
    low, high = bootstrap_ci(scores, n_boot=BOOTSTRAP_RESAMPLES, seed=shared["seed"], level=CI_LEVEL)
    result = {
        "benchmark": job.benchmark,
        "data_path": str(job.data_path.resolve()),
        "n_problems": len(rows),
        "avg_at_k": score,
        "pass_at_k": {"1": mean_pass_at_k(correct, 1), str(k): mean_pass_at_k(correct, k)},
        "ci95_avg_at_k": [low, high],
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "level": CI_LEVEL, "unit": "problem",
                      "seed": shared["seed"]},
        "per_problem": [{"id": row["id"], "score": s, "n_correct": sum(row["grades"])}
                        for row, s in zip(rows, scores)],
        **shared,
        "lm_eval_metrics": {name: value for name, value in lm_eval_metrics.items() if "_stderr," not in name},
        "samples_path": str(job.samples_path),
        "task_config": str(task_file),
        "calibration": calibration_summary(problem_calibration(rows), calibration_bins, n_boot=BOOTSTRAP_RESAMPLES,
                                           seed=shared["seed"], level=CI_LEVEL),
    }
    _write_atomic(job.samples_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    _write_atomic(job.out_json, json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
    return result


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def package_versions() -> dict:
    """Versions of the packages that decide the numbers (absent ones are left out)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace.evaluation.run", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--benchmark", required=True, help="name used in the task and the results, e.g. math500")
    parser.add_argument("--data", type=Path, required=True, help="normalised JSONL eval set")
    parser.add_argument("--out", type=Path, required=True, help="results JSON path")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=32768)
    parser.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--backend", choices=BACKENDS, default="hf")
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--calibration-bins", type=int, default=None,
                        help="equal-width bins of the calibration error (default: the schema's eval.calibration_bins)")
    args = parser.parse_args(argv)
    result = evaluate(
        args.model_dir, args.benchmark, args.data, args.out, k=args.k,
        gen={"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
             "max_new_tokens": args.max_new_tokens},
        thinking=args.thinking, backend=args.backend,
        batch_size=int(args.batch_size) if args.batch_size.isdigit() else args.batch_size,
        limit=args.limit, seed=args.seed, device=args.device, dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
        calibration_bins=args.calibration_bins)
    print(f"{args.benchmark}: avg@{args.k} = {result['avg_at_k']:.4f} "
          f"(95% CI {result['ci95_avg_at_k'][0]:.4f}-{result['ci95_avg_at_k'][1]:.4f}), "
          f"n = {result['n_problems']}, ECE {result['calibration']['ece']:.4f}, {result['wall_time_s']:.0f} s "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
