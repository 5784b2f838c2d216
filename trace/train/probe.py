"""The paper's mechanism measurements (TRACE.md §7: Fig 6 and the one-step log-prob lift), taken
by the training loop on the same steps (``train.probe.steps``) for every method.

At a probe step the step's own rollouts are annotated by the configured annotator (for every
method, so GRPO and the all-token baselines are measured against the same kind of spans), and the
step's optimizer update is measured per completion token:

  credit_t      = |log π_θ'(y_t) − log π_θ(y_t)|   the per-token update magnitude of one step
  concentration = mean credit inside the annotated spans (K ∪ E, α-capped) / mean credit outside
  lift          = mean of log π_θ'(y_t) − log π_θ(y_t) over *teacher-supported key tokens*: positions
                  in key spans where the teacher gives the sampled token more probability than the
                  student, q(y_t) > p(y_t); the teacher is TRACE's (the current policy given the
                  annotator's diagnostic label), the same for every method.

(The spec gives the paper's numbers, not its exact estimators: these definitions are ours.)
Caveat: Adam's very first update is ≈ lr·sign(gradient) per parameter, so at step 0 the measured
update reflects the gradient's sign pattern more than its size (methods whose gradients share signs
measure alike); probes after a few steps, with Adam's moments warmed up, separate the losses better.
Nothing here draws random numbers, so probing leaves the training trajectory unchanged.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from trace.logprobs import completion_hidden_states, gather_logprobs
from trace.losses import tokens_from_positions
from trace.prompting import teacher_prompt
from trace.router import build_routed_masks
from trace.settings import TrainRun


@dataclasses.dataclass(frozen=True)
class ProbedPolicy:
    """What the probe reads of a run: its live policy, how the run scores tokens, and its process group."""
    policy: torch.nn.Module
    tokenizer: Any
    dist: Any                  # trace.train.distributed.Distributed
    temperature: float
    logprob_chunk: int
    micro_batch_size: int
    thinking: bool
    alpha: float

    @classmethod
    def of(cls, settings: TrainRun, policy, tokenizer, dist) -> "ProbedPolicy":
        return cls(policy, tokenizer, dist, settings.sampling.temperature, settings.logprob_chunk,
                   settings.micro_batch_size, settings.thinking, settings.kl.alpha)

    def logprobs(self, rollouts, prompts=None) -> torch.Tensor:
        """log π of the rollouts' tokens [B, T]; ``prompts`` None = the student's own prompts."""
        return _batched_logprobs(self.policy, self.tokenizer, prompts, rollouts, self.temperature,
                                 self.logprob_chunk, self.micro_batch_size)


@dataclasses.dataclass
class ProbeState:
    """What the probe knows before the update: the rollouts' token log-probs and the masks."""
    logp_before: torch.Tensor   # [B, T]
    mask: torch.Tensor          # [B, T] completion tokens
    spans: torch.Tensor         # [B, T] annotated K ∪ E after the α cap
    supported_key: torch.Tensor  # [B, T] key-span tokens with q(y_t) > p(y_t)
    map_row: int | None         # the rollout drawn as Fig 6's credit map (first one with a span)


@torch.no_grad()
def token_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float,
                   chunk: int) -> torch.Tensor:
    """log π(y_t) of the given completions under ``model``, [B, T] (zeros at padding)."""
    mask = completion_mask.bool()
    hidden = completion_hidden_states(model, torch.cat([prompt_ids, completion_ids], dim=1),
                                      torch.cat([prompt_mask, completion_mask], dim=1), prompt_ids.shape[1])
    logp, _ = gather_logprobs(hidden[mask], model.get_output_embeddings().weight, completion_ids[mask],
                              temperature, chunk)
    return tokens_from_positions(logp, mask)


def _masked_mean(dist_, values: torch.Tensor, where: torch.Tensor) -> float | None:
    """Mean over every rank's selected tokens; None (JSON null) when no token is selected anywhere,
    e.g. a step without annotated key spans."""
    total, count = dist_.sum(torch.stack([values[where].double().sum(), where.sum().double()])).tolist()
    return total / count if count else None


def row_slices(n: int, size: int) -> list[slice]:
    """Micro-batches of ``n`` rows as slices (they index tensors and lists of prompts alike)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _batched_logprobs(model, tokenizer, prompts, rollouts, temperature, chunk, micro) -> torch.Tensor:
    """token_logprobs over micro-batches; ``prompts`` None = the student's own prompts."""
    out = []
    for rows in row_slices(len(rollouts.texts), micro):
        if prompts is None:
            prompt_ids, prompt_mask = rollouts.prompt_ids[rows], rollouts.prompt_mask[rows]
        else:
            enc = tokenizer(prompts[rows], return_tensors="pt", padding=True, add_special_tokens=False,
                            padding_side="left").to(rollouts.completion_ids.device)
            prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
        out.append(token_logprobs(model, prompt_ids, prompt_mask, rollouts.completion_ids[rows],
                                  rollouts.completion_mask[rows], temperature, chunk))
    return torch.cat(out)


def probe_before_update(probed: ProbedPolicy, records: list[dict], rollouts, correct: torch.Tensor,
                        key: torch.Tensor, error: torch.Tensor, prefixes: list[str | None]) -> ProbeState:
    """Score the step's annotated rollouts (``key`` / ``error`` spans and the label ``prefixes`` from the
    run's annotator) under the student and TRACE's teacher (no grad)."""
    mask = rollouts.completion_mask.bool()
    capped = build_routed_masks("annotated", mask.cpu(), correct.cpu(), key.cpu(), error.cpu(), probed.alpha)
    spans = (capped.key | capped.error).to(mask.device)
    student = probed.logprobs(rollouts)
    teacher_prompts = [teacher_prompt(probed.tokenizer, r, "label", p, probed.thinking)
                       for r, p in zip(records, prefixes)]
    teacher = probed.logprobs(rollouts, teacher_prompts)
    supported = capped.key.to(mask.device) & (teacher > student)
    with_span = spans.any(dim=1).nonzero()
    probed.dist.reshard(probed.policy)
    return ProbeState(student, mask, spans, supported, int(with_span[0]) if len(with_span) else None)


def probe_after_update(probed: ProbedPolicy, rollouts, state: ProbeState) -> dict:
    """The step's metrics row entries (``probe/*``) and one rollout's credit map for Fig 6."""
    after = probed.logprobs(rollouts)
    probed.dist.reshard(probed.policy)
    change = (after - state.logp_before).float()
    credit = change.abs()
    inside, outside = state.spans & state.mask, ~state.spans & state.mask
    dist_ = probed.dist  # under torchrun: this rank's rollouts; the means and counts are over all ranks
    row = {"probe/credit_inside": _masked_mean(dist_, credit, inside),
           "probe/credit_outside": _masked_mean(dist_, credit, outside),
           "probe/logprob_lift_key_supported": _masked_mean(dist_, change, state.supported_key),
           "probe/tokens_key_supported": float(dist_.sum(state.supported_key.sum())),
           "probe/tokens_span": float(dist_.sum(inside.sum()))}
    if row["probe/credit_inside"] is not None and row["probe/credit_outside"]:
        row["probe/credit_concentration"] = row["probe/credit_inside"] / row["probe/credit_outside"]
    credit_map = None
    if state.map_row is not None:
        i, length = state.map_row, int(state.mask[state.map_row].sum())
        ids = rollouts.completion_ids[i, :length].tolist()
        credit_map = {"rollout": dist_.rank * len(rollouts.texts) + i,  # ranks hold contiguous shares
                      "tokens": probed.tokenizer.convert_ids_to_tokens(ids),
                      "credit": [round(float(c), 6) for c in credit[i, :length]],
                      "span": [int(s) for s in state.spans[i, :length]]}
    # the first rollout with a span over all ranks, as one process would pick it
    credit_map = next((m for m in dist_.gather_objects(credit_map) if m is not None), None)
    if credit_map is not None:
        row["probe/map"] = credit_map
    return row


# --------------------------------------------------------------------------- the fixed probe batch
# The step's own rollouts differ between methods after step 0 (each samples from its own policy), so
# their credit maps compare different texts. The fixed batch (written by the teacher check,
# trace/train/teacher_gap.py) is the SAME base rollouts for every method and step: on it the probe
# measures where each method moves probability, at the tokens the mechanism is about:
#   margin_first_error = log π(c) − log π(w) at the first error token of an incorrect rollout (c the
#                        correct token, w the sampled wrong one): how far the policy is from fixing it
#   margin_change      = its change over the probe step's one update (> 0: the update moved toward c)
#   lift_key_supported = mean Δ log π(y_t) over key-span tokens the label teacher supports (q > p)
@dataclasses.dataclass
class FixedProbeBatch:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    error_rows: torch.Tensor      # [E] rollout of each first error
    error_positions: torch.Tensor  # [E] its token position
    correct_ids: torch.Tensor     # [E] the correct token there
    key_supported: torch.Tensor   # [B, T]


def load_fixed_batch(path, tokenizer, device) -> FixedProbeBatch:
    """The teacher check's probe batch (torch.save of plain tensors, lists and strings)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"probe batch {path} does not exist (the teacher_gap rule writes it)")
    saved = torch.load(path, weights_only=True)
    enc = tokenizer(saved["prompts"], return_tensors="pt", padding=True, add_special_tokens=False,
                    padding_side="left")
    errors = saved["first_errors"] or [(0, 0, 0, 0)][:0]
    rows, positions, correct = (torch.tensor([e[i] for e in errors], dtype=torch.long) for i in range(3))
    return FixedProbeBatch(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                           saved["completion_ids"].to(device), saved["completion_mask"].to(device),
                           rows, positions, correct, saved["key_supported"].to(device))


@torch.no_grad()
def fixed_batch_scores(probed: ProbedPolicy, batch: FixedProbeBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π of every sampled token [B, T], log π(c) [E] and log π(w) [E] at the first errors), by the
    current policy. Every rank scores the whole batch (the sharded policy runs its forward on all ranks)."""
    temperature, chunk, micro = probed.temperature, probed.logprob_chunk, probed.micro_batch_size
    W = probed.policy.get_output_embeddings().weight
    sampled, correct, wrong = [], torch.zeros(len(batch.error_rows)), torch.zeros(len(batch.error_rows))
    for rows in row_slices(batch.completion_ids.shape[0], micro):
        mask = batch.completion_mask[rows].bool()
        hidden = completion_hidden_states(
            probed.policy, torch.cat([batch.prompt_ids[rows], batch.completion_ids[rows]], 1),
            torch.cat([batch.prompt_mask[rows], batch.completion_mask[rows]], 1), batch.prompt_ids.shape[1])
        logp, _ = gather_logprobs(hidden[mask], W, batch.completion_ids[rows][mask], temperature, chunk)
        sampled.append(tokens_from_positions(logp, mask))
        here = (batch.error_rows >= rows.start) & (batch.error_rows < rows.stop)
        if here.any():
            at = hidden[(batch.error_rows[here] - rows.start).to(hidden.device), batch.error_positions[here].to(hidden.device)]
            logp_all = (at @ W.T).float().div(temperature).log_softmax(-1).cpu()
            correct[here] = logp_all.gather(-1, batch.correct_ids[here].unsqueeze(-1)).squeeze(-1)
            wrong_ids = batch.completion_ids[batch.error_rows[here], batch.error_positions[here]].cpu()
            wrong[here] = logp_all.gather(-1, wrong_ids.unsqueeze(-1)).squeeze(-1)
    probed.dist.reshard(probed.policy)
    return torch.cat(sampled), correct, wrong


def fixed_batch_row(before, after, batch: FixedProbeBatch) -> dict:
    """The probe/fixed_* metrics from fixed_batch_scores before and after the step's update."""
    (sampled_0, correct_0, wrong_0), (sampled_1, correct_1, wrong_1) = before, after
    margin_0, margin_1 = correct_0 - wrong_0, correct_1 - wrong_1
    supported = batch.key_supported & batch.completion_mask.bool()
    lift = (sampled_1 - sampled_0).float()[supported]
    row = {"probe/fixed_first_errors": len(margin_0), "probe/fixed_tokens_key_supported": int(supported.sum())}
    if len(margin_0):
        row.update({"probe/fixed_margin_first_error": float(margin_0.mean()),
                    "probe/fixed_margin_change": float((margin_1 - margin_0).mean()),
                    "probe/fixed_correct_logprob_change": float((correct_1 - correct_0).mean()),
                    "probe/fixed_share_margin_up": float(((margin_1 - margin_0) > 0).float().mean())})
    if len(lift):
        row["probe/fixed_lift_key_supported"] = float(lift.mean())
    return row
