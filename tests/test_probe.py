"""The mechanism probe (TRACE.md §7: Fig 6 credit concentration, one-step log-prob lift) on the toy
world: every method is probed on the same step-0 rollouts and spans, the logged numbers equal a
recomputation from the policy before and after the update, and probing changes no training."""
import copy

import pytest
import torch

from test_train import read_metrics, run_config
from trace.router import build_routed_masks
from trace.logprobs import completion_hidden_states, gather_logprobs
from trace.rollout import HFRolloutEngine
from trace.prompting import teacher_prompt
from trace.train.trainer import Trainer
from trace import losses


def probe_config(method, **overrides):
    cfg = run_config(method, batch_prompts=4, lr=1e-2, weight_decay=0.0, steps=1, save_every=10, **overrides)
    cfg["sampling"].update(max_new_tokens=96, temperature=1.0)
    cfg["probe"] = {"steps": [0]}
    return cfg


def trainer_for(method, tiny_base, toy_data, run_dir, **overrides):
    torch.set_num_threads(1)
    return Trainer(probe_config(method, **overrides), tiny_base, toy_data / "choice_ood.jsonl", run_dir)


def logp_of(model, rollouts, prompt_ids=None, prompt_mask=None):
    """Independent of trace.train.probe: one forward over the whole batch."""
    prompt_ids = rollouts.prompt_ids if prompt_ids is None else prompt_ids
    prompt_mask = rollouts.prompt_mask if prompt_mask is None else prompt_mask
    mask = rollouts.completion_mask.bool()
    with torch.no_grad():
        hidden = completion_hidden_states(model, torch.cat([prompt_ids, rollouts.completion_ids], 1),
                                          torch.cat([prompt_mask, rollouts.completion_mask], 1), prompt_ids.shape[1])
        logp, _ = gather_logprobs(hidden[mask], model.get_output_embeddings().weight, rollouts.completion_ids[mask],
                                  1.0)
    return losses.tokens_from_positions(logp, mask)


@pytest.mark.parametrize("method", ["grpo", "trace_fkl"])
def test_probe_numbers_equal_a_recomputation_from_the_policy_before_and_after(method, tiny_base, toy_data, tmp_path,
                                                                              monkeypatch):
    trainer = trainer_for(method, tiny_base, toy_data, tmp_path / method)
    before = copy.deepcopy(trainer.policy)
    batches = []
    original = HFRolloutEngine.generate
    monkeypatch.setattr(HFRolloutEngine, "generate",
                        lambda self, *a, **k: batches.append(original(self, *a, **k)) or batches[-1])
    row = trainer.train_step(0)
    rollouts = batches[0]
    change = logp_of(trainer.policy, rollouts) - logp_of(before, rollouts)
    mask = rollouts.completion_mask.bool()
    # the spans: the configured annotator (toy oracle) on the same rollouts, α-capped
    records = [r for r in trainer.sample_prompts(0) for _ in range(4)]
    correct = torch.tensor(_grades(rollouts, records))
    key, error, prefixes, _ = trainer.annotate(records, rollouts, correct)
    capped = build_routed_masks("annotated", mask, correct, key, error, trainer.settings.kl.alpha)
    spans = (capped.key | capped.error) & mask
    assert spans.any() and (mask & ~spans).any()
    inside, outside = change.abs()[spans].mean(), change.abs()[mask & ~spans].mean()
    assert row["probe/credit_inside"] == pytest.approx(float(inside), rel=1e-4)
    assert row["probe/credit_outside"] == pytest.approx(float(outside), rel=1e-4)
    assert row["probe/credit_concentration"] == pytest.approx(float(inside / outside), rel=1e-4)
    assert row["probe/tokens_span"] == float(spans.sum())
    # teacher-supported key tokens: q(y_t) > p(y_t), q = the pre-update policy given the diagnostic label
    enc = trainer.tokenizer([teacher_prompt(trainer.tokenizer, r, "label", p, False) for r, p in zip(records, prefixes)],
                            return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    q = logp_of(before, rollouts, enc["input_ids"], enc["attention_mask"])
    supported = capped.key & mask & (q > logp_of(before, rollouts))
    assert row["probe/tokens_key_supported"] == float(supported.sum())
    if supported.any():
        assert row["probe/logprob_lift_key_supported"] == pytest.approx(float(change[supported].mean()), rel=1e-4)
    # Fig 6's map: one rollout's tokens, |Δ log π| and span flags
    m = row["probe/map"]
    length = int(mask[m["rollout"]].sum())
    assert len(m["tokens"]) == len(m["credit"]) == len(m["span"]) == length
    assert m["credit"] == pytest.approx(change[m["rollout"], :length].abs().tolist(), abs=1e-5)
    assert m["span"] == spans[m["rollout"], :length].int().tolist()


def _grades(rollouts, records):
    from trace.verify import grade_many

    return grade_many(rollouts.texts, [r["answer"] for r in records], [r["kind"] for r in records])


def test_every_method_is_probed_on_the_same_step0_rollouts_and_probing_changes_no_training(tiny_base, toy_data,
                                                                                            tmp_path):
    maps, trainers = {}, {}
    for method in ("grpo", "trace_fkl", "sdpo"):
        trainers[method] = trainer_for(method, tiny_base, toy_data, tmp_path / method)
        trainers[method].fit()
        (row,) = read_metrics(tmp_path / method / "metrics.jsonl")
        maps[method] = row["probe/map"]
        assert row["probe/tokens_span"] > 0 and "probe/credit_concentration" in row
    assert maps["grpo"]["tokens"] == maps["trace_fkl"]["tokens"] == maps["sdpo"]["tokens"]
    assert maps["grpo"]["span"] == maps["trace_fkl"]["span"] == maps["sdpo"]["span"]
    assert maps["grpo"]["credit"] != maps["trace_fkl"]["credit"]  # different losses, different updates
    # the same run without the probe: identical loss and weights
    cfg = probe_config("trace_fkl")
    cfg["probe"] = {"steps": []}
    torch.set_num_threads(1)
    plain = Trainer(cfg, tiny_base, toy_data / "choice_ood.jsonl", tmp_path / "plain")
    plain.fit()
    (row,) = read_metrics(tmp_path / "plain" / "metrics.jsonl")
    (probed,) = read_metrics(tmp_path / "trace_fkl" / "metrics.jsonl")
    assert "probe/map" not in row and row["loss"] == probed["loss"]
    assert row["annotator/requested"] == probed["annotator/requested"]  # the probe's own call is not counted
    for a, b in zip(plain.policy.parameters(), trainers["trace_fkl"].policy.parameters()):
        assert torch.equal(a, b)
