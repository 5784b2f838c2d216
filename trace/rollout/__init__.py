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

Config (``train.rollout``, documented in config.yaml; defaults in the schema): ``trace.settings.Rollout``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from trace.settings import TrainRun

from .batch import RolloutBatch, completion_mask_from_ids, pad_right
from .hf import HFRolloutEngine

ENGINES = ("hf", "vllm")


def build_engine(settings: TrainRun, tokenizer, weights: Path | str, cache_dir: Path | str,
                 sampling: Mapping | None = None):
    """The run's engine (``train.rollout.engine``). ``weights``: the folder the policy was loaded from
    (the vLLM engine loads its own copy); ``cache_dir``: where vLLM / inductor caches may go;
    ``sampling``: another sampling mapping than ``train.sampling`` (a prompted annotator's)."""
    settings = TrainRun.from_mapping(settings)  # a mapping is checked and typed here
    sampling = settings.sampling.as_dict() if sampling is None else sampling
    if settings.rollout.engine == "hf":
        return HFRolloutEngine(tokenizer, sampling)
    check_vllm_head_dim(weights)
    from .vllm_engine import VLLMRolloutEngine

    return VLLMRolloutEngine(weights, tokenizer, sampling, settings.rollout, settings.rollout_dtype, settings.seed,
                             Path(cache_dir))


VLLM_CPU_MIN_HEAD_DIM = 32  # vLLM's CPU attention: 32, 64, 80, 96, 112, 128 and up (16 fails at the first forward)


def check_vllm_head_dim(weights: Path | str) -> None:
    """On a machine without CUDA, fail before loading vLLM when the model's attention heads are too
    narrow for vLLM's CPU attention (it would fail deep inside the first forward)."""
    import json

    import torch

    config_file = Path(weights) / "config.json"
    if torch.cuda.is_available() or not config_file.exists():
        return
    model_config = json.loads(config_file.read_text())
    head_dim = model_config.get("head_dim") or model_config["hidden_size"] // model_config["num_attention_heads"]
    if head_dim < VLLM_CPU_MIN_HEAD_DIM:
        raise ValueError(f"train.rollout.engine 'vllm' on CPU needs head_dim >= {VLLM_CPU_MIN_HEAD_DIM}, but "
                         f"{config_file} has head_dim {head_dim}: use engine 'hf' for this model, or give the toy "
                         f"model a wider head (models.<name>.size.head_dim, workflow/configs/toy_vllm.yaml)")


__all__ = ["RolloutBatch", "completion_mask_from_ids", "pad_right", "HFRolloutEngine", "ENGINES", "build_engine"]
