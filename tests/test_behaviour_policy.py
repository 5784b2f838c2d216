"""Rollout policies other than the student (trace/rollout/behaviour.py) and TRB's off-policy correction: the
trust-region blend on hand-checked 3-token distributions, TRB's budget schedule, the truncated importance weights
of the OPD loss by hand; on tiny random Qwen3s: teacher-prefix rollouts, TRB rollouts (budget 0 = the student's
own samples; the realised KL within the budget; the recorded behaviour log-probs = a full forward of both models);
slow: real TRB training steps."""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_opd import CORPUS, MASK, RKL_PQ, P, Q, hand_batch, metric, model_folder, run_config
from torch.testing import assert_close

from trace.logprobs import position_ids_from_mask
from trace.rollout.behaviour import (TeacherPrefixRollouts, TrustRegionRollouts, TrustRegionSampler,
                                     geometric_blend, kl_to_student, rollout_policy_for, trust_region_eta)
from trace.rollout.hf import HFRolloutEngine
from trace.settings import default_run
from trace.toy.model import train_tokenizer
from trace.train.objectives import OBJECTIVES

LOGP, LOGQ = torch.tensor([P]).log(), torch.tensor([Q]).log()
KL_QP = sum(q * math.log(q / p) for p, q in zip(P, Q))   # 0.394816: KL(teacher ‖ student)


# ---------------------------------------------------------------------------------------------- the blend by hand
def test_the_blend_is_the_normalised_geometric_mean_and_its_kl_is_by_hand():
    eta = 0.3
    by_hand = [p ** 0.7 * q ** 0.3 for p, q in zip(P, Q)]
    b = [x / sum(by_hand) for x in by_hand]
    logb = geometric_blend(LOGP, LOGQ, torch.tensor([eta]))
    assert_close(logb.exp(), torch.tensor([b]))
    assert kl_to_student(logb, LOGP).item() == pytest.approx(sum(x * math.log(x / p) for x, p in zip(b, P)), abs=1e-6)
    assert kl_to_student(LOGQ, LOGP).item() == pytest.approx(KL_QP, abs=1e-6) and KL_QP == pytest.approx(0.394816, abs=1e-6)
    # KL(b_η ‖ p) grows with η (bisection relies on it)
    values = [kl_to_student(geometric_blend(LOGP, LOGQ, torch.tensor([e / 10])), LOGP).item() for e in range(11)]
    assert values[0] == pytest.approx(0.0, abs=1e-7) and all(a < b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("budget", [0.01, 0.05, 0.2])
def test_the_bisection_finds_the_largest_eta_within_the_budget_and_the_budget_binds(budget):
    eta = trust_region_eta(LOGP, LOGQ, budget)
    kl = kl_to_student(geometric_blend(LOGP, LOGQ, eta), LOGP).item()
    assert 0 < eta.item() < 1 and kl <= budget and kl == pytest.approx(budget, abs=1e-6)
    # a little more η leaves the trust region
    assert kl_to_student(geometric_blend(LOGP, LOGQ, eta + 1e-4), LOGP).item() > budget


def test_eta_is_one_when_the_teacher_is_within_the_budget_and_zero_for_no_budget():
    assert trust_region_eta(LOGP, LOGQ, KL_QP + 1e-4).item() == 1.0
    assert_close(geometric_blend(LOGP, LOGQ, trust_region_eta(LOGP, LOGQ, 1.0)), LOGQ)   # b = q
    assert trust_region_eta(LOGP, LOGQ, 0.0).item() == 0.0
    assert_close(geometric_blend(LOGP, LOGQ, trust_region_eta(LOGP, LOGQ, 0.0)), LOGP)   # b = p
    # rows are independent: a teacher equal to the student (η = 1, KL 0), and the binding one
    logp, logq = torch.cat([LOGP, LOGP]), torch.cat([LOGP, LOGQ])
    eta = trust_region_eta(logp, logq, 0.05)
    assert eta[0].item() == 1.0 and eta[1].item() == pytest.approx(trust_region_eta(LOGP, LOGQ, 0.05).item())


def test_the_budget_follows_the_warmup_linear_decay_schedule_to_zero_at_end():
    settings = default_run("trb", trb={"kl_budget": 0.1, "warmup": 3, "end": 13, "is_clip": 2.0})
    policy = TrustRegionRollouts(settings, engine=None)
    budgets = [policy.step_values(step)["trb/kl_budget"] for step in range(15)]
    expected = [0.1, 0.1, 0.1] + [0.1 * (13 - k) / 10 for k in range(3, 13)] + [0.0, 0.0]
    assert budgets == pytest.approx(expected) and budgets[12] == pytest.approx(0.01) and budgets[13] == 0.0


def test_the_opd_loss_is_weighted_by_truncated_importance_weights_raw_logged_beside_clipped():
    """Sampled tokens 0, 2 | 1 with p = 0.5, 0.2 | 0.3 and behaviour b = 0.4, 0.05 | 0.6: ratios 1.25, 4, 0.5, cap 2."""
    batch = hand_batch("trb")
    assert batch.settings.trb.is_clip == 2.0 and batch.guided is None
    on_policy = OBJECTIVES["opd"].loss(hand_batch("trb"), torch.zeros(2, 3))
    batch.behaviour_logp = torch.tensor([[0.4, 0.05, 0.0], [0.6, 0.0, 0.0]]).clamp(min=1e-30).log() * MASK
    loss = OBJECTIVES["opd"].loss(batch, torch.zeros(2, 3))
    weights = [1.25, 2.0, 0.5]
    assert loss.item() == pytest.approx(0.5 * RKL_PQ * sum(weights) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(on_policy.item() * 1.25, abs=1e-6)
    assert metric(batch, "is/ratio_raw") == pytest.approx((1.25 + 4.0 + 0.5) / 3, abs=1e-5)
    assert metric(batch, "is/weight") == pytest.approx(1.25, abs=1e-6)
    assert metric(batch, "is/clipped_frac") == pytest.approx(1 / 3)
    assert metric(batch, "kl/opd_token_mean") == pytest.approx(RKL_PQ, abs=1e-6)   # the KL itself, unweighted
    (grad,) = torch.autograd.grad(loss, batch.lm_head)   # the weights are detached: 1.25 × the on-policy gradient
    assert_close(grad[:, 0], 1.25 * torch.tensor([0.5 * p * (math.log(p / q) - RKL_PQ) for p, q in zip(P, Q)]))


# ---------------------------------------------------------------------------------------------- real rollouts
PROMPTS = ["<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWhat is 31 + 42 + 17?<|im_end|>\n<|im_start|>assistant\n"]   # other lengths: left padding
UNTRUNCATED = {"temperature": 0.6, "top_p": 1.0, "top_k": 0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A random tiny student (width 8) and teacher (width 16, another seed, sharpened) with one tokenizer, and an
    HF engine sampling untruncated."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pair")
    tokenizer = train_tokenizer(CORPUS, 270, root / "tok")
    student, teacher = (AutoModelForCausalLM.from_pretrained(model_folder(root / name, tokenizer, width, seed)).eval()
                        for name, width, seed in (("student", 8, 0), ("teacher", 16, 1)))
    with torch.no_grad():  # random tiny models are near-uniform: a sharper teacher, far from the student
        teacher.get_output_embeddings().weight.mul_(20.0)
    return student, teacher, HFRolloutEngine(tokenizer, UNTRUNCATED)


def seeds(n):
    return [1000 + i for i in range(n)]


def test_teacher_prefix_rollouts_mark_exactly_the_teachers_tokens(tiny_pair):
    student, teacher, engine = tiny_pair
    settings = default_run("opd", guidance={"share": 0.5, "prefix_tokens": 5}, sampling=UNTRUNCATED)
    policy = rollout_policy_for("teacher_prefix", settings, engine)
    assert isinstance(policy, TeacherPrefixRollouts) and policy.guided_per_group(4) == 2
    G, row_seeds = 4, seeds(8)
    batch, sums = policy(0, student, teacher, PROMPTS, G, row_seeds=row_seeds)
    guided = [0, 1, 4, 5]   # the first share·G rows of each group
    assert sums["guidance/rows"] == 4.0 and batch.behaviour_logprobs is None
    enc = engine.encode(PROMPTS, G, student.device)
    teacher_wrote = engine.batch(enc["input_ids"][guided], enc["attention_mask"][guided], engine.generate_ids(
        teacher, enc["input_ids"][guided], enc["attention_mask"][guided], {"max_new_tokens": 5},
        [row_seeds[r] for r in guided]))
    lengths = teacher_wrote.completion_mask.sum(1)
    assert sums["guidance/prefix_tokens_mean_sum"] / sums["guidance/prefix_tokens_mean_tokens"] == lengths.float().mean()
    expected_mask = torch.zeros_like(batch.guided_mask)
    for i, row in enumerate(guided):
        expected_mask[row, :lengths[i]] = True
        assert batch.completion_ids[row, :lengths[i]].tolist() == teacher_wrote.completion_ids[i, :lengths[i]].tolist()
    assert torch.equal(batch.guided_mask, expected_mask) and int(lengths.max()) == 5
    # the student continued the prefixes (the whole completion within max_new_tokens), and sampled the other rows
    assert int(batch.completion_mask[guided].sum(1).max()) > 5 and batch.completion_ids.shape[1] <= 12
    own = [2, 3, 6, 7]
    mine = engine.generate_ids(student, enc["input_ids"][own], enc["attention_mask"][own], None,
                               [row_seeds[r] for r in own])
    assert batch.completion_ids[own, :mine.shape[1]].tolist() == engine.batch(
        enc["input_ids"][own], enc["attention_mask"][own], mine).completion_ids.tolist()
    assert batch.texts[0] == engine.tokenizer.decode(batch.completion_ids[0], skip_special_tokens=True)
    assert torch.equal(batch.prompt_ids, enc["input_ids"])


def test_a_teacher_prefix_that_ends_the_turn_is_the_whole_completion(tiny_pair):
    """A teacher whose output layer always says end-of-turn: each guided row is that one token, all guided, and the
    student does not continue it; the unguided rows are the student's own."""
    import copy

    student, teacher, engine = tiny_pair
    ender = copy.deepcopy(teacher)
    width, vocab = ender.config.hidden_size, ender.get_output_embeddings().weight.shape[0]
    ender.lm_head = torch.nn.Linear(width, vocab, bias=True)
    with torch.no_grad():
        ender.lm_head.weight.zero_()
        ender.lm_head.bias.fill_(-30.0)
        ender.lm_head.bias[engine.eos_id] = 30.0
    settings = default_run("opd", guidance={"share": 0.5, "prefix_tokens": 5}, sampling=UNTRUNCATED)
    batch, sums = rollout_policy_for("teacher_prefix", settings, engine)(0, student, ender, PROMPTS, 4,
                                                                        row_seeds=seeds(8))
    guided = [0, 1, 4, 5]
    assert batch.completion_mask[guided].sum(1).tolist() == [1, 1, 1, 1]
    assert batch.completion_ids[guided, 0].tolist() == [engine.eos_id] * 4
    assert batch.guided_mask[guided, 0].all() and int(batch.guided_mask.sum()) == 4
    assert sums["guidance/prefix_tokens_mean_sum"] / sums["guidance/prefix_tokens_mean_tokens"] == 1.0
    assert all(batch.texts[row] == "" for row in guided)


def test_trb_with_a_zero_budget_samples_the_students_own_rollouts(tiny_pair):
    student, teacher, engine = tiny_pair
    row_seeds = seeds(4)
    own = engine.generate(student, PROMPTS, 2, row_seeds=row_seeds)
    # the policy at a step with ε = 0 (from `end` on): plain student generate, no behaviour log-probs
    settings = default_run("trb", trb={"kl_budget": 0.1, "warmup": 0, "end": 1}, sampling=UNTRUNCATED)
    batch, sums = TrustRegionRollouts(settings, engine)(1, student, teacher, PROMPTS, 2, row_seeds=row_seeds)
    assert batch.behaviour_logprobs is None and torch.equal(batch.completion_ids, own.completion_ids)
    assert sums["trb/realised_kl_sum"] == 0.0 and sums["trb/eta_mean_sum"] == 0.0
    # the trust-region sampler itself with ε = 0 draws the same tokens from b = p, and log b = the student's log p
    enc = engine.encode(PROMPTS, 2, student.device)
    generators = [torch.Generator().manual_seed(s) for s in row_seeds]
    sampler = TrustRegionSampler(teacher, enc["attention_mask"], 0.0, 0.6, generators)
    blended = engine.batch(enc["input_ids"], enc["attention_mask"], engine.generate_ids(
        student, enc["input_ids"], enc["attention_mask"], sampler=sampler))
    assert torch.equal(blended.completion_ids, own.completion_ids)
    logb, kl, eta = sampler.recorded(blended.completion_mask)
    assert_close(logb, full_forward_logp(student, blended, 0.6), atol=1e-5, rtol=0)
    assert float(kl.abs().max()) < 1e-6 and float(eta.max()) == 0.0


def full_forward_logp(model, batch, temperature, of=None) -> torch.Tensor:
    """[B, T] log-probs (all [B, T, V] with of='all') of the completion tokens, from one forward over each row."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=position_ids_from_mask(batch.attention_mask)).logits
    logp = torch.log_softmax(logits[:, batch.prompt_ids.shape[1] - 1:-1].float() / temperature, dim=-1)
    if of == "all":
        return logp
    return logp.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * batch.completion_mask


def test_trb_rollouts_stay_within_the_budget_and_record_the_behaviour_log_probs(tiny_pair):
    student, teacher, engine = tiny_pair
    budget = 0.05
    settings = default_run("trb", trb={"kl_budget": budget, "warmup": 5, "end": 10}, sampling=UNTRUNCATED)
    batch, sums = TrustRegionRollouts(settings, engine)(0, student, teacher, PROMPTS, 3, row_seeds=seeds(6))
    realised = sums["trb/realised_kl_sum"] / sums["trb/realised_kl_tokens"]
    eta_mean = sums["trb/eta_mean_sum"] / sums["trb/eta_mean_tokens"]
    print(f"realised KL per token {realised:.5f} (budget {budget}), mean η {eta_mean:.4f}")
    assert 0 < realised <= budget + 1e-6 and 0 < eta_mean < 1
    # the recorded log b(y_t) = the blend of full forwards of both models (the teacher's KV cache, left padding)
    mask = batch.completion_mask.bool()
    logp, logq = full_forward_logp(student, batch, 0.6, "all"), full_forward_logp(teacher, batch, 0.6, "all")
    eta = trust_region_eta(logp[mask], logq[mask], budget)
    logb = geometric_blend(logp[mask], logq[mask], eta)
    assert float(kl_to_student(logb, logp[mask]).max()) <= budget + 1e-6
    assert kl_to_student(logq[mask], logp[mask]).min() > budget   # the teacher differs: the budget binds
    expected = logb.gather(1, batch.completion_ids[mask].unsqueeze(1)).squeeze(1)
    assert_close(batch.behaviour_logprobs[mask], expected, atol=1e-4, rtol=0)
    assert not batch.behaviour_logprobs[~mask].any()   # 0 at padding


def test_a_behaviour_policy_needs_the_hf_engine():
    settings = default_run("trb")
    with pytest.raises(ValueError, match=r"^method 'trb' samples its rollouts with the trb policy, supported on "
                                         r"train.rollout.engine 'hf' only \(got 'hf'\)$"):
        rollout_policy_for("trb", settings, engine=object())
    with pytest.raises(ValueError, match=r"^unknown rollout policy 'teacher'"):
        rollout_policy_for("teacher", settings, engine=object())


# ---------------------------------------------------------------------------------------------- training (slow)
@pytest.mark.slow
def test_trb_training_keeps_the_realised_kl_within_the_budget_until_it_reaches_zero(tiny_base, toy_data, tmp_path):
    from transformers import AutoTokenizer

    from trace.train.trainer import Trainer

    torch.set_num_threads(1)
    teacher_dir = model_folder(tmp_path / "teacher", AutoTokenizer.from_pretrained(tiny_base), width=48, seed=1)
    cfg = run_config("trb", teacher_dir, steps=4, trb={"kl_budget": 0.1, "warmup": 1, "end": 3, "is_clip": 2.0})
    Trainer(cfg, tiny_base, toy_data / "train.jsonl", tmp_path / "run").fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        print({k: round(r[k], 5) for k in r if k.startswith(("trb/", "is/", "kl/opd_token"))})
    assert [r["trb/kl_budget"] for r in rows] == pytest.approx([0.1, 0.1, 0.05, 0.0])
    for r in rows[:3]:
        assert 0 < r["trb/realised_kl"] <= r["trb/kl_budget"] + 1e-6 and 0 < r["trb/eta_mean"] <= 1
        assert r["is/weight"] <= 2.0 and 0 <= r["is/clipped_frac"] <= 1 and r["is/ratio_raw"] > 0
    last = rows[3]   # ε = 0: the student's own rollouts, no importance weights
    assert last["trb/realised_kl"] == 0.0 and last["trb/eta_mean"] == 0.0 and "is/weight" not in last
