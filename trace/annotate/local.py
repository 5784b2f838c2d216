"""Local annotator models: loading a frozen model folder, and prompting a local model (``mode: prompted``).

``ChatGenerate`` turns a causal LM into the ``generate(conversations) -> replies`` function that
``CallableAnnotator`` expects: each conversation (the versioned annotation prompt of contract.py)
is rendered with the model's chat template and decoded by a rollout engine (trace/rollout: the
trainer's own engine for the self tier, so with vLLM the same ``LLM`` as the rollouts; otherwise
a Hugging Face engine on the model: no grad, eval mode during generation, the model's train/eval
mode restored afterwards). Greedy by default; ``do_sample: true`` uses the
run's rollout sampling (temperature / top-p / top-k). The replies then go through the shared
parse / validate / segment→token / cap pipeline, and a reply that is not a valid annotation
(e.g. from a toy model that cannot follow the prompt) fails cleanly: that rollout trains with
plain GRPO and the failure is counted.

Used by the prompted self tier (the live policy), the static tier (a frozen copy of the initial
student, loaded from the base folder; with ``train.rollout.engine: vllm`` its own frozen vLLM
engine) and the frozen tier (a local model folder; with vLLM or ``annotator.http`` it is served
instead: server.py / http.py).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .backends import Messages


def load_frozen_model(path: Path | str, device: torch.device | str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a Hugging Face folder; eval mode, no gradients, never trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"annotator model folder {path} has no config.json (config key annotator.model, "
                                "or the base model for the static tier)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    model.eval().requires_grad_(False)
    return model, tokenizer


def weights_fingerprint(path: Path | str) -> str:
    """sha256 over the names and CONTENT of a folder's weight files: part of a reply-cache key (a
    rebuilt model under the same path never reuses stale replies) and of a run's resume fingerprint.
    Content, not timestamps: copying results/ with tar or rsync keeps every checkpoint valid. Reading
    the weights once costs ~1 s per GB at the start of a job."""
    digest = hashlib.sha256()
    for f in sorted(f for f in Path(path).iterdir() if f.suffix in (".safetensors", ".bin")):
        with open(f, "rb") as handle:
            digest.update(f"{f.name}:{hashlib.file_digest(handle, 'sha256').hexdigest()}|".encode())
    return digest.hexdigest()[:16]


class ChatGenerate:
    """``generate(conversations) -> replies`` with a local model, through a rollout engine (trace/rollout).

    ``model`` is the network itself (for the self tier: the live policy object). ``engine``: the
    engine that decodes the replies: for the self tier the trainer's own engine (with vLLM: the
    same ``LLM`` as the rollouts, synced after every step); None = a Hugging Face engine on
    ``model``. ``sampling`` holds temperature / top_p / top_k (used when ``do_sample``);
    ``max_new_tokens`` bounds each reply.
    """

    def __init__(self, model: Any, tokenizer, *, engine=None, max_new_tokens: int = 512, do_sample: bool = False,
                 sampling: Mapping[str, Any] | None = None, thinking: bool = False, batch_size: int = 16):
        from trace.rollout import HFRolloutEngine

        if batch_size < 1:
            raise ValueError(f"annotator.batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.thinking, self.batch_size = model, tokenizer, thinking, batch_size
        settings = dict(sampling or {})
        if do_sample:
            missing = [k for k in ("temperature", "top_p", "top_k") if k not in settings]
            if missing:
                raise ValueError(f"sampled annotator replies need {missing} (the run's train.sampling)")
        settings.update(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample))
        self.settings = settings
        self.engine = engine if engine is not None else HFRolloutEngine(tokenizer, settings)

    def render(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=self.thinking)

    def __call__(self, conversations: Sequence[Messages]) -> list[str]:
        prompts = [self.render(c) for c in conversations]
        replies: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = self.engine.generate(self.model, prompts[start:start + self.batch_size], 1, sampling=self.settings)
            replies.extend(batch.texts)
        return replies
