"""The teacher check (trace/train/teacher_gap.py) and the instruments that must not hide a broken teacher:
hand-computed first-error corrections, verdicts, the refusal, the unclipped KL beside the clipped one,
the toy's privileged SFT examples, the fixed probe batch's margins, figures inside their canvas."""
import json
import logging
import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from trace import losses
from trace.annotate.contract import LABELS, label_to_teacher_prefix
from trace.prompting import REFERENCE_PREFIX
from trace.toy.task import first_error_correction
from trace.train.teacher_gap import check_teacher, summary, verdict

REFERENCE = "7+5=12\n12*2=24\n\\boxed{24}"


# ---------------------------------------------------------------- where an incorrect rollout goes wrong
@pytest.mark.parametrize("response, expected", [
    ("7+5=13\n13*2=26\n\\boxed{26}", (5, "2\n")),          # arithmetic slip: "13" should read "12"
    ("7+4=11\n11*2=22\n\\boxed{22}", (2, "5=12\n")),       # misread operand
    ("7+5=12\n12*2=24\n\\boxed{25}", (15 + 8, "4}\n")),    # right chain, wrong boxed digit
    ("7+5=12\n\\boxed{12}", (7, "12*2=24\n")),             # boxed too early: the next step was due
    ("7+5=12\n12*2=24", None),                             # a correct prefix that stops: no departure
])
def test_first_error_correction_is_the_first_differing_character(response, expected):
    assert first_error_correction(REFERENCE, response) == expected


# ---------------------------------------------------------------- verdicts and the refusal
def _stat(mean, low, high, n=50):
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": n}


@pytest.mark.parametrize("correct, sampled, expected", [
    (_stat(0.3, 0.2, 0.4), _stat(-1, -1.2, -0.8), ("better", "first_error_correct")),
    (_stat(-6.2, -6.9, -5.5), _stat(-7, -8, -6), ("worse", "first_error_correct")),
    (_stat(0.1, -0.1, 0.3), _stat(-1, -2, -0.5), ("uninformative", "first_error_correct")),
    # real data: no correct token known, the sampled wrong token decides (a good teacher lowers it more
    # than the rollout's other tokens)
    (_stat(None, None, None, 0), _stat(-0.5, -0.8, -0.2), ("better", "first_error_sampled_relative")),
    (_stat(None, None, None, 0), _stat(0.5, 0.2, 0.8), ("worse", "first_error_sampled_relative")),
    (_stat(None, None, None, 0), _stat(0.5, 0.2, 0.8, n=3), ("uninformative",
                                                             "fewer than 10 first-error positions")),
])
def test_verdict_rests_on_the_ci_of_the_first_error_statistic(correct, sampled, expected):
    assert verdict({"first_error_correct": correct, "first_error_sampled_relative": sampled}) == expected


def test_summary_is_the_mean_with_a_bootstrap_ci():
    values = [1.0, 2.0, 3.0, 4.0]
    stat = summary(values)
    assert stat["mean"] == 2.5 and stat["n"] == 4
    assert 1.0 <= stat["ci_low"] < 2.5 < stat["ci_high"] <= 4.0
    assert summary([]) == {"mean": None, "ci_low": None, "ci_high": None, "n": 0}


def _gap_file(tmp_path, verdict_):
    path = tmp_path / "label.json"
    path.write_text(json.dumps({"model": "toy-small", "context": "label", "verdict": verdict_,
                                "verdict_basis": "first_error_correct",
                                "first_error_correct": _stat(-6.17, -6.88, -5.48, 270)}))
    return path


def test_a_worse_teacher_is_refused_with_one_line_naming_the_file(tmp_path):
    path = _gap_file(tmp_path, "worse")
    with pytest.raises(ValueError) as refused:
        check_teacher(path, "trace_fkl", "refuse")
    message = str(refused.value)
    assert str(path) in message and "worse" in message and "-6.170 [-6.880, -5.480], n=270" in message
    assert "teacher_check.on_worse: warn" in message and "\n" not in message


def test_warn_downgrades_the_refusal_to_a_loud_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trace"):
        check_teacher(_gap_file(tmp_path, "worse"), "sdpo", "warn")
    assert any("!!!" in r.message and "sdpo anyway" in r.message for r in caplog.records)
    check_teacher(_gap_file(tmp_path, "better"), "sdpo", "refuse")  # a better teacher starts quietly


# ---------------------------------------------------------------- the KL instrument: clipped AND unclipped
def test_routed_divergence_returns_the_clip_scale_so_the_unclipped_kl_can_be_logged():
    p, q = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.1, 0.2, 0.7]])
    clipped, scale = losses.routed_divergence(p.log(), q.log(), "fkl", entry_clip=0.05, return_scale=True)
    # KL(q‖p) = 0.1·ln(1/7) + 0.7·ln 7 = 0.6·ln 7; the largest Bregman entry 0.7·ln 7 − 0.7 + 0.1
    kl = 0.6 * math.log(7)
    largest = 0.7 * math.log(7) - 0.6
    assert float(scale) == pytest.approx(0.05 / largest, rel=1e-5)
    assert float(clipped) == pytest.approx(kl * 0.05 / largest, rel=1e-5)
    assert float(clipped / scale) == pytest.approx(kl, rel=1e-5)  # what the trainer logs as unclipped
    unclipped, ones = losses.routed_divergence(p.log(), q.log(), "fkl", entry_clip=None, return_scale=True)
    assert float(unclipped) == pytest.approx(kl, rel=1e-5) and float(ones) == 1.0


def test_chunked_divergence_returns_per_position_scales():
    torch.manual_seed(0)
    hidden, teacher, weight = torch.randn(5, 4), torch.randn(5, 4), torch.randn(6, 4)
    values, scale = losses.chunked_divergence(hidden, teacher, weight, "fkl", chunk_size=2, entry_clip=0.05,
                                              return_scale=True)
    raw = losses.chunked_divergence(hidden, teacher, weight, "fkl", chunk_size=2, entry_clip=None)
    assert values.shape == scale.shape == (5,)
    assert torch.allclose(values / scale, raw, rtol=1e-5)


# ---------------------------------------------------------------- the toy's privileged SFT examples
def test_privileged_examples_pair_each_private_turn_with_the_clean_solution():
    from trace.toy import task
    from trace.toy.world import privileged_examples

    train = task.make_split("train", 40, 0, task.TRAIN_OPS)
    examples = privileged_examples(train, 1.0, seed=0)
    assert len(examples) == 80  # share 1: one label and one reference example per problem
    by_id = {r["id"]: r for r in train}
    label_prefixes = {label_to_teacher_prefix(label) for label in LABELS}
    for example in examples:
        source = by_id[example["id"].rsplit("-", 1)[0]]
        assert example["solution"] == source["solution"]  # the clean reference, never the slipping demonstrator
        if example["id"].endswith("-label"):
            assert example["private_context"] in label_prefixes
            assert not any(ch.isdigit() for ch in example["private_context"])  # no positions, no values
        else:
            assert example["private_context"] == REFERENCE_PREFIX + source["solution"]
    assert privileged_examples(train, 0.0, seed=0) == []


def test_the_sft_prompt_of_a_privileged_example_has_its_system_turn(tiny_base):
    from transformers import AutoTokenizer

    from trace.toy.sft import encode_sft_example

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    record = {"problem": "Start with 7. Then add 5. What is the result?", "solution": "7+5=12\n\\boxed{12}",
              "kind": "math", "private_context": "Private hint: reason carefully."}
    ids, prompt_len = encode_sft_example(tokenizer, record, thinking=False)
    prompt = tokenizer.decode(ids[:prompt_len])
    assert prompt.startswith("<|im_start|>system\nPrivate hint: reason carefully.<|im_end|>")
    assert tokenizer.decode(ids[prompt_len:]) == "7+5=12\n\\boxed{12}<|im_end|>"


# ---------------------------------------------------------------- the fixed probe batch's margins
def test_fixed_batch_row_measures_the_margin_and_its_change():
    from trace.train.probe import FixedProbeBatch, fixed_batch_row

    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    supported = torch.tensor([[False, True, False], [True, False, False]])
    batch = FixedProbeBatch(None, None, torch.zeros(2, 3, dtype=torch.long), mask, torch.tensor([0, 1]),
                            torch.tensor([2, 1]), torch.tensor([5, 6]), supported)
    sampled_0 = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    sampled_1 = torch.tensor([[-1.0, -1.5, -3.5], [-0.5, -1.5, 0.0]])
    before = (sampled_0, torch.tensor([-2.0, -4.0]), torch.tensor([-1.0, -0.5]))  # margins -1, -3.5
    after = (sampled_1, torch.tensor([-1.0, -4.0]), torch.tensor([-1.5, -0.5]))   # margins 0.5, -3.5
    row = fixed_batch_row(before, after, batch)
    assert row["probe/fixed_margin_first_error"] == pytest.approx((-1 - 3.5) / 2)
    assert row["probe/fixed_margin_change"] == pytest.approx((1.5 + 0) / 2)
    assert row["probe/fixed_correct_logprob_change"] == pytest.approx((1.0 + 0.0) / 2)
    assert row["probe/fixed_share_margin_up"] == pytest.approx(0.5)
    assert row["probe/fixed_lift_key_supported"] == pytest.approx((0.5 + 0.5) / 2)  # (0,1) and (1,0)
    assert row["probe/fixed_first_errors"] == 2 and row["probe/fixed_tokens_key_supported"] == 2


# ---------------------------------------------------------------- figures: nothing cut off
def test_a_title_past_the_canvas_is_caught():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trace.report import texts_outside_canvas

    fig, ax = plt.subplots(figsize=(6, 2))
    ax.set_title("x" * 200, fontsize=8)
    fig.tight_layout()
    assert {side.split()[0] for side in texts_outside_canvas(fig)} == {"left", "right"}
    ax.set_title("fits", fontsize=8)
    assert texts_outside_canvas(fig) == []
    plt.close(fig)


# ---------------------------------------------------------------- a teacher that cannot read its context
@pytest.mark.slow
def test_a_base_without_privileged_sft_fails_the_check_and_distillation_refuses(tiny_base, toy_data, tmp_path):
    """The conftest base never saw a system turn (no privileged SFT): its label teacher reads unseen text,
    the check must say 'worse' and a TRACE run must refuse to start, writing nothing."""
    from trace.settings import default_train_section

    train = default_train_section()
    train.update(seed=0, thinking=False, batch_prompts=4, steps=2, validation={}, probe={"steps": []})
    cfg = {"train": train, "teacher_check": {"n_prompts": 24, "seed": 0, "on_worse": "refuse", "engine": None},
           "context": "label", "model": "tiny"}
    out = tmp_path / "gap" / "label.json"
    env = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    check = subprocess.run([sys.executable, "-m", "trace", "teacher-gap", "--cfg", json.dumps(cfg), "--base",
                            str(tiny_base), "--train-data", str(toy_data / "train.jsonl"), "--out", str(out),
                            "--probe-batch", str(tmp_path / "gap" / "label.probe.pt")],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert check.returncode == 0, check.stderr[-2000:]
    gap = json.loads(out.read_text())
    assert gap["verdict"] == "worse", gap
    assert gap["first_error_correct"]["ci_high"] < 0
    assert gap["kl_span"]["mean"] > gap["kl_span_clipped"]["mean"]  # the clip hides part of the real KL
    run_dir = tmp_path / "run"
    refused = subprocess.run([sys.executable, "-m", "trace", "train", "--cfg",
                              json.dumps({**train, "method": "trace_fkl", "teacher_check_on_worse": "refuse"}),
                              "--base", str(tiny_base), "--train-data", str(toy_data / "train.jsonl"),
                              "--run-dir", str(run_dir), "--teacher-gap", str(out)],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert refused.returncode == 2
    errors = [line for line in refused.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(out) in errors[0] and "is worse than the student" in errors[0], refused.stderr
    assert "Traceback" not in refused.stderr
    assert not run_dir.exists()
