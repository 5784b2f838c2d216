"""The rollout engine: sample G completions per prompt from the current policy.

Hugging Face ``generate`` on CPU and small GPUs. On a cluster the same interface is served by vLLM
(see README: 'Rollouts with vLLM'); everything downstream only sees a ``RolloutBatch``.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RolloutBatch:
    """Prompts (left-padded to one width P) and their sampled completions (right-padded to T)."""
    prompt_ids: torch.Tensor        # [B, P]
    prompt_mask: torch.Tensor       # [B, P]
    completion_ids: torch.Tensor    # [B, T]
    completion_mask: torch.Tensor   # [B, T]  1 up to and including the end-of-turn token
    texts: list[str]                # decoded completions (special tokens dropped)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for every token up to and including the first end-of-turn, 0 after (padding)."""
    is_eos = completion_ids == eos_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


class HFRolloutEngine:
    def __init__(self, tokenizer, sampling: dict):
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)

    @torch.no_grad()
    def generate(self, model, prompts: list[str], n: int) -> RolloutBatch:
        """n samples for each prompt, grouped: rows [i*n, (i+1)*n) belong to prompt i."""
        repeated = [p for p in prompts for _ in range(n)]
        enc = self.tokenizer(repeated, return_tensors="pt", padding=True, add_special_tokens=False,
                             padding_side="left").to(model.device)
        was_training = model.training
        model.eval()
        # sampling {"do_sample": False} decodes greedily (the prompted annotator tiers' default)
        do_sample = self.sampling.get("do_sample", True)
        decoding = (dict(temperature=self.sampling["temperature"], top_p=self.sampling["top_p"],
                         top_k=self.sampling["top_k"]) if do_sample else {})
        out = model.generate(
            **enc, do_sample=do_sample, max_new_tokens=self.sampling["max_new_tokens"], **decoding,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_id,
        )
        model.train(was_training)
        completion_ids = out[:, enc["input_ids"].shape[1]:]
        completion_mask = completion_mask_from_ids(completion_ids, self.eos_id)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return RolloutBatch(enc["input_ids"], enc["attention_mask"], completion_ids, completion_mask, texts)
