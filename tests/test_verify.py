"""trace.verify: hand-written right / wrong / hostile cases for the one shared grader."""
import concurrent.futures
import threading
import time

import pytest

from trace import verify
from trace.verify import VerifierPool, extract_final_answer, grade, grade_many

# (response, gold, expected)
MATH_CASES = [
    ("So the answer is $\\boxed{25}$.", "25", True),
    ("So the answer is $\\boxed{25}$.", "025", True),          # AIME zero padding
    ("\\boxed{025}", "25", True),
    ("\\boxed{27}", "27.0", True),                            # AMC floats
    ("\\boxed{26}", "27.0", False),
    ("\\boxed{24}", "25", False),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{0.5}", "\\frac12", True),
    ("\\boxed{\\frac{2}{3}}", "\\frac{1}{2}", False),
    ("\\boxed{\\frac{1}{\\sqrt{3}}}", "\\frac{\\sqrt{3}}{3}", True),
    ("\\boxed{(3, 4]}", "(3,4]", True),
    ("\\boxed{[3, 4]}", "(3,4]", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{Evelyn}", "\\text{Evelyn}", True),
    ("\\boxed{Evlyne}", "\\text{Evelyn}", False),             # a bare word must not become E*v*l*y*n*e
    ("\\boxed{\\text{1.25}}", "1.25", True),
    ("\\boxed{90°}", "90^\\circ", True),
    ("\\boxed{90}", "90^\\circ", True),
    ("\\boxed{25\\%}", "25\\%", True),
    ("\\boxed{-2, 1}", "1,-2", True),
    ("\\boxed{1}", "1,-2", False),
    ("\\fbox{7}", "7", True),
    ("the answer is \\boxed 7.", "7", True),
    ("first \\boxed{3}, then corrected: \\boxed{5}", "5", True),  # the LAST box counts
    ("first \\boxed{5}, then corrected: \\boxed{3}", "5", False),
    ("The answer is 5.", "5", False),                         # no box -> no answer
    ("\\boxed{5", "5", False),                                # unbalanced box
    ("", "5", False),
    # equations (issue 12, item 4): only "<bare variable> = answer" counts as the answer
    ("\\boxed{4 = 3}", "3", False),
    ("\\boxed{0 = 3}", "3", False),
    ("\\boxed{1 + 1 = 3}", "3", False),
    ("\\boxed{\\text{wrong} = 3}", "3", False),
    ("\\boxed{f(x) = 3}", "3", False),
    ("\\boxed{x = 3 = 4}", "3", False),
    ("\\boxed{x = 3}", "3", True),
    ("\\boxed{x=4}", "3", False),
    ("\\boxed{x_1 = \\frac{1}{2}}", "\\frac12", True),
    ("\\boxed{\\theta = 30^\\circ}", "30^\\circ", True),
    ("\\boxed{$n = 7$}", "7", True),
    ("\\boxed{y = 2x + 1}", "y = 2x + 1", True),              # the gold is itself an equation
    ("\\boxed{x \\geq 3}", "x \\ge 3", True),                # inequalities are not equations
    # numeric tolerance: math-verify's default, agreement after rounding to 6 decimal places
    ("\\boxed{3.1415927}", "\\pi", True),
    ("\\boxed{0.333333}", "\\frac{1}{3}", True),
    ("\\boxed{3.14159}", "\\pi", False),
    ("\\boxed{3.14}", "\\pi", False),
    ("\\boxed{0.3333}", "\\frac{1}{3}", False),
]


@pytest.mark.parametrize("response,gold,expected", MATH_CASES)
def test_math_cases(response, gold, expected):
    assert grade(response, gold, "math") is expected


def test_grade_many_matches_grade_on_every_case():
    responses, golds, expected = zip(*MATH_CASES)
    assert grade_many(list(responses), list(golds), ["math"] * len(golds)) == list(expected)


def test_think_block_only_text_after_closing_tag_counts():
    response = "<think>maybe \\boxed{3}? no...</think>\nSo the answer is \\boxed{5}."
    assert grade(response, "5") is True
    assert grade(response, "3") is False
    assert extract_final_answer(response) == "5"


def test_unclosed_think_block_has_no_answer():
    response = "<think>long reasoning ... \\boxed{5} and then the token budget ran out"
    assert extract_final_answer(response) is None
    assert grade(response, "5") is False
    assert grade("<think>The answer is C", "C", "mc") is False


def test_think_block_without_answer_after_it():
    assert grade("<think>\\boxed{5}</think> I am not sure.", "5") is False


def test_extract_final_answer_math():
    assert extract_final_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
    assert extract_final_answer("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces do not nest
    assert extract_final_answer("\\boxed{\\left\\{ x \\right\\}}") == "\\left\\{ x \\right\\}"
    assert extract_final_answer("no box here") is None


MC_CASES = [
    ("Therefore the answer is \\boxed{C}.", "C", True),
    ("\\boxed{(C)}", "C", True),
    ("\\boxed{\\text{C}}", "C", True),
    ("\\boxed{C. 10^-4 eV}", "C", True),
    ("Answer: (C)", "C", True),
    ("The answer is C.", "C", True),
    ("**Answer:** C", "C", True),
    ("The correct answer is (C) 10^-4 eV", "C", True),
    ("The answer is: \\textbf{D}", "D", True),
    ("I considered A, B and D. The answer is (B).", "B", True),
    ("\\boxed{B}", "C", False),
    ("Answer: (B)", "C", False),
    ("\\boxed{C}", "c", True),                 # gold letters are compared upper-case
    # listing every option must not pass
    ("\\boxed{A, B, C, D}", "C", False),
    ("\\boxed{A/B/C/D}", "C", False),
    ("\\boxed{(A) (B) (C) (D)}", "C", False),
    ("\\boxed{ABCD}", "C", False),
    ("Answer: A, B, C, or D", "A", False),
    ("Answer: (A), (B), (C), (D)", "A", False),
    ("answer: (A)(B)", "A", False),
    ("the answer is a function of x", "A", False),  # lower-case "a" is a word, not an option
    ("It could be C.", "C", False),                  # no box and no "answer" phrase
]


@pytest.mark.parametrize("response,gold,expected", MC_CASES)
def test_mc_cases(response, gold, expected):
    assert grade(response, gold, "mc") is expected


def test_extract_final_answer_mc():
    assert extract_final_answer("The answer is $\\boxed{D}$", "mc") == "D"
    assert extract_final_answer("\\boxed{A, B}", "mc") is None


def test_mixed_kinds_in_one_batch():
    assert grade_many(["\\boxed{C}", "\\boxed{C}", "\\boxed{\\frac{3}{6}}"], ["C", "3", "0.5"],
                      ["mc", "math", "math"]) == [True, False, True]


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="unknown answer kind 'code'"):
        grade("\\boxed{1}", "1", "code")
    with pytest.raises(ValueError, match="lengths differ"):
        grade_many(["a", "b"], ["1"], ["math", "math"])
    with pytest.raises(TypeError, match="str response"):
        grade(None, "1")


HOSTILE = [
    "\\boxed{9^{9^{9^{9^9}}}}",
    "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    "\\boxed{99999999999999999999!}",
    "\\boxed{(x+1)^{100000}}",
    "\\boxed{\\frac{1}{0}}",
    "\\boxed{" + "(" * 450 + "1" + ")" * 450 + "}",
    "\\boxed{" + "{" * 200_000 + "}" * 200_000 + "}",  # deep nesting, far over the length cap
    "\\boxed{" + "1" * 1_000_000 + "}",                 # 1 MB answer
    "x" * 1_000_000,                                    # 1 MB, no answer
    "answer " * 150_000,                                # regex stress for the mc patterns
]


@pytest.mark.parametrize("response", HOSTILE, ids=lambda r: f"{r[:24]}...({len(r)} chars)")
def test_hostile_inputs_return_false_in_bounded_time(response):
    for kind, gold in (("math", "5"), ("mc", "A")):
        start = time.monotonic()
        assert grade(response, gold, kind) is False
        # An upper bound for safety (the per-item deadline is 5 s), not a speed claim.
        assert time.monotonic() - start < 10


def test_model_output_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [f"\\boxed{{__import__('os').system('touch {marker}')}}",
                f"\\boxed{{eval(\"open('{marker}', 'w')\")}}",
                f"The answer is __import__('os').system('touch {marker}')"]
    assert grade_many(payloads, ["0"] * 3, ["math"] * 3) == [False] * 3
    assert not marker.exists()


def test_grading_from_non_main_threads():
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(ok=grade("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt2}{2}")))
    thread.start()
    thread.join(timeout=120)
    assert outcome == {"ok": True}
    # several threads at once share the pool safely
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(grade, f"\\boxed{{\\frac{{{n}}}{{2}}}}", str(n / 2)) for n in range(1, 9)]
        assert [f.result(timeout=120) for f in futures] == [True] * 8


def test_hard_deadline_kills_a_stuck_worker_and_the_pool_recovers():
    # 0.5 s is far shorter than math-verify's own 1 s alarm, so the pool must kill the worker.
    pool = VerifierPool(n_workers=1, timeout_s=0.5)
    try:
        slow = ("5", ["9^{9^{9^{9^9}}}"])  # takes math-verify ~2 s before its own alarm fires
        assert pool.run([slow]) == [False]
        assert pool.n_timeouts == 1
        assert pool.run([("\\frac{1}{2}", ["0.5"]), ("3", ["4"])]) == [True, False]
    finally:
        pool.close()


def test_pool_replaces_a_worker_that_died_while_idle():
    pool = VerifierPool(n_workers=1, timeout_s=5)
    try:
        assert pool.run([("\\frac{1}{2}", ["0.5"])]) == [True]
        pool._workers[0].process.kill()  # as the kernel's out-of-memory killer would
        pool._workers[0].process.wait()
        assert pool.run([("\\frac{1}{3}", ["2/6"]), ("\\frac{1}{3}", ["0.3"])]) == [True, False]
    finally:
        pool.close()


def test_pool_settings_come_from_environment(monkeypatch):
    monkeypatch.setenv("TRACE_VERIFY_WORKERS", "1")
    monkeypatch.setenv("TRACE_VERIFY_TIMEOUT_S", "3.5")
    verify.close_pool()
    try:
        pool = verify.get_pool()
        assert (pool.n_workers, pool.timeout_s) == (1, 3.5)
        monkeypatch.setenv("TRACE_VERIFY_WORKERS", "two")
        verify.close_pool()
        with pytest.raises(ValueError, match="TRACE_VERIFY_WORKERS='two'"):
            verify.get_pool()
    finally:
        monkeypatch.undo()
        verify.close_pool()


# --------------------------------------------------------------------------- answer keys (agreement confidence)

@pytest.mark.parametrize("response, kind, key", [
    ("\\boxed{025}", "math", "25"),                 # a plain integer in its shortest form
    ("so \\boxed{ 25.0 }.", "math", "25"),
    ("\\boxed{x = 3}", "math", "3"),                # <bare variable> = value: the value, as the grader reads it
    ("\\boxed{f(x) = 3}", "math", "f(x)=3"),        # any other equation stays whole
    ("\\boxed{$\\frac{1}{2}$}", "math", "\\frac{1}{2}"),
    ("\\boxed{\\frac{1}{ 2 }}", "math", "\\frac{1}{2}"),  # whitespace does not count
    ("\\boxed{\\text{Evelyn}}", "math", "Evelyn"),
    ("the answer is 12", "math", None),             # no boxed answer: none
    ("<think>\\boxed{3}", "math", None),            # thinking never closed: none
    ("<think>\\boxed{3}</think> \\boxed{4}", "math", "4"),
    ("The answer is (C)", "mc", "C"),
    ("\\boxed{A, B}", "mc", None),
])
def test_answer_key(response, kind, key):
    assert verify.answer_key(response, kind) == key
