"""``python -m trace bench``: what routing the KL to α·|y| positions saves, in memory and time.

Two comparisons, each variant on the same seeded inputs, forward + backward:

(a) the KL loss alone (Eq. 1's key branch, FKL with the per-entry clip, trace.losses.span_branch):
      naive all-token    full [B, T, V] float32 logits for student and teacher (what public code does),
                         then trace.losses.routed_divergence at every completion position
      chunked all-token  trace.losses.chunked_divergence at every completion position (as the trainer)
      routed α           trace.losses.chunked_divergence at floor(α·|y|) positions per rollout only
(b) the loss phase of one optimizer step, i.e. ``Trainer.micro_batch_loss`` of the real trainer on a
    Qwen3-architecture model with a V-token vocabulary:
      GRPO               student forward, clipped surrogate on all tokens, backward
      TRACE-FKL α        + teacher forward under the label prompt (no grad), FKL on the routed key tokens
    Rollout generation is excluded: both score the same fixed synthetic rollouts.
(c) whole optimizer steps, ``Trainer.train_step`` with rollouts (``--engine hf|vllm``, the same engine
    for both methods), GRPO vs TRACE-FKL, in the KL window (steps 0…, λ = w0, teacher + annotation
    on) and after it (steps ≥ kl.end = 40: λ = 0, teacher and annotator freed, so TRACE is GRPO).
    Rollouts come from the random bench model, which rarely ends its turn: most rollouts run to
    ``--length`` tokens (the mean is reported). Two stand-ins, so that TRACE-FKL routes what it would
    route at its cap: rewards are synthetic (every other rollout of a group correct), and the
    annotator marks every segment, which the contract's α-cap trims to floor(α·|y|) tokens (the
    real parse → token mask → cap path of trace/annotate). Time: median step; memory: the step's
    peak above the state before it (engine, policy, optimizer, teacher are in the baseline).

Memory is measured per variant in a fresh subprocess (``--in-process`` runs them all here instead):
on CPU the peak resident set during the measured call minus the resident set right before it (the
kernel's high-water mark VmHWM, i.e. the process's own ru_maxrss, is reset just before the call via
/proc/self/clear_refs); on CUDA torch.cuda.max_memory_allocated() after reset_peak_memory_stats()
minus memory_allocated() before the call.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trace.runtime import threads_from_env
from trace.settings import TrainRun, replace

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
QWEN3_VOCAB = 151936
MIB = 2 ** 20

KL_VARIANTS = ("kl_naive_all", "kl_chunked_all", "kl_routed")
STEP_VARIANTS = ("step_grpo", "step_trace")
WHOLE_VARIANTS = ("whole_grpo_kl_window", "whole_trace_kl_window", "whole_grpo_after", "whole_trace_after")
LABELS = {
    "kl_naive_all": "naive all-token (full [B,T,V] fp32 logits)",
    "kl_chunked_all": "chunked all-token",
    "kl_routed": "routed α={alpha:g} (chunked)",
    "step_grpo": "GRPO (student fwd, surrogate, bwd)",
    "step_trace": "TRACE-FKL α={alpha:g} (+ teacher fwd, routed FKL)",
    "whole_grpo_kl_window": "GRPO, step in the KL window",
    "whole_trace_kl_window": "TRACE-FKL α={alpha:g}, step in the KL window (λ = w0)",
    "whole_grpo_after": "GRPO, step after kl.end",
    "whole_trace_after": "TRACE-FKL, step after kl.end (λ = 0, teacher off)",
}
# The synthetic task the rollouts answer; the teacher sees the same prompt plus a private label hint.
RECORD = {"problem": "A bag holds 3 red and 5 blue marbles. Two are drawn without replacement. "
                     "What is the probability that both are red?", "answer": "3/28", "kind": "math"}


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench subcommand's options (trace.cli adds them to its parser)."""
    a = parser.add_argument
    a("--vocab", type=int, default=32768, help=f"vocabulary size V (Qwen3: {QWEN3_VOCAB})")
    a("--length", type=int, default=2048, help="completion length T (every rollout is this long)")
    a("--batch", type=int, default=2, help="rollouts B in the micro-batch")
    a("--alpha", type=float, default=0.25, help="routed fraction: floor(α·T) key positions per rollout")
    a("--hidden", type=int, default=256, help="hidden size d of the benchmark model")
    a("--layers", type=int, default=2, help="transformer layers of the benchmark model (part b)")
    a("--chunk", type=int, default=None, help="positions per vocabulary chunk (default: config logprob_chunk)")
    a("--device", default="cpu", help="cpu | cuda")
    a("--dtype", default="float32", help="float32 | bfloat16 (model weights and hidden states)")
    a("--seed", type=int, default=0)
    a("--warmup", type=int, default=None, help="untimed runs before measuring (default: 0 on CPU, 1 on CUDA)")
    a("--repeats", type=int, default=None, help="timed runs, the median is reported (default: 1 CPU, 3 CUDA)")
    a("--no-naive", action="store_true", help="skip the naive full-logits row (it needs ~9·B·T·V·4 bytes)")
    a("--parts", default="a,b", help="any of a (KL loss), b (step loss phase), c (whole steps with rollouts): a,b,c")
    a("--engine", default="hf", help="part c: rollout engine, hf | vllm (train.rollout.engine)")
    a("--in-process", action="store_true",
      help="run every variant in this process (faster; CPU memory then shares one allocator)")
    a("--out", default=None, help="also write the JSON result to this file")


def settings_from_args(args) -> dict:
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"a", "b", "c"}:
        raise ValueError(f"--parts must be a comma list of a, b, c; got {args.parts!r}")
    if args.engine not in ("hf", "vllm"):
        raise ValueError(f"--engine must be hf or vllm, got {args.engine!r}")
    if not 0.0 < args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in (0, 1], got {args.alpha}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {args.dtype!r}")
    for name in ("vocab", "length", "batch", "hidden", "layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be ≥ 1")
    train_cfg = load_train_config()
    cuda = args.device.startswith("cuda")
    variants = []
    if "a" in parts:
        variants += [v for v in KL_VARIANTS if not (args.no_naive and v == "kl_naive_all")]
    if "b" in parts:
        variants += list(STEP_VARIANTS)
    if "c" in parts:
        variants += list(WHOLE_VARIANTS)
    return {
        "vocab": args.vocab, "length": args.length, "batch": args.batch, "alpha": args.alpha,
        "hidden": args.hidden, "layers": args.layers, "heads": max(1, args.hidden // 64),
        "chunk": args.chunk or bench_settings({"train_cfg": train_cfg}, "grpo").logprob_chunk, "device": args.device, "dtype": args.dtype,
        "seed": args.seed, "warmup": args.warmup if args.warmup is not None else (1 if cuda else 0),
        "repeats": args.repeats if args.repeats is not None else (3 if cuda else 1),
        "in_process": bool(args.in_process), "variants": variants, "train_cfg": train_cfg, "engine": args.engine,
    }


def load_train_config() -> dict:
    """The trainer's settings (config.yaml ``train`` without ``parallel``), as they go into the spec
    a worker subprocess reads (JSON); :func:`bench_settings` types them."""
    import yaml

    path = REPO_ROOT / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the bench takes the trainer's settings from it")
    train = yaml.safe_load(path.read_text())["train"]
    return {key: value for key, value in train.items() if key != "parallel"}


def bench_settings(s: dict, method: str) -> TrainRun:
    """The run settings of one bench variant: config.yaml's ``train`` with the bench's shape (one prompt of
    ``batch`` rollouts of ``length`` tokens, one micro-batch, the chunk and α asked for)."""
    run = TrainRun.from_mapping({**s["train_cfg"], "method": method, "thinking": False}, "bench: config.yaml train")
    shape = {key: s[key] for key in ("seed", "device", "dtype") if key in s}
    if "batch" in s:
        shape.update(batch_prompts=1, group_size=s["batch"], micro_batch_size=s["batch"], logprob_chunk=s["chunk"],
                     sampling={"max_new_tokens": s["length"]}, kl={"alpha": s["alpha"]})
    return replace(run, **shape)


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """Peak memory of one measured call, above what was held right before it."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.method = ("torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() "
                       "right before the call" if self.cuda else None)

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.baseline = self.torch.cuda.memory_allocated()
            return
        self.reset = _reset_peak_rss()
        self.baseline = _proc_status_bytes("VmRSS") or _ru_maxrss_bytes()
        if self.reset and _proc_status_bytes("VmHWM") is not None:
            self.method = ("peak RSS during the call (VmHWM = the process's own ru_maxrss, reset just before via "
                           "/proc/self/clear_refs) minus RSS right before it")
        else:  # no reset possible: the lifetime peak; a lower peak than the setup's is not seen
            self.method = "ru_maxrss after the call minus RSS right before it (no peak reset: an upper bound)"

    def stop(self) -> dict:
        if self.cuda:
            self.torch.cuda.synchronize()
            peak = self.torch.cuda.max_memory_allocated()
        else:
            hwm = _proc_status_bytes("VmHWM") if self.reset else None
            peak = hwm if hwm is not None else _ru_maxrss_bytes()
        return {"peak_delta_mib": round(max(0, peak - self.baseline) / MIB, 1), "peak_abs_mib": round(peak / MIB, 1),
                "baseline_mib": round(self.baseline / MIB, 1), "memory_method": self.method}


def measure(fn, device, warmup: int, repeats: int, reset) -> dict:
    """Time `fn` (median of `repeats` after `warmup` runs) and its peak memory (over the timed runs)."""
    import torch

    for _ in range(warmup):
        reset()
        fn()
    reset()
    memory = PeakMemory(device)
    memory.start()
    times, result = [], None
    for i in range(repeats):
        if i:
            reset()
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    row = memory.stop()
    row.update(time_s=round(statistics.median(times), 4), times_s=[round(t, 4) for t in times])
    return row, result


# ---------------------------------------------------------------------------------------------
# (a) the KL loss alone
# ---------------------------------------------------------------------------------------------


def routed_key_mask(mask, alpha: float, seed: int):
    """floor(α·|y|) random key positions per rollout: the router's 'random' strategy with every routed
    token a key token, i.e. TRACE-FKL with the coverage cap filled on every rollout (its upper bound).
    """
    import torch

    from trace.router import build_routed_masks

    correct = torch.ones(mask.shape[0], dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed * 100_003 + 1)
    return build_routed_masks("random", mask.cpu(), correct, alpha=alpha, generator=generator,
                              route_by="key").key.to(mask.device)


def kl_inputs(s: dict, device, dtype) -> dict:
    """Seeded student / teacher final hidden states [B, T, d] and lm-head weights [V, d] (a separate
    teacher copy, as the trainer's synced teacher), the completion mask and the routed key mask."""
    import torch

    g = torch.Generator().manual_seed(s["seed"])
    B, T, V, d = s["batch"], s["length"], s["vocab"], s["hidden"]
    hidden = torch.randn(B, T, d, generator=g)
    teacher_hidden = hidden + 0.5 * torch.randn(B, T, d, generator=g)  # the teacher sees another prompt
    weight = 0.02 * torch.randn(V, d, generator=g) * math.sqrt(256 / d)  # logits of std ≈ 0.3
    teacher_weight = weight + 0.002 * torch.randn(V, d, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    routed = routed_key_mask(mask, s["alpha"], s["seed"])

    def put(x, grad=False):
        return x.to(device=device, dtype=dtype).requires_grad_(grad)

    return {"hidden": put(hidden, True), "teacher_hidden": put(teacher_hidden), "weight": put(weight, True),
            "teacher_weight": put(teacher_weight), "mask": mask.to(device), "routed": routed.to(device)}


def kl_loss(variant: str, x: dict, settings: TrainRun, chunk: int) -> dict:
    """Forward + backward of the KL branch of Eq. 1 (FKL on key tokens), one way of computing it."""
    import torch
    import torch.nn.functional as F

    from trace import losses

    kl = settings.kl
    opts = dict(top_k=kl.top_k, tail_bucket=kl.tail_bucket, entry_clip=kl.entry_clip,
                temperature=settings.sampling.temperature)
    mask = x["mask"]
    if variant == "kl_naive_all":
        where = mask
        student_logits = F.linear(x["hidden"], x["weight"]).float()  # [B, T, V]
        with torch.no_grad():
            teacher_logits = F.linear(x["teacher_hidden"], x["teacher_weight"]).float()  # [B, T, V]
        per_token = losses.routed_divergence(student_logits, teacher_logits, "fkl", **opts)  # [B, T]
    else:
        where = mask if variant == "kl_chunked_all" else x["routed"]
        values = losses.chunked_divergence(x["hidden"][where], x["teacher_hidden"][where], x["weight"], "fkl",
                                           chunk_size=chunk, teacher_lm_head_weight=x["teacher_weight"], **opts)
        per_token = losses.tokens_from_positions(values, where)
    loss = losses.span_branch(per_token, where, where, mask)  # mean over K per rollout × |K|/|y|, / B
    loss.backward()
    with torch.no_grad():  # the same KL, restricted to the routed positions (equals the routed loss)
        on_routed = losses.span_branch(per_token.detach().float(), x["routed"], x["routed"], mask)
    return {"kl_positions": int(where.sum()), "loss": float(loss.detach()),
            "loss_on_routed_positions": float(on_routed),
            "grad_norm_weight": float(x["weight"].grad.float().norm())}


# ---------------------------------------------------------------------------------------------
# (b) the loss phase of a training step, through the real trainer
# ---------------------------------------------------------------------------------------------


def key_label_prefix() -> str:
    """The teacher's private context for a key span: the annotator contract's hint for a key label."""
    from trace.annotate.contract import KEY_LABELS, label_to_teacher_prefix

    return label_to_teacher_prefix(next(iter(KEY_LABELS)))


class _RoutedByBench:
    """Stands in for the span annotator: the bench hands the trainer its routed masks directly."""

    def annotate(self, requests):
        raise RuntimeError("the bench supplies routed masks; the annotator is never called")


def build_bench_model(s: dict, out_dir: Path) -> Path:
    """A random Qwen3-architecture model with a V-token vocabulary, saved like any HF model.

    The tokenizer (trace.toy.model.train_tokenizer) only has to encode the prompts, so it is small;
    the model's vocabulary is then grown to V (completion ids are drawn from all V ids, nothing
    decodes them).
    """
    from trace.prompting import render_prompt
    from trace.toy.model import build_model, train_tokenizer

    corpus = [RECORD["problem"], key_label_prefix(), "Please reason step by step, and put your final answer "
              "within \\boxed{}.", "system user assistant think"] * 4
    tokenizer = train_tokenizer(corpus, 400, out_dir)
    d, heads = s["hidden"], s["heads"]
    teacher_text = render_prompt(tokenizer, RECORD, False, system_prefix=key_label_prefix())
    prompt_len = len(tokenizer(teacher_text, add_special_tokens=False)["input_ids"])
    size = {"hidden_size": d, "intermediate_size": 3 * d, "num_layers": s["layers"], "num_heads": heads,
            "num_kv_heads": max(1, heads // 2), "max_positions": prompt_len + s["length"] + 8}
    model = build_model(tokenizer, size, s["seed"])
    if s["vocab"] < len(tokenizer):
        raise ValueError(f"--vocab must be ≥ the prompt tokenizer's {len(tokenizer)} tokens")
    model.resize_token_embeddings(s["vocab"], mean_resizing=False)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def step_setup(s: dict, method: str, model_dir: Path, work: Path):
    """A Trainer on the bench model and the arguments train_step would pass to micro_batch_loss."""
    import torch

    from trace import losses
    from trace.prompting import render_prompt
    from trace.router import RoutedMasks
    from trace.rollout import RolloutBatch
    from trace.prompting import teacher_prompt
    from trace.train.trainer import Trainer

    train_path = work / "train.jsonl"
    train_path.write_text(json.dumps(RECORD) + "\n")
    trainer = Trainer(bench_settings(s, method), model_dir, train_path, work / f"run_{method}",
                      annotator=_RoutedByBench())
    dev, tok, B, T = trainer.device, trainer.tokenizer, s["batch"], s["length"]
    enc = tok([render_prompt(tok, RECORD, False)] * B, return_tensors="pt", padding=True,
              add_special_tokens=False, padding_side="left")
    g = torch.Generator().manual_seed(s["seed"])
    completion_ids = torch.randint(0, s["vocab"], (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    rollouts = RolloutBatch(enc["input_ids"].to(dev), enc["attention_mask"].to(dev), completion_ids.to(dev),
                            completion_mask.to(dev), texts=[""] * B)
    correct = (torch.arange(B) % 2 == 0).to(dev)  # half right: a group with reward variance
    advantages = losses.ADVANTAGE_ESTIMATORS[trainer.settings.advantage](correct.float(), B)
    mask = completion_mask.bool().to(dev)
    _, agg = trainer.aggregation(mask)
    step, lam = 0, trainer.schedule(0)
    routed = teacher_prompts = None
    if trainer.teacher is not None:
        key = routed_key_mask(mask, s["alpha"], s["seed"])
        routed = RoutedMasks.from_spans(mask, key, torch.zeros_like(key))
        teacher_prompts = [teacher_prompt(tok, RECORD, trainer.method.teacher_context, key_label_prefix(), False)] * B
    trainer.policy.train()
    call = dict(rows=list(range(B)), rollouts=rollouts, advantages=advantages, correct=correct, routed=routed,
                teacher_prompts=teacher_prompts, lam=lam, step=step, agg=agg, srpo_weight_mean=None)
    return trainer, call


# ---------------------------------------------------------------------------------------------
# (c) whole optimizer steps with rollouts, through the real trainer
# ---------------------------------------------------------------------------------------------


def cap_filling_annotator(alpha: float):
    """Stands in for the span annotator in part (c): marks every segment of every rollout (key spans
    of correct, error spans of incorrect rollouts, the contract's first label), so the real parse →
    token mask → α-cap path keeps the earliest floor(α·|y|) tokens: TRACE's routing at its cap."""
    from trace.annotate.backends import LocalReplyAnnotator
    from trace.annotate.contract import labels_for

    class CapFilling(LocalReplyAnnotator):
        name = "bench_cap_filling"

        def replies(self, requests, segmented):
            return [json.dumps({"key_spans" if r.is_correct else "error_spans": [[1, len(segments)]],
                                "label": next(iter(labels_for(r.is_correct)))}) if segments else None
                    for r, segments in zip(requests, segmented)]

    return CapFilling(alpha=alpha)


def half_correct(texts, golds, kinds):
    """Part (c)'s synthetic rewards: every other rollout of a group is correct (reward variance, and
    correct rollouts for TRACE-FKL's key spans); random text never contains the gold answer."""
    return [i % 2 == 0 for i in range(len(texts))]


def whole_step_setup(s: dict, variant: str, model_dir: Path, work: Path):
    """A Trainer with the bench's rollout engine and the step indices to run (warm-up first)."""
    from trace.train.trainer import Trainer

    method = "grpo" if "grpo" in variant else "trace_fkl"
    settings = replace(bench_settings(s, method), rollout={"engine": s["engine"]})
    train_path = work / "train.jsonl"
    train_path.write_text(json.dumps(RECORD) + "\n")
    # part (c)'s synthetic rewards come in as the run's reward function (random text never holds the gold answer)
    trainer = Trainer(settings, model_dir, train_path, work / f"run_{variant}", annotator=cap_filling_annotator(s["alpha"]),
                      reward=half_correct)
    first = 0 if variant.endswith("kl_window") else settings.kl.end  # the step after the window frees the teacher
    return trainer, iter(range(first, first + whole_step_warmup(s) + s["repeats"]))


def whole_step_warmup(s: dict) -> int:
    """At least one: the first step after the window frees the teacher; the first step of a run pays one-off costs."""
    return max(1, s["warmup"])


# ---------------------------------------------------------------------------------------------
# one variant (in a worker subprocess, or here)
# ---------------------------------------------------------------------------------------------


def run_variant(s: dict, variant: str, model_dir: Path | None, work: Path) -> dict:
    import torch

    threads_from_env()
    device, dtype = torch.device(s["device"]), getattr(torch, s["dtype"])
    torch.manual_seed(s["seed"])
    if variant in KL_VARIANTS:
        x = kl_inputs(s, device, dtype)

        def reset():
            x["hidden"].grad = x["weight"].grad = None

        row, out = measure(lambda: kl_loss(variant, x, bench_settings(s, "trace_fkl"), s["chunk"]), device,
                           s["warmup"], s["repeats"], reset)
        row.update(out)
    elif variant in WHOLE_VARIANTS:
        trainer, steps = whole_step_setup(s, variant, model_dir, work)
        row, metrics = measure(lambda: trainer.train_step(next(steps)), device, whole_step_warmup(s),
                               s["repeats"], lambda: None)
        row.update(kl_positions=int(metrics.get("tokens_key", 0)), loss=metrics["loss"], lam=metrics["lambda"],
                   teacher_active=metrics["teacher_active"], rollout_s=metrics["rollout_s"], grad_norm=metrics["grad_norm"],
                   response_length=metrics["response_length"], engine=s["engine"])
    else:
        method = "grpo" if variant == "step_grpo" else "trace_fkl"
        trainer, call = step_setup(s, method, model_dir, work)

        def reset():
            trainer.optimizer.zero_grad(set_to_none=True)

        row, metrics = measure(lambda: trainer.micro_batch_loss(**call), device, s["warmup"], s["repeats"], reset)
        routed = call["routed"]
        row.update(kl_positions=int(routed.key.sum()) if routed is not None else 0, loss=metrics["loss"],
                   lam=call["lam"], kl_key_branch=metrics.get("kl/kl_key_branch"),
                   grad_norm=float(torch.nn.utils.get_total_norm(
                       [p.grad for p in trainer.policy.parameters() if p.grad is not None])))
    row.update(variant=variant, threads=torch.get_num_threads(), device=str(device))
    return row


def _worker(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    model_dir = Path(spec["model_dir"]) if spec["model_dir"] else None
    row = run_variant(spec["settings"], spec["variant"], model_dir, Path(spec["work"]))
    Path(result_path).write_text(json.dumps(row))


def _run_in_subprocess(s: dict, variant: str, model_dir: Path | None, work: Path) -> dict:
    spec_path, result_path = work / f"{variant}.spec.json", work / f"{variant}.result.json"
    spec_path.write_text(json.dumps({"settings": s, "variant": variant, "work": str(work),
                                     "model_dir": str(model_dir) if model_dir else None}))
    result_path.unlink(missing_ok=True)
    path = [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-m", "trace.bench", "--worker", str(spec_path), str(result_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result_path.exists():
        why = "killed (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-3:]
        return {"variant": variant, "error": f"{why}: {' | '.join(tail)}"}
    return json.loads(result_path.read_text())


# ---------------------------------------------------------------------------------------------
# the whole bench
# ---------------------------------------------------------------------------------------------


def run_bench(s: dict) -> dict:
    from tqdm import tqdm

    started = time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="trace_bench_") as tmp:
        work = Path(tmp)
        model_dir = None
        if any(v in STEP_VARIANTS + WHOLE_VARIANTS for v in s["variants"]):
            model_dir = build_bench_model(s, work / "model")
        bar = tqdm(s["variants"], desc="bench", unit="variant", file=sys.stderr)
        for variant in bar:
            bar.set_postfix_str(variant)
            t0 = time.perf_counter()
            skip = _naive_does_not_fit(s) if variant == "kl_naive_all" else None
            if skip:
                row = {"variant": variant, "error": skip}
            elif s["in_process"]:
                try:
                    row = run_variant(s, variant, model_dir, work)
                except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
                    row = {"variant": variant, "error": f"{type(exc).__name__}: {exc}"}
            else:
                row = _run_in_subprocess(s, variant, model_dir, work)
            row["label"] = LABELS[variant].format(alpha=s["alpha"])
            rows[variant] = row
            if "error" in row:
                log.warning("bench %-15s FAILED after %.1fs: %s", variant, time.perf_counter() - t0, row["error"])
            else:
                log.info("bench %-15s %8.3fs  peak +%8.1f MiB  (%d KL positions, loss %.6g; %.1fs with setup)",
                         variant, row["time_s"], row["peak_delta_mib"], row["kl_positions"], row["loss"],
                         time.perf_counter() - t0)
    return summarize(s, rows, time.perf_counter() - started)


NAIVE_LOGITS_COPIES = 9  # measured: the naive loss holds ~9 [B, T, V] float32 tensors at its peak


def _naive_does_not_fit(s: dict) -> str | None:
    """On CPU, skip the naive row rather than let it push a shared machine into the OOM killer."""
    if s["device"] != "cpu":
        return None  # CUDA raises OutOfMemoryError, which the row reports
    need = NAIVE_LOGITS_COPIES * s["batch"] * s["length"] * s["vocab"] * 4
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    if available is not None and need > 0.8 * available:
        return (f"skipped: needs ~{need / 2**30:.1f} GiB (~{NAIVE_LOGITS_COPIES} full [B,T,V] fp32 tensors), "
                f"{available / 2**30:.1f} GiB available (--no-naive to drop the row)")
    return None


def _ratio(num: dict | None, den: dict | None, key: str) -> float | None:
    if not num or not den or "error" in num or "error" in den or not den.get(key):
        return None
    return round(num[key] / den[key], 3)


def summarize(s: dict, rows: dict, wall_s: float) -> dict:
    import torch

    ok = {k: v for k, v in rows.items() if "error" not in v}
    methods = {v["memory_method"] for v in ok.values()}
    ratios = {}
    for ref in ("kl_chunked_all", "kl_naive_all"):
        for key, name in (("time_s", "time"), ("peak_delta_mib", "peak_memory")):
            ratios[f"routed/{ref.removeprefix('kl_')}_{name}"] = _ratio(rows.get("kl_routed"), rows.get(ref), key)
    for key, name in (("time_s", "time"), ("peak_delta_mib", "peak_memory")):
        ratios[f"trace/grpo_step_{name}"] = _ratio(rows.get("step_trace"), rows.get("step_grpo"), key)
        for phase in ("kl_window", "after"):
            ratios[f"trace/grpo_whole_step_{phase}_{name}"] = _ratio(rows.get(f"whole_trace_{phase}"),
                                                                      rows.get(f"whole_grpo_{phase}"), key)
    checks = {}
    if "kl_routed" in ok:
        for ref in ("kl_chunked_all", "kl_naive_all"):
            if ref in ok:
                checks[f"routed_loss_minus_{ref.removeprefix('kl_')}_restricted"] = (
                    ok["kl_routed"]["loss"] - ok[ref]["loss_on_routed_positions"])
    if "kl_chunked_all" in ok and "kl_naive_all" in ok:
        checks["chunked_minus_naive_all_token_loss"] = ok["kl_chunked_all"]["loss"] - ok["kl_naive_all"]["loss"]
    notes = []
    if any(v in KL_VARIANTS + STEP_VARIANTS for v in rows):
        notes.append(f"Routed = floor(α·|y|) = {math.floor(s['alpha'] * s['length'] + 1e-9)} random key positions per "
                     "rollout (the coverage cap filled on every rollout: TRACE's upper bound).")
    if any(v in STEP_VARIANTS for v in rows):
        notes += [
            "Part (b): Rollout generation is excluded: GRPO and TRACE score the same fixed synthetic rollouts "
            f"({s['batch']} random completions of {s['length']} tokens, seeded).",
            "Part (b) is Trainer.micro_batch_loss (the loss phase of train_step), not the optimizer step; "
            "model weights (student, and the teacher copy for TRACE) are in the baseline, not the peak delta."]
    if any(v in WHOLE_VARIANTS for v in rows):
        notes.append(
            f"Part (c): whole Trainer.train_step with rollouts from the {s['engine']} engine (both methods), "
            f"median of {s['repeats']} step(s) after {whole_step_warmup(s)} warm-up step(s); synthetic rewards "
            "(every other rollout correct) and an annotator that fills the α-cap on every rollout (bench.cap_filling_annotator). "
            "KL window: from step 0 (λ = w0); after: from step kl.end (λ = 0: the teacher and annotator are freed "
            "in the warm-up step). The physical floor in the window is one extra no-grad teacher forward "
            "(≈ 1/3 of forward + backward) plus the routed KL and the annotation; after the window, nothing.")
    n_routed = s["batch"] * math.floor(s["alpha"] * s["length"] + 1e-9)
    if n_routed >= s["chunk"]:
        notes.append(
            f"The chunked KL's peak memory is set by one chunk ({s['chunk']} positions × V logits, student and "
            f"teacher, recomputed in backward), not by how many positions are routed: routed ({n_routed}) and "
            f"all-token ({s['batch'] * s['length']}) both fill ≥ 1 full chunk, so routing saves time (∝ positions) "
            "but little peak memory against the chunked all-token loss; against the naive full-logits loss it "
            "saves both.")
    settings = {k: v for k, v in s.items() if k not in ("train_cfg", "variants")}
    run = bench_settings(s, "trace_fkl")
    settings.update(divergence="fkl", entry_clip=run.kl.entry_clip, top_k=run.kl.top_k,
                    temperature=run.sampling.temperature, lam=run.kl.w0,
                    torch=torch.__version__, isolation="in-process" if s["in_process"] else "subprocess per variant")
    return {
        "bench": "trace routed-KL memory/time", "settings": settings,
        "kl_loss": [rows[v] for v in KL_VARIANTS if v in rows],
        "step_loss_phase": [rows[v] for v in STEP_VARIANTS if v in rows],
        "whole_step": [rows[v] for v in WHOLE_VARIANTS if v in rows],
        "ratios": ratios, "checks": checks, "memory_method": sorted(methods), "wall_s": round(wall_s, 1),
        "notes": notes,
    }


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def format_report(result: dict) -> str:
    s = result["settings"]
    measured = result["kl_loss"] + result["step_loss_phase"] + result.get("whole_step", [])
    threads = next((r["threads"] for r in measured if "threads" in r), "?")
    lines = [
        f"# trace bench: B={s['batch']} T={s['length']} V={s['vocab']} d={s['hidden']} layers={s['layers']} "
        f"α={s['alpha']:g} chunk={s['chunk']} {s['dtype']} on {s['device']} ({threads} torch thread(s)), "
        f"{s['isolation']}, warmup {s['warmup']}, median of {s['repeats']} timed run(s)",
        "",
    ]

    def table(title, rows, ref, extra_col):
        out = [f"## {title}", "",
               f"| variant | KL positions | loss | time (s) | peak mem Δ (MiB) | peak mem abs (MiB) | "
               f"time ÷ {extra_col} | mem ÷ {extra_col} |",
               "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                why = r["error"].replace("|", "/")
                out.append(f"| {r['label']} (not measured: {why}) |" + " – |" * 7)
                continue
            out.append(f"| {r['label']} | {r['kl_positions']} | {r['loss']:.6g} | {r['time_s']:.3f} | "
                       f"{r['peak_delta_mib']:.1f} | {r['peak_abs_mib']:.1f} | "
                       f"{_fmt(_ratio(r, ref, 'time_s'), '.2f')} | {_fmt(_ratio(r, ref, 'peak_delta_mib'), '.2f')} |")
        return out + [""]

    by = {r["variant"]: r for r in measured}
    if result["kl_loss"]:
        lines += table("(a) KL loss (FKL, per-entry clip), forward + backward", result["kl_loss"],
                       by.get("kl_chunked_all"), "chunked all-token")
    if result["step_loss_phase"]:
        lines += table("(b) training step, loss phase (Trainer.micro_batch_loss), forward + backward",
                       result["step_loss_phase"], by.get("step_grpo"), "GRPO")
    for phase, title in (("kl_window", "in the KL window"), ("after", "after kl.end")):
        pair = [by[v] for v in (f"whole_grpo_{phase}", f"whole_trace_{phase}") if v in by]
        if pair:
            lines += table(f"(c) whole training step with rollouts ({s['engine']} engine), {title}", pair,
                           by.get(f"whole_grpo_{phase}"), "GRPO")
            lines[-1:-1] = ["- rollouts per step: " + "; ".join(
                f"{r['label']}: {r['rollout_s']:.3f}s, mean length {r['response_length']:.1f}"
                for r in pair if "rollout_s" in r)]
    r = result["ratios"]
    names = {"routed/chunked_all": "routed ÷ chunked all-token", "routed/naive_all": "routed ÷ naive all-token",
             "trace/grpo_step": "TRACE ÷ GRPO step loss phase",
             "trace/grpo_whole_step_kl_window": "TRACE-FKL ÷ GRPO whole step, KL window",
             "trace/grpo_whole_step_after": "TRACE-FKL ÷ GRPO whole step, after kl.end"}
    for key, name in names.items():
        t, m = r.get(f"{key}_time"), r.get(f"{key}_peak_memory")
        if t is not None or m is not None:
            lines.append(f"- {name}: time {_fmt(t, '.3f')}×, peak memory Δ {_fmt(m, '.3f')}×")
    for key, value in result["checks"].items():
        lines.append(f"- check {key}: {value:+.3e}")
    lines.append(f"- memory: {'; '.join(result['memory_method'])}")
    lines += [f"- {note}" for note in result["notes"]]
    lines.append(f"- total wall time {result['wall_s']:.1f}s")
    return "\n".join(lines)


def run_from_args(args) -> dict:
    settings = settings_from_args(args)
    result = run_bench(settings)
    print(format_report(result))
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        logging.basicConfig(level=logging.WARNING)
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m trace bench [options] (this module's own entry point is for its workers)")
