"""The vLLM engine: a vLLM ``LLM`` colocated in the training process (as TRL's colocate mode and verl).

Same contract as the HF engine (hf.py): ``generate(model, prompts, n)`` returns a ``RolloutBatch``
with the prompts tokenised and left-padded by the same tokenizer call, the completions ending at
(and including) the end-of-turn token, right-padded with the pad token; plus ``sampled_logprobs``.

* In-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the engine's model lives in this process and
  weights move between the policy and the engine as tensors.
* Stopping: the model folder's generation_config.json is ignored (``generation_config="vllm"``; Qwen3's
  also lists ``<|endoftext|>``), the only stop token is the tokenizer's eos, as ``HFRolloutEngine``.
* ``max_model_len``: a prompt that does not fit fails with one clear error; the completion budget is
  min(max_new_tokens, max_model_len − prompt length).
* Tokenizer: the engine never loads one (``skip_tokenizer_init``): prompts go in as token ids and
  completions come back as ids, encoded and decoded by the trainer's tokenizer (loading Qwen3's
  151,936-entry tokenizer again cost ~5 s of every job's start-up on CPU).
* CPU sampling: vLLM's CPU sampler applies top-k and top-p by sorting the whole vocabulary for every
  sequence at every token (~85 % of a CPU smoke's rollout time with Qwen3's vocabulary);
  ``fast_top_k_top_p`` gives the same result from the top k + 1 logits (see there).
* Seeds: each prompt's request gets a seed drawn from torch's generator, which the trainer seeds from
  (seed, step): the same step samples the same rollouts again on a resumed run.
* Log-probs: ``logprobs_mode="processed_logprobs"``, the log-probs vLLM samples from: log_softmax of
  logits / T, then restricted to top-k / top-p and renormalised. With top-k and top-p off (top_k ≤ 0,
  top_p = 1) this is exactly the trainer's log_softmax(logits / T) (trace/logprobs.py), so the
  two agree to float rounding (tests/test_rollout_vllm.py). With truncation on, vLLM's value is the
  truncated behaviour policy's log-prob, larger than the trainer's by −log(kept mass); the default
  ``raw_logprobs`` would instead be the temperature-1 distribution, which the trainer never computes
  at T ≠ 1.
* ``sync_weights(policy)`` after every optimizer step pushes the policy's tensors into the engine's
  model (``reload_weights`` with a weights iterator: vLLM's in-place reload that re-runs its weight
  post-processing, e.g. the CPU gemm repacking), then drops the prefix cache (its KV blocks were
  computed with the old weights). No disk round trip on CPU or GPU. Measured on CPU: the tied
  lm_head follows (tests/test_rollout_vllm.py checks it against the new and the old weights),
  whereas ``reload_weights(weights_path=...)`` from a saved folder leaves it on the OLD weights
  (max |Δ| 1.9 nats) until it is re-tied and re-packed (../shared/notes/vllm-cpu.md).
* GPU only (not runnable on the CPU test machine; written to vLLM 0.32's API, untested here):
  ``gpu_memory_utilization`` caps the engine's share; with ``sleep_mode`` the engine sleeps after
  each generate call (level 1: weights to host memory, KV cache dropped; level 2: both dropped,
  since sync_weights re-pushes all weights anyway) so the training step gets the memory back, and
  wakes (weights at sync, KV cache and scheduling at the next generate).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping

import torch

from trace.settings import Rollout

from .batch import RolloutBatch, pad_right

log = logging.getLogger(__name__)
LOGPROBS_MODE = "processed_logprobs"
SLEEP_TAGS = ("weights", "kv_cache", "scheduling")


def set_vllm_environment(cache_dir: Path, kv_cache_gib: float) -> None:
    """Process-wide vLLM settings, before the first engine is built: in-process engine, caches in
    folders we own (an explicit environment wins), the CPU KV cache size, and on CPU no thread pinning:
    vLLM's default pins its threads to every core of the node (and then ignores torch.set_num_threads),
    so two jobs sharing a node would fight over the same cores instead of keeping the threads their
    job was given (trace/cli.py)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))


def checkpoint_tensors(policy):
    """(name, tensor) in the model folder's naming: FSDP2 (DTensor) shards gathered to whole tensors,
    wrapper prefixes of activation checkpointing / torch.compile removed."""
    for name, tensor in policy.state_dict().items():
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def fast_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None,
                     allow_cpu_sync: bool = False, *, full_sort=None) -> torch.Tensor:
    """vLLM's ``apply_top_k_top_p_pytorch`` (``full_sort``) without sorting the vocabulary when top-k is on.

    vLLM keeps every logit ≥ the k-th largest, then, over those in ascending order, drops each whose
    cumulative probability is ≤ 1 − p (always keeping the largest). With top-k on, the survivors are
    among the k + 1 largest logits, so the same masks are computed on ``topk(k + 1)``: O(V) instead of a
    full O(V log V) sort. Where that could differ — a row without top-k, a tie at the k-th value (vLLM
    would keep more than k) — the full sort runs. tests/test_rollout_vllm_sampler.py checks equality.
    """
    if k is None or not allow_cpu_sync:
        return full_sort(logits, k, p, allow_cpu_sync)
    k = k.to(torch.long)
    if bool((k >= logits.shape[1]).any()):
        return full_sort(logits, k, p, allow_cpu_sync)
    values, index = logits.topk(int(k.max()) + 1, dim=1)  # descending
    if bool((values.gather(1, k.unsqueeze(1)) == values.gather(1, (k - 1).unsqueeze(1))).any()):
        return full_sort(logits, k, p, allow_cpu_sync)
    values = values.masked_fill(torch.arange(values.shape[1]).unsqueeze(0) >= k.unsqueeze(1), -float("inf"))
    if p is not None:
        ascending = values.flip(1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p.unsqueeze(1)
        drop[:, -1] = False
        values = ascending.masked_fill(drop, -float("inf")).flip(1)
    return logits.fill_(-float("inf")).scatter_(1, index, values)


def install_fast_cpu_top_k_top_p() -> None:
    """Route vLLM's CPU sampler through ``fast_top_k_top_p`` (in this process; idempotent)."""
    import functools

    from vllm.v1.sample.ops import topk_topp_sampler as sampler

    if not getattr(sampler.apply_top_k_top_p_pytorch, "trace_fast", False):
        fast = functools.partial(fast_top_k_top_p, full_sort=sampler.apply_top_k_top_p_pytorch)
        fast.trace_fast = True
        sampler.apply_top_k_top_p_pytorch = fast


class VLLMRolloutEngine:
    def __init__(self, weights: Path | str, tokenizer, sampling: Mapping, settings: Rollout, dtype: str, seed: int,
                 cache_dir: Path):
        """``settings``: train.rollout; ``dtype``: the engine's (train.rollout.dtype, else train.dtype)."""
        set_vllm_environment(Path(cache_dir), settings.kv_cache_gib)
        from vllm import LLM

        self.tokenizer, self.sampling = tokenizer, dict(sampling)
        self.eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        self.cuda = torch.cuda.is_available()
        self.sleep_level = int(settings.sleep_level) if self.cuda and settings.sleep_mode else 0
        gpu = dict(gpu_memory_utilization=settings.gpu_memory_utilization,
                   enable_sleep_mode=bool(self.sleep_level)) if self.cuda else {}
        # under torchrun every rank runs its own engine on its own device (LOCAL_RANK) inside the trainer's
        # process group, as TRL's colocate mode and verl do; the default executor would put all on device 0
        launcher = ({"distributed_executor_backend": "external_launcher"}
                    if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {})
        if not self.cuda:
            install_fast_cpu_top_k_top_p()
        started = time.perf_counter()
        self.llm = LLM(model=str(weights), skip_tokenizer_init=True, dtype=dtype,
                       max_model_len=settings.max_model_len, enforce_eager=settings.enforce_eager, seed=seed,
                       logprobs_mode=LOGPROBS_MODE, generation_config="vllm", **gpu, **launcher)
        _LIVE_ENGINES.append(self.llm)  # never shut down mid-run: see _LIVE_ENGINES
        self.load_s = time.perf_counter() - started
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.asleep: set[str] = set()
        self.last_sync_s = 0.0
        log.info("vLLM engine for %s loaded in %.1fs (max_model_len %d)", weights, self.load_s, self.max_model_len)
        self._sleep()

    # ------------------------------------------------------------------ GPU memory alternation
    def _sleep(self) -> None:
        if self.sleep_level and self.llm is not None and self.asleep != set(SLEEP_TAGS):
            self.llm.sleep(level=self.sleep_level)
            self.asleep = set(SLEEP_TAGS)

    def _wake(self, tags: tuple[str, ...]) -> None:
        todo = [t for t in tags if t in self.asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self.asleep -= set(todo)

    # ------------------------------------------------------------------ the contract
    def _sampling_params(self, s: Mapping, n: int, max_tokens: int, seed: int):
        from vllm import SamplingParams

        greedy = not s.get("do_sample", True)
        top_k = s.get("top_k")
        return SamplingParams(
            n=n, max_tokens=max_tokens, seed=seed, stop_token_ids=[self.eos_id], logprobs=0,
            detokenize=False,  # the texts are decoded by the HF tokenizer, as in the HF engine
            temperature=0.0 if greedy else float(s["temperature"]),
            top_p=1.0 if greedy else float(s["top_p"]),
            top_k=-1 if greedy or not top_k or top_k <= 0 else int(top_k))

    @torch.no_grad()
    def generate(self, model, prompts: list[str], n: int, sampling: Mapping | None = None,
                 row_seeds: list[int] | None = None, synced: bool = False) -> RolloutBatch:
        """n samples for each prompt, grouped: rows [i*n, (i+1)*n) belong to prompt i.

        The engine samples from its own copy of the weights, kept equal to ``model`` by
        ``sync_weights``; ``model`` only gives the device of the returned tensors. ``row_seeds``
        (train.rollout_rng rollout): each prompt's request is seeded by its first row's seed, so a
        rank's share draws what one process would for those prompts. ``synced`` is for sharded HF
        generation; every rank's engine holds full weights, so ranks need not step together.
        """
        from vllm.inputs import TokensPrompt

        s = {**self.sampling, **(sampling or {})}
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                             padding_side="left")
        token_lists = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
        longest = max(len(t) for t in token_lists)
        if longest >= self.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens does not fit train.rollout.max_model_len "
                             f"{self.max_model_len} (prompt + completion tokens per sequence)")
        seeds = (torch.randint(0, 2 ** 31 - 1, (len(prompts),)).tolist() if row_seeds is None  # seeded per step
                 else [int(row_seeds[i * n]) % (2 ** 31 - 1) for i in range(len(prompts))])
        params = [self._sampling_params(s, n, min(int(s["max_new_tokens"]), self.max_model_len - len(t)), seed)
                  for t, seed in zip(token_lists, seeds)]
        self._wake(SLEEP_TAGS)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=t) for t in token_lists], params, use_tqdm=False)
        self._sleep()

        samples = [c for out in outputs for c in out.outputs]
        completion_ids, completion_mask = pad_right([list(c.token_ids) for c in samples],
                                                    self.tokenizer.pad_token_id, torch.long)
        sampled_logprobs, _ = pad_right([[step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
                                         for c in samples], 0.0, torch.float32)
        device = next(model.parameters()).device if model is not None else torch.device("cpu")
        repeat = torch.arange(len(prompts)).repeat_interleave(n)
        return RolloutBatch(enc["input_ids"][repeat].to(device), enc["attention_mask"][repeat].to(device),
                            completion_ids.to(device), completion_mask.to(device),
                            self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
                            sampled_logprobs.to(device))

    @torch.no_grad()
    def sync_weights(self, policy) -> None:
        """The engine samples from ``policy``'s current weights from now on (call after every optimizer step)."""
        started = time.perf_counter()
        self._wake(("weights",))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checkpoint_tensors(policy)})
        self.llm.reset_prefix_cache()
        self.last_sync_s = time.perf_counter() - started

    def close(self) -> None:
        """Done with this engine: on GPUs it sleeps (its memory released, with sleep_mode), and it is
        shut down with the process (see ``_LIVE_ENGINES``)."""
        self._sleep()
        self.llm = None
        if self.cuda:
            torch.cuda.empty_cache()


# vLLM's engine shutdown (run when an engine is garbage-collected) tears down vLLM's process-wide
# parallel state and the default process group (vllm.distributed.cleanup_dist_env_and_memory). Every
# other engine of the process then fails ("pipeline model parallel group is not initialized"), and under
# torchrun the trainer's own group is gone. An engine dropped mid-run (the static annotator tier's, freed
# at kl.end) must therefore not shut down: every engine is kept here until the process ends.
_LIVE_ENGINES: list = []


def shutdown_engines() -> None:
    """Shut down every engine of this process (this also destroys the default process group): for a
    process that goes on to destroy that group itself (scripts/gpu_check.py), so that no engine's
    finalizer runs at exit against a group already destroyed."""
    while _LIVE_ENGINES:
        _LIVE_ENGINES.pop().llm_engine.engine_core.shutdown()
