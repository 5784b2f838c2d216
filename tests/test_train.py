"""The RL trainer on a tiny real model: weights move, metrics are written, runs resume, every
method trains, and λ = 0 for good means no teacher at all."""
import copy
import json
import os

import pytest
import torch

from conftest import REPO_ROOT
from trace.settings import default_train_section  # noqa: E402
from trace.annotate.setup import annotator_for
from trace.methods import METHODS
from trace.train.trainer import Trainer

BASE_TRAIN = default_train_section()  # the one shared base (trace/settings.py)


def run_config(method="grpo", **overrides):
    cfg = copy.deepcopy(BASE_TRAIN)
    cfg.update(method=method, seed=0, thinking=False, steps=2, batch_prompts=2, group_size=4,
               micro_batch_size=4, lr=1e-3, save_every=1)
    cfg["sampling"]["max_new_tokens"] = 48
    for key, value in overrides.items():
        if key == "kl":
            cfg["kl"].update(value)
        else:
            cfg[key] = value
    return cfg


def make_trainer(cfg, tiny_base, toy_data, run_dir):
    torch.set_num_threads(1)
    return Trainer(cfg, tiny_base, toy_data / "train.jsonl", run_dir, annotator=annotator_for(cfg, tiny_base))


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_grpo_steps_change_weights_and_write_metrics(tiny_base, toy_data, tmp_path):
    # multiple-choice prompts: even a barely trained model guesses letters right ~25% of the time,
    # so groups have reward variance and GRPO a real gradient (no weight decay to blur the check)
    cfg = run_config(batch_prompts=4, weight_decay=0.0, sampling=dict(BASE_TRAIN["sampling"], max_new_tokens=96,
                                                                      temperature=1.0))
    torch.set_num_threads(1)
    trainer = Trainer(cfg, tiny_base, toy_data / "choice_ood.jsonl", tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.fit()
    changed = [n for n, p in trainer.policy.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(changed) == len(before), "every parameter should receive a gradient step"
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    for row in rows:
        assert 0.0 <= row["reward_mean"] <= 1.0 and row["reward_mean"] == row["accuracy"]
        assert row["entropy"] > 0 and 1 <= row["response_length"] <= 96
        assert row["step_s"] > 0 and row["rollout_s"] > 0
        assert row["clip_frac_high"] == 0.0  # one update per batch: ratio is exactly 1
    assert any(row["groups_with_signal"] > 0 and row["grad_norm"] > 0 for row in rows)
    assert (tmp_path / "run" / "model" / "config.json").exists()


def fit_killed_at(trainer, step):
    """fit() until the job is killed while training ``step`` (as by SLURM or Ctrl-C)."""
    train_step = trainer.train_step

    def killed(s):
        if s == step:
            raise KeyboardInterrupt
        return train_step(s)

    trainer.train_step = killed
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()


def test_killed_run_resumes_from_last_checkpoint(tiny_base, toy_data, tmp_path):
    run = tmp_path / "run"
    fit_killed_at(make_trainer(run_config(steps=2), tiny_base, toy_data, run), 1)  # checkpoint after step 0
    state = torch.load(run / "work" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["next_step"] == 1
    resumed = make_trainer(run_config(steps=3), tiny_base, toy_data, run)
    assert resumed.start_step == 1
    resumed.fit()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2]


def test_changed_settings_do_not_resume_a_stale_checkpoint(tiny_base, toy_data, tmp_path):
    run = tmp_path / "run"
    make_trainer(run_config(steps=2), tiny_base, toy_data, run).fit()  # leaves a checkpoint at step 2
    changed = make_trainer(run_config(steps=2, lr=5e-4), tiny_base, toy_data, run)
    assert changed.start_step == 0
    changed.fit()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1]


def test_a_fresh_start_drops_rows_of_a_killed_attempt(tiny_base, toy_data, tmp_path):
    run = tmp_path / "run"
    (run / "work").mkdir(parents=True)
    (run / "work" / "metrics.jsonl").write_text('{"step": 0, "reward_mean": 0.5}\n')  # killed before a checkpoint
    trainer = make_trainer(run_config(steps=2, save_every=10), tiny_base, toy_data, run)
    assert trainer.start_step == 0
    trainer.fit()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1]


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"grpo"}))
def test_every_method_trains_with_its_teacher(method, tiny_base, toy_data, tmp_path):
    cfg = run_config(method, steps=1, save_every=10)
    if METHODS[method].teacher == "external":  # OPD: a teacher folder with the student's tokenizer (here: itself)
        cfg.update(teacher_model=str(tiny_base))
        cfg["kl"]["top_k"] = 5 if METHODS[method].support == "teacher_top_k" else None
    trainer = make_trainer(cfg, tiny_base, toy_data, tmp_path / method)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.fit()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainer.policy.parameters()))
    (row,) = read_metrics(tmp_path / method / "metrics.jsonl")
    assert row["teacher_active"] == 1
    assert row["lambda"] == cfg["kl"]["w0"]
    assert "tokens_key" in row and "span_coverage" in row
    if METHODS[method].routing in ("annotated", "random", "inverted"):
        assert row["span_coverage"] <= cfg["kl"]["alpha"] + 1e-9
    if METHODS[method].needs_annotation:
        assert row["annotator/requested"] == 8


def test_lambda_zero_for_good_skips_the_teacher(tiny_base, toy_data, tmp_path):
    cfg = run_config("trace_fkl", steps=1, kl={"warmup": 0, "end": 0})
    trainer = make_trainer(cfg, tiny_base, toy_data, tmp_path / "run")
    assert trainer.teacher is None  # never built: no teacher forward, no annotation
    trainer.fit()
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert row["teacher_active"] == 0 and row["lambda"] == 0.0 and "tokens_key" not in row


def _mc_trainer(tiny_base, toy_data, run_dir, method, **overrides):
    cfg = run_config(method, batch_prompts=4, weight_decay=0.0,
                     sampling=dict(BASE_TRAIN["sampling"], max_new_tokens=96, temperature=1.0), **overrides)
    torch.set_num_threads(1)
    return Trainer(cfg, tiny_base, toy_data / "choice_ood.jsonl", run_dir)


def test_srpo_loss_does_not_depend_on_the_micro_batch_split(tiny_base, toy_data, tmp_path, monkeypatch):
    """SRPO's entropy weights are normalised over the whole optimizer batch, not per micro-batch."""
    whole = _mc_trainer(tiny_base, toy_data, tmp_path / "whole", "srpo", micro_batch_size=16).train_step(0)
    split = _mc_trainer(tiny_base, toy_data, tmp_path / "split", "srpo", micro_batch_size=4).train_step(0)
    assert 0 < whole["accuracy"] < 1, "the check needs failed and correct rollouts in the batch"
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-4, abs=1e-6)
    assert split["teacher_entropy"] == pytest.approx(whole["teacher_entropy"], rel=1e-4)
    # the test is sensitive: per-micro-batch normalisation (the pitfall) changes the loss
    monkeypatch.setattr(Trainer, "_srpo_global_weight_mean", lambda *args: None)
    naive = _mc_trainer(tiny_base, toy_data, tmp_path / "naive", "srpo", micro_batch_size=4).train_step(0)
    assert abs(naive["loss"] - whole["loss"]) > 1e-6


def test_a_grpo_step_raises_rewarded_rollouts_and_lowers_the_others(tiny_base, toy_data, tmp_path):
    """Direction of the policy gradient: after one step, positive-advantage rollouts gain log-prob."""
    from trace import losses
    from trace.prompting import render_prompt
    from trace.logprobs import completion_hidden_states, gather_logprobs
    from trace.verify import grade_many

    trainer = _mc_trainer(tiny_base, toy_data, tmp_path / "run", "grpo", lr=3e-4, micro_batch_size=16)
    records = trainer.sample_prompts(0)
    rollouts = trainer.engine.generate(trainer.policy, [render_prompt(trainer.tokenizer, r, False) for r in records], 4)
    golds = [r["answer"] for r in records for _ in range(4)]
    correct = torch.tensor(grade_many(rollouts.texts, golds, ["mc"] * len(golds)))
    advantages = losses.grpo_advantages(correct.float(), 4)
    assert (advantages > 0).any() and (advantages < 0).any()
    mask = rollouts.completion_mask.bool()

    def sequence_logp():
        with torch.no_grad():
            hidden = completion_hidden_states(trainer.policy, rollouts.input_ids, rollouts.attention_mask,
                                              rollouts.prompt_ids.shape[1])
            logp, _ = gather_logprobs(hidden[mask], trainer.policy.get_output_embeddings().weight,
                                      rollouts.completion_ids[mask], 1.0)
            return losses.tokens_from_positions(logp, mask).sum(-1)

    before = sequence_logp()
    _, agg = trainer.aggregation(mask)
    trainer.optimizer.zero_grad()
    trainer.micro_batch_loss(list(range(len(golds))), rollouts, advantages, correct, None, None, 0.0, 0, agg, None)
    trainer.optimizer.step()
    change = sequence_logp() - before
    assert change[advantages > 0].mean() > 0 > change[advantages < 0].mean()


# ------------------------------------------------------------------ issue 12: checkpoints and resume
def test_fingerprint_hashes_weight_content_not_timestamps(tiny_base, tmp_path):
    """Copying results/ with tar or rsync changes mtimes, never the content: checkpoints stay valid."""
    import os
    import shutil

    from trace.annotate.local import weights_fingerprint
    from trace.train.trainer import run_fingerprint

    copy_dir = tmp_path / "copied_base"
    shutil.copytree(tiny_base, copy_dir)
    for f in copy_dir.iterdir():
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))   # as an archive restore would set them
    cfg = run_config()
    assert weights_fingerprint(copy_dir) == weights_fingerprint(tiny_base)
    assert run_fingerprint(cfg, copy_dir) == run_fingerprint(cfg, tiny_base)
    weights = next(f for f in copy_dir.iterdir() if f.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF                                      # one changed byte, same size and mtime
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_fingerprint(copy_dir) != weights_fingerprint(tiny_base)


def test_a_checkpoint_survives_touched_base_weights(tiny_base, toy_data, tmp_path):
    import os
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    run = tmp_path / "run"
    make_trainer(run_config(steps=2), base, toy_data, run).fit()
    for f in base.iterdir():
        os.utime(f)                                       # e.g. results/ restored from a tar archive
    assert make_trainer(run_config(steps=3), base, toy_data, run).start_step >= 1


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(os.environ["TRACE_TEST_MARKER"]),))


def test_trainer_state_is_loaded_without_running_code(tiny_base, toy_data, tmp_path, monkeypatch):
    """A swapped trainer_state.pt must not run code (torch.load(weights_only=True)); the error names the file."""
    run = tmp_path / "run"
    make_trainer(run_config(steps=2), tiny_base, toy_data, run).fit()
    state_path = run / "work" / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("TRACE_TEST_MARKER", str(marker))
    torch.save({**state, "payload": _RunsCodeWhenUnpickled()}, state_path)
    with pytest.raises(ValueError, match="trainer_state.pt") as error:
        make_trainer(run_config(steps=3), tiny_base, toy_data, run)
    assert not marker.exists()
    assert "delete" in str(error.value) and "\n" not in str(error.value)


def test_corrupt_checkpoint_weights_name_the_file(tiny_base, toy_data, tmp_path):
    run = tmp_path / "run"
    make_trainer(run_config(steps=2), tiny_base, toy_data, run).fit()
    weights = next((run / "work" / "checkpoint").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])       # truncated by a full disk
    with pytest.raises(ValueError, match="checkpoint") as error:
        make_trainer(run_config(steps=3), tiny_base, toy_data, run)
    assert str(run / "work" / "checkpoint") in str(error.value) and "\n" not in str(error.value)


def test_a_truncated_training_jsonl_names_the_file_and_line(toy_data, tmp_path):
    from trace.train.trainer import load_records

    lines = (toy_data / "train.jsonl").read_text().splitlines()[:3]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines[:2] + [lines[2][: len(lines[2]) // 2]]) + "\n")   # killed mid-write
    with pytest.raises(ValueError) as error:
        load_records(data)
    message = str(error.value)
    assert f"{data} line 3" in message and "\n" not in message and "rerun" in message


def test_cli_errors_are_one_line_naming_the_file(tiny_base, toy_data, tmp_path):
    """Through `python -m trace train`: a missing base folder and a truncated JSONL each give one
    error line naming the file (not "Repo id must be in the form ..." or a JSONDecodeError)."""
    import subprocess
    import sys

    cfg = json.dumps(run_config())
    bad_data = tmp_path / "train.jsonl"
    bad_data.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+')

    def run(base, data):
        return subprocess.run([sys.executable, "-m", "trace", "train", "--cfg", cfg, "--base", str(base),
                               "--train-data", str(data), "--run-dir", str(tmp_path / "run")],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    missing = run(tmp_path / "no-such-base", toy_data / "train.jsonl")
    assert missing.returncode == 2 and "Repo id" not in missing.stderr and "Traceback" not in missing.stderr
    (line,) = [ln for ln in missing.stderr.splitlines() if "ERROR" in ln]
    assert str(tmp_path / "no-such-base") in line and "does not exist" in line
    truncated = run(tiny_base, bad_data)
    (line,) = [ln for ln in truncated.stderr.splitlines() if "ERROR" in ln]
    assert truncated.returncode == 2 and f"{bad_data} line 2" in line and "Traceback" not in truncated.stderr


def test_extending_a_finished_run_repeats_no_step(tiny_base, toy_data, tmp_path):
    """The final step is checkpointed too: raising train.steps continues where the run ended."""
    run = tmp_path / "run"
    make_trainer(run_config(steps=2, save_every=10), tiny_base, toy_data, run).fit()
    assert torch.load(run / "work" / "checkpoint" / "trainer_state.pt", weights_only=True)["next_step"] == 2
    extended = make_trainer(run_config(steps=3, save_every=10), tiny_base, toy_data, run)
    assert extended.start_step == 2
    extended.fit()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2]


def test_a_rerun_keeps_the_killed_attempts_log(tiny_base, toy_data, tmp_path):
    """The trainer appends to its own log in work/ (the rule's log: file is rewritten by each rerun)."""
    run = tmp_path / "run"
    fit_killed_at(make_trainer(run_config(steps=3), tiny_base, toy_data, run), 2)
    make_trainer(run_config(steps=3), tiny_base, toy_data, run).fit()
    text = (run / "work" / "train.log").read_text()
    assert text.count("attempt started") == 2
    assert "attempt started at step 0" in text and "attempt started at step 2" in text
    assert [ln.split(" step ")[1].split()[0] for ln in text.splitlines() if " reward " in ln] == ["0", "1", "2"]


def test_annotator_and_router_count_the_same_response_length(tiny_base, toy_data, tmp_path):
    """|y| in the coverage cap is the response mask's length for both the annotator and the router
    (the end-of-turn token is shown to the annotator as a zero-width token, never marked)."""
    trainer = make_trainer(run_config("trace_fkl", steps=1, save_every=10), tiny_base, toy_data, tmp_path / "run")
    seen = {}
    generate, annotate = trainer.engine.generate, trainer.annotator.annotate
    trainer.engine.generate = lambda *a, **k: seen.setdefault("rollouts", generate(*a, **k))
    trainer.annotator.annotate = lambda requests: annotate(seen.setdefault("requests", requests))
    trainer.train_step(0)
    rollouts = seen["rollouts"]
    lengths = rollouts.completion_mask.sum(-1).tolist()
    ends_with_eos = [rollouts.completion_ids[row, n - 1].item() == trainer.engine.eos_id
                     for row, n in enumerate(lengths)]
    assert any(ends_with_eos), "the check needs rollouts that end with the end-of-turn token"
    assert [len(r.token_offsets) for r in seen["requests"]] == lengths


@pytest.mark.parametrize("method", ["trace_both", "srpo"])
def test_logged_metrics_do_not_depend_on_the_micro_batch_size(method, tiny_base, toy_data, tmp_path):
    """Issue 12, item 10: every logged metric of one step (128 rollouts) is the same for micro-batches
    of 128, 32 and 16 (sums over global counts, never sums of per-micro-batch means)."""
    rows = {}
    for size in (128, 32, 16):
        cfg = run_config(method, batch_prompts=8, group_size=16, micro_batch_size=size, steps=1, save_every=10,
                         sampling=dict(BASE_TRAIN["sampling"], max_new_tokens=96, temperature=1.0))
        torch.set_num_threads(1)
        trainer = Trainer(cfg, tiny_base, toy_data / "choice_ood.jsonl", tmp_path / f"mb{size}",
                          annotator=annotator_for(cfg, tiny_base))
        rows[size] = trainer.train_step(0)
    whole = rows[128]
    assert 0 < whole["accuracy"] < 1, "the check needs correct and failed rollouts"
    if method == "trace_both":
        assert whole["tokens_key"] > 0 and whole["tokens_error"] > 0
        assert whole["kl/fkl_key_token_mean"] > 0 and whole["kl/rkl_error_token_mean"] > 0
    else:
        assert 0 < whole["srpo_weight_raw_mean"] <= 1
    timing = {"rollout_s", "step_s"} | {k for k in whole if "latency" in k or k.endswith("wall_s")}
    numbers = {n for n, v in whole.items() if isinstance(v, (int, float))} - timing
    for size in (32, 16):
        assert set(rows[size]) == set(whole)
        for name in sorted(numbers):
            assert rows[size][name] == pytest.approx(whole[name], rel=1e-4, abs=1e-6), (size, name)
        for name in sorted(set(whole) - timing - numbers):   # e.g. the mechanism probe's nested values
            assert _same_values(rows[size][name], whole[name]), (size, name)
        worst = max(abs(rows[size][n] - whole[n]) / max(abs(whole[n]), 1e-12) for n in numbers)
        print(f"{method}: {len(set(whole) - timing)} metrics, micro-batch {size} vs 128: max rel. diff {worst:.2e} "
              f"over the {len(numbers)} numbers")


def _same_values(a, b) -> bool:
    """Numbers equal up to float rounding (rel 1e-4; abs 1e-5 for 6-decimal rounded values), other
    values exactly, recursively through lists and dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == pytest.approx(b, rel=1e-4, abs=1e-5)
    return a == b


def test_resume_between_teacher_syncs_equals_an_uninterrupted_run(tiny_base, toy_data, tmp_path):
    """Issue 12, item 12: save_every (7) differs from teacher_sync_every (10), so the checkpoint at step 7
    must carry the teacher synced at step 0, not a copy of the step-7 policy."""
    cfg = run_config("trace_fkl", steps=9, save_every=7, kl={"teacher_sync_every": 10})
    straight = make_trainer(cfg, tiny_base, toy_data, tmp_path / "straight")
    straight.fit()
    killed = make_trainer(cfg, tiny_base, toy_data, tmp_path / "resumed")
    fit_killed_at(killed, 8)
    resumed = make_trainer(cfg, tiny_base, toy_data, tmp_path / "resumed")
    assert resumed.start_step == 7
    resumed.fit()
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(9))
    timing = {"rollout_s", "step_s"}
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in timing and "wall_s" not in k and "latency" not in k} == \
               {k: v for k, v in y.items() if k not in timing and "wall_s" not in k and "latency" not in k}
    for (name, p), q in zip(straight.policy.named_parameters(), resumed.policy.parameters()):
        assert torch.equal(p, q), name
