"""Supervised fine-tuning that turns the random tiny model into the toy world's "base" policy.

Cross-entropy on the reference-solution tokens only (the prompt is context), AdamW with linear
warm-up and cosine decay to zero, so the base lands at a clearly non-zero but imperfect accuracy
that RL can then move.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from trace.prompting import render_prompt


def encode_sft_example(tokenizer, record: dict, thinking: bool) -> tuple[list[int], int]:
    """Token ids of prompt + solution + end-of-turn, and where the completion starts."""
    prompt = render_prompt(tokenizer, record, thinking, system_prefix=record.get("private_context"))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(record["solution"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, len(prompt_ids)


def _batch(examples: list[tuple[list[int], int]], pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        labels[row, prompt_len: len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, attention, labels


def completion_loss(model, input_ids, attention, labels) -> torch.Tensor:
    """Mean cross-entropy of the completion tokens, projecting ONLY their positions onto the
    vocabulary: with Qwen3's 151,936-entry vocabulary the full [B, T, V] logits of the prompt
    positions would cost most of the step for nothing."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[keep]).float()
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * progress))


def run_sft(model, tokenizer, records: list[dict], out_dir: Path, *, steps: int, batch_size: int,
            lr: float, warmup: int, weight_decay: float, thinking: bool, seed: int,
            log_every: int = 25) -> list[dict]:
    """Train in place, save the model + tokenizer to ``out_dir``, return the loss log."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    examples = [encode_sft_example(tokenizer, r, thinking) for r in records]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    log, started = [], time.time()
    for step in tqdm(range(steps), desc="sft", mininterval=5):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        input_ids, attention, labels = _batch(rng.sample(examples, batch_size), tokenizer.pad_token_id)
        loss = completion_loss(model, input_ids, attention, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                        "wall_s": round(time.time() - started, 2)})
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "sft_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    return log
