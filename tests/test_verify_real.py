"""The shared grader on the real benchmark answers: every gold, written the way a model writes it,
must grade True; common wrong answers must grade False.

No gold answer of the five evaluation sets (nor of Minerva / OlympiadBench) needed an exception.
"""
import re
from pathlib import Path

import pytest

from trace.data import MAIN_EVAL_SETS, read_eval_set
from trace.verify import answer_candidates, get_pool, grade_many

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                reason=f"real data mirror not found at {SHARED_DATA}")


def _model_spellings(gold: str, kind: str) -> list[str]:
    if kind == "mc":
        return [f"Therefore, the answer is \\boxed{{{gold}}}.", f"Answer: ({gold})", f"So the answer is {gold}."]
    return [f"... so the answer is \\boxed{{{gold}}}.",
            f"The final answer is $\\boxed{{{gold}}}$",
            f"\\boxed{{${gold}$}}",
            f"\\boxed{{\\text{{{gold}}}}}"]


def _assert_all(responses, golds, kinds, expected, labels):
    results = grade_many(responses, golds, kinds)
    wrong = [(label, response, gold) for label, response, gold, got in zip(labels, responses, golds, results)
             if got is not expected]
    assert not wrong, f"{len(wrong)} of {len(results)} graded {not expected}; first ones: {wrong[:10]}"


@pytest.fixture(scope="module")
def eval_records():
    return {name: read_eval_set(name, SHARED_DATA) for name in MAIN_EVAL_SETS}


def test_every_gold_answer_grades_true(eval_records):
    responses, golds, kinds, labels = [], [], [], []

    def add(response, gold, kind, label):
        responses.append(response), golds.append(gold), kinds.append(kind), labels.append(label)

    for name, records in eval_records.items():
        for record in records:
            for response in _model_spellings(record["answer"], record["kind"]):
                add(response, record["answer"], record["kind"], f"{name}/{record['id']}")
            raw = record["meta"].get("answer_raw")
            if raw is not None and raw != record["answer"]:  # AIME "025", AMC "27.0"
                add(f"\\boxed{{{record['answer']}}}", raw, "math", f"{name}/{record['id']} raw gold")
                add(f"\\boxed{{{raw}}}", record["answer"], "math", f"{name}/{record['id']} raw answer")
    assert len(responses) > 2800
    _assert_all(responses, golds, kinds, True, labels)


def test_math_verify_itself_accepts_every_math_gold(eval_records):
    # grade() short-cuts answers spelled exactly like the gold, so the test above mostly
    # exercises that fast path. This sends every math gold through the math-verify workers,
    # the path taken whenever a model spells the answer differently.
    math_records = [r for records in eval_records.values() for r in records if r["kind"] == "math"]
    results = get_pool().run([(r["answer"], answer_candidates(r["answer"])) for r in math_records])
    failed = [(r["source"], r["id"], r["answer"]) for r, ok in zip(math_records, results) if not ok]
    assert len(math_records) == 600 and not failed


@pytest.mark.parametrize("name", ["minerva", "olympiadbench"])
def test_extra_benchmarks_gold_answers_grade_true(name):
    records = read_eval_set(name, SHARED_DATA)
    _assert_all([f"The answer is \\boxed{{{r['answer']}}}." for r in records], [r["answer"] for r in records],
                ["math"] * len(records), True, [r["id"] for r in records])


def _wrong_answers(gold: str, kind: str) -> list[str]:
    if kind == "mc":
        return [letter for letter in "ABCD" if letter != gold]
    if re.fullmatch(r"-?\d+", gold):
        return [str(int(gold) + 1), str(int(gold) - 1)]  # off by one
    wrong = [gold + "+1"]
    fraction = re.search(r"\\[dt]?frac\{?(\d+)", gold)
    if fraction:  # a different fraction: bump the first numerator
        wrong.append(gold[:fraction.start(1)] + str(int(fraction.group(1)) + 1) + gold[fraction.end(1):])
    return wrong


def test_common_wrong_answers_grade_false(eval_records):
    responses, golds, kinds, labels = [], [], [], []
    for name, records in eval_records.items():
        for record in records:
            for wrong in _wrong_answers(record["answer"], record["kind"]):
                responses.append(f"The answer is \\boxed{{{wrong}}}.")
                golds.append(record["answer"]), kinds.append(record["kind"]), labels.append(f"{name}/{record['id']}")
    assert len(responses) > 1500
    _assert_all(responses, golds, kinds, False, labels)


# Answer styles found in MATH-500 golds: (gold, model answer, expected).
MATH500_STYLES = [
    # fractions and surds
    ("\\frac{14}{3}", "\\dfrac{14}{3}", True), ("\\frac{14}{3}", "14/3", True),
    ("\\frac{14}{3}", "\\frac{13}{3}", False), ("\\frac{14}{3}", "4.67", False),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True), ("\\frac{\\sqrt{3}}{3}", "\\sqrt{3}", False),
    # intervals and unions
    ("(3,4]", "(3, 4]", True), ("(3,4]", "(3,4)", False), ("(3,4]", "[3,4]", False),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)", True),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty, 2] \\cup (3,\\infty)", False),
    # \text{} words, letters and units
    ("\\text{Evelyn}", "Evelyn", True), ("\\text{Evelyn}", "\\text{Navin}", False),
    ("\\text{(C)}", "C", True), ("\\text{(C)}", "(C)", True), ("\\text{(C)}", "\\text{(B)}", False),
    ("5.4 \\text{ cents}", "5.4", True), ("5.4 \\text{ cents}", "5.4 \\text{ cents}", True),
    ("5.4 \\text{ cents}", "5.5", False),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True), ("\\frac{270}7\\text{ degrees}", "38", False),
    # degrees
    ("90^\\circ", "90", True), ("90^\\circ", "90^{\\circ}", True), ("90^\\circ", "90°", True),
    ("90^\\circ", "89^\\circ", False),
    # several answers, plus-minus
    ("1,-2", "-2, 1", True), ("1,-2", "1", False), ("3, 5, 7", "3,5,7", True), ("3, 5, 7", "3, 5", False),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}", True), ("1 \\pm \\sqrt{19}", "2 \\pm \\sqrt{19}", False),
    # thousands separators and money
    ("10,\\!080", "10080", True), ("10,\\!080", "10,080", True), ("10,\\!080", "10081", False),
    ("\\$32,\\!348", "32348", True), ("\\$32,\\!348", "32349", False),
    # equations, tuples, matrices, bases
    ("x=5", "5", True), ("x=5", "x=6", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi)", False),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}", True),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{4}{3} \\end{pmatrix}", False),
    ("52_8", "52_{8}", True), ("52_8", "53_8", False),
    ("p - q", "p-q", True), ("p - q", "q-p", False),
]
# MATH-500 has no percentage gold, so these golds are made up in the MATH style.
PERCENT_STYLES = [("25\\%", "25", True), ("25\\%", "25\\%", True), ("25\\%", "26\\%", False)]


def test_math500_answer_styles(eval_records):
    math500_golds = {r["answer"] for r in eval_records["math500"]}
    missing = {gold for gold, _, _ in MATH500_STYLES} - math500_golds - {"\\frac{14}{3}"}
    assert not missing, f"these golds are meant to be real MATH-500 answers: {missing}"
    cases = MATH500_STYLES + PERCENT_STYLES
    results = grade_many([f"The final answer is $\\boxed{{{answer}}}$." for _, answer, _ in cases],
                         [gold for gold, _, _ in cases], ["math"] * len(cases))
    mismatches = [case for case, got in zip(cases, results) if got is not case[2]]
    assert not mismatches
