"""Calibration of agreement confidence for one evaluation (issue 23, docs/methods.md "Calibration").

On-policy distillation is reported to leave students miscalibrated; the remedy proposed estimates a
policy's confidence on a problem from the agreement of its k samples. Per problem of one evaluation
(one row of the per-sample log, trace/evaluation/run.py ``per_sample_rows``):

* each sample's final answer is :func:`trace.verify.answer_key` (None: no extractable answer, which
  counts as one answer of its own, "no answer");
* the majority answer is the most common one (ties: the one given first), the **confidence** is its
  share of the k samples, and its **correctness** is the grader's verdict on it: the grade of the first
  sample that gave it (trace/verify.py, the grades of the log; "no answer" grades False);
* over the problems: expected calibration error (equal-width bins over confidence, ``eval.calibration_bins``),
  the reliability diagram's bins, the Brier score, mean confidence and majority accuracy, with percentile
  bootstrap CIs over problems (trace/evaluation/metrics.py).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

from trace.evaluation.metrics import (CALIBRATION_STATISTICS, bootstrap_calibration_ci, brier_score,
                                      expected_calibration_error, majority_vote, reliability_bins)
from trace.verify import answer_key

CONFIDENCE = "agreement: share of the k samples whose final answer (trace.verify.answer_key) is the majority answer"


def problem_calibration(rows: Iterable[Mapping]) -> list[dict]:
    """Per problem (rows with id, kind, responses, grades): its majority answer (None: "no answer"), the
    agreement confidence, whether the majority answer is graded correct, and how many samples gave none."""
    out = []
    for row in rows:
        keys = [answer_key(response, row["kind"]) for response in row["responses"]]
        if len(keys) != len(row["grades"]) or not keys:
            raise ValueError(f"problem {row['id']!r}: {len(keys)} responses and {len(row['grades'])} grades")
        first, share = majority_vote(keys)
        out.append({"id": row["id"], "majority_answer": keys[first], "confidence": share,
                    "majority_correct": bool(row["grades"][first]), "n_no_answer": keys.count(None)})
    return out


def calibration_summary(per_problem: list[dict], n_bins: int, *, n_boot: int, seed: int, level: float) -> dict:
    """The ``calibration`` entry of an evaluation's results JSON (per_problem: :func:`problem_calibration`)."""
    confidence = [p["confidence"] for p in per_problem]
    correct = [p["majority_correct"] for p in per_problem]
    ci = bootstrap_calibration_ci([confidence], [correct], n_bins, n_boot=n_boot, seed=seed, level=level)
    values = {"ece": expected_calibration_error(confidence, correct, n_bins),
              "brier": brier_score(confidence, correct),
              "mean_confidence": sum(confidence) / len(confidence),
              "majority_accuracy": sum(correct) / len(correct)}
    return {"confidence": CONFIDENCE, "n_bins": int(n_bins), **values,
            "ci95": {name: list(ci[name]) for name in CALIBRATION_STATISTICS},
            "bootstrap": {"resamples": n_boot, "level": level, "unit": "problem", "seed": seed},
            "reliability": reliability_bins(confidence, correct, n_bins),
            "per_problem": per_problem}


def read_samples_log(path: Path) -> list[dict]:
    """The rows of an evaluation's ``<benchmark>.samples.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
