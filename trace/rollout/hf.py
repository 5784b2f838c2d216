"""The Hugging Face engine: ``model.generate`` on the live policy object (toy world, tests, small GPUs).

It samples from the very network it is given, so it follows every optimizer step by itself
(``sync_weights`` has nothing to do).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .batch import RolloutBatch, completion_mask_from_ids


class HFRolloutEngine:
    def __init__(self, tokenizer, sampling: Mapping):
        self.tokenizer = tokenizer
        self.sampling = dict(sampling)
        self.eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)

    @torch.no_grad()
    def generate(self, model, prompts: list[str], n: int, sampling: Mapping | None = None) -> RolloutBatch:
        """n samples for each prompt, grouped: rows [i*n, (i+1)*n) belong to prompt i.

        ``sampling`` overrides the engine's settings for this call (the prompted annotator tiers).
        """
        s = {**self.sampling, **(sampling or {})}
        repeated = [p for p in prompts for _ in range(n)]
        enc = self.tokenizer(repeated, return_tensors="pt", padding=True, add_special_tokens=False,
                             padding_side="left").to(model.device)
        was_training = model.training
        model.eval()
        # sampling {"do_sample": False} decodes greedily (the prompted annotator tiers' default)
        do_sample = s.get("do_sample", True)
        decoding = dict(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"]) if do_sample else {}
        out = model.generate(
            **enc, do_sample=do_sample, max_new_tokens=s["max_new_tokens"], **decoding,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_id,
        )
        model.train(was_training)
        completion_ids = out[:, enc["input_ids"].shape[1]:]
        completion_mask = completion_mask_from_ids(completion_ids, self.eos_id)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return RolloutBatch(enc["input_ids"], enc["attention_mask"], completion_ids, completion_mask, texts)

    def sync_weights(self, policy) -> None:
        """Nothing to copy: ``generate`` runs the policy object itself."""

    def close(self) -> None:
        """Nothing to free."""
