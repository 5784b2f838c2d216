"""Held-out validation during training (``train.validation``; paper Figs 3/4/7): mean@k of the policy on
the first n problems of a validation split, every ``every`` steps and after the last one, and, with
``select: best``, the best-on-validation policy kept as the run's model."""
from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from trace.evaluation.metrics import avg_at_k, bootstrap_ci, per_problem_accuracy
from trace.prompting import render_prompt
from trace.settings import TrainRun
from trace.train.distributed import rollout_seed, seeds_per_rollout
from trace.train.run_files import RunDir, load_records

log = logging.getLogger(__name__)

STREAM = 500_000  # validation's sampling streams, apart from training's (one per step)


def validation_records(settings: TrainRun, val_path: Path | None) -> list[dict]:
    """The first n_problems validation records (none when validation is off or no file was given)."""
    val = settings.validation
    if val.every == 0 or val_path is None:
        if val.select == "best":
            raise ValueError("train.validation.select is 'best' but validation is off "
                             f"({'no --val-data file' if val_path is None else 'every: 0'})")
        if val.every > 0:
            log.warning("train.validation.every is %d but no --val-data file was given: no validation", val.every)
        return []
    records = [r for r in load_records(val_path, "validation data") if r.get("answer") not in (None, "")]
    records = records[:val.n_problems] if val.n_problems else records
    if not records:
        raise ValueError(f"validation file {val_path} has no problems with an answer")
    return records


class HeldOutValidation:
    """mean@k on held-out problems, graded by the training reward's grader (``reward``)."""

    def __init__(self, settings: TrainRun, val_path: Path | None, run: RunDir, start_step: int,
                 reward: Callable[[list[str], list[str], list[str]], list[bool]]):
        self.settings, self.run, self.reward = settings, run, reward
        self.records = validation_records(settings, val_path)
        if start_step == 0:  # a fresh start forgets an earlier attempt's best policy
            shutil.rmtree(run.best, ignore_errors=True)
        info = run.best / "validation.json"
        self.best = json.loads(info.read_text()) if info.exists() else None

    @property
    def select_best(self) -> bool:
        return self.settings.validation.select == "best"

    def due(self, step: int) -> bool:
        return bool(self.records) and ((step + 1) % self.settings.validation.every == 0
                                       or step + 1 == self.settings.steps)

    @torch.no_grad()
    def measure(self, step: int, policy, engine, tokenizer, dist) -> dict:
        """mean@k of ``policy`` after step ``step``'s update: k samples per problem from the rollout engine
        (the training engine with validation's sampling overrides); under torchrun each rank its share."""
        settings, started, k = self.settings, time.time(), self.settings.validation.k
        engine = copy.copy(engine)
        engine.sampling = settings.validation.sampling.over(settings.sampling).as_dict()
        stream = STREAM + step
        torch.manual_seed(settings.seed * 1_000_003 + stream)
        per_rollout = seeds_per_rollout(settings, dist)  # then any number of ranks draws the same samples
        mine = dist.share_padded(self.records)
        graded: dict[int, list[bool]] = {}
        for start in range(0, len(mine), settings.batch_prompts):
            chunk = mine[start:start + settings.batch_prompts]
            seeds = ([rollout_seed(settings.seed, stream, i or 0, j) for i, _ in chunk for j in range(k)]
                     if per_rollout else None)
            texts = engine.generate(policy, [render_prompt(tokenizer, r, settings.thinking) for _, r in chunk], k,
                                    row_seeds=seeds, synced=dist.active).texts
            grades = self.reward(texts, [r["answer"] for _, r in chunk for _ in range(k)],
                                 [r.get("kind", "math") for _, r in chunk for _ in range(k)])
            graded.update({i: grades[n * k:(n + 1) * k] for n, (i, _) in enumerate(chunk) if i is not None})
        dist.reshard(policy)
        merged = {i: g for part in dist.gather_objects(graded) for i, g in part.items()}
        correct = [merged[i] for i in range(len(self.records))]
        low, high = bootstrap_ci(per_problem_accuracy(correct))
        return {"val/mean_at_k": avg_at_k(correct), "val/ci95_low": low, "val/ci95_high": high, "val/k": k,
                "val/n_problems": len(correct), "val_s": round(time.time() - started, 3)}

    def keep_if_best(self, step: int, row: dict, save_policy: Callable[[Path], None], dist) -> None:
        """select best: save the policy when its score beats every earlier one (ties keep the earlier
        step), atomically like the checkpoint."""
        if self.best is not None and row["val/mean_at_k"] <= self.best["val/mean_at_k"]:
            return
        self.best = {"step": step, "val/mean_at_k": row["val/mean_at_k"]}  # the same on every rank
        tmp = self.run.work / "best.tmp"
        save_policy(tmp)
        if dist.is_main:
            (tmp / "validation.json").write_text(json.dumps(self.best) + "\n")
            shutil.rmtree(self.run.best, ignore_errors=True)
            tmp.rename(self.run.best)
        dist.barrier()
