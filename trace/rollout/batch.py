"""What every rollout engine returns: prompts and their sampled completions, padded like HF ``generate``."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class RolloutBatch:
    """Prompts (left-padded to one width P) and their sampled completions (right-padded to T).

    Rows [i*n, (i+1)*n) are the n samples of prompt i. ``sampled_logprobs`` is the engine's own
    log-probability of each sampled token (vLLM: at the sampling temperature, see vllm_engine.py;
    None for the HF engine); 0 at padding. Rollouts not sampled by the student alone
    (trace/rollout/behaviour.py) mark the teacher's tokens (``guided_mask``) or carry the log-prob of each
    token under the behaviour policy that sampled it (``behaviour_logprobs``, 0 at padding).
    """
    prompt_ids: torch.Tensor        # [B, P]
    prompt_mask: torch.Tensor       # [B, P]
    completion_ids: torch.Tensor    # [B, T]
    completion_mask: torch.Tensor   # [B, T]  1 up to and including the end-of-turn token
    texts: list[str]                # decoded completions (special tokens dropped)
    sampled_logprobs: torch.Tensor | None = None   # [B, T] float32
    guided_mask: torch.Tensor | None = None        # [B, T] bool: completion tokens written by the teacher, not the student
    behaviour_logprobs: torch.Tensor | None = None  # [B, T] float32: log-prob of each sampled token under the policy
                                                    # that sampled it, at the sampling temperature; None = the student

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def take(self, rows: list[int], prompt_width: int | None = None, completion_width: int | None = None) -> "RolloutBatch":
        """These rows, their prompts cut to the last ``prompt_width`` columns (left padding) and every [B, T]
        field to the first ``completion_width`` (None: all)."""
        P = self.prompt_ids.shape[1]
        start = P - (P if prompt_width is None else prompt_width)
        T = self.completion_ids.shape[1] if completion_width is None else completion_width
        fields = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "texts":
                fields[field.name] = [value[i] for i in rows]
            elif value is not None:
                fields[field.name] = value[rows, start:] if field.name.startswith("prompt_") else value[rows, :T]
            else:
                fields[field.name] = None
        return RolloutBatch(**fields)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for every token up to and including the first end-of-turn, 0 after (padding)."""
    is_eos = completion_ids == eos_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


def pad_right(rows: list[list], pad, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged rows -> ([B, T] values padded with ``pad``, [B, T] mask of real entries); T = longest row."""
    width = max((len(r) for r in rows), default=0)
    values = torch.full((len(rows), width), pad, dtype=dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        values[i, :len(row)] = torch.tensor(row, dtype=dtype)
        mask[i, :len(row)] = 1
    return values, mask
