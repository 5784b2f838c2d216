"""GPU check, one command: a few TRACE-FKL and GRPO steps of a small Qwen3 with the real tokenizer (random
init: no weights needed) under torchrun + FSDP2 in bf16 on all visible GPUs; prints per-phase times
(rollout, teacher forward, loss forward + backward, optimizer), peak memory and a PASS/FAIL line.

    python scripts/gpu_check.py                  # CUDA: every visible GPU, bf16 compute, fp32 master weights
    python scripts/gpu_check.py --device cpu     # the same code as a dry run: 2 gloo CPU processes, fp32

Rollouts: ``--engine vllm`` (the paper study's: vLLM colocated in every rank, weights pushed after every
step, sleeping while the policy trains), ``hf`` (Hugging Face generate through the sharded policy), or
``auto`` (vllm when it is installed). Exit status 0 on PASS, 1 on FAIL.
PASS: every method ran every step on every rank with finite losses and gradient norms, the teacher ran
for TRACE-FKL, and the final model was written.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the package `trace` shadows a stdlib module: the repo comes first

import torch  # noqa: E402

from trace.settings import default_train_section  # noqa: E402
from trace.train.distributed import Distributed, launched_by_torchrun  # noqa: E402

PHASES = ("rollout", "teacher_fwd", "loss_fwd_bwd", "optimizer")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--nproc", type=int, default=None, help="processes (default: every visible GPU; 2 on CPU)")
    p.add_argument("--methods", nargs="+", default=["trace_fkl", "grpo"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (a multiple of --nproc)")
    p.add_argument("--group", type=int, default=4, help="rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                   help="rollout engine (train.rollout.engine); auto: vllm when installed, else hf")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--micro-batch-tokens", type=int, default=8192)
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "models" / "qwen3"))
    p.add_argument("--out", default="/tmp/trace_gpu_check")
    return p.parse_args(argv)


def launch(argv, args) -> int:
    """Not under torchrun yet: check the device, then start one process per GPU."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: FAIL: needs CUDA (no CUDA device is visible); `--device cpu` runs the same code as a "
              "dry run on CPU")
        return 1
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               __file__, *argv]
    return subprocess.run(command, cwd=REPO, env=env).returncode


def rollout_engine(args) -> str:
    if args.engine != "auto":
        return args.engine
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") else "hf"


def build_model_and_data(args, out: Path) -> tuple[Path, Path]:
    """Rank 0: a random-init Qwen3 (Qwen3-1.7B's config, shrunk) with the real tokenizer, and toy prompts."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from trace.toy import task

    model_dir, data = out / "model", out / "train.jsonl"
    config = json.loads((Path(args.tokenizer) / "config.Qwen3-1.7B.json").read_text())
    config.update(hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                  max_window_layers=args.layers, torch_dtype="float32")
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**config)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(model_dir)
    records = task.make_split("train", 256, 0, task.TRAIN_OPS)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return model_dir, data


class PhaseClock:
    """Wall time per phase (CUDA synchronised), by wrapping the trainer's own calls."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, dict.fromkeys(PHASES, 0.0)

    def wrap(self, fn, phase: str):
        def timed(*a, **kw):
            self._sync()
            started = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._sync()
                self.seconds[phase] += time.perf_counter() - started
        return timed

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def run_method(method: str, args, model_dir: Path, data: Path, out: Path, dist_: Distributed) -> dict:
    from trace.train.trainer import Trainer

    cfg = copy.deepcopy(default_train_section())
    cfg.update(method=method, seed=0, thinking=False, steps=args.steps, batch_prompts=args.prompts,
               group_size=args.group, save_every=args.steps, device=args.device,
               dtype="bfloat16" if args.device == "cuda" else "float32", activation_checkpointing=True,
               micro_batch_tokens=args.micro_batch_tokens, rollout_rng="rollout",
               validation={"every": 0}, probe={"steps": []})  # this check times the training step only
    cfg["sampling"]["max_new_tokens"] = args.max_new_tokens
    cfg["rollout"] = {**cfg["rollout"], "engine": rollout_engine(args), "max_model_len": 1024}
    if dist_.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist_.device)
    started = time.perf_counter()
    trainer = Trainer(cfg, model_dir, data, out / method)
    clock = PhaseClock(trainer.device)
    trainer.engine.generate = clock.wrap(trainer.engine.generate, "rollout")
    if trainer.teacher is not None:
        trainer.teacher.hidden_states = clock.wrap(trainer.teacher.hidden_states, "teacher_fwd")
    trainer.micro_batch_loss = clock.wrap(trainer.micro_batch_loss, "loss_fwd_bwd")
    trainer.optimizer.step = clock.wrap(trainer.optimizer.step, "optimizer")
    trainer.fit()
    clock.seconds["loss_fwd_bwd"] -= clock.seconds["teacher_fwd"]  # teacher forwards run inside the loss phase
    rows = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
    mine = dict(clock.seconds, peak_mib=peak_memory_mib(trainer.device), total_s=time.perf_counter() - started)
    ranks = dist_.gather_objects(mine)
    report = {phase: max(r[phase] for r in ranks) for phase in (*PHASES, "total_s", "peak_mib")}
    problems = []
    if [r["step"] for r in rows] != list(range(args.steps)):
        problems.append(f"steps {[r['step'] for r in rows]}")
    if not all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows):
        problems.append("non-finite loss or gradient norm")
    if "rollout_logprob_gap" in rows[0]:  # vLLM's log-prob of its samples vs the trainer's (truncated sampling)
        report["rollout_logprob_gap"] = max(r["rollout_logprob_gap"] for r in rows)
        if not all(math.isfinite(r["rollout_logprob_gap"]) for r in rows):
            problems.append("non-finite rollout log-prob gap")
    if method != "grpo" and not any(r.get("teacher_active") for r in rows):
        problems.append("the teacher never ran")
    if not (out / method / "model" / "config.json").exists():
        problems.append("no final model")
    return dict(report, rows=rows, problems=problems)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not launched_by_torchrun():
        return launch(argv, args)
    dist_ = Distributed(args.device)
    out = Path(args.out)
    if dist_.is_main:
        for method in args.methods:  # a check starts fresh: it never resumes an earlier check's runs
            shutil.rmtree(out / method, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        build_model_and_data(args, out)
    dist_.barrier()
    results = {m: run_method(m, args, out / "model", out / "train.jsonl", out, dist_) for m in args.methods}
    if dist_.is_main:
        name = torch.cuda.get_device_name(dist_.device) if dist_.device.type == "cuda" else "cpu"
        print(f"\n# gpu_check: {dist_.world_size} × {name}, Qwen3 hidden {args.hidden} × {args.layers} layers, real "
              f"tokenizer, {rollout_engine(args)} rollouts, {args.prompts} prompts × {args.group} rollouts, "
              f"≤ {args.max_new_tokens} new tokens, "
              f"{args.steps} steps; seconds summed over steps (slowest rank); peak memory: max over ranks of "
              f"{'max_memory_allocated' if dist_.device.type == 'cuda' else 'the process peak RSS so far'}")
        print("| method | " + " | ".join(f"{p} (s)" for p in PHASES) + " | total (s) | peak memory (MiB) |")
        print("|---|" + "---:|" * (len(PHASES) + 2))
        for method, r in results.items():
            print(f"| {method} | " + " | ".join(f"{r[p]:.2f}" for p in PHASES)
                  + f" | {r['total_s']:.1f} | {r['peak_mib']:.0f} |")
        gaps = {m: r["rollout_logprob_gap"] for m, r in results.items() if "rollout_logprob_gap" in r}
        if gaps:
            print("rollout log-prob gap, vLLM vs trainer (mean |Δ| per sampled token, max over steps; −log of the "
                  "kept top-k/top-p mass plus rounding): " + ", ".join(f"{m} {g:.3g}" for m, g in gaps.items()))
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    problems = [f"{m}: {p}" for m, r in results.items() for p in r["problems"]]
    if dist_.is_main:
        print("gpu_check: PASS" if not problems else "gpu_check: FAIL: " + "; ".join(problems))
    if "vllm" in sys.modules:  # the ranks' engines share the process group: shut them down first
        from trace.rollout.vllm_engine import shutdown_engines

        shutdown_engines()
    dist_.close()
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
