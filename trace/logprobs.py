"""Per-token log-probabilities of given completions, without materialising [B, T, V] logits.

The policy's transformer body runs once; the vocabulary projection runs on chunks of completion
positions under activation checkpointing, so peak memory is O(chunk · V) in forward and backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` used them (a plain forward would not)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def completion_hidden_states(model, input_ids, attention_mask, prompt_width: int) -> torch.Tensor:
    """Final hidden states at the positions that PREDICT each completion token: [B, T, d]."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return hidden[:, prompt_width - 1: -1]


def _logprob_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = (F.linear(hidden, weight).float() / temperature).log_softmax(-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    return logp, entropy


def gather_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(target) and the policy entropy (no grad), per position: [N, d], [N] → [N], [N]."""
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start:start + chunk_size], lm_head_weight, targets[start:start + chunk_size], temperature)
        logp, entropy = (checkpoint(_logprob_and_entropy, *args, use_reentrant=False) if needs_grad
                         else _logprob_and_entropy(*args))
        logps.append(logp)
        entropies.append(entropy)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(logps), torch.cat(entropies)
