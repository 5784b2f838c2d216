"""The objective of each method family, in a registry keyed by ``MethodSpec.objective`` (verl-style).

An objective turns one micro-batch's clipped PPO surrogate (and, while the KL channel is on, the teacher's
hidden states) into the loss to backpropagate, logging what it computed. OPD's (opd, opd_k1, tropd) use no
reward at all: the full reverse KL, or a per-token advantage in place of GRPO's. ``OBJECTIVES[name]`` has:

    advantages(batch, adv) -> adv      per-token advantages before the surrogate (RLSD reweights them)
    loss(batch, ppo) -> loss           the scalar, normalised by the WHOLE optimizer batch (batch.agg)

Once the teacher is off (λ = 0 for good), every method is GRPO: the trainer uses ``OBJECTIVES["grpo"]``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from trace import losses
from trace.logprobs import gather_logprobs
from trace.methods import MethodSpec
from trace.router import CORNERS, AgreementRegion, RoutedMasks, agreement_region
from trace.settings import TrainRun


@dataclasses.dataclass
class MicroBatch:
    """What one micro-batch's objective reads (rows of the optimizer batch), and the metrics it logs."""
    settings: TrainRun
    method: MethodSpec
    mask: torch.Tensor                    # [b, T] completion tokens
    targets: torch.Tensor                 # [b, T] completion token ids
    hidden: torch.Tensor                  # [b, T, d] student hidden states (with grad)
    lm_head: torch.Tensor                 # student output embedding
    logp: torch.Tensor                    # [b, T] student log-prob of the sampled tokens (with grad)
    correct: torch.Tensor                 # [b] verifiable reward
    routed: RoutedMasks | None            # this micro-batch's rows of the router's masks (TRACE methods)
    teacher_hidden: torch.Tensor | None   # [b, T, d] teacher hidden states, None once the teacher is off
    teacher_lm_head: torch.Tensor | None
    lam: float                            # λ_k of this step
    strength: float                       # the schedule's strength at this step (RLSD)
    agg: dict                             # aggregation arguments with the whole batch's normalisers
    srpo_weight_mean: torch.Tensor | None  # SRPO's batch-wide weight normaliser
    guided: torch.Tensor | None = None          # [b, T] bool: tokens the teacher wrote (teacher-prefix rollouts)
    behaviour_logp: torch.Tensor | None = None  # [b, T] log-prob under the policy that sampled (None: the student)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    _teacher_sampled: tuple[torch.Tensor, torch.Tensor] | None = dataclasses.field(default=None, repr=False)

    @property
    def temperature(self) -> float:
        return self.settings.sampling.temperature

    def support(self) -> dict:
        """The categories a full-distribution KL sums over, by the method's ``support`` (trace/methods.py)."""
        kl, support = self.settings.kl, self.method.support
        if support == "settings":
            return dict(top_k=kl.top_k, tail_bucket=kl.tail_bucket)
        if support == "vocab":
            return dict(top_k=None)
        if support == "teacher_top_k":
            if kl.top_k is None:
                raise ValueError(f"method {self.settings.method!r} distils on the teacher's top-K: set train.kl.top_k")
            return dict(top_k=kl.top_k, support="teacher", tail_bucket=True)
        raise ValueError(f"method {self.settings.method!r}: support {support!r} is not a full-distribution KL")

    def divergence(self, where: torch.Tensor, kind: str, name: str, categories: dict | None = None,
                   **extra) -> torch.Tensor:
        """Per-token divergence at the routed positions only (zeros elsewhere), over the method's support (or
        ``categories``: top_k / support / tail_bucket); ``extra`` goes to routed_divergence (beta;
        entry_clip=None: unclipped). Logs, per routed token over
        the WHOLE batch (sums and counts here, divided by the trainer): the clipped value the loss uses
        (kl/<name>_token_mean), the unclipped one (…_unclipped_token_mean) and the share of tokens whose
        value the per-entry clip scaled down (…_clip_binds_frac)."""
        options = {**(self.support() if categories is None else categories), "entry_clip": self.settings.kl.entry_clip,
                   **extra}
        values, scale = losses.chunked_divergence(
            self.hidden[where], self.teacher_hidden[where], self.lm_head, kind,
            chunk_size=self.settings.logprob_chunk, teacher_lm_head_weight=self.teacher_lm_head,
            temperature=self.temperature, return_scale=True, **options)
        n = float(values.numel())
        for metric, total in (("token_mean", values.detach()), ("unclipped_token_mean", values.detach() / scale),
                              ("clip_binds_frac", (scale < 1).float())):
            self.metrics[f"kl/{name}_{metric}_sum"] = float(total.sum())
            self.metrics[f"kl/{name}_{metric}_tokens"] = n
        return losses.tokens_from_positions(values, where)

    def teacher_token_logp(self) -> torch.Tensor:
        """[b, T] the teacher's log-prob of the sampled tokens (0 at padding), no gradient; one projection,
        which also gives the teacher's entropy (log_teacher_entropy_of_sampled)."""
        if self._teacher_sampled is None:
            flat, entropy = gather_logprobs(self.teacher_hidden[self.mask], self.teacher_lm_head,
                                            self.targets[self.mask], self.temperature, self.settings.logprob_chunk)
            self._teacher_sampled = (losses.tokens_from_positions(flat.detach(), self.mask), entropy)
        return self._teacher_sampled[0]

    def importance_weights(self) -> torch.Tensor | None:
        """Off-policy correction where another policy sampled the tokens (``behaviour_logp`` set, e.g. TRB):
        the truncated importance weight w_t = min(p(y_t)/b(y_t), C) per token, detached (C = train.trb.is_clip);
        None when the student sampled. Logs, per token over the whole batch, the raw ratio (is/ratio_raw) beside
        the weight used (is/weight) and the share of tokens the cap binds (is/clipped_frac)."""
        if self.behaviour_logp is None:
            return None
        ratio = torch.exp(self.logp.detach() - self.behaviour_logp.to(self.logp.dtype))
        cap = self.settings.trb.is_clip
        weight = ratio.clamp(max=cap)
        for name, value in (("ratio_raw", ratio), ("weight", weight), ("clipped_frac", (ratio > cap).float())):
            self.log_token_mean(f"is/{name}", value, self.mask)
        return weight

    def log_teacher_entropy_of_sampled(self) -> None:
        """The teacher's entropy at every completion token, from teacher_token_logp's projection."""
        self.teacher_token_logp()
        entropy = self._teacher_sampled[1]
        self.metrics.update(teacher_entropy_sum=float(entropy.sum()), teacher_entropy_tokens=float(entropy.numel()))

    def aggregate(self, per_token: torch.Tensor) -> torch.Tensor:
        """A [b, T] per-token loss reduced with GRPO's aggregation and the WHOLE batch's normalisers."""
        agg = self.agg
        return losses.aggregate(per_token, self.mask, agg["agg_mode"], agg["global_tokens"], agg["global_seqs"],
                                agg["max_len"])

    def student_written(self) -> torch.Tensor:
        """The completion tokens the student sampled itself: all but a teacher-written guidance prefix's."""
        return self.mask if self.guided is None else self.mask & ~self.guided.bool()

    def log_token_mean(self, name: str, per_token: torch.Tensor, where: torch.Tensor) -> None:
        """A per-token value logged per token of ``where`` over the whole batch (sum and count here)."""
        self.metrics[f"{name}_sum"] = float(per_token.detach()[where].sum())
        self.metrics[f"{name}_tokens"] = float(where.sum())

    def teacher_entropy(self, where: torch.Tensor) -> torch.Tensor:
        """The teacher's entropy at the given positions, flat."""
        return losses.chunked_entropy(self.teacher_hidden[where], self.teacher_lm_head, self.settings.logprob_chunk,
                                      self.temperature)

    def routed_span(self) -> torch.Tensor:
        """The tokens with a KL channel: the router's key ∪ error spans (all completion tokens unrouted)."""
        return self.mask if self.routed is None else (self.routed.key | self.routed.error)

    def log_teacher_entropy(self, where: torch.Tensor) -> None:
        if where.any():
            self.metrics.update(teacher_entropy_sum=float(self.teacher_entropy(where).sum()),
                                teacher_entropy_tokens=float(where.sum()))


def _same_advantages(batch: MicroBatch, adv: torch.Tensor) -> torch.Tensor:
    return adv


def grpo_loss(batch: MicroBatch, ppo: torch.Tensor) -> torch.Tensor:
    return batch.aggregate(ppo)


def trace_loss(batch: MicroBatch, ppo: torch.Tensor) -> torch.Tensor:
    """Eq. 1: FKL on key spans and/or RKL on error spans (the corner's μ), λ-weighted, GRPO elsewhere."""
    routed, lam, kl = batch.routed, batch.lam, batch.settings.kl
    mu_E, mu_K = CORNERS[batch.method.corner]
    fkl = batch.divergence(routed.key, "fkl", "fkl_key") if (lam and mu_K) else None
    rkl = batch.divergence(routed.error, "rkl", "rkl_error") if (lam and mu_E) else None
    loss, parts = losses.trace_objective(
        ppo, batch.mask, routed.key, routed.error, fkl, rkl, lam=lam, w0=kl.w0, mu_E=mu_E, mu_K=mu_K,
        full_grpo_on_spans_without_kl=kl.full_grpo_on_spans_without_kl, **batch.agg)
    batch.metrics.update({f"kl/{k}": float(v) for k, v in parts.items() if k in ("kl_key_branch", "kl_error_branch")})
    for name, values in (("fkl_key", fkl), ("rkl_error", rkl)):
        if values is None:  # no KL this step on this class: logged as 0 (λ = 0 or the corner's μ = 0)
            batch.metrics[f"kl/{name}_token_mean_sum"] = batch.metrics[f"kl/{name}_token_mean_tokens"] = 0.0
    batch.log_teacher_entropy(batch.routed_span())
    return loss


def sdpo_loss(batch: MicroBatch, ppo: torch.Tensor) -> torch.Tensor:
    """GRPO + the all-token distillation term (the method's divergence, JSD) toward the frozen teacher."""
    kl = batch.settings.kl
    distill = batch.divergence(batch.mask, batch.method.divergence, "distill", beta=kl.jsd_beta)
    loss, parts = losses.sdpo_objective(ppo, batch.mask, distill, distillation_weight=kl.sdpo_distillation_weight,
                                        **batch.agg)
    batch.metrics["kl/distill"] = float(parts["distill"])
    batch.log_teacher_entropy(batch.routed_span())
    return loss


def srpo_loss(batch: MicroBatch, ppo: torch.Tensor) -> torch.Tensor:
    """GRPO + distillation on failed rollouts only, weighted by the teacher's entropy (mean 1 batch-wide)."""
    kl = batch.settings.kl
    failed = batch.mask & ~batch.correct.bool().unsqueeze(-1)
    distill = batch.divergence(failed, batch.method.divergence, "distill", beta=kl.jsd_beta)
    teacher_entropy = losses.tokens_from_positions(batch.teacher_entropy(failed), failed)
    loss, parts = losses.srpo_objective(ppo, batch.mask, distill, batch.correct, teacher_entropy,
                                        entropy_beta=kl.srpo_entropy_beta,
                                        weight_global_mean=batch.srpo_weight_mean, **batch.agg)
    batch.metrics["kl/distill"] = float(parts["distill"])
    if failed.any():
        batch.metrics.update(teacher_entropy_sum=float(teacher_entropy[failed].sum()),
                             teacher_entropy_tokens=float(failed.sum()))
    return loss


def rlsd_advantages(batch: MicroBatch, adv: torch.Tensor) -> torch.Tensor:
    """RLSD: the sequence advantage reweighted per token by the teacher–student log-prob ratio."""
    t_logp_flat, _ = gather_logprobs(batch.teacher_hidden[batch.mask], batch.teacher_lm_head,
                                     batch.targets[batch.mask], batch.temperature, batch.settings.logprob_chunk)
    return losses.rlsd_token_advantages(adv, batch.logp.detach(), losses.tokens_from_positions(t_logp_flat, batch.mask),
                                        strength=batch.strength, eps_w=batch.settings.kl.rlsd_eps_w)


def rlsd_loss(batch: MicroBatch, ppo: torch.Tensor) -> torch.Tensor:
    batch.log_teacher_entropy(batch.routed_span())
    return grpo_loss(batch, ppo)


def log_sampled_rkl(batch: MicroBatch) -> None:
    """OPD's sampled-token estimates of KL(p‖q) at every token the student sampled (Schulman's k1 and k3,
    metrics only): the same numbers for every OPD estimator, so its variants can be compared."""
    logp, teacher_logp = batch.logp.detach(), batch.teacher_token_logp()
    for name, estimate in (("k1", losses.k1_estimate), ("k3", losses.k3_estimate)):
        batch.log_token_mean(f"kl/opd_sampled_{name}_token_mean", estimate(logp, teacher_logp), batch.student_written())


def opd_loss(batch: MicroBatch, ppo: torch.Tensor) -> torch.Tensor:
    """OPD: λ·KL(p_t‖q_t) (reverse) at every completion token toward the external teacher, over the method's
    support (opd: the vocabulary; opd_topk: the teacher's top-K + tail), unclipped; no GRPO term (ppo unused).
    Tokens another policy sampled (TRB) are weighted by their truncated importance weight."""
    rkl = batch.divergence(batch.mask, "rkl", "opd", entry_clip=None)
    weights = batch.importance_weights()
    if weights is not None:
        rkl = rkl * weights
    log_sampled_rkl(batch)
    batch.log_teacher_entropy_of_sampled()
    return losses.opd_objective(rkl, batch.mask, weight=batch.lam, **batch.agg)


def opd_k1_advantages(batch: MicroBatch, adv: torch.Tensor) -> torch.Tensor:
    """OPD-K1: the sequence advantage is replaced by A_t = −λ·(log p(y_t) − log q(y_t)) per token."""
    return losses.opd_k1_advantages(batch.logp, batch.teacher_token_logp(), weight=batch.lam)


def opd_k1_loss(batch: MicroBatch, ppo: torch.Tensor) -> torch.Tensor:
    """The policy-gradient surrogate with OPD-K1's per-token advantages (GRPO's aggregation, no reward term)."""
    log_sampled_rkl(batch)
    batch.log_token_mean("kl/opd_token_mean", losses.k1_estimate(batch.logp, batch.teacher_token_logp()), batch.mask)
    batch.log_teacher_entropy_of_sampled()
    return grpo_loss(batch, ppo)


def tropd_region(batch: MicroBatch) -> AgreementRegion:
    """TrOPD's split of the student-written tokens (guided ones are in neither part): the trust region and
    the outliers by agreement (trace.router.agreement_region), or every token trusted with trust_region off."""
    tropd, own = batch.settings.tropd, batch.student_written()
    if not tropd.trust_region:
        return AgreementRegion(trust=own, outliers=torch.zeros_like(own))
    return agreement_region(batch.teacher_token_logp(), own, tropd.agreement_threshold)


def tropd_advantages(batch: MicroBatch, adv: torch.Tensor) -> torch.Tensor:
    """TrOPD: OPD-K1's per-token advantage on the trust region, 0 on outliers and guided tokens."""
    k1_advantages = opd_k1_advantages(batch, adv)
    return torch.where(tropd_region(batch).trust, k1_advantages, 0.0)


def tropd_loss(batch: MicroBatch, ppo: torch.Tensor) -> torch.Tensor:
    """TrOPD: the K1 surrogate (nonzero on the trust region only) + outlier_weight·λ·KL(q‖p) over the teacher's
    top outlier_top_k + a tail at outliers (unclipped) + imitation_weight·NLL of guided tokens, every term
    aggregated with the batch's normalisers. Ours (?): the imitation NLL is a per-token term like the others,
    i.e. under token-mean β × (guided share) × the mean NLL over guided tokens, so micro-batches sum exactly."""
    tropd, region = batch.settings.tropd, tropd_region(batch)
    loss = grpo_loss(batch, ppo)
    k1 = losses.k1_estimate(batch.logp, batch.teacher_token_logp())
    batch.log_token_mean("tropd/trust_frac", region.trust.float(), batch.student_written())
    batch.log_token_mean("tropd/k1_trust_token_mean", k1, region.trust)
    batch.log_token_mean("tropd/k1_outlier_token_mean", k1, region.outliers)
    if tropd.trust_region and tropd.outlier_fkl:
        fkl = batch.divergence(region.outliers, "fkl", "tropd_outlier_fkl", entry_clip=None,
                               categories=dict(top_k=tropd.outlier_top_k, support="teacher", tail_bucket=True))
        loss = loss + tropd.outlier_weight * batch.lam * batch.aggregate(fkl)
    guided = torch.zeros_like(batch.mask) if batch.guided is None else batch.guided.bool() & batch.mask
    batch.metrics["tropd/tokens_guided"] = float(guided.sum())
    if guided.any():
        nll = torch.where(guided, -batch.logp, 0.0)
        batch.log_token_mean("tropd/imitation_nll_token_mean", nll, guided)
        loss = loss + tropd.imitation_weight * batch.aggregate(nll)
    log_sampled_rkl(batch)
    batch.log_teacher_entropy_of_sampled()
    return loss


@dataclasses.dataclass(frozen=True)
class Objective:
    loss: Callable[[MicroBatch, torch.Tensor], torch.Tensor]
    advantages: Callable[[MicroBatch, torch.Tensor], torch.Tensor] = _same_advantages


OBJECTIVES: dict[str, Objective] = {
    "grpo": Objective(grpo_loss),
    "trace": Objective(trace_loss),
    "sdpo": Objective(sdpo_loss),
    "srpo": Objective(srpo_loss),
    "rlsd": Objective(rlsd_loss, rlsd_advantages),
    "opd": Objective(opd_loss),
    "opd_k1": Objective(opd_k1_loss, opd_k1_advantages),
    "tropd": Objective(tropd_loss, tropd_advantages),
}


def objective_for(method: MethodSpec, teacher_on: bool) -> Objective:
    """The method's objective while its teacher is on; GRPO's once λ is 0 for good (or for GRPO)."""
    if not teacher_on:
        return OBJECTIVES["grpo"]
    if method.objective not in OBJECTIVES:
        raise ValueError(f"method objective {method.objective!r} has no entry in OBJECTIVES; known: {sorted(OBJECTIVES)}")
    return OBJECTIVES[method.objective]
