"""Rollout engines: sample n completions per prompt from the current policy, behind one interface.

    engine.generate(model, prompts, n, sampling=None) -> RolloutBatch   # rows [i*n, (i+1)*n): prompt i
    engine.sync_weights(policy)    # after every optimizer step: later samples come from the new weights
    engine.close()
    engine.eos_id                  # the end-of-turn token completions stop at (and include)

``HFRolloutEngine`` (hf.py): Hugging Face ``generate`` on the live policy (toy world, tests).
``VLLMRolloutEngine`` (vllm_engine.py): vLLM colocated in the training process; also returns vLLM's
log-prob of every sampled token. The trainer (trace/train/trainer.py) samples its rollouts through
``build_engine``; the prompted annotator tiers (trace/annotate/local.py) decode their replies
through the same engines (the self tier through the trainer's own engine).

Config (``train.rollout``, documented in config.yaml): see ``DEFAULTS``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .batch import RolloutBatch, completion_mask_from_ids, pad_right
from .hf import HFRolloutEngine

ENGINES = ("hf", "vllm")
DEFAULTS: dict[str, Any] = {
    "engine": "hf",                  # hf | vllm
    "dtype": None,                   # vLLM weights / compute dtype; None = train.dtype
    "max_model_len": None,           # vLLM: prompt + completion tokens per sequence; None = the model's limit
    "enforce_eager": True,           # vLLM: no torch.compile / CUDA graphs (fast start; False = faster decoding)
    "gpu_memory_utilization": 0.3,   # vLLM on GPU: the engine's share of GPU memory (weights + KV cache)
    "sleep_mode": True,              # vLLM on GPU: the engine sleeps while the policy trains
    "sleep_level": 1,                # 1: weights to host memory, KV cache dropped | 2: both dropped
    "kv_cache_gib": 1,               # vLLM on CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE, whole GiB)
    "annotator_server": None,        # served frozen annotator tier: vLLM server settings (server.py)
}


def rollout_settings(cfg: Mapping) -> dict:
    """``train.rollout`` with defaults filled in; an unknown key or engine fails naming it."""
    given = cfg.get("rollout") or {}
    if not isinstance(given, Mapping):
        raise ValueError(f"train.rollout must be a mapping, got {type(given).__name__}")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown settings {unknown} in train.rollout; known: {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **given}
    if settings["engine"] not in ENGINES:
        raise ValueError(f"train.rollout.engine must be one of {ENGINES}, got {settings['engine']!r}")
    if settings["sleep_level"] not in (1, 2):
        raise ValueError(f"train.rollout.sleep_level must be 1 or 2, got {settings['sleep_level']!r}")
    settings["dtype"] = settings["dtype"] or cfg.get("dtype", "float32")
    return settings


def build_engine(cfg: Mapping, tokenizer, weights: Path | str, cache_dir: Path | str,
                 sampling: Mapping | None = None):
    """The run's engine (``train.rollout.engine``). ``weights``: the folder the policy was loaded from
    (the vLLM engine loads its own copy); ``cache_dir``: where vLLM / inductor caches may go."""
    settings = rollout_settings(cfg)
    sampling = cfg["sampling"] if sampling is None else sampling
    if settings["engine"] == "hf":
        return HFRolloutEngine(tokenizer, sampling)
    check_vllm_head_dim(weights)
    from .vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(weights, tokenizer, sampling, settings, int(cfg.get("seed", 0)), Path(cache_dir))


VLLM_CPU_MIN_HEAD_DIM = 32  # vLLM's CPU attention: 32, 64, 80, 96, 112, 128 and up (16 fails at the first forward)


def check_vllm_head_dim(weights: Path | str) -> None:
    """On a machine without CUDA, fail before loading vLLM when the model's attention heads are too
    narrow for vLLM's CPU attention (it would fail deep inside the first forward)."""
    import json

    import torch

    config_file = Path(weights) / "config.json"
    if torch.cuda.is_available() or not config_file.exists():
        return
    config = json.loads(config_file.read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim < VLLM_CPU_MIN_HEAD_DIM:
        raise ValueError(f"train.rollout.engine 'vllm' on CPU needs head_dim >= {VLLM_CPU_MIN_HEAD_DIM}, but "
                         f"{config_file} has head_dim {head_dim}: use engine 'hf' for this model, or give the toy "
                         f"model a wider head (models.<name>.size.head_dim, workflow/configs/toy_vllm.yaml)")


__all__ = ["RolloutBatch", "completion_mask_from_ids", "pad_right", "HFRolloutEngine", "ENGINES", "DEFAULTS",
           "rollout_settings", "build_engine"]
