"""Who samples the rollouts: the student, or a behaviour policy that leans on the external teacher.

A method's ``rollout_policy`` (trace/methods.py) picks one of ``ROLLOUT_POLICIES``:

  student         the student's own samples (train.sampling), as every paper method
  teacher_prefix  guidance (TrOPD, not the paper's): in a share of each prompt's G rollouts the teacher writes
                  the first ``train.guidance.prefix_tokens`` tokens (train.sampling), the student continues on
                  policy from prompt + prefix; ``guided_mask`` marks the teacher's tokens. The reward grades the
                  whole completion. ``behaviour_logprobs`` stays None: the teacher samples with train.sampling's
                  top-k / top-p, so its log-probs are not the exact probabilities of its draws.
  trb             TRB (not the paper's): every token from the per-row geometric blend b ∝ p^(1−η)·q^η of the
                  student p and the teacher q, with η ∈ [0, 1] the largest value with KL(b‖p) ≤ ε_k (a
                  student-centred trust region); ε_k follows train.trb's warm-up/linear-decay schedule to 0, from
                  where the student samples alone. p and q are at the sampling temperature and UNTRUNCATED (no
                  top-k / top-p), so ``behaviour_logprobs`` = log b(y_t) is exact and the loss's importance
                  ratios p/b are too.

Every policy: ``policy(step, student, teacher, prompts, n, row_seeds=None, synced=False) -> (RolloutBatch, sums)``
with ``sums`` metric sums / counts the trainer adds up over ranks (``<name>_sum`` / ``<name>_tokens`` pairs are
logged as their ratio), and ``policy.step_values(step)`` the values logged as they are (the same on every rank).
Without a teacher (none loaded: λ = 0) the student samples. Only the HF engine can run a behaviour policy.
"""
from __future__ import annotations

import math

import torch

from trace.logprobs import position_ids_from_mask
from trace.schedule import LambdaSchedule
from trace.settings import TrainRun

from .batch import RolloutBatch, pad_right
from .hf import HFRolloutEngine, draw_rows, pick_scores

BISECTION_STEPS = 30  # η to within 2^-30: far below any budget's resolution


# ---------------------------------------------------------------------------------------------- the blend
def geometric_blend(logp: torch.Tensor, logq: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """log b for b ∝ p^(1−η)·q^η, per row ([B, V] log-probs, η [B])."""
    return torch.log_softmax(logp + eta.unsqueeze(-1) * (logq - logp), dim=-1)


def kl_to_student(logb: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(b‖p) per row, [B]."""
    return (logb.exp() * (logb - logp)).sum(-1).clamp(min=0.0)


def trust_region_eta(logp: torch.Tensor, logq: torch.Tensor, budget: float) -> torch.Tensor:
    """The largest η ∈ [0, 1] per row with KL(b_η‖p) ≤ budget, by bisection (KL(b_η‖p) grows with η:
    its derivative is η·Var_b(log q − log p) ≥ 0). η = 1 where the teacher itself is within the budget;
    η = 0 for a zero budget. Always the feasible end of the bracket, so KL(b‖p) ≤ budget holds exactly."""
    B = logp.shape[0]
    if budget <= 0:
        return torch.zeros(B, device=logp.device)
    low, high = torch.zeros(B, device=logp.device), torch.ones(B, device=logp.device)
    inside = kl_to_student(logq, logp) <= budget
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        feasible = kl_to_student(geometric_blend(logp, logq, middle), logp) <= budget
        low, high = torch.where(feasible, middle, low), torch.where(feasible, high, middle)
    return torch.where(inside, torch.ones_like(low), low)


class TrustRegionSampler:
    """A logits processor for HF ``generate`` that samples every token from the trust-region blend of the
    student's scores and the teacher's next-token distribution on the same ids, and records per row and step
    log b(y_t), KL(b‖p) and η. The teacher reads the prompt's attention mask (left padding) and the
    positions ``generate`` gives the student, and keeps its own KV cache (one sampler per generate call)."""

    def __init__(self, teacher, prompt_mask: torch.Tensor, budget: float, temperature: float,
                 generators: list | None = None):
        self.teacher, self.prompt_mask, self.budget = teacher, prompt_mask, budget
        self.temperature, self.generators = temperature, generators
        self.cache = None
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, width = input_ids.shape
        generated = width - self.prompt_mask.shape[1]
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(B, generated)], dim=1)
        positions = position_ids_from_mask(mask)
        if self.cache is None:  # the prompt (and anything before the first call) in one forward
            out = self.teacher(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
        else:
            out = self.teacher(input_ids=input_ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                               past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generators is not None and scores.shape[0] != len(self.generators):
            raise ValueError(f"TrustRegionSampler has {len(self.generators)} seeds for {scores.shape[0]} rows")
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        logq = torch.log_softmax(self.teacher_logits(input_ids) / self.temperature, dim=-1)
        eta = trust_region_eta(logp, logq, self.budget)
        logb = geometric_blend(logp, logq, eta)
        picks = draw_rows(logb.exp(), self.generators)
        self.steps.append((logb.gather(1, picks.unsqueeze(1)).squeeze(1), kl_to_student(logb, logp), eta))
        return pick_scores(scores, picks)

    def recorded(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T] log b(y_t), KL(b‖p), η of the completion tokens (0 where ``mask`` is 0)."""
        return tuple(torch.stack(values, dim=1)[:, :mask.shape[1]] * mask for values in zip(*self.steps))


# ---------------------------------------------------------------------------------------------- the policies
class StudentRollouts:
    """The student's own samples, from the run's engine (HF or vLLM)."""

    def __init__(self, settings: TrainRun, engine):
        self.settings, self.engine = settings, engine

    def __call__(self, step, student, teacher, prompts, n, row_seeds=None, synced=False):
        return self.engine.generate(student, prompts, n, row_seeds=row_seeds, synced=synced), {}

    def step_values(self, step: int) -> dict:
        return {}


class TeacherPrefixRollouts(StudentRollouts):
    """Guidance: the first rows of each group (share · n, rounded half up) start with a teacher-written prefix."""

    def guided_per_group(self, n: int) -> int:
        return min(n, math.floor(self.settings.guidance.share * n + 0.5))

    def __call__(self, step, student, teacher, prompts, n, row_seeds=None, synced=False):
        k = self.guided_per_group(n)
        if teacher is None or k == 0:
            return super().__call__(step, student, teacher, prompts, n, row_seeds, synced)
        engine, prefix_tokens = self.engine, self.settings.guidance.prefix_tokens
        enc = engine.encode(prompts, n, student.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        guided = [row for row in range(len(prompts) * n) if row % n < k]
        own = [row for row in range(len(prompts) * n) if row % n >= k]
        seeds = (lambda rows, offset=0: None if row_seeds is None else [row_seeds[r] + offset for r in rows])
        completions: dict[int, list[int]] = {}
        prefix = engine.batch(ids[guided], mask[guided], engine.generate_ids(
            teacher, ids[guided], mask[guided], {"max_new_tokens": prefix_tokens}, seeds(guided), synced))
        prefix_lengths = prefix.completion_mask.sum(1).tolist()
        for row, written, length in zip(guided, prefix.completion_ids.tolist(), prefix_lengths):
            completions[row] = written[:length]
        # the student continues the prefixes that did not end the turn (all prefix_tokens long), within the
        # same total max_new_tokens as its own rollouts (the loss's length normaliser)
        ended = {i for i, row in enumerate(guided) if completions[row][-1] == engine.eos_id}
        # under torchrun (synced) every rank must make the same generate calls, as the sharded weights are
        # gathered per forward: there the ended prefixes are continued too, and that continuation dropped
        go_on = [i for i in range(len(guided)) if synced or i not in ended]
        budget = self.settings.sampling.max_new_tokens - prefix_tokens
        if go_on and budget > 0:
            rows = [guided[i] for i in go_on]
            context = torch.cat([ids[rows], prefix.completion_ids[go_on]], dim=1)
            context_mask = torch.cat([mask[rows], prefix.completion_mask[go_on]], dim=1)
            # a row's continuation draws from its own generator, seeded apart from the teacher's prefix draws
            more = engine.batch(context, context_mask, engine.generate_ids(
                student, context, context_mask, {"max_new_tokens": budget}, seeds(rows, 1), synced))
            for i, row, written, length in zip(go_on, rows, more.completion_ids.tolist(),
                                               more.completion_mask.sum(1).tolist()):
                if i not in ended:
                    completions[row] += written[:length]
        if own:
            mine = engine.batch(ids[own], mask[own], engine.generate_ids(student, ids[own], mask[own], None,
                                                                         seeds(own), synced))
            for row, written, length in zip(own, mine.completion_ids.tolist(), mine.completion_mask.sum(1).tolist()):
                completions[row] = written[:length]
        completion_ids, completion_mask = pad_right([completions[row] for row in range(len(ids))],
                                                    engine.tokenizer.pad_token_id, torch.long)
        guided_mask = torch.zeros_like(completion_ids, dtype=torch.bool)
        for row, length in zip(guided, prefix_lengths):
            guided_mask[row, :length] = True
        device = ids.device
        batch = RolloutBatch(ids, mask, completion_ids.to(device), completion_mask.to(device),
                             engine.tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
                             guided_mask=guided_mask.to(device))
        return batch, {"guidance/rows": float(len(guided)), "guidance/prefix_tokens_mean_sum": float(sum(prefix_lengths)),
                       "guidance/prefix_tokens_mean_tokens": float(len(guided))}


class TrustRegionRollouts(StudentRollouts):
    """TRB: rollouts from the trust-region blend while the budget ε_k > 0, the student's own afterwards."""

    def __init__(self, settings: TrainRun, engine):
        super().__init__(settings, engine)
        trb = settings.trb
        self.budget = LambdaSchedule("warmup_linear_decay", trb.kl_budget, trb.warmup, trb.end)

    def step_values(self, step: int) -> dict:
        return {"trb/kl_budget": self.budget(step)}

    def __call__(self, step, student, teacher, prompts, n, row_seeds=None, synced=False):
        budget = self.budget(step)
        if teacher is None or budget <= 0:  # pure student rollouts: logged as a zero KL and η
            batch, _ = super().__call__(step, student, teacher, prompts, n, row_seeds, synced)
            return batch, self.sums(torch.zeros_like(batch.completion_mask, dtype=torch.float32),
                                    torch.zeros_like(batch.completion_mask, dtype=torch.float32), batch.completion_mask)
        engine = self.engine
        enc = engine.encode(prompts, n, student.device)
        generators = (None if row_seeds is None
                      else [torch.Generator(device=student.device).manual_seed(int(s)) for s in row_seeds])
        sampler = TrustRegionSampler(teacher, enc["attention_mask"], budget, self.settings.sampling.temperature,
                                     generators)
        batch = engine.batch(enc["input_ids"], enc["attention_mask"], engine.generate_ids(
            student, enc["input_ids"], enc["attention_mask"], None, None, synced, sampler=sampler))
        behaviour_logp, kl, eta = sampler.recorded(batch.completion_mask)
        batch.behaviour_logprobs = behaviour_logp.float()
        return batch, self.sums(kl, eta, batch.completion_mask)

    @staticmethod
    def sums(kl: torch.Tensor, eta: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
        """trb/realised_kl and trb/eta_mean: per generated token over the whole batch."""
        tokens = float(mask.sum())
        return {"trb/realised_kl_sum": float(kl.sum()), "trb/realised_kl_tokens": tokens,
                "trb/eta_mean_sum": float(eta.sum()), "trb/eta_mean_tokens": tokens}


ROLLOUT_POLICIES = {"student": StudentRollouts, "teacher_prefix": TeacherPrefixRollouts, "trb": TrustRegionRollouts}


def rollout_policy_for(name: str, settings: TrainRun, engine):
    """The policy object a run samples with (MethodSpec.rollout_policy); ValueError in one line when it
    is unknown or needs the HF engine."""
    if name not in ROLLOUT_POLICIES:
        raise ValueError(f"unknown rollout policy {name!r} (MethodSpec.rollout_policy); choose from "
                         f"{sorted(ROLLOUT_POLICIES)}")
    if name != "student" and not isinstance(engine, HFRolloutEngine):
        raise ValueError(f"method {settings.method!r} samples its rollouts with the {name} policy, supported on "
                         f"train.rollout.engine 'hf' only (got {settings.rollout.engine!r})")
    return ROLLOUT_POLICIES[name](settings, engine)
