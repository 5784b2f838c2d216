"""The toy task: reference solutions are correct under the project's verifier; the oracle is exact."""
import json

from trace.toy import task
from trace.verify import grade_many


def test_every_reference_solution_grades_correct(toy_data):
    for split in ["train", "sft", "val", *task.TEST_SPLITS, task.OOD_SPLIT]:
        records = [json.loads(line) for line in (toy_data / f"{split}.jsonl").read_text().splitlines()]
        assert records, split
        grades = grade_many([r["solution"] for r in records], [r["answer"] for r in records],
                            [r["kind"] for r in records])
        assert all(grades), f"{split}: {grades.count(False)} reference solutions graded wrong"


def test_splits_have_the_documented_shape(toy_data):
    manifest = json.loads((toy_data / "manifest.json").read_text())
    assert manifest["train"] == 200 and manifest["sft"] == 220 and manifest["arith_5op"] == 8
    ood = [json.loads(line) for line in (toy_data / "choice_ood.jsonl").read_text().splitlines()]
    assert all(r["kind"] == "mc" and r["answer"] in "ABCD" and len(r["choices"]) == 4 for r in ood)
    five_ops = [json.loads(line) for line in (toy_data / "arith_5op.jsonl").read_text().splitlines()]
    assert all(len(task.reference_steps(r["solution"])) == 5 for r in five_ops)
    assert five_ops[0]["solution"].split("\n")[-1] == f"\\boxed{{{five_ops[0]['answer']}}}"


def test_wrong_answers_grade_wrong():
    record = task.make_split("arith_2op", 1, 0, (2, 2))[0]
    wrong = record["solution"].replace(f"\\boxed{{{record['answer']}}}", f"\\boxed{{{int(record['answer']) + 1}}}")
    assert grade_many([wrong], [record["answer"]], ["math"]) == [False]


def test_oracle_marks_multiplications_and_first_wrong_step():
    reference = "4+3=7\n7*2=14\n14-5=9\n\\boxed{9}"
    verdict = task.oracle_spans(reference, reference, is_correct=True)
    assert verdict.lines == (1,) and verdict.label == "decisive_computation"
    slip = "4+3=7\n7*2=15\n15-5=10\n\\boxed{10}"
    assert task.oracle_spans(reference, slip, is_correct=False) == task.OracleVerdict((1,), "arithmetic_slip")
    misread = "4+8=12\n12*2=24\n\\boxed{24}"
    assert task.oracle_spans(reference, misread, False) == task.OracleVerdict((0,), "misread_problem")
    short = "4+3=7\n\\boxed{7}"
    assert task.oracle_spans(reference, short, False) == task.OracleVerdict((1,), "incomplete_solution")


def test_demonstrator_slips_are_off_by_one_and_carried_through_the_chain():
    import random

    reference = "7+3=10\n10*2=20\n20-4=16\n\\boxed{16}"
    assert task.demonstrator_solution(reference, random.Random(0), 0.0) == reference
    always = task.demonstrator_solution(reference, random.Random(0), 1.0)
    # every step slips by +1 and the next step starts from the slipped value
    assert always == "7+3=11\n11*2=23\n23-4=20\n\\boxed{20}"
    verdict = task.oracle_spans(reference, always, is_correct=False)
    assert verdict.lines == (0,) and verdict.label == "arithmetic_slip"
    # at rate 0.3 about 30% of steps slip; the final answer is wrong exactly when some step slipped
    rng, slipped_steps, n_steps = random.Random(1), 0, 0
    for _ in range(400):
        text = task.demonstrator_solution(reference, rng, 0.3)
        steps = task.reference_steps(text)
        n_steps += len(steps)
        slipped_steps += sum(s.result != task._apply(s.operation, s.left, s.operand) for s in steps)
        assert ("\\boxed{16}" in text) == (text == reference)
    assert 0.25 < slipped_steps / n_steps < 0.35
