"""The toy world's verifiable task: short arithmetic chains with worked step-by-step solutions.

It stands in for OpenThoughts math + the paper's benchmarks when no GPU or hub is available.
A problem is a start value and a chain of operations; the reference solution does one
operation per line in a compact form (``7+5=12``) and ends in ``\\boxed{12}``: short completions
(about 30 tokens for 3 operations) keep the default study within minutes on a CPU. Because every
step is checkable, the toy world has a programmatic *span oracle*: it knows the decisive steps of
a correct rollout (key spans) and the first wrong step of an incorrect one (error spans), with a
diagnostic type label.

Splits (all written in the project's normalised record format, see ``trace/data``):
- ``train`` / ``val``: 2–4 operations, values kept in [0, MAX_VALUE];
- four in-distribution test splits of rising difficulty (2, 3, 4 and 5 operations);
- ``choice_ood``: the same computations asked as 4-way multiple choice, graded by letter
  (the GPQA-Diamond analogue: a format the RL stage never trains on).
"""
from __future__ import annotations

import dataclasses
import random
import re

MAX_VALUE = 30  # small values: a ~1M-parameter model learns the tables in minutes on a CPU
OPERATIONS = ("add", "subtract", "multiply")
LETTERS = "ABCD"

# name -> (number of operations, or a range for mixed splits), used by make_split
TEST_SPLITS = {
    "arith_2op": (2, 2),
    "arith_3op": (3, 3),
    "arith_4op": (4, 4),
    "arith_5op": (5, 5),
}
OOD_SPLIT = "choice_ood"
TRAIN_OPS = (2, 4)

_SYMBOL = {"add": "+", "subtract": "-", "multiply": "*"}
_PHRASE = {"add": "add {x}", "subtract": "subtract {x}", "multiply": "multiply by {x}"}


@dataclasses.dataclass(frozen=True)
class Step:
    operation: str
    left: int
    operand: int
    result: int

    def line(self) -> str:
        return f"{self.left}{_SYMBOL[self.operation]}{self.operand}={self.result}"


@dataclasses.dataclass(frozen=True)
class Problem:
    start: int
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return self.steps[-1].result

    def text(self) -> str:
        ops = ", ".join(_PHRASE[s.operation].format(x=s.operand) for s in self.steps)
        return f"Start with {self.start}. Then {ops}. What is the result?"

    def solution(self, final: str | None = None) -> str:
        lines = [s.line() for s in self.steps]
        lines.append(f"\\boxed{{{self.answer if final is None else final}}}")
        return "\n".join(lines)


def _apply(operation: str, value: int, operand: int) -> int:
    if operation == "add":
        return value + operand
    if operation == "subtract":
        return value - operand
    return value * operand


def random_problem(rng: random.Random, n_ops: int) -> Problem:
    """A chain whose every intermediate value stays in [0, MAX_VALUE]."""
    value = rng.randint(1, 15)
    start, steps = value, []
    while len(steps) < n_ops:
        operation = rng.choice(OPERATIONS)
        operand = 2 if operation == "multiply" else rng.randint(1, 5)
        result = _apply(operation, value, operand)
        if 0 <= result <= MAX_VALUE:
            steps.append(Step(operation, value, operand, result))
            value = result
    return Problem(start, tuple(steps))


def multiple_choice(rng: random.Random, problem: Problem) -> tuple[list[str], str]:
    """Four options: the answer and three near misses, shuffled; returns (choices, gold letter)."""
    answer = problem.answer
    distractors: set[int] = set()
    while len(distractors) < 3:
        candidate = answer + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
        if candidate >= 0 and candidate != answer:
            distractors.add(candidate)
    choices = [answer, *sorted(distractors)]
    rng.shuffle(choices)
    return [str(c) for c in choices], LETTERS[choices.index(answer)]


def choice_problem_text(problem: Problem, choices: list[str]) -> str:
    options = " ".join(f"({letter}) {c}" for letter, c in zip(LETTERS, choices))
    return f"{problem.text()[:-len(' What is the result?')]} Which option is the result? {options}"


def make_split(name: str, n: int, seed: int, n_ops: tuple[int, int]) -> list[dict]:
    """Normalised records (id, problem, solution, answer, kind, choices, source) for one split."""
    rng = random.Random(f"{name}:{seed}")
    records = []
    for i in range(n):
        problem = random_problem(rng, rng.randint(*n_ops))
        record = {"id": f"{name}-{i}", "source": f"toy/{name}"}
        if name == OOD_SPLIT or name.startswith("sft_choice"):
            choices, letter = multiple_choice(rng, problem)
            record.update(problem=choice_problem_text(problem, choices), choices=choices,
                          answer=letter, kind="mc", solution=problem.solution(final=letter))
        else:
            record.update(problem=problem.text(), choices=None, answer=str(problem.answer),
                          kind="math", solution=problem.solution())
        records.append(record)
    return records


def demonstrator_solution(reference_solution: str, rng: random.Random, slip_rate: float) -> str:
    """The reference solution as an imperfect demonstrator writes it, for the SFT corpus only.

    Each step's result is off by one with probability ``slip_rate`` and the chain continues from
    the slipped value, so the final answer is wrong too. The base policy learns these slips as a
    systematic habit (a single alternative token survives temperature-0.6 sampling, unlike noise
    spread over many values): its accuracy is then set by the slip rate rather than by a knife-edge
    SFT budget, and RL has a real, localised error to remove. RL data and evaluation stay clean.
    """
    steps = reference_steps(reference_solution)
    if not steps or slip_rate <= 0:
        return reference_solution
    lines, value = [], steps[0].left
    for step in steps:
        result = _apply(step.operation, value, step.operand) + (rng.random() < slip_rate)
        lines.append(Step(step.operation, value, step.operand, result).line())
        value = result
    lines.append(f"\\boxed{{{value}}}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- span oracle
_STEP_RE = re.compile(r"^(\d+)([+*-])(\d+)=(-?\d+)\s*$")  # "left op operand=result"
_OP_OF_SYMBOL = {v: k for k, v in _SYMBOL.items()}


@dataclasses.dataclass(frozen=True)
class OracleVerdict:
    """Line indices (0-based over ``response.split('\\n')``) that the oracle marks, and a label."""
    lines: tuple[int, ...]
    label: str


def reference_steps(reference_solution: str) -> list[Step]:
    """The chain of a toy reference solution, read back from its "a op b=c" lines."""
    steps = []
    for line in reference_solution.split("\n"):
        if match := _STEP_RE.match(line.strip()):
            steps.append(Step(_OP_OF_SYMBOL[match.group(2)], int(match.group(1)), int(match.group(3)),
                              int(match.group(4))))
    return steps


def oracle_spans(reference_solution: str, response: str, is_correct: bool) -> OracleVerdict:
    """Key steps of a correct rollout, or the first wrong step of an incorrect one.

    Key steps: the multiplications (the steps a tiny model most often gets wrong), else the
    last step. Error: the first line that breaks the chain, labelled by what went wrong
    (labels from the annotation vocabulary, trace/annotate/contract.py).
    """
    expected_steps = reference_steps(reference_solution)
    lines = response.split("\n")
    if is_correct:
        key = [i for i, ln in enumerate(lines)
               if (m := _STEP_RE.match(ln.strip())) and m.group(2) == "*"]
        if not key:
            key = [i for i, ln in enumerate(lines) if _STEP_RE.match(ln.strip())][-1:]
        return OracleVerdict(tuple(key), "decisive_computation")

    step_index = 0
    for i, line in enumerate(lines):
        stripped = line.strip()
        if "\\boxed" in stripped:
            label = "incomplete_solution" if step_index < len(expected_steps) else "other_error"
            return OracleVerdict((i,), label)
        match = _STEP_RE.match(stripped)
        if match is None or step_index >= len(expected_steps):
            return OracleVerdict((i,), "unjustified_step")
        expected = expected_steps[step_index]
        left, symbol, operand, result = (int(match.group(1)), match.group(2),
                                         int(match.group(3)), int(match.group(4)))
        if left != expected.left or _OP_OF_SYMBOL[symbol] != expected.operation or operand != expected.operand:
            return OracleVerdict((i,), "misread_problem")
        if result != _apply(expected.operation, left, operand):
            return OracleVerdict((i,), "arithmetic_slip")
        step_index += 1
    return OracleVerdict((len(lines) - 1,), "incomplete_solution")


def first_error_correction(reference_solution: str, response: str) -> tuple[int, str] | None:
    """Where an incorrect toy rollout first departs from the correct chain, and what the correct chain
    writes from there: (char offset into ``response``, the correct text from that offset on, to the
    end of that line). None when there is no such point (a correct prefix that simply stops).

    The line is the oracle's error line (every line before it is a correct step, so the expected line
    is the next reference step, or the boxed answer after the last one); the offset is its first
    character that differs from the expected line. The teacher check (trace/train/teacher_gap.py)
    compares teacher and student on the correct token there.
    """
    expected_steps = reference_steps(reference_solution)
    if not expected_steps:
        return None
    line_index = oracle_spans(reference_solution, response, is_correct=False).lines[0]
    lines = response.split("\n")
    expected = (expected_steps[line_index].line() if line_index < len(expected_steps)
                else f"\\boxed{{{expected_steps[-1].result}}}")
    written = lines[line_index]
    if written == expected:
        return None
    k = next((i for i, (a, b) in enumerate(zip(written, expected)) if a != b), min(len(written), len(expected)))
    line_start = sum(len(line) + 1 for line in lines[:line_index])
    return line_start + k, expected[k:] + "\n"
