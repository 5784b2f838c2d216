"""Validation during training (TRACE.md: held-out validation curves, Figs 3/4/7) on the toy world:
val/mean_at_k appears at the right steps, equals a recomputation from the sampled completions, and
`select: best` makes the best-validated policy the run's model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from test_train import read_metrics, run_config
from trace.rollout import HFRolloutEngine
from trace.settings import SettingsError, TrainRun, default_run
from trace.train.trainer import Trainer
from trace.train.validation import validation_records
from trace.verify import grade


def val_config(**validation):
    # multiple-choice validation problems: even a tiny model is right ~25% of the time, so scores vary
    cfg = run_config(lr=1e-2, weight_decay=0.0)
    cfg["sampling"].update(max_new_tokens=96, temperature=1.0)  # room to answer, as in test_train's MC checks
    cfg["validation"] = {"every": 2, "n_problems": 6, "k": 3, "sampling": {}, "select": "last", **validation}
    return cfg


def make(cfg, tiny_base, toy_data, run_dir):
    torch.set_num_threads(1)
    return Trainer(cfg, tiny_base, toy_data / "choice_ood.jsonl", run_dir, val_path=toy_data / "choice_ood.jsonl")


def test_validation_runs_every_n_steps_and_after_the_last(tiny_base, toy_data, tmp_path):
    cfg = val_config(every=2)
    cfg["steps"] = 5
    make(cfg, tiny_base, toy_data, tmp_path / "run").fit()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/mean_at_k" in r] == [1, 3, 4]  # after steps 2, 4 and the last (5th)
    for row in rows:
        if "val/mean_at_k" in row:
            assert row["val/k"] == 3 and row["val/n_problems"] == 6
            # 6 problems x 3 samples: the mean is a multiple of 1/18
            assert round(row["val/mean_at_k"] * 18, 6) == round(row["val/mean_at_k"] * 18)
            assert row["val/ci95_low"] <= row["val/mean_at_k"] <= row["val/ci95_high"]
            assert row["val_s"] > 0


def test_val_mean_at_k_equals_a_recomputation_from_the_sampled_completions(tiny_base, toy_data, tmp_path,
                                                                             monkeypatch):
    trainer = make(val_config(), tiny_base, toy_data, tmp_path / "run")
    sampled = []  # the real engine runs; we only keep what it returned
    original = HFRolloutEngine.generate

    def keep(self, model, prompts, n, **options):  # options: row_seeds, synced (the engine's keywords)
        batch = original(self, model, prompts, n, **options)
        sampled.append((len(prompts), n, self.sampling, batch.texts))
        return batch

    monkeypatch.setattr(HFRolloutEngine, "generate", keep)
    row = trainer.validate(step=3)
    # batches of train.batch_prompts (2) prompts, k = 3 samples each, the training sampling settings
    assert [(p, n) for p, n, _, _ in sampled] == [(2, 3)] * 3
    assert all(s == trainer.settings.sampling.as_dict() for _, _, s, _ in sampled)
    texts = [t for *_, batch in sampled for t in batch]
    records = [json.loads(line) for line in (toy_data / "choice_ood.jsonl").read_text().splitlines()][:6]
    grades = np.array([grade(texts[3 * i + j], r["answer"], r["kind"]) for i, r in enumerate(records)
                       for j in range(3)]).reshape(6, 3)
    assert row["val/mean_at_k"] == pytest.approx(grades.mean(axis=1).mean(), abs=1e-12)
    assert 0 < grades.sum() < 18, "the check needs right and wrong samples"
    # the same step's validation draws the same samples (its own seed, apart from training's)
    assert trainer.validate(step=3)["val/mean_at_k"] == row["val/mean_at_k"]


def test_validation_sampling_overrides_reach_the_engine(tiny_base, toy_data, tmp_path, monkeypatch):
    trainer = make(val_config(sampling={"max_new_tokens": 5}), tiny_base, toy_data, tmp_path / "run")
    seen = []
    original = HFRolloutEngine.generate
    monkeypatch.setattr(HFRolloutEngine, "generate",
                        lambda self, *a, **kw: seen.append(dict(self.sampling)) or original(self, *a, **kw))
    trainer.validate(step=0)
    assert seen and all(s == {**trainer.settings.sampling.as_dict(), "max_new_tokens": 5} for s in seen)
    assert trainer.engine.sampling["max_new_tokens"] == 96  # training's engine is untouched


def test_select_best_makes_the_best_validated_policy_the_runs_model(tiny_base, toy_data, tmp_path):
    cfg = val_config(every=1, select="best")
    cfg["steps"] = 4
    cfg["lr"] = 1e-3  # a gentler step keeps the tiny policy answering (lr 1e-2 can collapse it to all-wrong)
    run = tmp_path / "run"
    trainer = make(cfg, tiny_base, toy_data, run)
    trainer.fit()
    scores = {r["step"]: r["val/mean_at_k"] for r in read_metrics(run / "metrics.jsonl")}
    assert list(scores) == [0, 1, 2, 3] and len(set(scores.values())) > 1, scores
    best = max(scores, key=lambda s: (scores[s], -s))  # highest score, earliest step on ties
    saved = json.loads((run / "model" / "validation.json").read_text())
    assert saved == {"step": best, "val/mean_at_k": scores[best]}
    # model/ holds the policy after step `best`: validating it again at that step reproduces its score
    weights = load_file(run / "model" / "model.safetensors")
    last = load_file(run / "work" / "last" / "model.safetensors")
    if best != 3:
        assert any(not torch.equal(weights[n], last[n]) for n in weights)
    trainer.policy.load_state_dict(weights, strict=False)
    assert trainer.validate(best)["val/mean_at_k"] == scores[best]


def test_validation_settings_fail_with_one_clear_line(toy_data):
    def run(**validation) -> TrainRun:  # train.validation exactly as given, the rest of it from the schema
        return TrainRun.from_mapping({**default_run().to_dict(), "validation": validation})

    with pytest.raises(ValueError, match="select is 'best' but validation is off"):
        validation_records(run(every=10, select="best"), None)
    with pytest.raises(SettingsError, match=r"train.validation: unknown key\(s\) \['n'\]"):
        run(n=3)
    with pytest.raises(SettingsError, match=r"train.validation.select: 'first' is not one of \['last', 'best'\]"):
        run(select="first")
    with pytest.raises(FileNotFoundError, match="validation data .*missing.jsonl does not exist"):
        validation_records(run(every=2), toy_data / "missing.jsonl")
    settings = run(every=2, n_problems=5)
    assert len(validation_records(settings, toy_data / "val.jsonl")) == 5
    assert settings.validation.k == 4 and settings.validation.select == "last"  # the schema's defaults
    assert validation_records(run(every=2), None) == []  # no file: validation off, training goes on


def test_cli_train_takes_the_validation_file(tiny_base, toy_data, tmp_path):
    cfg = val_config(every=2)
    result = subprocess.run([sys.executable, "-m", "trace", "train", "--cfg", json.dumps(cfg), "--base",
                             str(tiny_base), "--train-data", str(toy_data / "choice_ood.jsonl"), "--run-dir",
                             str(tmp_path / "run"), "--val-data", str(toy_data / "choice_ood.jsonl")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/mean_at_k" in r] == [1]


def test_validation_leaves_the_training_trajectory_unchanged(tiny_base, toy_data, tmp_path):
    cfg = val_config(every=1)
    with_val = make(cfg, tiny_base, toy_data, tmp_path / "with")
    with_val.fit()
    without = Trainer({**cfg, "validation": {**cfg["validation"], "every": 0}}, tiny_base,
                      toy_data / "choice_ood.jsonl", tmp_path / "without")
    without.fit()
    rows = read_metrics(tmp_path / "without" / "metrics.jsonl")
    assert all("val/mean_at_k" not in r for r in rows)
    assert [r["loss"] for r in read_metrics(tmp_path / "with" / "metrics.jsonl")] == [r["loss"] for r in rows]
    for a, b in zip(with_val.policy.parameters(), without.policy.parameters()):
        assert torch.equal(a, b)
