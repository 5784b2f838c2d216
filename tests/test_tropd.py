"""Trust-region OPD (methods tropd, tropd_noguide): the agreement router, the objective on hand-computed 3-token
distributions (K1 on the trust region, the forward KL on the teacher's top-k at outliers, the imitation NLL of
guided tokens) and each switch; only tropd runs carry train.tropd; (slow) real steps toward a noisy copy of the
student lower the reverse KL."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from trace import losses
from trace.methods import METHODS
from trace.router import agreement_region
from trace.settings import default_run
from trace.train.objectives import OBJECTIVES, MicroBatch
from test_opd import P, Q, micro_batch_on_p_and_q


def test_the_trust_region_is_where_the_teacher_gives_the_sampled_token_at_least_the_threshold():
    teacher_logp = torch.tensor([[0.05, 0.5, 0.2], [0.3, 0.01, 0.9]]).log()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    trust, outliers = agreement_region(teacher_logp, mask, threshold=0.25)
    assert trust.tolist() == [[False, True, False], [True, False, True]]
    assert outliers.tolist() == [[True, False, False], [False, True, False]]   # padding is in neither
    assert agreement_region(teacher_logp, mask, 0.0).trust.tolist() == mask.tolist()
    assert not agreement_region(teacher_logp, mask, 0.95).trust.any()


def test_tropd_settings_and_methods():
    settings = default_run("tropd").tropd
    assert (settings.agreement_threshold, settings.trust_region, settings.outlier_fkl, settings.outlier_top_k,
            settings.outlier_weight, settings.imitation_weight) == (0.1, True, True, 8, 1.0, 0.001)
    assert METHODS["tropd"].rollout_policy == "teacher_prefix" and METHODS["tropd_noguide"].rollout_policy == "student"
    assert METHODS["opd_k1"].rollout_policy == "student"
    # a run's settings carry only the train keys its method reads (tropd reads its guidance settings too)
    assert set(METHODS["tropd"].unused_train_keys) == {"trb"} and METHODS["tropd"].teacher == "external"
    assert set(METHODS["tropd_noguide"].unused_train_keys) == {"guidance", "trb"}
    assert set(METHODS["opd"].unused_train_keys) == {"tropd", "guidance", "trb"}
    assert set(METHODS["trb"].unused_train_keys) == {"tropd", "guidance"}
    assert set(METHODS["grpo"].unused_train_keys) == {"tropd", "teacher_model", "guidance", "trb"}


def test_only_tropd_runs_carry_train_tropd():
    """A key only TrOPD reads stays out of the other runs' settings: changing it reruns only the tropd runs."""
    from test_study_plan import plan_of

    plan = plan_of(methods=["grpo", "opd_k1", "tropd"], train={"teacher_model": "results/base/toy-large"})
    assert plan.train_settings("tropd", 0)["tropd"] == plan.config["train"]["tropd"]
    assert "tropd" not in plan.train_settings("opd_k1", 0) and "tropd" not in plan.train_settings("grpo", 0)
    assert "tropd" not in plan.teacher_gap_settings("toy-small", "label")["train"]
    assert plan.teacher_problem() is None


# ---------------------------------------------------------------------------------------------- the objective by hand
# student P and teacher Q at every position: test_opd.py's (λ = 0.5 there too)
MASK = torch.tensor([[True, True, True], [True, False, False]])   # 4 completion tokens, 2 padding
TARGETS = torch.tensor([[0, 2, 1], [1, 0, 0]])  # sampled: q(y) = 0.2, 0.6, 0.2 | 0.2
K1 = [[math.log(0.5 / 0.2), math.log(0.2 / 0.6), math.log(0.3 / 0.2)], [math.log(0.3 / 0.2), 0.0, 0.0]]
LAM = 0.5
FKL_TOP1 = 0.6 * math.log(0.6 / 0.2) + 0.4 * math.log(0.4 / 0.8)   # the teacher's top-1 (token 2) + the tail
GUIDED = torch.tensor([[True, False, False], [False, False, False]])  # the first token written by the teacher


def hand_batch(method: str = "tropd", guided=None, **tropd) -> MicroBatch:
    """Student logits log P (width 2), teacher logits log Q (width 4, its own lm_head) at every position,
    λ = w0 = 0.5, temperature 1, token-mean over the 4 completion tokens; trust region at q(y) ≥ 0.3
    (the tokens sampled as 2) and the teacher's top-1 for the outlier FKL unless ``tropd`` says otherwise."""
    tropd = {"agreement_threshold": 0.3, "outlier_top_k": 1, **tropd}
    settings = default_run(method, tropd=tropd, sampling={"temperature": 1.0})
    return micro_batch_on_p_and_q(settings, MASK, TARGETS, guided=guided)


def advantages_and_loss(batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    objective = OBJECTIVES[batch.method.objective]
    adv = objective.advantages(batch, torch.tensor([1.0, -1.0]))   # GRPO's sequence advantages are replaced
    ppo, _ = losses.ppo_clip_per_token(batch.logp, batch.logp.detach(), adv, mask=MASK)
    return adv, objective.loss(batch, ppo)


def metric(batch, name):
    return batch.metrics[f"{name}_sum"] / batch.metrics[f"{name}_tokens"]


def test_k1_on_the_trust_region_and_the_teachers_top_k_forward_kl_on_outliers():
    batch = hand_batch()
    adv, loss = advantages_and_loss(batch)
    assert_close(adv, torch.tensor([[0.0, -LAM * K1[0][1], 0.0], [0.0, 0.0, 0.0]]))   # 0.549306 at the trusted token
    surrogate = LAM * K1[0][1] / 4     # −A·ratio, token-mean over 4 tokens
    outlier_fkl = LAM * 3 * FKL_TOP1 / 4
    assert FKL_TOP1 == pytest.approx(0.381908, abs=1e-6)
    assert loss.item() == pytest.approx(surrogate + outlier_fkl, abs=1e-6)   # −0.137327 + 0.143216
    assert metric(batch, "tropd/trust_frac") == 0.25
    assert metric(batch, "tropd/k1_trust_token_mean") == pytest.approx(K1[0][1], abs=1e-6)
    assert metric(batch, "tropd/k1_outlier_token_mean") == pytest.approx((K1[0][0] + K1[0][2] + K1[1][0]) / 3,
                                                                         abs=1e-6)
    assert metric(batch, "kl/tropd_outlier_fkl_token_mean") == pytest.approx(FKL_TOP1, abs=1e-6)
    assert metric(batch, "kl/tropd_outlier_fkl_unclipped_token_mean") == pytest.approx(FKL_TOP1, abs=1e-6)
    assert batch.metrics["tropd/tokens_guided"] == 0 and "tropd/imitation_nll_token_mean_sum" not in batch.metrics
    # the full vocabulary as the support (k = 3, empty tail): KL(q‖p) over the 3 tokens
    fkl_full = sum(q * math.log(q / p) for p, q in zip(P, Q))
    full = hand_batch(outlier_top_k=3)
    advantages_and_loss(full)
    assert metric(full, "kl/tropd_outlier_fkl_token_mean") == pytest.approx(fkl_full, abs=1e-6)   # 0.394822


def test_guided_tokens_get_only_the_imitation_nll():
    batch = hand_batch(guided=GUIDED, agreement_threshold=0.1, imitation_weight=0.1)   # all student tokens trusted
    adv, loss = advantages_and_loss(batch)
    trusted = ~GUIDED & MASK
    assert_close(adv, torch.where(trusted, -LAM * torch.tensor(K1), 0.0))   # no K1 on the teacher's token
    nll = -math.log(0.5)
    k1_sum = K1[0][1] + K1[0][2] + K1[1][0]
    assert loss.item() == pytest.approx(LAM * k1_sum / 4 + 0.1 * nll / 4, abs=1e-6)
    assert batch.metrics["tropd/tokens_guided"] == 1 and metric(batch, "tropd/trust_frac") == 1.0
    assert metric(batch, "tropd/imitation_nll_token_mean") == pytest.approx(nll, abs=1e-6)
    assert metric(batch, "kl/opd_sampled_k1_token_mean") == pytest.approx(k1_sum / 3, abs=1e-6)  # student's tokens
    (grad,) = torch.autograd.grad(loss, batch.logp)
    assert_close(grad, torch.where(trusted, LAM * torch.tensor(K1) / 4, 0.0) - 0.1 * GUIDED.float() / 4)
    # outliers exclude guided tokens too: at q(y) ≥ 0.3, 2 outliers (not 3), each with the top-1 FKL
    split = hand_batch(guided=GUIDED)
    _, loss = advantages_and_loss(split)
    assert split.metrics["kl/tropd_outlier_fkl_token_mean_tokens"] == 2
    assert loss.item() == pytest.approx(LAM * K1[0][1] / 4 + LAM * 2 * FKL_TOP1 / 4 + 0.001 * nll / 4, abs=1e-6)


def test_the_switches():
    # no trust region: OPD-K1's advantages on every token, no outlier term
    no_region = hand_batch(trust_region=False)
    adv, loss = advantages_and_loss(no_region)
    opd_k1 = hand_batch("opd_k1")
    opd_adv, opd_loss = advantages_and_loss(opd_k1)
    assert torch.equal(adv, opd_adv) and loss.item() == pytest.approx(opd_loss.item(), abs=1e-7)
    assert metric(no_region, "tropd/trust_frac") == 1.0 and "kl/tropd_outlier_fkl_token_mean_sum" not in no_region.metrics
    # no outlier FKL: the K1 surrogate alone, same advantages
    no_fkl = hand_batch(outlier_fkl=False)
    adv, loss = advantages_and_loss(no_fkl)
    assert_close(adv, advantages_and_loss(hand_batch())[0])
    assert loss.item() == pytest.approx(LAM * K1[0][1] / 4, abs=1e-6)
    assert "kl/tropd_outlier_fkl_token_mean_sum" not in no_fkl.metrics
    # outlier weight scales the FKL term; imitation weight 0 drops the NLL
    heavy = hand_batch(outlier_weight=2.0)
    assert advantages_and_loss(heavy)[1].item() == pytest.approx(LAM * K1[0][1] / 4 + 2 * LAM * 3 * FKL_TOP1 / 4,
                                                                 abs=1e-6)
    no_imitation = hand_batch(guided=GUIDED, imitation_weight=0.0, outlier_fkl=False)
    assert advantages_and_loss(no_imitation)[1].item() == pytest.approx(LAM * K1[0][1] / 4, abs=1e-6)


# ---------------------------------------------------------------------------------------------- training (slow)
def perturbed_copy(base, out, noise: float, seed: int):
    """The base model with Gaussian noise of ``noise`` × each weight tensor's std added, saved with its tokenizer:
    a teacher that agrees with the student on some tokens and not on others."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(noise * weight.std() * torch.randn(weight.shape, generator=generator))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.mark.slow
def test_tropd_lowers_the_reverse_kl_to_another_teacher_on_a_fixed_batch(tiny_base, toy_data, tmp_path):
    """tropd_noguide toward a noisy copy of the base (it agrees on some tokens, not on others): both regions are
    populated, and after a few steps the full reverse KL on a fixed batch of the student's rollouts is lower."""
    from test_opd import fit_on_a_fixed_batch, run_config
    from trace.train.trainer import Trainer

    torch.set_num_threads(1)
    teacher_dir = perturbed_copy(tiny_base, tmp_path / "teacher", noise=0.5, seed=1)
    trainer = Trainer(run_config("tropd_noguide", teacher_dir, steps=4, lr=3e-3), tiny_base,
                      toy_data / "train.jsonl", tmp_path / "run")
    before, after, rows = fit_on_a_fixed_batch(trainer, tmp_path / "run")
    print(f"fixed-batch RKL {before:.4f} -> {after:.4f};", [
        {k: round(r[k], 4) for k in ("tropd/trust_frac", "tropd/k1_trust_token_mean", "tropd/k1_outlier_token_mean",
                                     "kl/tropd_outlier_fkl_token_mean", "kl/opd_sampled_k3_token_mean")} for r in rows])
    assert all(0.1 < r["tropd/trust_frac"] < 0.9 and r["tropd/tokens_guided"] == 0 for r in rows)
    assert after < 0.75 * before, (before, after)   # measured 2.04 -> 0.78
