"""Tests that catch a dead KL channel (issue 12, item 15): the KL term must move the weights in the
KL window and nothing once λ = 0; the teacher under the student's own prompt must give KL exactly 0
(same tokens, same positions); the log-probs recomputed for the loss must be the sampler's."""
import copy

import pytest
import torch

from conftest import REPO_ROOT
from trace.settings import default_train_section
from trace import losses
from trace.annotate.setup import annotator_for
from trace.prompting import render_prompt
from trace.logprobs import completion_hidden_states, gather_logprobs
from trace.prompting import teacher_prompt
from trace.train.teacher import Teacher
from trace.train.trainer import Trainer

BASE_TRAIN = default_train_section()  # the one shared base (trace/settings.py)
QWEN3 = REPO_ROOT.parent / "shared" / "models" / "qwen3"


def mc_config(method, **kl):
    cfg = copy.deepcopy(BASE_TRAIN)
    cfg.update(method=method, seed=0, thinking=False, steps=1, batch_prompts=4, group_size=4, micro_batch_size=16,
               lr=1e-3, weight_decay=0.0, save_every=10)
    cfg["sampling"].update(max_new_tokens=96, temperature=1.0)
    cfg["kl"].update(kl)
    return cfg


def one_step_update(cfg, tiny_base, toy_data, run_dir):
    """(parameter change of one optimizer step, the step's metrics row)."""
    torch.set_num_threads(1)
    trainer = Trainer(cfg, tiny_base, toy_data / "choice_ood.jsonl", run_dir, annotator=annotator_for(cfg, tiny_base))
    before = torch.cat([p.detach().flatten().clone() for p in trainer.policy.parameters()])
    row = trainer.train_step(0)
    after = torch.cat([p.detach().flatten() for p in trainer.policy.parameters()])
    return after - before, row


def test_the_kl_term_moves_the_weights_in_the_kl_window_and_not_after(tiny_base, toy_data, tmp_path, monkeypatch):
    grpo, grpo_row = one_step_update(mc_config("grpo"), tiny_base, toy_data, tmp_path / "grpo")
    assert grpo_row["groups_with_signal"] > 0 and grpo.abs().max() > 0
    # λ = 0 for good (end = 0): exactly GRPO's update
    after, _ = one_step_update(mc_config("trace_fkl", warmup=0, end=0), tiny_base, toy_data, tmp_path / "after")
    assert torch.equal(after, grpo)
    # the KL window (λ = w0): the update differs from GRPO's ...
    window, row = one_step_update(mc_config("trace_fkl"), tiny_base, toy_data, tmp_path / "window")
    assert row["lambda"] == BASE_TRAIN["kl"]["w0"] and row["tokens_key"] > 0 and row["kl/kl_key_branch"] > 0
    assert not torch.allclose(window, grpo)
    # ... and the KL term itself is part of the difference: with the divergence zeroed (a dead KL
    # channel: ρ-scaled GRPO on the spans only), the update changes
    real_divergence = losses.chunked_divergence
    def dead_divergence(*args, **kwargs):
        values, scale = real_divergence(*args, **kwargs)  # the trainer asks for the clip scale too
        return values * 0.0, scale

    monkeypatch.setattr(losses, "chunked_divergence", dead_divergence)
    dead, dead_row = one_step_update(mc_config("trace_fkl"), tiny_base, toy_data, tmp_path / "dead")
    assert dead_row["kl/kl_key_branch"] == 0.0
    kl_part = (window - dead).norm() / window.norm()
    print(f"share of the KL term in the step's update: {kl_part:.3f}")
    assert kl_part > 1e-3


@pytest.mark.parametrize("thinking", [False, True])
def test_teacher_under_the_students_prompt_gives_kl_exactly_zero(thinking, tiny_base, toy_data, tmp_path):
    """Same prompt (no private context) → the teacher scores the very same tokens at the very same
    positions as the student: every divergence is exactly 0 (any off-by-one or think-tag mismatch is not)."""
    cfg = mc_config("trace_fkl")
    cfg["thinking"] = thinking
    torch.set_num_threads(1)
    trainer = Trainer(cfg, tiny_base, toy_data / "choice_ood.jsonl", tmp_path / "run",
                      annotator=annotator_for(cfg, tiny_base))
    records = trainer.sample_prompts(0)
    rollouts = trainer.engine.generate(trainer.policy, [render_prompt(trainer.tokenizer, r, thinking) for r in records], 4)
    mask = rollouts.completion_mask.bool()
    student = completion_hidden_states(trainer.policy, rollouts.input_ids, rollouts.attention_mask,
                                       rollouts.prompt_ids.shape[1])
    teacher = Teacher(trainer.policy, "synced")
    prompts = [teacher_prompt(trainer.tokenizer, r, "label", None, thinking) for r in records for _ in range(4)]
    hidden = teacher.hidden_states(trainer.tokenizer, prompts, rollouts.completion_ids, rollouts.completion_mask)
    W = trainer.policy.get_output_embeddings().weight
    assert torch.equal(hidden[mask], student[mask])
    for kind in ("fkl", "rkl", "jsd"):
        kl = losses.chunked_divergence(student[mask], hidden[mask], W, kind, teacher_lm_head_weight=teacher.lm_head_weight,
                                       entry_clip=None, top_k=BASE_TRAIN["kl"]["top_k"])
        assert kl.numel() == int(mask.sum())
        if kind == "jsd":   # log(½e^a + ½e^a) is a only up to float rounding
            assert kl.abs().max() < 1e-6
        else:
            assert torch.equal(kl, torch.zeros_like(kl)), kind
    # sensitivity: the same teacher scoring the completion shifted by one position is far from 0
    shifted = teacher.hidden_states(trainer.tokenizer, prompts, rollouts.completion_ids.roll(1, dims=1),
                                    rollouts.completion_mask)
    assert losses.chunked_divergence(student[mask], shifted[mask], W, "fkl", entry_clip=None).mean() > 0.01


@pytest.mark.skipif(not (QWEN3 / "tokenizer_config.json").exists(), reason="real Qwen3 tokenizer not found")
@pytest.mark.parametrize("thinking", [False, True])
def test_qwen3_teacher_prompt_ends_with_the_students_assistant_header(thinking):
    """With the real Qwen3 chat template, the private system turn changes only what comes BEFORE the
    user turn: from the user turn on (think tags of the generation prompt included) the token ids are
    identical, so completion tokens sit in the same context for teacher and student."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN3)
    record = {"problem": "What is 2 + 3?", "answer": "5", "kind": "math", "solution": "2 + 3 = 5."}
    student = tokenizer(render_prompt(tokenizer, record, thinking), add_special_tokens=False)["input_ids"]
    teacher = tokenizer(teacher_prompt(tokenizer, record, "label", "Private hint: the decisive step is 'key insight'.",
                                       thinking), add_special_tokens=False)["input_ids"]
    assert len(teacher) > len(student) and teacher[-len(student):] == student
    think = tokenizer.convert_tokens_to_ids("<think>")
    assert (think in student) == (not thinking)   # Qwen3 NoThink pre-fills an empty <think></think>


def test_recomputed_log_probs_equal_the_samplers(tiny_base, toy_data, tmp_path):
    """The loss's log π(y_t) (one full forward over prompt + completion, left padding, chunked lm head)
    equals the log-softmax of the logits the sampler drew y_t from (generate with the KV cache)."""
    cfg = mc_config("grpo")
    torch.set_num_threads(1)
    trainer = Trainer(cfg, tiny_base, toy_data / "choice_ood.jsonl", tmp_path / "run")
    captured = {}
    original = trainer.policy.generate

    def generate_keeping_logits(**kwargs):
        out = original(**kwargs, output_logits=True, return_dict_in_generate=True)
        captured["logits"] = torch.stack(out.logits, dim=1)        # [B, T, V], before any warper
        return out.sequences

    trainer.policy.generate = generate_keeping_logits
    records = trainer.sample_prompts(0)
    rollouts = trainer.engine.generate(trainer.policy, [render_prompt(trainer.tokenizer, r, False) for r in records], 4)
    mask = rollouts.completion_mask.bool()
    temperature = cfg["sampling"]["temperature"]
    T = rollouts.completion_ids.shape[1]
    sampler = (captured["logits"][:, :T].float() / temperature).log_softmax(-1)
    sampler = sampler.gather(-1, rollouts.completion_ids.unsqueeze(-1)).squeeze(-1)[mask]
    with torch.no_grad():
        hidden = completion_hidden_states(trainer.policy, rollouts.input_ids, rollouts.attention_mask,
                                          rollouts.prompt_ids.shape[1])
        recomputed, _ = gather_logprobs(hidden[mask], trainer.policy.get_output_embeddings().weight,
                                        rollouts.completion_ids[mask], temperature, chunk_size=7)
    assert mask.sum() > 50 and (rollouts.prompt_mask == 0).any()   # left padding really present
    print(f"max |recomputed − sampler| log-prob: {(recomputed - sampler).abs().max():.2e}")
    assert torch.allclose(recomputed, sampler, atol=1e-4)
