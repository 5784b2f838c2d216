"""The self-distillation teacher: the same network, scoring the student's exact completion tokens
under a different (privileged) prompt, with no gradient.

Weights, by method: ``synced`` (a copy re-synced with the student every k steps; TRACE: 10),
``ema`` (SRPO: teacher ← (1 − rate)·teacher + rate·student), ``frozen`` (SDPO: the initial student).
"""
from __future__ import annotations

import copy

import torch

from trace.losses import ema_update
from trace.logprobs import completion_hidden_states
from trace.schedule import teacher_sync_due


class Teacher:
    def __init__(self, student, mode: str, sync_every: int = 10, ema_rate: float = 0.05):
        if mode not in ("synced", "ema", "frozen"):
            raise ValueError(f"unknown teacher mode {mode!r} (method.teacher): synced | ema | frozen")
        self.mode, self.sync_every, self.ema_rate = mode, sync_every, ema_rate
        self.model = copy.deepcopy(student).eval().requires_grad_(False)

    def update(self, student, step: int) -> None:
        """Called once per optimizer step, BEFORE the step's teacher forward."""
        if self.mode == "synced" and teacher_sync_due(step, self.sync_every):
            self.model.load_state_dict(student.state_dict())
        elif self.mode == "ema" and step > 0:
            ema_update(self.model.parameters(), student.parameters(), self.ema_rate)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @torch.no_grad()
    def hidden_states(self, tokenizer, teacher_prompts: list[str], completion_ids, completion_mask):
        """[B, T, d] teacher hidden states predicting the student's completion tokens."""
        enc = tokenizer(teacher_prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                        padding_side="left").to(completion_ids.device)
        input_ids = torch.cat([enc["input_ids"], completion_ids], dim=1)
        attention = torch.cat([enc["attention_mask"], completion_mask], dim=1)
        return completion_hidden_states(self.model, input_ids, attention, enc["input_ids"].shape[1])
