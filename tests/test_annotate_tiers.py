"""The paper's annotator tiers (Table 3) in the toy world: self / static / frozen, in likelihood mode
(toy scale) and prompted mode (real scale), behind the same contract as toy_oracle and api."""
import copy
import json
import re

import pytest
import torch

from conftest import REPO_ROOT
from trace.settings import default_train_section
from trace.annotate import (ERROR_LABELS, KEY_LABELS, AnnotationRequest, CallableAnnotator, ParseStatus,
                            completion_text_and_offsets, parse_annotation, segment_response)
from trace.annotate.contract import coverage_budget
from trace.annotate.likelihood import (LikelihoodAnnotator, SegmentScore, choose_segments, likelihood_reply,
                                       segment_scores)
from trace.annotate.local import ChatGenerate
from trace.annotate.setup import annotator_for
from trace.annotate.toy_oracle import ToyOracleAnnotator
from trace.toy.task import Step, reference_steps
from trace.train.trainer import Trainer

BASE_TRAIN = default_train_section()  # the one shared base (trace/settings.py)
ALPHA = BASE_TRAIN["kl"]["alpha"]


def run_config(tier="toy_oracle", method="trace_fkl", **annotator):
    cfg = copy.deepcopy(BASE_TRAIN)
    cfg.update(method=method, seed=0, thinking=False, steps=2, batch_prompts=2, group_size=4, micro_batch_size=8,
               lr=1e-3, save_every=10)
    cfg["sampling"]["max_new_tokens"] = 48
    cfg["annotator"].update(tier=tier, **annotator)
    return cfg


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# toy requests: reference solutions (correct) and copies with one corrupted step (incorrect)
# ----------------------------------------------------------------------------------------------
def chain_text(steps):
    return "\n".join([s.line() for s in steps] + [f"\\boxed{{{steps[-1].result}}}"])


def corrupt(solution, step=1, delta=3, where="result"):
    """The reference chain with step ``step`` (0-based) broken; later steps carry the wrong value on."""
    out, value = [], None
    for k, s in enumerate(reference_steps(solution)):
        left, operand = (s.left if value is None else value), s.operand
        if k == step and where == "operand":
            operand += delta
        result = {"add": left + operand, "subtract": left - operand, "multiply": left * operand}[s.operation]
        if k == step and where == "result":
            result += delta
        out.append(Step(s.operation, left, operand, result))
        value = result
    return chain_text(out)


def toy_requests(toy_data, tokenizer, n=12):
    records = [json.loads(line) for line in (toy_data / "train.jsonl").read_text().splitlines()][:n]
    requests = []
    for i, r in enumerate(records):
        correct = i % 2 == 0
        text = r["solution"] if correct else corrupt(r["solution"], step=i % 2)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        text, offsets = completion_text_and_offsets(tokenizer, ids)
        requests.append(AnnotationRequest(r["problem"], r["solution"], text, correct, offsets))
    return requests


# ----------------------------------------------------------------------------------------------
# scoring and span choice on constructed log-probabilities
# ----------------------------------------------------------------------------------------------
REFERENCE = "3+2=5\n5*2=10\n10-4=6\n\\boxed{6}"


def word_tokens(text):
    return [(m.start(), m.end()) for m in re.finditer(r"\d+|\S", text)]


def constructed_scores(text, surprisal_of):
    """Segment scores from per-token surprisal chosen by ``surprisal_of(token_text, token_index)``."""
    offsets = word_tokens(text)
    surprisal = [surprisal_of(text[a:b], t) for t, (a, b) in enumerate(offsets)]
    segments = segment_response(text)
    return segments, segment_scores(surprisal, offsets, segments), offsets


def test_corrupted_result_is_marked_with_the_slip_label():
    wrong = corrupt(REFERENCE, step=1, delta=2)          # 5*2=12, then 12-4=8, boxed 8
    assert wrong.split("\n")[1] == "5*2=12"
    peak = wrong.index("12")                            # the wrong result: what an annotator doubts
    segments, scores, offsets = constructed_scores(
        wrong, lambda tok, t: 6.0 if word_tokens(wrong)[t][0] == peak else 0.05)
    assert [round(s.surprisal, 2) for s in scores][1] == max(round(s.surprisal, 2) for s in scores)
    reply = likelihood_reply(segments, scores, is_correct=False, alpha=ALPHA)
    assert json.loads(reply) == {"error_spans": [[2, 2]], "label": "arithmetic_slip"}
    parsed = parse_annotation(reply, len(segments), is_correct=False)
    assert parsed.status is ParseStatus.OK and parsed.spans == ((1, 1),)


def test_corrupted_operand_is_a_misread_and_the_earliest_doubt_wins():
    wrong = corrupt(REFERENCE, step=1, delta=1, where="operand")   # 5*3=15 (the problem says 2)
    operand = wrong.index("*3") + 1
    later = wrong.index("15-4")
    segments, scores, _ = constructed_scores(
        wrong, lambda tok, t: (3.0 if word_tokens(wrong)[t][0] == operand
                               else 9.0 if word_tokens(wrong)[t][0] == later else 0.05))
    # step 3 is MORE surprising, but the root cause is the earliest step over the threshold
    assert scores[2].surprisal > scores[1].surprisal >= 1.5
    assert json.loads(likelihood_reply(segments, scores, False, ALPHA)) == {"error_spans": [[2, 2]],
                                                                           "label": "misread_problem"}
    # nothing reaches the threshold: the most surprising segment
    assert choose_segments(scores, False, ALPHA, error_threshold=100.0) == [2]


def test_key_spans_are_the_hardest_steps_within_the_budget():
    segments, scores, offsets = constructed_scores(
        REFERENCE, lambda tok, t: {"10": 2.0, "6": 1.0}.get(tok, 0.01))
    n_tokens = sum(s.n_tokens for s in scores)
    chosen = choose_segments(scores, True, ALPHA)
    assert chosen and all(i in (1, 2) for i in chosen)
    assert sum(scores[i].n_tokens for i in chosen) <= max(coverage_budget(n_tokens, ALPHA), scores[chosen[0]].n_tokens)
    assert choose_segments(scores, True, 0.8) == [1, 2, 3]                # a looser budget takes more steps
    reply = json.loads(likelihood_reply(segments, scores, True, ALPHA))
    assert set(reply) == {"key_spans", "label"} and reply["label"] == "decisive_computation"
    # every step certain beyond the key threshold: an explicit empty reply -> status "empty"
    empty = likelihood_reply(segments, scores, True, ALPHA, key_threshold=100.0)
    assert parse_annotation(empty, len(segments), True).status is ParseStatus.EMPTY
    assert choose_segments([], True, ALPHA) == [] and choose_segments([SegmentScore(0.0, 0, -1)], False, ALPHA) == [0]


# ----------------------------------------------------------------------------------------------
# the likelihood annotator on a real (tiny) model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def other_folder(tiny_base, tmp_path_factory):
    """A second model folder (the 'larger frozen model'): the tiny base with perturbed weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("frozen_annotator")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(out)
    return out


def test_likelihood_annotator_on_the_tiny_model(tiny, toy_data):
    model, tokenizer = tiny
    requests = toy_requests(toy_data, tokenizer)
    annotator = LikelihoodAnnotator(model, tokenizer, alpha=ALPHA, batch_size=5)   # chunked forwards
    results = annotator.annotate(requests)
    stats = annotator.last_call_stats
    assert (stats.requested, stats.annotated, stats.failed, stats.empty) == (len(requests), len(requests), 0, 0)
    for request, result in zip(requests, results):
        assert result.has_spans and len(result.spans) >= 1
        assert result.span_kind == ("key" if request.is_correct else "error")     # K only on correct, E on incorrect
        assert result.label in (KEY_LABELS if request.is_correct else ERROR_LABELS)
        assert json.loads(result.raw_reply).keys() == {"key_spans" if request.is_correct else "error_spans", "label"}
        if not request.is_correct:
            assert len(result.spans) == 1 and result.spans[0][0] == result.spans[0][1]   # one root-cause step
        assert sum(result.token_mask) <= coverage_budget(len(result.token_mask), ALPHA)
        assert result.teacher_prefix is not None
    assert stats.span_tokens <= ALPHA * stats.response_tokens
    assert 0 < stats.as_dict()["annotator/span_coverage"] <= ALPHA
    again = annotator.annotate(requests)                                           # deterministic
    assert [(r.spans, r.label, r.token_mask) for r in again] == [(r.spans, r.label, r.token_mask) for r in results]
    one_batch = LikelihoodAnnotator(model, tokenizer, alpha=ALPHA, batch_size=64).annotate(requests)
    assert [r.spans for r in one_batch] == [r.spans for r in results]
    # the same counters as the oracle tier, which runs the same pipeline on the same requests
    oracle = ToyOracleAnnotator(alpha=ALPHA)
    oracle.annotate(requests)
    assert oracle.last_call_stats.response_tokens == stats.response_tokens
    assert (oracle.last_call_stats.annotated, oracle.last_call_stats.failed) == (stats.annotated, stats.failed)


class _BrokenModel(torch.nn.Module):
    """An annotator model whose forward raises (e.g. out of memory)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(1, 1)

    def get_output_embeddings(self):
        return self.head

    def get_decoder(self):
        return self

    def forward(self, **inputs):
        raise RuntimeError("annotator forward failed")


def test_a_broken_model_fails_into_grpo_only(tiny, toy_data):
    model, tokenizer = tiny
    requests = toy_requests(toy_data, tokenizer, n=4)
    annotator = LikelihoodAnnotator(_BrokenModel(), tokenizer, alpha=ALPHA)          # the forward breaks
    results = annotator.annotate(requests + [AnnotationRequest("p", "r", "   ", True, [])])
    stats = annotator.last_call_stats
    assert (stats.failed, stats.empty, stats.annotated) == (4, 1, 0)
    assert all(not r.has_spans and r.teacher_prefix is None for r in results)
    assert "backend_error" in stats.failure_reasons


# ----------------------------------------------------------------------------------------------
# tiers from config: self follows the policy, static / frozen are fixed folders
# ----------------------------------------------------------------------------------------------
def _scores(annotator, requests):
    """All segment scores of the requests, flattened."""
    per_request = annotator.score(requests, [segment_response(r.response_text) for r in requests])
    return [s.surprisal for segment_scores_ in per_request for s in segment_scores_]


def test_self_tier_follows_the_policy_static_does_not(tiny_base, toy_data, tmp_path):
    torch.set_num_threads(1)
    trainer = Trainer(run_config("self"), tiny_base, toy_data / "train.jsonl", tmp_path / "run")
    self_tier = trainer.annotator
    assert isinstance(self_tier, LikelihoodAnnotator) and self_tier.model is trainer.policy
    static = annotator_for(run_config("static"), tiny_base, policy=trainer.policy)
    assert isinstance(static, LikelihoodAnnotator) and static.model is not trainer.policy
    assert not any(p.requires_grad for p in static.model.parameters())
    requests = toy_requests(toy_data, trainer.tokenizer, n=4)
    before_self, before_static = _scores(self_tier, requests), _scores(static, requests)
    assert before_self == pytest.approx(before_static, abs=1e-4)      # step 0: the policy is the base
    trainer.policy.train()
    with torch.no_grad():                                              # an "optimizer step" on the policy
        for p in trainer.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after_self = _scores(self_tier, requests)
    assert after_self != pytest.approx(before_self, abs=1e-3)
    assert _scores(static, requests) == before_static
    assert trainer.policy.training                                    # annotating restored train mode


def test_frozen_tier_loads_its_folder(tiny_base, other_folder):
    from safetensors.torch import load_file

    frozen = annotator_for(run_config("frozen", model=str(other_folder)), tiny_base)
    saved = load_file(str(other_folder / "model.safetensors"))
    params = dict(frozen.model.named_parameters())
    assert all(torch.equal(params[name], saved[name]) for name in saved if name in params)
    assert not any(p.requires_grad for p in params.values()) and not frozen.model.training


def test_tier_config_errors_name_the_key(tiny_base, tiny):
    with pytest.raises(ValueError, match=r"annotator\.model"):
        annotator_for(run_config("frozen"), tiny_base)
    with pytest.raises(ValueError, match=r"annotator\.tier"):
        annotator_for(run_config("teacher"), tiny_base)
    with pytest.raises(ValueError, match=r"annotator\.mode"):
        annotator_for(run_config("static", mode="vibes"), tiny_base)
    with pytest.raises(ValueError, match="policy"):
        annotator_for(run_config("self"), tiny_base)
    with pytest.raises(ValueError, match=r"annotator\.cache_dir"):
        annotator_for(run_config("self", cache_dir="/tmp/x"), tiny_base, policy=tiny[0])
    with pytest.raises(ValueError, match=r"annotator\.http"):
        annotator_for(run_config("api"), tiny_base)
    with pytest.raises(ValueError, match=r"annotator\.likelihood"):
        annotator_for(run_config("static", likelihood={"contxt": "problem"}), tiny_base)
    with pytest.raises(ValueError, match=r"annotator\.likelihood\.context"):
        annotator_for(run_config("static", likelihood={"context": "vibes"}), tiny_base)
    with pytest.raises(FileNotFoundError, match=r"annotator\.model"):
        annotator_for(run_config("frozen", model=str(tiny_base / "missing")), tiny_base)
    assert annotator_for(run_config("self", method="grpo"), tiny_base) is None


def test_served_tiers_use_the_http_backend(tiny_base, tmp_path):
    from trace.annotate import HttpAnnotator

    served = {"base_url": "http://127.0.0.1:9/v1", "model": "qwen3.5-plus"}
    api = annotator_for(run_config("api", http=served, cache_dir=str(tmp_path / "cache")), tiny_base)
    assert isinstance(api, HttpAnnotator) and api.cache is not None and api.alpha == ALPHA
    frozen = annotator_for(run_config("frozen", mode="prompted", http=dict(served, model="Qwen3-32B")), tiny_base)
    assert isinstance(frozen, HttpAnnotator) and frozen.config.model == "Qwen3-32B"
    assert isinstance(annotator_for(run_config("toy_oracle"), tiny_base), ToyOracleAnnotator)


# ----------------------------------------------------------------------------------------------
# prompted mode: the HF engine behind CallableAnnotator; a toy model's garbage fails cleanly
# ----------------------------------------------------------------------------------------------
def test_prompted_mode_goes_through_the_rollout_engine_and_fails_cleanly(tiny_base, tiny, toy_data):
    model, tokenizer = tiny
    requests = toy_requests(toy_data, tokenizer, n=4)
    model.train()
    for tier in ("self", "static"):
        annotator = annotator_for(run_config(tier, mode="prompted", prompted={"max_new_tokens": 8}), tiny_base,
                                  policy=model)
        assert isinstance(annotator, CallableAnnotator) and isinstance(annotator.generate, ChatGenerate)
        assert (annotator.generate.model is model) == (tier == "self")
        results = annotator.annotate(requests)
        stats = annotator.last_call_stats
        assert (stats.requested, stats.backend_prompts, stats.failed, stats.annotated) == (4, 4, 4, 0)
        assert sum(stats.failure_reasons.values()) == 4 and stats.as_dict()["annotator/failure_rate"] == 1.0
        assert all(not r.has_spans and r.teacher_prefix is None and not any(r.token_mask) for r in results)
        assert all(isinstance(r.raw_reply, str) for r in results)           # the model did reply
    assert model.training                                                   # generation restored train mode


# ----------------------------------------------------------------------------------------------
# TRACE-FKL training with each model tier
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", ["self", "static", "frozen", "self-prompted"])
def test_two_trace_fkl_steps_with_each_tier(tier, tiny_base, toy_data, other_folder, tmp_path):
    torch.set_num_threads(1)
    name, _, mode = tier.partition("-")
    extra = {"model": str(other_folder)} if name == "frozen" else {}
    cfg = run_config(name, mode=mode or "likelihood", prompted={"max_new_tokens": 8}, **extra)
    if mode:
        cfg["steps"] = 1
    trainer = Trainer(cfg, tiny_base, toy_data / "train.jsonl", tmp_path / "run")
    annotator = trainer.annotator
    annotator_model = annotator.generate.model if mode else annotator.model
    assert (annotator_model is trainer.policy) == (name == "self")
    before = {n: p.detach().clone() for n, p in annotator_model.named_parameters()}
    trainer.fit()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(cfg["steps"]))
    for row in rows:
        assert row["teacher_active"] == 1 and row["annotator/requested"] == 8
        assert 0.0 <= row["annotator/span_coverage"] <= ALPHA and row["span_coverage"] <= ALPHA + 1e-9
        assert 0.0 <= row["annotator/failure_rate"] <= 1.0 and row["annotator/wall_s"] >= 0.0
        if mode:   # a toy model cannot follow the prompt: every rollout trains with GRPO only
            assert row["annotator/failure_rate"] == 1.0 and row["tokens_key"] == row["tokens_error"] == 0
        else:
            assert row["annotator/failure_rate"] == 0.0 and row["annotator/annotated_rate"] > 0.5
            assert row["tokens_key"] + row["tokens_error"] > 0
    unchanged = all(torch.equal(before[n], p) for n, p in annotator_model.named_parameters())
    assert unchanged == (name != "self")     # self: the annotator IS the trained policy; static / frozen: fixed
