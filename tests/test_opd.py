"""On-policy distillation (OPD) from an external teacher (methods opd, opd_topk, opd_k1): the teacher must share
the student's tokenizer (one-line error otherwise); the objectives on hand-computed 3-token distributions; and
(slow) real training steps: KL ~0 and no gradient with the student as its own teacher, a reverse KL that falls
on a fixed batch toward a teacher of another width."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.testing import assert_close

from trace import losses
from trace.methods import METHODS
from trace.router import RoutedMasks
from trace.settings import default_run, default_train_section
from trace.toy.model import build_model, train_tokenizer
from trace.train.objectives import OBJECTIVES, MicroBatch
from trace.train.teacher import load_external_teacher, tokenizer_mismatch

CORPUS = [f"<|im_start|>user\nWhat is {a} + {b}?<|im_end|>\n<|im_start|>assistant\n{a} + {b} = {a + b}<|im_end|>"
          for a in range(40) for b in range(0, 60, 7)]
TINY = {"hidden_size": 8, "intermediate_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}


# ---------------------------------------------------------------------------------------------- the tokenizer check
def model_folder(path, tokenizer, width=8, seed=0):
    """A random tiny Qwen3 with this tokenizer, saved as a model folder (config, weights, tokenizer)."""
    build_model(tokenizer, {**TINY, "hidden_size": width, "intermediate_size": 2 * width}, seed, path)
    return path


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line_naming_both_folders(tmp_path):
    torch.set_num_threads(1)
    ours = train_tokenizer(CORPUS, 270, tmp_path / "tok-ours")
    student = model_folder(tmp_path / "student", ours)
    wider = load_external_teacher(model_folder(tmp_path / "wider", ours, width=16, seed=1), student,
                                  len(ours), torch.float32, "cpu")   # same tokenizer, any width: accepted
    assert wider.config.hidden_size == 16 and not wider.training
    assert tokenizer_mismatch(student, tmp_path / "wider") is None

    bigger = model_folder(tmp_path / "bigger", train_tokenizer(CORPUS, 280, tmp_path / "tok-bigger"))
    other_corpus = [text.replace("+", "*").replace("What", "Compute") for text in CORPUS]
    shuffled = model_folder(tmp_path / "shuffled", train_tokenizer(other_corpus, 270, tmp_path / "tok-other"))
    assert len(ours) == 270
    cases = {bigger: "vocabularies of 270 vs 280 tokens", shuffled: "of 270 tokens have other ids (e.g. "}
    # same vocabulary and ids, but the text lower-cased before encoding: the probe text tells them apart
    lowered = tmp_path / "lowered"
    model_folder(lowered, ours)
    spec = json.loads((lowered / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Lowercase"}
    (lowered / "tokenizer.json").write_text(json.dumps(spec))
    cases[lowered] = "the same vocabulary, but a probe text encodes to other ids"
    for teacher, problem in cases.items():
        with pytest.raises(ValueError) as error:
            load_external_teacher(teacher, student, len(ours), torch.float32, "cpu")
        line = str(error.value)
        assert "\n" not in line and line.startswith(f"train.teacher_model {teacher} does not share the tokenizer "
                                                    f"of the student {student}: "), line
        assert problem in line, line
    # the same tokenizer, an output layer over more rows (a padded vocabulary): refused too
    padded = tmp_path / "padded"
    model_folder(padded, ours)
    config = json.loads((padded / "config.json").read_text())
    from transformers import Qwen3Config, Qwen3ForCausalLM

    Qwen3ForCausalLM(Qwen3Config(**{**config, "vocab_size": len(ours) + 4})).save_pretrained(padded)
    with pytest.raises(ValueError, match=rf"^train.teacher_model {padded}: its output layer has 274 vocabulary "
                                         rf"rows, the student {student} 270: the logits must cover the same"):
        load_external_teacher(padded, student, len(ours), torch.float32, "cpu")
    with pytest.raises(FileNotFoundError, match=r"teacher model \(train.teacher_model\) folder .* does not exist"):
        load_external_teacher(tmp_path / "nowhere", student, len(ours), torch.float32, "cpu")


def test_a_checkpoint_resumes_only_with_the_same_teacher_weights(tmp_path):
    """The resume fingerprint of an OPD run hashes its teacher's weights; other runs ignore train.teacher_model."""
    from trace.settings import replace
    from trace.train.trainer import run_fingerprint

    torch.set_num_threads(1)
    ours = train_tokenizer(CORPUS, 270, tmp_path / "tok")
    student, teacher = model_folder(tmp_path / "student", ours, seed=0), model_folder(tmp_path / "teacher", ours, seed=1)
    grpo = default_run("grpo")
    assert run_fingerprint(grpo, student) == run_fingerprint(replace(grpo, teacher_model=str(teacher)), student)
    opd = default_run("opd", teacher_model=str(teacher))
    before = run_fingerprint(opd, student)
    assert run_fingerprint(opd, student) == before
    model_folder(teacher, ours, seed=2)   # the same folder, other weights (a retrained teacher)
    assert run_fingerprint(opd, student) != before


# ---------------------------------------------------------------------------------------------- the objectives by hand
P, Q = [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]     # student, teacher at every position
RKL_PQ = 0.5 * math.log(2.5) + 0.3 * math.log(1.5) + 0.2 * math.log(1 / 3)   # 0.360062
MASK = torch.tensor([[True, True, False], [True, False, False]])             # 3 completion tokens, 3 padding
TARGETS = torch.tensor([[0, 2, 0], [1, 0, 0]])                               # sampled tokens


def micro_batch_on_p_and_q(settings, mask, targets, routed=None, guided=None) -> MicroBatch:
    """A micro-batch of two rows × 3 positions whose student logits are log P (width 2) and whose teacher logits are
    log Q (width 4, its own lm_head) at every position, λ = 0.5, token-mean over the ``mask`` tokens."""
    hidden = torch.tensor([1.0, 0.0]).expand(2, 3, 2).clone().requires_grad_()
    lm_head = torch.tensor([[math.log(p), 0.0] for p in P], requires_grad=True)
    teacher_hidden = torch.tensor([0.0, 1.0, 0.0, 0.0]).expand(2, 3, 4).clone()
    teacher_lm_head = torch.tensor([[0.0, math.log(q), 3.0, -3.0] for q in Q])
    logp = losses.tokens_from_positions(torch.tensor(P).log()[targets[mask]], mask).requires_grad_()
    agg = dict(agg_mode="token-mean", global_tokens=mask.sum().float(), global_seqs=torch.tensor(2.0), max_len=3)
    return MicroBatch(settings, METHODS[settings.method], mask, targets, hidden, lm_head, logp, torch.tensor([1, 0]),
                      routed, teacher_hidden, teacher_lm_head, 0.5, 1.0, agg, None, guided=guided)


def hand_batch(method: str, **kl) -> MicroBatch:
    """micro_batch_on_p_and_q for ``method`` on 3 tokens (the default study's kl, entry_clip 0.05 included),
    temperature 1."""
    settings = default_run(method, kl=kl, sampling={"temperature": 1.0})
    return micro_batch_on_p_and_q(settings, MASK, TARGETS, RoutedMasks.from_spans(MASK, MASK, torch.zeros_like(MASK)))


def metric(batch, name):
    return batch.metrics[f"{name}_sum"] / batch.metrics[f"{name}_tokens"]


def test_opd_is_the_unclipped_full_reverse_kl_weighted_by_w0():
    batch = hand_batch("opd")
    assert batch.settings.kl.entry_clip == 0.05 and batch.settings.kl.w0 == 0.5
    loss = OBJECTIVES["opd"].loss(batch, torch.full((2, 3), 7.0))  # the PPO surrogate is not used (no GRPO term)
    assert loss.item() == pytest.approx(0.5 * RKL_PQ, abs=1e-6)  # 0.5 · token-mean over 3 tokens of 0.360062
    assert metric(batch, "kl/opd_token_mean") == pytest.approx(RKL_PQ, abs=1e-6)  # unclipped: the clip would bind
    assert metric(batch, "kl/opd_clip_binds_frac") == 0.0
    # sampled-token estimates at tokens 0, 2, 1: k1 = log p − log q
    k1 = [math.log(0.5 / 0.2), math.log(0.2 / 0.6), math.log(0.3 / 0.2)]
    assert metric(batch, "kl/opd_sampled_k1_token_mean") == pytest.approx(sum(k1) / 3, abs=1e-6)
    assert metric(batch, "kl/opd_sampled_k3_token_mean") == pytest.approx(
        sum(math.expm1(-x) + x for x in k1) / 3, abs=1e-6)
    entropy_q = -sum(q * math.log(q) for q in Q)
    assert metric(batch, "teacher_entropy") == pytest.approx(entropy_q, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, batch.lm_head)   # z_v = lm_head[v, 0]: 3 tokens × 0.5 / 3 × ∂KL/∂z_v
    assert_close(grad[:, 0], torch.tensor([0.5 * p * (math.log(p / q) - RKL_PQ) for p, q in zip(P, Q)]))


def test_opd_topk_is_the_reverse_kl_on_the_teachers_top_k_plus_a_tail():
    with pytest.raises(ValueError, match=r"^method 'opd_topk' distils on the teacher's top-K: set train.kl.top_k$"):
        OBJECTIVES["opd"].loss(hand_batch("opd_topk"), torch.zeros(2, 3))
    batch = hand_batch("opd_topk", top_k=1, tail_bucket=False)    # the tail bucket is always on for opd_topk
    loss = OBJECTIVES["opd"].loss(batch, torch.zeros(2, 3))
    # the teacher's top-1 is token 2 (q 0.6): categories p (0.2, 0.8), q (0.6, 0.4)
    by_hand = 0.2 * math.log(0.2 / 0.6) + 0.8 * math.log(0.8 / 0.4)
    assert metric(batch, "kl/opd_token_mean") == pytest.approx(by_hand, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * by_hand, abs=1e-6) and by_hand == pytest.approx(0.334795, abs=1e-6)


def test_opd_k1_is_a_per_token_advantage_in_the_policy_gradient_surrogate():
    batch = hand_batch("opd_k1")
    objective = OBJECTIVES["opd_k1"]
    adv = objective.advantages(batch, torch.tensor([1.0, -1.0]))   # GRPO's sequence advantages are replaced
    k1 = [[math.log(0.5 / 0.2), math.log(0.2 / 0.6), 0.0], [math.log(0.3 / 0.2), 0.0, 0.0]]
    assert_close(adv, -0.5 * torch.tensor(k1))
    ppo, _ = losses.ppo_clip_per_token(batch.logp, batch.logp.detach(), adv, mask=MASK)
    loss = objective.loss(batch, ppo)
    assert loss.item() == pytest.approx(0.5 * sum(map(sum, k1)) / 3, abs=1e-6)   # value: λ · token-mean k1
    assert metric(batch, "kl/opd_token_mean") == pytest.approx(sum(map(sum, k1)) / 3, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, batch.logp)
    assert_close(grad, 0.5 * torch.tensor(k1) / 3)   # λ·k1_t·∇log p(y_t) / 3 tokens


# ---------------------------------------------------------------------------------------------- training (slow)
def run_config(method, teacher, **overrides):
    cfg = copy.deepcopy(default_train_section())
    cfg.update(method=method, seed=0, thinking=False, steps=2, batch_prompts=4, group_size=4, micro_batch_size=16,
               lr=1e-3, weight_decay=0.0, save_every=10, teacher_model=str(teacher))
    cfg.update(overrides)
    cfg["sampling"]["max_new_tokens"] = 48
    cfg["validation"]["every"] = 0
    cfg["probe"]["steps"] = []
    return cfg


def fixed_batch_rkl(trainer, rollouts, records) -> float:
    """Mean full-vocabulary KL(student ‖ teacher) per completion token of the given rollouts, now."""
    from trace.logprobs import completion_hidden_states
    from trace.prompting import teacher_prompt

    with torch.no_grad():
        hidden = completion_hidden_states(trainer.policy, rollouts.input_ids, rollouts.attention_mask,
                                          rollouts.prompt_ids.shape[1])
        prompts = [teacher_prompt(trainer.tokenizer, r, "plain", None, False) for r in records]
        teacher = trainer.teacher.hidden_states(trainer.tokenizer, prompts, rollouts.completion_ids,
                                                rollouts.completion_mask)
        mask = rollouts.completion_mask.bool()
        values = losses.chunked_divergence(hidden[mask], teacher[mask], trainer.policy.get_output_embeddings().weight,
                                           "rkl", entry_clip=None, teacher_lm_head_weight=trainer.teacher.lm_head_weight,
                                           temperature=trainer.settings.sampling.temperature)
    return float(values.mean())


def fit_on_a_fixed_batch(trainer, run_dir) -> tuple[float, float, list[dict]]:
    """The full reverse KL to the teacher on a fixed batch of the student's rollouts (6 prompts × 2) before and
    after trainer.fit(), and the run's metrics rows."""
    from trace.prompting import render_prompt

    records = trainer.records[:6]
    torch.manual_seed(123)
    rollouts = trainer.engine.generate(trainer.policy, [render_prompt(trainer.tokenizer, r, False) for r in records],
                                       2, row_seeds=None, synced=False)
    records = [r for r in records for _ in range(2)]
    before = fixed_batch_rkl(trainer, rollouts, records)
    trainer.fit()
    after = fixed_batch_rkl(trainer, rollouts, records)
    return before, after, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["opd", "opd_k1"])
def test_the_student_as_its_own_teacher_gives_zero_kl_and_no_gradient(method, tiny_base, toy_data, tmp_path):
    from trace.train.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(run_config(method, tiny_base), tiny_base, toy_data / "train.jsonl", tmp_path / "run")
    assert trainer.teacher.mode == "external" and trainer.teacher.model is not trainer.policy
    row = trainer.train_step(0)
    print(method, {k: row[k] for k in ("kl/opd_token_mean", "kl/opd_sampled_k3_token_mean", "grad_norm", "loss")})
    assert row["teacher_active"] == 1 and row["lambda"] == 0.5 and row["span_coverage"] == 1.0
    assert abs(row["kl/opd_token_mean"]) < 1e-6 and abs(row["kl/opd_sampled_k1_token_mean"]) < 1e-6
    assert row["grad_norm"] < 1e-5 and abs(row["loss"]) < 1e-6


@pytest.mark.parametrize("method", ["opd", "opd_k1"])
def test_opd_lowers_the_reverse_kl_to_a_wider_teacher_on_a_fixed_batch(method, tiny_base, toy_data, tmp_path):
    """A teacher of another width (hidden 48, the student's 32) with the student's tokenizer: the logged reverse
    KL is > 0, and after a few OPD steps the full reverse KL on a fixed batch of the student's rollouts is lower."""
    from transformers import AutoTokenizer

    from trace.train.trainer import Trainer

    torch.set_num_threads(1)
    teacher_dir = model_folder(tmp_path / "teacher", AutoTokenizer.from_pretrained(tiny_base), width=48, seed=1)
    trainer = Trainer(run_config(method, teacher_dir, steps=4, lr=3e-3), tiny_base, toy_data / "train.jsonl",
                      tmp_path / "run")
    assert trainer.teacher.model.config.hidden_size == 48 != trainer.policy.config.hidden_size
    before, after, rows = fit_on_a_fixed_batch(trainer, tmp_path / "run")
    print(method, f"fixed-batch RKL {before:.4f} -> {after:.4f};",
          "logged", [round(r["kl/opd_token_mean"], 4) for r in rows], "k3", [round(r["kl/opd_sampled_k3_token_mean"], 4)
                                                                         for r in rows])
    assert all(r["kl/opd_token_mean"] > 0.1 and r["kl/opd_sampled_k3_token_mean"] > 0.1 for r in rows)
    assert after < before - 0.05, (before, after)
