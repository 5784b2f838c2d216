"""lm-eval evaluation: task YAML, scoring of all k samples, results JSON, prompts == render_prompt.

Three kinds of check:
* the scoring hook on hand-written responses (right / wrong / mixed k, think mode, mc);
* a *scripted* lm-eval model that answers correctly on a known number of each problem's k
  samples, run through the real lm-eval pipeline -> avg@k and pass@k must equal the script;
* a tiny random Qwen3 checkpoint through lm-eval's ``hf`` backend (toy splits and the five real
  benchmarks): prompts, k responses per problem, and avg@k recomputed from the logs with grade().
"""
import collections
import json
import os
from pathlib import Path

import pytest
import yaml

from trace.data.benchmarks import MAIN_EVAL_SETS, prepare_eval_sets, write_jsonl
from trace.evaluation import EvalDataError, EvaluationError, evaluate, evaluate_many, process_results
from trace.evaluation.lmeval_tasks import STOP_SEQUENCES, check_gen, read_eval_records, write_task_config
from trace.evaluation.run import model_arguments
from trace.prompting import render_prompt, user_message
from trace.toy.task import OOD_SPLIT, make_split
from trace.verify import grade

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GEN = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 24}
TINY_SIZE = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
             "max_positions": 4096}  # real benchmark prompts are long in a ~400-token vocabulary


def _boxed(answer: str) -> str:
    return f"Step 1: work it out.\nThe answer is \\boxed{{{answer}}}."


def _doc(answer: str, kind: str = "math") -> dict:
    return {"id": "d", "problem": "What?", "answer": answer, "kind": kind,
            "choices": ["1", "2", "3", "4"] if kind == "mc" else None}


# --------------------------------------------------------------------------- scoring hook

@pytest.mark.parametrize("responses,avg,passed", [
    ([_boxed("12")], 1.0, 1.0),
    ([_boxed("13")], 0.0, 0.0),
    ([_boxed("12"), "no boxed answer: 12", _boxed("012"), _boxed("11")], 0.5, 1.0),
    (["<think>\nscratch \\boxed{3}\n</think>\n\n" + _boxed("12"), "<think>\n" + _boxed("12")], 0.5, 1.0),
])
def test_process_results_grades_every_sample(responses, avg, passed):
    metrics = process_results(_doc("12"), [responses])
    assert metrics["avg_at_k"] == avg
    assert metrics["pass_at_k"] == passed
    assert metrics["sample_grades"] == [int(grade(r, "12", "math")) for r in responses]
    assert len(metrics["sample_grades"]) == len(responses)


def test_process_results_multiple_choice_letters():
    metrics = process_results(_doc("C", "mc"), [["\\boxed{C}", "The answer is (C).", "\\boxed{A}"]])
    assert metrics["sample_grades"] == [1, 1, 0]
    assert metrics["avg_at_k"] == pytest.approx(2 / 3)


def test_process_results_refuses_a_single_filtered_response():
    # What lm-eval's default take_first filter would hand over: one string, not k of them.
    with pytest.raises(ValueError, match="take_first|filter"):
        process_results(_doc("12"), [_boxed("12")])


# --------------------------------------------------------------------------- task YAML

def test_task_yaml_samples_k_and_keeps_all_of_them(tmp_path, monkeypatch):
    records = make_split("arith_2op", 3, 0, (2, 2))
    write_jsonl(records, tmp_path / "toy.jsonl")
    monkeypatch.chdir(tmp_path)  # a relative data path must still end up absolute in the YAML
    path = write_task_config("trace_toy", Path("toy.jsonl"), tmp_path / "tasks", k=5, gen=GEN, thinking=True)
    text = path.read_text()
    assert "!function 'trace.evaluation.lmeval_tasks.process_results'" in text
    config = yaml.load(text.replace("!function", ""), Loader=yaml.SafeLoader)  # tags stripped for inspection
    assert config["dataset_kwargs"]["data_path"] == str((tmp_path / "toy.jsonl").resolve())
    assert config["repeats"] == 5
    assert config["filter_list"] == [{"name": "all_samples", "filter": [{"function": "take_first_k", "k": 5}]}]
    assert config["generation_kwargs"] == {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                           "max_gen_toks": 24, "until": STOP_SEQUENCES}
    assert config["metadata"]["thinking"] is True and config["metadata"]["n_records"] == 3

    from lm_eval.tasks import TaskManager

    monkeypatch.chdir("/")
    task = TaskManager(include_path=str(path.parent), include_defaults=False).load(["trace_toy"])["tasks"]["trace_toy"]
    docs = list(task.test_docs())
    assert [doc["id"] for doc in docs] == [r["id"] for r in records]
    assert [task.doc_to_text(doc) for doc in docs] == [user_message(r) for r in records]


def test_bad_data_files_are_named(tmp_path):
    with pytest.raises(EvalDataError, match="missing.jsonl"):
        write_task_config("t", tmp_path / "missing.jsonl", tmp_path, k=2, gen=GEN, thinking=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "1", "problem": "p", "kind": "math"}) + "\n")
    with pytest.raises(EvalDataError, match=r"bad.jsonl:1: .*'answer'"):
        read_eval_records(bad)
    bad.write_text(json.dumps({"id": "1", "problem": "p", "answer": "1", "kind": "essay"}) + "\n")
    with pytest.raises(EvalDataError, match="kind"):
        read_eval_records(bad)


def test_gen_settings_are_checked():
    with pytest.raises(ValueError, match="missing \\['top_k'\\]"):
        check_gen({"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 8})
    with pytest.raises(ValueError, match="temperature"):
        check_gen({**GEN, "temperature": 0})


def test_model_arguments_pass_thinking_to_the_chat_template(tmp_path):
    hf_on = model_arguments("hf", tmp_path, thinking=True, seed=0, dtype="float32")
    assert hf_on["chat_template_args"] == {"enable_thinking": True}
    assert model_arguments("hf", tmp_path, thinking=False, seed=0, dtype="float32")["chat_template_args"] == {
        "enable_thinking": False}
    vllm_off = model_arguments("vllm", tmp_path, thinking=False, seed=3, dtype="bfloat16",
                               tensor_parallel_size=2, data_parallel_size=4)
    assert vllm_off["enable_thinking"] is False and vllm_off["seed"] == 3
    assert (vllm_off["tensor_parallel_size"], vllm_off["data_parallel_size"]) == (2, 4)
    assert "enable_thinking" not in model_arguments("vllm", tmp_path, thinking=True, seed=0, dtype="bfloat16")
    with pytest.raises(ValueError, match="backend"):
        model_arguments("sglang", tmp_path, thinking=True, seed=0, dtype="float32")


def test_missing_checkpoint_is_named(tmp_path):
    records = make_split("arith_2op", 2, 0, (2, 2))
    write_jsonl(records, tmp_path / "toy.jsonl")
    with pytest.raises(EvaluationError, match="no_model_here"):
        evaluate(tmp_path / "no_model_here", "toy", tmp_path / "toy.jsonl", tmp_path / "out.json",
                 k=2, gen=GEN, thinking=False)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random 1-layer Qwen3 with a BPE tokenizer trained on toy text (plus byte fallback)."""
    import torch

    from trace.toy.model import build_model, train_tokenizer

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny_qwen3")
    records = make_split("train", 200, 0, (2, 4)) + make_split(OOD_SPLIT, 50, 0, (2, 4))
    tokenizer = train_tokenizer([user_message(r) + "\n" + r["solution"] for r in records], 400, out)
    build_model(tokenizer, TINY_SIZE, seed=0, out_dir=out)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def real_eval_dir(tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data mirror not found at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("real_eval")
    prepare_eval_sets(SHARED_DATA, out, list(MAIN_EVAL_SETS), gpqa_seed=0)
    return out


def test_vllm_style_unset_thinking_renders_the_thinking_prompt(tokenizer):
    # The vllm path leaves enable_thinking unset (None) for thinking mode.
    record = make_split("arith_2op", 1, 0, (2, 2))[0]
    messages = [{"role": "user", "content": user_message(record)}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=None)
    assert rendered == render_prompt(tokenizer, record, thinking=True)
    assert rendered != render_prompt(tokenizer, record, thinking=False)


# --------------------------------------------------------------------------- scripted model

def _scripted_lm(tokenizer, records, thinking, n_correct):
    """An lm-eval LM that answers from a script: sample j of record r is right iff j < n_correct(r)."""
    from lm_eval.api.model import LM

    class ScriptedLM(LM):
        def __init__(self):
            super().__init__()
            self.by_prompt = {render_prompt(tokenizer, r, thinking): r for r in records}
            self.calls = collections.Counter()

        @property
        def tokenizer_name(self) -> str:
            return "scripted"

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt,
                                                 enable_thinking=thinking)

        def generate_until(self, requests, disable_tqdm=False):
            responses = []
            for request in requests:
                prompt = request.args[0]
                record = self.by_prompt[prompt]  # KeyError: lm-eval's prompt differs from render_prompt
                sample = self.calls[prompt]
                self.calls[prompt] += 1
                answer = _boxed(record["answer"])
                if sample < n_correct(record):
                    responses.append(f"<think>\nfine\n</think>\n\n{answer}" if thinking else answer)
                else:  # thinking never closed: the boxed gold inside must NOT count
                    responses.append(f"<think>\n{answer}" if thinking else "I am not sure.")
            return responses

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    return ScriptedLM()


def _check_scripted(result, records, k, n_correct):
    expected = [min(n_correct(r), k) / k for r in records]
    assert result["n_problems"] == len(records)
    assert [p["score"] for p in result["per_problem"]] == expected
    assert result["avg_at_k"] == pytest.approx(sum(expected) / len(expected))
    assert result["pass_at_k"][str(k)] == pytest.approx(sum(e > 0 for e in expected) / len(expected))
    assert result["pass_at_k"]["1"] == pytest.approx(result["avg_at_k"])
    low, high = result["ci95_avg_at_k"]
    assert low <= result["avg_at_k"] <= high
    # calibration: the right samples give the gold, the others no answer (one answer of its own); the right
    # ones come first, so a tie goes to the gold
    counts = [min(n_correct(r), k) for r in records]
    calibration = result["calibration"]
    assert [p["id"] for p in calibration["per_problem"]] == [r["id"] for r in records]
    assert [p["confidence"] for p in calibration["per_problem"]] == [max(c, k - c) / k for c in counts]
    assert [p["majority_correct"] for p in calibration["per_problem"]] == [0 < c and c >= k - c for c in counts]
    assert [p["n_no_answer"] for p in calibration["per_problem"]] == [k - c for c in counts]
    assert calibration["n_bins"] == 10 and sum(b["count"] for b in calibration["reliability"]) == len(records)


@pytest.mark.parametrize("thinking", [False, True])
def test_scripted_model_scores_every_sample(tmp_path, tokenizer, thinking):
    k = 4
    records = make_split("arith_3op", 5, 1, (3, 3)) + make_split(OOD_SPLIT, 5, 1, (2, 4))
    write_jsonl(records, tmp_path / "mixed.jsonl")
    index = {r["id"]: i for i, r in enumerate(records)}

    def n_correct(record):
        return index[record["id"]] % (k + 1)  # 0, 1, ..., k right answers

    lm = _scripted_lm(tokenizer, records, thinking, n_correct)
    result = evaluate(tmp_path / "unused", "mixed", tmp_path / "mixed.jsonl", tmp_path / "mixed.json",
                      k=k, gen=GEN, thinking=thinking, lm=lm)
    _check_scripted(result, records, k, n_correct)
    assert set(lm.calls.values()) == {k}  # k requests per problem reached the model
    # 0..4 right of 4, twice: confidence 1, .75, .5, .75, 1, majority wrong, wrong, right, right, right; by hand,
    # ECE = 4/10 · |.5 − 1| + 4/10 · |.5 − .75| + 2/10 · |1 − .5| = 0.4, Brier = 2 · (1 + .5625 + .25 + .0625 + 0) / 10
    calibration = result["calibration"]
    assert calibration["ece"] == pytest.approx(0.4) and calibration["brier"] == pytest.approx(0.375)
    assert calibration["mean_confidence"] == pytest.approx(0.8) and calibration["majority_accuracy"] == pytest.approx(0.6)
    assert json.loads((tmp_path / "mixed.json").read_text())["calibration"] == calibration


def test_scripted_model_on_the_five_real_benchmarks(tmp_path, tokenizer, real_eval_dir):
    from trace.data.benchmarks import read_records

    k, limit = 3, 4
    records = {name: read_records(real_eval_dir / f"{name}.jsonl")[:limit] for name in MAIN_EVAL_SETS}
    everything = [r for rs in records.values() for r in rs]
    position = {r["id"]: i for rs in records.values() for i, r in enumerate(rs)}

    def n_correct(record):
        return position[record["id"]]  # 0, 1, 2, 3 (capped at k)

    lm = _scripted_lm(tokenizer, everything, True, n_correct)
    results = evaluate_many(tmp_path / "unused", {name: real_eval_dir / f"{name}.jsonl" for name in MAIN_EVAL_SETS},
                            tmp_path / "out", k=k, gen=GEN, thinking=True, limit=limit, lm=lm)
    assert sorted(results) == sorted(MAIN_EVAL_SETS)
    for name in MAIN_EVAL_SETS:
        _check_scripted(results[name], records[name], k, n_correct)
        assert json.loads((tmp_path / "out" / f"{name}.json").read_text())["benchmark"] == name


# --------------------------------------------------------------------------- tiny checkpoint, hf backend

def _check_against_logs(result, records, tokenizer, thinking, k):
    """Recompute everything the results JSON claims from the per-sample log."""
    rows = [json.loads(line) for line in Path(result["samples_path"]).read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    assert [row["id"] for row in rows] == [p["id"] for p in result["per_problem"]]
    scores = []
    for row in rows:
        record = by_id[row["id"]]
        assert row["prompt"] == render_prompt(tokenizer, record, thinking)
        assert len(row["responses"]) == len(row["grades"]) == k
        assert row["grades"] == [grade(response, record["answer"], record["kind"]) for response in row["responses"]]
        scores.append(sum(row["grades"]) / k)
    assert result["avg_at_k"] == pytest.approx(sum(scores) / len(scores))
    assert [p["score"] for p in result["per_problem"]] == pytest.approx(scores)
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("split,thinking", [("arith_2op", False), (OOD_SPLIT, True)])
def test_tiny_checkpoint_through_lm_eval(tmp_path, tiny_checkpoint, tokenizer, split, thinking):
    k = 3
    records = make_split(split, 4, 7, (2, 2))
    write_jsonl(records, tmp_path / f"{split}.jsonl")
    out_json = tmp_path / "results" / f"{split}.json"
    result = evaluate(tiny_checkpoint, split, tmp_path / f"{split}.jsonl", out_json, k=k, gen=GEN,
                      thinking=thinking, batch_size=16, seed=1)
    rows = _check_against_logs(result, records, tokenizer, thinking, k)
    assert json.loads(out_json.read_text()) == json.loads(json.dumps(result, default=str))
    assert any(len(set(row["responses"])) > 1 for row in rows), "k samples should differ (do_sample)"
    # the settings and versions that make the number reproducible
    assert result["sampling"] == {**GEN, "do_sample": True}
    assert result["thinking"] is thinking and result["backend"] == "hf" and result["seed"] == 1
    assert result["k"] == k and result["n_problems"] == len(records)
    assert result["model_args"]["chat_template_args"] == {"enable_thinking": thinking}
    assert {"python", "lm_eval", "torch", "transformers", "datasets"} <= set(result["versions"])
    assert result["wall_time_s"] > 0 and Path(result["task_config"]).is_file()
    assert result["lm_eval_metrics"]["avg_at_k,all_samples"] == pytest.approx(result["avg_at_k"])


@pytest.mark.slow
def test_tiny_checkpoint_on_the_five_real_benchmarks(tmp_path, tiny_checkpoint, tokenizer, real_eval_dir):
    from trace.data.benchmarks import read_records

    k, limit = 2, 2
    results = evaluate_many(tiny_checkpoint, {name: real_eval_dir / f"{name}.jsonl" for name in MAIN_EVAL_SETS},
                            tmp_path, k=k, gen={**GEN, "max_new_tokens": 16}, thinking=True, limit=limit,
                            batch_size=32)
    for name in MAIN_EVAL_SETS:
        records = read_records(real_eval_dir / f"{name}.jsonl")[:limit]
        assert results[name]["n_problems"] == limit
        _check_against_logs(results[name], records, tokenizer, True, k)


@pytest.mark.slow
def test_lm_eval_failures_name_the_model_and_the_data(tmp_path, tiny_checkpoint):
    import shutil

    broken = tmp_path / "no_weights"
    shutil.copytree(tiny_checkpoint, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    write_jsonl(make_split("arith_2op", 2, 0, (2, 2)), tmp_path / "toy.jsonl")
    with pytest.raises(EvaluationError, match=r"no_weights.*toy\.jsonl"):
        evaluate(broken, "toy", tmp_path / "toy.jsonl", tmp_path / "out.json", k=2, gen=GEN, thinking=False)
    assert not (tmp_path / "out.json").exists()
