"""``python -m trace bench`` on tiny sizes: every row is there and the numbers obey real invariants
(the routed KL is the all-token KL restricted to the routed positions; the TRACE step loss is GRPO's
plus λ times the KL branch; the naive row's measured memory holds its full logits). No timing asserts.
"""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from trace.bench import _run_in_subprocess, add_arguments, run_variant, settings_from_args

B, T, V = 2, 64, 512
TINY = ["--vocab", str(V), "--length", str(T), "--batch", str(B), "--hidden", "32", "--layers", "1", "--chunk", "16"]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.mark.slow  # runs `python -m trace bench`
def test_bench_command_prints_table_and_json_with_consistent_rows(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "trace", "bench", *TINY, "--in-process", "--out", str(out)],
                          cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    printed = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert json.loads(printed[-1]) == result
    assert "| routed α=0.25 (chunked) | 32 |" in proc.stdout and "Rollout generation is excluded" in proc.stdout

    rows = {r["variant"]: r for r in result["kl_loss"] + result["step_loss_phase"]}
    assert set(rows) == {"kl_naive_all", "kl_chunked_all", "kl_routed", "step_grpo", "step_trace"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["time_s"] > 0 and row["peak_delta_mib"] >= 0 and row["threads"] == 1

    n_routed = B * math.floor(0.25 * T)
    naive, chunked, routed = rows["kl_naive_all"], rows["kl_chunked_all"], rows["kl_routed"]
    assert naive["kl_positions"] == chunked["kl_positions"] == B * T
    assert routed["kl_positions"] == n_routed
    # same inputs: chunking is exact, and the routed loss is the all-token KL on the routed positions only
    assert chunked["loss"] == pytest.approx(naive["loss"], rel=1e-5)
    assert routed["loss"] == pytest.approx(chunked["loss_on_routed_positions"], rel=1e-5)
    assert routed["loss"] == pytest.approx(naive["loss_on_routed_positions"], rel=1e-5)
    assert 0 < routed["loss"] < chunked["loss"]
    assert result["ratios"]["routed/chunked_all_time"] is not None

    grpo, trace_step = rows["step_grpo"], rows["step_trace"]
    assert grpo["kl_positions"] == 0 and trace_step["kl_positions"] == n_routed
    # one update per batch (ratio 1), zero-sum advantages, equal lengths and equal routed counts per
    # rollout: the surrogate parts sum to 0, so GRPO's loss is 0 and TRACE's is λ·(KL branch)
    assert grpo["loss"] == pytest.approx(0.0, abs=1e-6)
    assert trace_step["lam"] == 0.5 and trace_step["kl_key_branch"] > 0
    assert trace_step["loss"] == pytest.approx(trace_step["lam"] * trace_step["kl_key_branch"], rel=1e-4, abs=1e-9)
    assert grpo["grad_norm"] > 0 and trace_step["grad_norm"] > 0


@pytest.mark.slow  # measures memory in a worker process
def test_subprocess_worker_sees_the_full_logits_and_the_same_loss(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    Tn, Vn = 256, 4096
    settings = settings_from_args(parser.parse_args(
        ["--vocab", str(Vn), "--length", str(Tn), "--batch", str(B), "--hidden", "32", "--parts", "a"]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    row = _run_in_subprocess(settings, "kl_naive_all", None, tmp_path)
    assert "error" not in row, row
    logits_mib = B * Tn * Vn * 4 / 2 ** 20
    # student and teacher [B, T, V] float32 logits are both alive at the peak, and the peak was measured
    # from a reset high-water mark (Linux), so the delta is the call's own
    assert row["peak_delta_mib"] >= 2 * logits_mib, row
    assert "clear_refs" in row["memory_method"]
    assert row["kl_positions"] == B * Tn and row["loss"] > 0 and row["loss_on_routed_positions"] < row["loss"]
    # the worker rebuilt exactly the inputs this process builds from the same seed
    here = run_variant(settings, "kl_naive_all", None, tmp_path)
    assert here["loss"] == row["loss"] and here["loss_on_routed_positions"] == row["loss_on_routed_positions"]


def test_whole_step_comparison_with_rollouts(tmp_path):
    """Part (c): whole train_step with HF rollouts. In the window TRACE-FKL routes the capped key tokens
    of the correct half; after kl.end it has dropped its teacher and IS GRPO (same rollouts, same update)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    Tc = 16
    args = parser.parse_args(["--vocab", str(V), "--length", str(Tc), "--batch", "4", "--hidden", "32", "--layers", "1",
                              "--chunk", "16", "--parts", "c", "--in-process", "--repeats", "1"])
    from trace.bench import format_report, run_bench

    result = run_bench(settings_from_args(args))
    rows = {r["variant"]: r for r in result["whole_step"]}
    assert set(rows) == {"whole_grpo_kl_window", "whole_trace_kl_window", "whole_grpo_after", "whole_trace_after"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["time_s"] > 0 and row["rollout_s"] > 0 and row["engine"] == "hf"
        assert 1 <= row["response_length"] <= Tc
    window, after = rows["whole_trace_kl_window"], rows["whole_trace_after"]
    assert window["lam"] == 0.5 and window["teacher_active"] == 1
    assert 0 < window["kl_positions"] <= 2 * math.floor(0.25 * Tc)   # key tokens of the 2 correct rollouts, capped
    assert after["lam"] == 0.0 and after["teacher_active"] == 0 and after["kl_positions"] == 0
    assert after["grad_norm"] == pytest.approx(rows["whole_grpo_after"]["grad_norm"], rel=1e-5)
    assert after["loss"] == pytest.approx(rows["whole_grpo_after"]["loss"], abs=1e-7)
    assert result["ratios"]["trace/grpo_whole_step_kl_window_time"] is not None
    report = format_report(result)
    assert "(c) whole training step with rollouts (hf engine), in the KL window" in report
    assert "TRACE-FKL ÷ GRPO whole step, after kl.end" in report
