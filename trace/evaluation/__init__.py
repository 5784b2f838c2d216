"""Evaluation (spec §6): lm-eval tasks over the normalised eval sets, avg@k / pass@k, bootstrap CIs, calibration.

- :mod:`trace.evaluation.lmeval_tasks`: task YAML generation and the scoring hooks lm-eval calls;
- :mod:`trace.evaluation.metrics`: avg@k, unbiased pass@k, bootstrap confidence intervals, and the
  calibration statistics (majority vote, ECE, reliability bins, Brier score);
- :mod:`trace.evaluation.calibration`: agreement confidence over the k samples of one evaluation;
- :mod:`trace.evaluation.run`: ``evaluate(...)`` -> one results JSON + per-sample JSONL.
"""
from trace.evaluation.lmeval_tasks import EvalDataError, process_results, write_task_config
from trace.evaluation.metrics import avg_at_k, bootstrap_ci, mean_pass_at_k, pass_at_k, per_problem_accuracy
from trace.evaluation.run import EvaluationError, evaluate, evaluate_many

__all__ = [
    "EvalDataError",
    "EvaluationError",
    "avg_at_k",
    "bootstrap_ci",
    "evaluate",
    "evaluate_many",
    "mean_pass_at_k",
    "pass_at_k",
    "per_problem_accuracy",
    "process_results",
    "write_task_config",
]
