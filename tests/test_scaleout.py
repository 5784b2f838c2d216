"""The scale-out pieces that need no second process: per-rollout seeded sampling, token-budget
micro-batches, activation checkpointing, the launch command, and the GPU check's CPU dry run."""
import copy
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from trace.settings import default_train_section  # noqa: E402
from trace.launch import train_launcher, train_resources, world_size
from trace.train.distributed import Distributed, rollout_seed, token_budget_plan
from trace.rollout import HFRolloutEngine, RolloutBatch
from trace.rollout.hf import PerRowSampler

BASE_TRAIN = default_train_section()  # the one shared base (trace/settings.py)


# ---------------------------------------------------------------------- per-rollout sampling
def test_per_row_sampler_draws_from_the_warped_distribution():
    """p = (0.5, 0.3, 0.2): T = 1 keeps it; top-k 2 renormalises to (0.625, 0.375); 4000 rows, one draw each."""
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    seeds = list(range(4000))
    for top_k, expected in ((0, [0.5, 0.3, 0.2]), (2, [0.625, 0.375, 0.0])):
        sampler = PerRowSampler(seeds, {"temperature": 1.0, "top_k": top_k, "top_p": 1.0}, "cpu")
        out = sampler(torch.zeros(4000, 1, dtype=torch.long), scores.clone())
        assert torch.isfinite(out).sum(dim=1).eq(1).all()  # one pick per row, greedy takes it
        freq = torch.bincount(out.argmax(-1), minlength=3).float() / 4000
        assert freq.tolist() == pytest.approx(expected, abs=0.025)  # 3.2σ of a binomial(4000, 0.5)


def test_a_rollout_samples_the_same_tokens_whatever_batch_it_is_in(tiny_base):
    """Rank split: prompt 1's group alone (as on rank 1) equals its rows in the whole batch (one process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    engine = HFRolloutEngine(tokenizer, dict(BASE_TRAIN["sampling"], temperature=1.0, max_new_tokens=24))
    prompts = ["Compute 3 + 4.", "What is 12 times 7 minus a very long subtraction of 5?", "2 * 2"]
    seeds = [rollout_seed(0, 5, i, j) for i in range(3) for j in range(2)]
    whole = engine.generate(model, prompts, 2, row_seeds=seeds)
    alone = engine.generate(model, prompts[1:2], 2, row_seeds=seeds[2:4])
    for row in range(2):
        length = int(alone.completion_mask[row].sum())
        assert length == int(whole.completion_mask[2 + row].sum())
        assert torch.equal(alone.completion_ids[row, :length], whole.completion_ids[2 + row, :length])
    assert whole.texts[2:4] == alone.texts
    assert whole.texts[2] != whole.texts[3] or whole.texts[0] != whole.texts[1], "samples should differ"


# ---------------------------------------------------------------------- token-budget micro-batches
def batch_of(prompt_lengths, completion_lengths, P=6, T=8):
    rows = len(prompt_lengths)
    prompt_mask = torch.zeros(rows, P, dtype=torch.long)
    completion_mask = torch.zeros(rows, T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        prompt_mask[i, P - p:] = 1
        completion_mask[i, :c] = 1
    return RolloutBatch(prompt_mask.clone(), prompt_mask, completion_mask.clone(), completion_mask, [""] * rows)


def test_token_budget_plan_by_hand():
    # rows (prompt + completion): 0: 2+2, 1: 4+8, 2: 2+3, 3: 3+3; sorted by length: 0 (4), 2 (5), 3 (6), 1 (12)
    rollouts = batch_of([2, 4, 2, 3], [2, 8, 3, 3])
    # budget 12: [0, 2] is 2 rows × (2 + 3) = 10; + row 3 → 3 × 6 = 18 > 12; [3] then + row 1 → 2 × 12 > 12
    assert token_budget_plan(rollouts, 12, 32, Distributed()) == [[0, 2], [3], [1]]
    assert token_budget_plan(rollouts, 100, 32, Distributed()) == [[0, 2, 3, 1]]
    assert token_budget_plan(rollouts, 100, 2, Distributed()) == [[0, 2], [3, 1]]  # micro_batch_size caps rows
    assert token_budget_plan(rollouts, 1, 32, Distributed()) == [[0], [2], [3], [1]]  # a longer row gets its own

    class BusierRankElsewhere(Distributed):  # the max over ranks of the plan length, as all_reduce(MAX) returns it
        def max_int(self, value):
            return 3

    # FSDP gathers weights per forward, so every rank runs as many micro-batches: split the largest
    assert token_budget_plan(rollouts, 100, 32, BusierRankElsewhere()) == [[0], [2], [3, 1]]


def one_step(tiny_base, toy_data, run_dir, method, **overrides):
    from trace.train.trainer import Trainer

    cfg = copy.deepcopy(BASE_TRAIN)
    cfg.update(method=method, seed=0, thinking=False, steps=1, batch_prompts=4, group_size=4, micro_batch_size=16,
               lr=1e-3, save_every=10, weight_decay=0.0, probe={"steps": []}, **overrides)
    cfg["sampling"].update(temperature=1.0, max_new_tokens=64)
    torch.set_num_threads(1)
    return Trainer(cfg, tiny_base, toy_data / "choice_ood.jsonl", run_dir).train_step(0)


def test_token_budget_and_activation_checkpointing_leave_the_step_unchanged(tiny_base, toy_data, tmp_path):
    """Trimmed micro-batches under a token budget, with activation checkpointing: the same TRACE-FKL step
    as one 16-row micro-batch (global normalisers; padding is masked)."""
    whole = one_step(tiny_base, toy_data, tmp_path / "whole", "trace_fkl")
    budget = one_step(tiny_base, toy_data, tmp_path / "budget", "trace_fkl", micro_batch_tokens=300,
                      activation_checkpointing=True)
    assert 0 < whole["accuracy"] < 1 and whole["tokens_key"] > 0, "the check needs a gradient and KL tokens"
    for key in ("loss", "entropy", "grad_norm", "teacher_entropy", "kl/kl_key_branch", "tokens_key", "tokens_error",
                "clip_frac_high", "response_length"):
        assert budget[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key


# ---------------------------------------------------------------------- launch
def test_launch_command_and_resources():
    one = {"device": "cpu"}
    assert train_launcher(one, "py") == "py" and world_size(one) == 1
    node = {"device": "cuda", "parallel": {"procs_per_node": 4, "cpus_per_proc": 8, "mem_mb_per_node": 256000}}
    assert train_launcher(node, "py") == "py -m torch.distributed.run --nproc_per_node 4 --standalone"
    assert train_resources(node) == {"nodes": 1, "tasks": 1, "cpus_per_task": 32, "gpu": 4, "runtime": 1440,
                                     "mem_mb": 256000}
    multi = {"device": "cuda", "parallel": {"nodes": 2, "procs_per_node": 8}}
    assert world_size(multi) == 16
    assert train_launcher(multi, "py") == (
        'srun --nodes 2 --ntasks-per-node 1 py -m torch.distributed.run --nproc_per_node 8 --nnodes 2 '
        '--rdzv-backend c10d --rdzv-endpoint $(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):29500 '
        '--rdzv-id "$SLURM_JOB_ID"')
    with pytest.raises(ValueError, match="train.parallel.procs_per_node"):
        train_launcher({"parallel": {"procs_per_node": 0}})
    with pytest.raises(ValueError, match="unknown key"):
        train_launcher({"parallel": {"gpus": 2}})


# ---------------------------------------------------------------------- the GPU check
GPU_CHECK = [sys.executable, str(REPO_ROOT / "scripts" / "gpu_check.py")]
QWEN3 = REPO_ROOT.parent / "shared" / "models" / "qwen3"


@pytest.mark.slow  # runs scripts/gpu_check.py
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_says_it_needs_cuda():
    done = subprocess.run(GPU_CHECK, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "gpu_check: FAIL: needs CUDA" in done.stdout


@pytest.mark.slow  # runs scripts/gpu_check.py
@pytest.mark.skipif(not (QWEN3 / "tokenizer.json").exists(), reason="needs ../shared/models/qwen3")
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_gpu_check_dry_run_on_cpu(engine, tmp_path):
    """The same code on 2 gloo CPU processes: a random-init Qwen3 with the real tokenizer, 2 steps each;
    with vLLM every rank's engine takes the gathered FSDP2 weights after each step."""
    if engine == "vllm":
        pytest.importorskip("vllm", reason="vLLM is not installed")
    hidden = "64" if engine == "vllm" else "32"  # head_dim 32: vLLM's CPU attention minimum
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(GPU_CHECK + ["--device", "cpu", "--engine", engine, "--hidden", hidden, "--layers", "1",
                                       "--heads", "2", "--kv-heads", "1", "--prompts", "2", "--group", "2",
                                       "--max-new-tokens", "8", "--steps", "2", "--micro-batch-tokens", "40",
                                       "--out", str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "gpu_check: PASS" in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith(("| trace_fkl", "| grpo"))]
    assert len(lines) == 2
    for line in lines:
        cells = [float(c) for c in line.strip("|").split("|")[1:]]
        assert all(math.isfinite(c) and c >= 0 for c in cells) and cells[0] > 0  # rollout time
    assert float(lines[0].strip("|").split("|")[2]) > 0  # trace_fkl's teacher forward ran
    assert (f"{engine} rollouts" in done.stdout) and (("rollout log-prob gap" in done.stdout) == (engine == "vllm"))
