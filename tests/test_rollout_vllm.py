"""The vLLM rollout engine against the trainer, on a tiny random Qwen3 with the real tokenizer (fp32, CPU).

(a) the trainer's recomputed log-probs of vLLM's sampled tokens equal vLLM's; (b) after a weight
update + sync_weights, vLLM samples from the new weights (and not the old); (c) every method trains
with the vLLM engine, the self annotator tier decodes through it; (d) completions stop at the
end-of-turn token with the HF engine's convention. One engine is shared by the whole module
(loading one takes 20–60 s on this machine).

Tolerance of (a)/(b): both sides compute log_softmax(logits / T) in fp32 over 151,936 logits, with
different kernels (vLLM's packed CPU gemm and attention vs torch's), so they differ by float rounding
only: measured max |Δ| 9.5e-7 … 1.9e-6. LOGPROB_TOL = 1e-4 is 50× that, and 100× below the change
that one small weight update makes (> 1e-2, asserted in (b)).
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from trace.settings import default_train_section  # noqa: E402

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup_venv.sh with TRACE_VLLM=none)")

from trace.methods import METHODS  # noqa: E402
from trace.prompting import render_prompt  # noqa: E402
from trace.rollout import HFRolloutEngine, build_engine, completion_mask_from_ids  # noqa: E402
from trace.settings import SettingsError, TrainRun  # noqa: E402
from trace.logprobs import completion_hidden_states, gather_logprobs  # noqa: E402

pytestmark = pytest.mark.slow
LOGPROB_TOL = 1e-4
# top-k / top-p off: vLLM's processed log-probs are then exactly the trainer's log_softmax(logits / T),
# and CPU sampling skips the full-vocabulary sort (../shared/notes/vllm-cpu.md)
SAMPLING = {"temperature": 0.6, "top_p": 1.0, "top_k": 0, "max_new_tokens": 24}
BASE_TRAIN = default_train_section()  # the one shared base (trace/settings.py)
RECORDS = [{"problem": "What is 17 + 25?", "answer": "42"}, {"problem": "Compute 6 * 7 - 3.", "answer": "39"}]


def run_config(method="grpo", **overrides):
    cfg = copy.deepcopy(BASE_TRAIN)
    cfg.update(method=method, seed=0, thinking=False, steps=1, batch_prompts=2, group_size=2, micro_batch_size=4,
               lr=1e-3, save_every=10, sampling=dict(SAMPLING), rollout={"engine": "vllm", "max_model_len": 512})
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


@pytest.fixture(scope="module")
def engine(tiny_qwen3, tokenizer, tmp_path_factory):
    torch.set_num_threads(1)
    engine = build_engine(run_config(), tokenizer, tiny_qwen3, tmp_path_factory.mktemp("vllm_cache"))
    print(f"\nvLLM engine load time: {engine.load_s:.1f}s")
    yield engine
    engine.close()


@pytest.fixture()
def policy(tiny_qwen3):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32)


def prompts(tokenizer):
    return [render_prompt(tokenizer, r, thinking=False) for r in RECORDS]


def trainer_logprobs(model, rollouts, temperature):
    """What the trainer computes for these tokens (trace/train/trainer.py micro_batch_loss)."""
    mask = rollouts.completion_mask.bool()
    with torch.no_grad():
        hidden = completion_hidden_states(model, rollouts.input_ids, rollouts.attention_mask,
                                          rollouts.prompt_ids.shape[1])
        logp, _ = gather_logprobs(hidden[mask], model.get_output_embeddings().weight,
                                  rollouts.completion_ids[mask], temperature)
    return logp, rollouts.sampled_logprobs[mask]


def test_trainer_logprobs_of_vllm_samples_match_vllm(engine, policy, tokenizer):
    engine.sync_weights(policy)
    torch.manual_seed(0)
    rollouts = engine.generate(policy, prompts(tokenizer), 4)
    trainer, vllm = trainer_logprobs(policy, rollouts, SAMPLING["temperature"])
    delta = (trainer - vllm).abs().max().item()
    print(f"\nmax |Δ log-prob| trainer vs vLLM over {trainer.numel()} sampled tokens: {delta:.2e}")
    assert trainer.numel() > 20 and delta < LOGPROB_TOL
    # the same prompt tokens, left-padded exactly as the HF engine pads them
    hf = tokenizer([p for p in prompts(tokenizer) for _ in range(4)], return_tensors="pt", padding=True,
                   add_special_tokens=False, padding_side="left")
    assert torch.equal(rollouts.prompt_ids, hf["input_ids"]) and torch.equal(rollouts.prompt_mask, hf["attention_mask"])
    # the processed log-probs are at temperature T: at T = 1 the trainer's values are far from them
    at_one, _ = trainer_logprobs(policy, rollouts, 1.0)
    assert (at_one - vllm).abs().max().item() > 100 * LOGPROB_TOL


def test_after_a_weight_update_vllm_samples_from_the_new_weights(engine, policy, tokenizer):
    engine.sync_weights(policy)
    old = copy.deepcopy(policy)
    torch.manual_seed(1)
    with torch.no_grad():  # includes the tied embedding / output layer, which a stale lm_head would miss
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    engine.sync_weights(policy)
    print(f"\nweight sync (reload_weights from tensors): {engine.last_sync_s:.3f}s")
    rollouts = engine.generate(policy, prompts(tokenizer), 4)
    new_trainer, vllm = trainer_logprobs(policy, rollouts, SAMPLING["temperature"])
    old_trainer, _ = trainer_logprobs(old, rollouts, SAMPLING["temperature"])
    print(f"max |Δ| vs new weights {(new_trainer - vllm).abs().max():.2e}, vs old {(old_trainer - vllm).abs().max():.2e}")
    assert (new_trainer - vllm).abs().max() < LOGPROB_TOL
    assert (old_trainer - vllm).abs().max() > 1e-2


def check_stop_convention(batch, eos_id, pad_id, max_new_tokens, tokenizer):
    """Mask 1 up to and including the first end-of-turn token, pad after; a row without one ran to the
    budget. Returns (rows that ended their turn, rows cut at max_new_tokens)."""
    ended = cut = 0
    for ids, mask in zip(batch.completion_ids.tolist(), batch.completion_mask.tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n) and ids[n:] == [pad_id] * (len(ids) - n)
        if eos_id in ids[:n]:
            assert ids.index(eos_id) == n - 1
            ended += 1
        else:
            assert n == max_new_tokens
            cut += 1
    assert torch.equal(batch.completion_mask, completion_mask_from_ids(batch.completion_ids, eos_id))
    assert batch.texts == tokenizer.batch_decode(batch.completion_ids, skip_special_tokens=True)
    return ended, cut


def test_completions_stop_at_end_of_turn_like_the_hf_engine(engine, policy, tokenizer):
    engine.sync_weights(policy)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    assert engine.eos_id == eos and pad != eos
    hf = HFRolloutEngine(tokenizer, SAMPLING)
    counts = {}
    for name, eng in (("vllm", engine), ("hf", hf)):
        torch.manual_seed(0)
        ended = cut = 0
        for budget in (24, 3):   # long: most replies end their turn; 3 tokens: most are cut
            batch = eng.generate(policy, prompts(tokenizer), 8, sampling={"max_new_tokens": budget})
            assert batch.completion_ids.shape[1] == int(batch.completion_mask.sum(1).max()) <= budget
            e, c = check_stop_convention(batch, eos, pad, budget, tokenizer)
            ended, cut = ended + e, cut + c
        counts[name] = (ended, cut)
    print(f"\n(ended their turn, cut at the budget) over 32 rows: {counts}")
    assert all(ended > 0 and cut > 0 for ended, cut in counts.values())


def test_a_prompt_longer_than_max_model_len_fails_naming_the_key(engine, policy, tokenizer):
    with pytest.raises(ValueError, match=r"train\.rollout\.max_model_len"):
        engine.generate(policy, ["word " * 600], 1)


def test_unknown_rollout_settings_fail_naming_the_key():
    with pytest.raises(SettingsError, match=r"train\.rollout: unknown key\(s\) \['engnie'\]; known"):
        TrainRun.from_mapping({**BASE_TRAIN, "rollout": {"engnie": "vllm"}})
    with pytest.raises(SettingsError, match=r"train\.rollout\.engine: 'sglang' is not one of"):
        TrainRun.from_mapping({**BASE_TRAIN, "rollout": {"engine": "sglang"}})


# ----------------------------------------------------------------------------------------------
# every method trains with the vLLM engine; the self annotator tier decodes through it
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("records") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_with_the_vllm_engine(method, engine, tiny_qwen3, train_path, tmp_path):
    from trace.train.trainer import Trainer

    torch.set_num_threads(1)
    external = {}
    if METHODS[method].teacher == "external":  # OPD: a teacher folder with the student's tokenizer (here itself)
        external = {"teacher_model": str(tiny_qwen3), "kl": {**BASE_TRAIN["kl"], "top_k": 5}}
    if METHODS[method].rollout_policy != "student":  # a behaviour policy (TRB) samples on the HF engine only
        with pytest.raises(ValueError, match=r"supported on train.rollout.engine 'hf' only \(got 'vllm'\)$"):
            Trainer(run_config(method, **external), tiny_qwen3, train_path, tmp_path / method, engine=engine)
        return
    trainer = Trainer(run_config(method, **external), tiny_qwen3, train_path, tmp_path / method, engine=engine)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.fit()
    assert trainer.engine is engine
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainer.policy.parameters()))
    (row,) = read_metrics(tmp_path / method / "metrics.jsonl")
    assert row["rollout_s"] > 0 and 1 <= row["response_length"] <= SAMPLING["max_new_tokens"]
    assert row["teacher_active"] == int(METHODS[method].uses_teacher)
    print(f"\n{method}: step {row['step_s']:.2f}s (rollouts {row['rollout_s']:.2f}s), weight sync "
          f"{engine.last_sync_s:.3f}s")


def test_grpo_steps_keep_vllm_on_the_trained_weights(engine, tiny_qwen3, train_path, tmp_path, tokenizer):
    from trace.train.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(run_config("grpo", steps=2, lr=1e-2), tiny_qwen3, train_path, tmp_path / "run", engine=engine)
    trainer.fit()
    rollouts = engine.generate(trainer.policy, prompts(tokenizer), 2)
    new, vllm = trainer_logprobs(trainer.policy, rollouts, SAMPLING["temperature"])
    assert (new - vllm).abs().max() < LOGPROB_TOL


def test_self_tier_annotates_through_the_vllm_engine(engine, tiny_qwen3, train_path, tmp_path):
    from trace.annotate.local import ChatGenerate
    from trace.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = run_config("trace_fkl", annotator={"tier": "self", "mode": "prompted", "prompted": {"max_new_tokens": 8}})
    trainer = Trainer(cfg, tiny_qwen3, train_path, tmp_path / "run", engine=engine)
    generate = trainer.annotator.generate
    assert isinstance(generate, ChatGenerate) and generate.engine is engine and generate.model is trainer.policy
    replies = generate([[{"role": "user", "content": "Mark the key step."}]] * 2)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    trainer.fit()
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # the random model cannot follow the annotation prompt: every reply fails cleanly into plain GRPO
    assert row["annotator/requested"] == 4 and row["annotator/backend_prompts"] >= 1
    assert row["annotator/failed"] + row["annotator/empty"] == 4 and row["tokens_key"] == row["tokens_error"] == 0


def test_static_tier_samples_from_its_own_frozen_vllm_engine(engine, tiny_qwen3, train_path, tmp_path, tokenizer):
    from trace.rollout.vllm_engine import VLLMRolloutEngine
    from trace.train.trainer import Trainer

    torch.set_num_threads(1)
    cfg = run_config("trace_fkl", lr=1e-2,
                     annotator={"tier": "static", "mode": "prompted", "prompted": {"max_new_tokens": 8}})
    trainer = Trainer(cfg, tiny_qwen3, train_path, tmp_path / "run", engine=engine)
    static = trainer.annotator.generate.engine
    assert isinstance(static, VLLMRolloutEngine) and static is not engine and trainer.annotator.generate.model is None

    def sample(eng):
        torch.manual_seed(0)
        return eng.generate(None, prompts(tokenizer), 2).sampled_logprobs

    static_before, live_before = sample(static), sample(engine)
    trainer.fit()   # one optimizer step; the trainer syncs ITS engine only
    assert torch.equal(sample(static), static_before)            # the frozen copy never moves
    assert not torch.equal(sample(engine), live_before)          # the rollout engine follows the policy
    static.close()


def test_dropping_a_second_engine_leaves_the_first_working(engine, policy, tiny_qwen3, tokenizer, tmp_path):
    """vLLM's shutdown of one engine tears down the parallel state every engine of the process uses (the
    rollout engine then failed: "pipeline model parallel group is not initialized"); the trainer drops
    the static tier's engine at kl.end, so engines live until the process ends."""
    import gc

    from trace.rollout.vllm_engine import _LIVE_ENGINES

    second = build_engine(run_config(), tokenizer, tiny_qwen3, tmp_path / "cache")
    second.close()
    del second
    gc.collect()
    engine.sync_weights(policy)
    rollouts = engine.generate(policy, prompts(tokenizer), 2)
    assert rollouts.completion_ids.shape[0] == 4 and rollouts.completion_mask.sum() > 0
    assert len(_LIVE_ENGINES) >= 2  # the dropped engine is kept (asleep on GPUs) until the process ends


def test_frozen_tier_is_served_by_a_vllm_server_the_job_starts_and_stops(tiny_qwen3):
    """The served frozen tier on CPU: a real `vllm.entrypoints.openai.api_server` subprocess (2–4 min
    to start on this shared 2-core machine), asked through the HTTP backend."""
    from trace.annotate import AnnotationRequest, HttpAnnotator
    from trace.annotate.setup import annotator_for

    cfg = run_config("trace_fkl", annotator={"tier": "frozen", "mode": "prompted", "model": str(tiny_qwen3),
                                             "prompted": {"max_new_tokens": 8}})
    cfg["rollout"]["annotator_server"] = {"max_model_len": 512}
    annotator = annotator_for(cfg, tiny_qwen3)
    assert isinstance(annotator, HttpAnnotator) and annotator.server.running
    assert annotator.config.base_url.startswith("http://127.0.0.1:") and annotator.config.max_tokens == 8
    text = "Step 1: 17 + 25 = 42.\nSo the answer is \\boxed{42}."
    results = annotator.annotate([AnnotationRequest(RECORDS[0]["problem"], "", text, True)] * 2)
    stats = annotator.last_call_stats
    # the server answered (it reports the prompt's token count); the random model's reply is no
    # valid annotation, which fails cleanly (parse error, not a transport error)
    assert stats.backend_prompts == 1 and stats.http_requests == 1 and stats.prompt_tokens > 100
    assert len(results) == 2 and not any(code.startswith(("http_", "connection", "timeout"))
                                         for code in stats.failure_reasons)
    process = annotator.server.proc
    del annotator, results   # the server is stopped with its annotator (as when the trainer drops it)
    assert process.poll() is not None


def test_under_torchrun_each_rank_keeps_its_engines_past_kl_end(tiny_qwen3, train_path, tmp_path):
    """2 gloo ranks, each with its own vLLM engine in the trainer's process group and the static tier's
    frozen engine. At kl.end the trainer drops the annotator; vLLM's engine shutdown would destroy the
    trainer's process group there (the step's all-reduces would then fail), so engines under torchrun live
    until the process ends (trace/rollout/vllm_engine.py). Same rollouts per prompt on any rank count."""
    cfg = run_config("trace_fkl", steps=3, batch_prompts=2, rollout_rng="rollout",
                     kl={**BASE_TRAIN["kl"], "warmup": 1, "end": 2, "teacher_sync_every": 1},
                     annotator={"tier": "static", "mode": "prompted", "prompted": {"max_new_tokens": 8}})
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps([dict(cfg=cfg, base=str(tiny_qwen3), train_data=str(train_path),
                                     run_dir=str(tmp_path / "run"))]))
    env = dict(os.environ, OMP_NUM_THREADS="1", TRACE_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO_ROOT / "tests" / "torchrun_jobs.py"), str(spec)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and [r["teacher_active"] for r in rows] == [1, 1, 0]
    assert all(r["rollout_logprob_gap"] < LOGPROB_TOL for r in rows)  # both ranks sampled the trained weights
    assert "Invalid process group" not in done.stderr
