"""The Hugging Face engine: ``model.generate`` on the live policy object (toy world, tests, small GPUs).

It samples from the very network it is given, so it follows every optimizer step by itself
(``sync_weights`` has nothing to do).
"""
from __future__ import annotations

from typing import Mapping

import torch

from .batch import RolloutBatch, completion_mask_from_ids


def fast_top_p_call(warper, input_ids, scores: torch.Tensor, *, full_sort) -> torch.Tensor:
    """transformers' ``TopPLogitsWarper.__call__`` (``full_sort``) without sorting the whole vocabulary
    when top-k has already set all but a few logits to −inf (generate applies top-k first).

    Only the finite logits can survive, and the −inf ones add nothing to the cumulative probability,
    so the same mask is computed over ``topk(number finite)``. Where that could differ — most logits
    finite, ties among the finite ones (the full sort orders them arbitrarily), another filter value —
    the full sort runs. With Qwen3's 151,936-entry vocabulary this was ~0.3 s of CPU per decoding step
    of a 20-row batch (~15 % of a smoke evaluation job); tests/test_rollout_hf_sampler.py checks equality.
    """
    finite = int(torch.isfinite(scores).sum(dim=1).max())
    if finite * 4 > scores.shape[1] or warper.filter_value != -float("inf"):
        return full_sort(warper, input_ids, scores)
    values, index = scores.topk(finite, dim=1)
    ascending, index = values.flip(1), index.flip(1)
    if bool(((ascending[:, 1:] == ascending[:, :-1]) & torch.isfinite(ascending[:, 1:])).any()):
        return full_sort(warper, input_ids, scores)
    remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - warper.top_p)
    remove[..., -warper.min_tokens_to_keep:] = False
    return scores.scatter(1, index, ascending.masked_fill(remove, warper.filter_value))


def install_fast_top_p() -> None:
    """Route transformers' top-p warper through ``fast_top_p_call`` (in this process; idempotent)."""
    import functools

    from transformers.generation.logits_process import TopPLogitsWarper

    if not getattr(TopPLogitsWarper.__call__, "trace_fast", False):
        full_sort = TopPLogitsWarper.__call__

        @functools.wraps(full_sort)
        def call(self, input_ids, scores):
            return fast_top_p_call(self, input_ids, scores, full_sort=full_sort)

        call.trace_fast, call.full_sort = True, full_sort
        TopPLogitsWarper.__call__ = call


class HFRolloutEngine:
    def __init__(self, tokenizer, sampling: Mapping):
        self.tokenizer = tokenizer
        self.sampling = dict(sampling)
        self.eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)

    def encode(self, prompts: list[str], n: int, device) -> dict[str, torch.Tensor]:
        """The prompts' ids and attention mask, each prompt repeated n times, left-padded to one width."""
        repeated = [p for p in prompts for _ in range(n)]
        return self.tokenizer(repeated, return_tensors="pt", padding=True, add_special_tokens=False,
                              padding_side="left").to(device)

    @torch.no_grad()
    def generate(self, model, prompts: list[str], n: int, sampling: Mapping | None = None,
                 row_seeds: list[int] | None = None, synced: bool = False) -> RolloutBatch:
        """n samples for each prompt, grouped: rows [i*n, (i+1)*n) belong to prompt i.

        ``sampling`` overrides the engine's settings for this call (the prompted annotator tiers).
        row_seeds: one seed per row; each row then samples from its own generator, so its tokens do not
        depend on which rows share the batch (a rank's share reproduces the one-process rollouts).
        synced: keep every rank stepping until all are done (sharded weights are gathered per forward).
        """
        enc = self.encode(prompts, n, model.device)
        completion_ids = self.generate_ids(model, enc["input_ids"], enc["attention_mask"], sampling, row_seeds, synced)
        return self.batch(enc["input_ids"], enc["attention_mask"], completion_ids)

    @torch.no_grad()
    def generate_ids(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     sampling: Mapping | None = None, row_seeds: list[int] | None = None, synced: bool = False,
                     sampler=None) -> torch.Tensor:
        """The sampled completion ids [B, T] after left-padded ``input_ids`` (as ``generate`` returns them:
        rows that ended early continue with padding). ``sampler``: a logits processor that picks each row's
        token itself (returns one finite score per row, e.g. a behaviour policy, trace/rollout/behaviour.py);
        it replaces the engine's sampling, whose max_new_tokens still applies."""
        s = {**self.sampling, **(sampling or {})}
        was_training = model.training
        model.eval()
        # sampling {"do_sample": False} decodes greedily (the prompted annotator tiers' default)
        do_sample = s.get("do_sample", True)
        decoding = dict(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"]) if do_sample else {}
        if sampler is None and do_sample and row_seeds is not None:  # the per-row sampler draws
            sampler = PerRowSampler(row_seeds, s, model.device)
        if sampler is not None:  # generate then just takes its pick
            decoding, do_sample = dict(logits_processor=[sampler]), False
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=do_sample,
            max_new_tokens=s["max_new_tokens"], **decoding,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.eos_id, synced_gpus=synced,
        )
        model.train(was_training)
        return out[:, input_ids.shape[1]:]

    def batch(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor) -> RolloutBatch:
        """The RolloutBatch of these completions: cut after each row's end-of-turn, padded, decoded."""
        completion_mask = completion_mask_from_ids(completion_ids, self.eos_id)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, texts)

    def sync_weights(self, policy) -> None:
        """Nothing to copy: ``generate`` runs the policy object itself."""

    def close(self) -> None:
        """Nothing to free."""


class PerRowSampler:
    """A logits processor: samples every row from its own seeded generator with Hugging Face's own
    warpers (temperature, top-k, top-p, in generate's order) and returns a one-hot score, so greedy
    decoding takes that pick."""

    def __init__(self, seeds: list[int], sampling: Mapping, device):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
        warpers = [TemperatureLogitsWarper(sampling["temperature"])]
        if sampling.get("top_k"):
            warpers.append(TopKLogitsWarper(sampling["top_k"]))
        if sampling.get("top_p", 1.0) < 1.0:
            warpers.append(TopPLogitsWarper(sampling["top_p"]))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"PerRowSampler has {len(self.generators)} seeds for {scores.shape[0]} rows")
        return pick_scores(scores, draw_rows(self.warpers(input_ids, scores).softmax(-1), self.generators))


def draw_rows(probs: torch.Tensor, generators: list | None = None) -> torch.Tensor:
    """One sample per row of ``probs`` [B, V] -> [B]: from each row's own generator, or torch's global one."""
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def pick_scores(scores: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """Scores that make greedy decoding take ``picks`` [B]: 0 there, −inf elsewhere."""
    return torch.full_like(scores, -float("inf")).scatter_(1, picks.unsqueeze(1), 0.0)
