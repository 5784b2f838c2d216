"""The one answer checker used for BOTH the training reward and the evaluation.

Spec §8 lists "train-time reward and eval grader disagreeing" as a known pitfall, so the
trainer and the evaluator must both call :func:`grade` / :func:`grade_many` from here.

Grading rules
-------------
* Qwen3 Think mode: only the text after the last ``</think>`` is graded. A response with an
  opening ``<think>`` but no closing tag ran out of tokens while thinking: no answer, False.
* ``kind="math"``: the answer is the content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``,
  or ``\\boxed 5``) after the thinking block. A response without a boxed answer grades False:
  the prompt asks for ``\\boxed{}``, and guessing "the last number in the text" would reward
  unformatted output differently at train and eval time. Plain integers (also zero-padded
  ``025`` or ``27.0``) and answers spelled exactly like the gold are settled in-process;
  everything else goes to math-verify (``verify(parse(gold), parse(answer))``, gold first
  as math-verify requires). A ``$...$`` or ``\\text{...}`` wrapper around the whole answer
  is also tried without it. Boxed answers over ``MAX_ANSWER_CHARS`` characters grade False
  without being parsed.
* Equations: ``\\boxed{x = 3}`` answers 3, but only when the left side is a bare variable
  (one letter or a Greek letter, optionally subscripted: ``x``, ``n_1``, ``\\theta``);
  ``4 = 3``, ``1 + 1 = 3``, ``f(x) = 3`` or ``\\text{wrong} = 3`` grade False (math-verify
  would compare only the right-hand side). A gold that is itself an equation is compared
  whole. ``<=``, ``\\geq`` etc. are not equations.
* Numeric tolerance (our decision, math-verify's default): a decimal matches an exact gold
  when both agree after rounding to 6 decimal places, so ``3.1415927`` = ``\\pi`` and
  ``0.333333`` = ``\\frac{1}{3}`` grade True while ``3.14159`` and ``0.3333`` grade False.
  Seven significant digits of a transcendental value are not a lucky guess, and the
  eval sets' golds are integers or exact forms, so this only forgives a model that wrote
  its exact answer as a long decimal.
* ``kind="mc"``: the gold is a letter (A-J). The model's letter comes from the last
  ``\\boxed{X}`` or, failing that, from the last "answer is X" / "Answer: (X)" phrase. A
  box or phrase that names several letters ("A, B, C, D") yields no letter, so False.

Safety: math-verify's own timeout relies on ``signal.alarm`` (main thread only), and some
inputs (``9^{9^{9^{9^9}}}``) spin inside C code where no signal can interrupt them. So
every math-verify call runs in a small pool of worker processes; each item gets a hard
deadline, and a worker that misses it is killed and replaced (the item grades False).
Only math-verify's LaTeX extractor is used: its plain-expression extractor would hand
model text to ``sympy.parse_expr`` (which uses ``eval``).

Environment variables: ``TRACE_VERIFY_WORKERS`` (pool size, default 2) and
``TRACE_VERIFY_TIMEOUT_S`` (per-item deadline in seconds, default 5).
"""
from __future__ import annotations

import atexit
import json
import logging
import multiprocessing.connection
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Sequence

log = logging.getLogger(__name__)

KINDS = ("math", "mc")

# Boxed answers longer than this are not parsed (graded False): no gold answer in the eval
# sets comes close (MATH-500's longest is 53 characters), and huge LaTeX is what makes
# sympy slow or recursive.
MAX_ANSWER_CHARS = 1000

DEFAULT_WORKERS = 2
DEFAULT_TIMEOUT_S = 5.0
# A worker must import sympy + math-verify before it is ready; on a loaded machine that can
# take a while, and it must not eat into the per-item deadline.
WORKER_STARTUP_TIMEOUT_S = 180.0


# ---------------------------------------------------------------------------------------
# Extraction (pure string work, runs in the caller's process)
# ---------------------------------------------------------------------------------------

def answer_region(response: str) -> str | None:
    """The part of a response that may hold the final answer (after the thinking block).

    Returns None when the response opened ``<think>`` and never closed it.
    """
    close = response.rfind("</think>")
    if close >= 0:
        return response[close + len("</think>"):]
    if "<think>" in response:
        return None
    return response


_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character, or a brace


def _braced_content(text: str, open_brace: int) -> str | None:
    """Content between ``text[open_brace] == "{"`` and its matching ``}`` (None if unbalanced).

    Escaped braces (``\\{``, ``\\}``) are literal characters in LaTeX and do not nest.
    """
    depth = 0
    for token in _BRACE_TOKEN.finditer(text, open_brace):
        if token.group() == "{":
            depth += 1
        elif token.group() == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1:token.start()]
    return None


def last_boxed_content(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` in ``text``."""
    last = None
    for last in _BOX_COMMAND.finditer(text):
        pass
    if last is None:
        return None
    rest_start = last.end()
    after = text[rest_start:rest_start + 1]
    if after == "{":
        content = _braced_content(text, rest_start)
    else:
        # "\boxed 5" form: the argument is the next whitespace-delimited token.
        token = re.match(r"\s+([^\s$]+)", text[rest_start:rest_start + MAX_ANSWER_CHARS + 2])
        content = token.group(1).rstrip(".,;") if token else None
    if content is None:
        return None
    content = content.strip()
    return content or None


# Wrappers a model may put around the whole boxed answer: $...$, \(...\), \text{...}.
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TEXT_WRAPPER = re.compile(r"^\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{")


def _strip_math_delimiters(latex: str) -> str:
    latex = latex.strip()
    for opener, closer in _MATH_DELIMITERS:
        if len(latex) > len(opener) + len(closer) and latex.startswith(opener) and latex.endswith(closer):
            return latex[len(opener):-len(closer)].strip()
    return latex


def _unwrap_text(latex: str) -> str | None:
    """``\\text{...}`` wrapping the WHOLE answer -> its inside; else None."""
    match = _TEXT_WRAPPER.match(latex)
    if not match:
        return None
    inside = _braced_content(latex, match.end() - 1)
    if inside is None or len(inside) != len(latex) - match.end() - 1:
        return None  # the wrapper closes before the end: "\text{a} + b"
    return inside.strip()


_WORDS = re.compile(r"^[A-Za-z]{2,}(?: [A-Za-z]+)*$")


def answer_candidates(latex: str) -> list[str]:
    """Spellings of a model's answer to try; a match on any of them counts.

    ``\\text{Evelyn}`` must stay a word while ``\\text{1.25}`` must become a number, so the
    answer is tried as written and without a ``$``/``\\text{}`` wrapper; a bare word
    (``Evelyn``, which LaTeX would read as the product E*v*e*l*y*n) is also tried as
    ``\\text{Evelyn}``. Golds are not rewritten: they come in the datasets' own LaTeX.
    """
    as_written = _strip_math_delimiters(latex).replace("°", "^{\\circ}")  # "90°": math-verify wants ^\circ
    candidates = [as_written]
    inner = _unwrap_text(as_written)
    if inner:
        candidates.append(_strip_math_delimiters(inner))
    if _WORDS.match(candidates[-1]):
        candidates.append("\\text{" + candidates[-1] + "}")
    return list(dict.fromkeys(candidates))


# --- multiple choice ---

_LETTERS = "A-J"
_ONE_LETTER = re.compile(rf"^\(?([{_LETTERS}])\)?\.?$")
# "(C) option text", "C. option text", "C: option text"
_LETTER_THEN_TEXT = re.compile(rf"^\(?([{_LETTERS}])(?:\)|\.|:)\s")
_OPTION_MARKER = re.compile(rf"(?:^|\s)\(?[{_LETTERS}](?:\)|\.|:)(?=\s|$)")
_ANSWER_PHRASE = re.compile(
    r"(?:answer|option|choice)\s*+(?:is|:|would\s+be|should\s+be)?\s*+[:\-]?\s*+(?:option\s*+|choice\s*+)?"
    rf"[*_\s]*+(?:\\text(?:bf)?\{{)?\(?([{_LETTERS}])\)?+\}}?+(?![A-Za-z0-9])"
    # not the first of a list: "answer: A, B or C", "Answer: (A)(B)"
    rf"(?![*_\s]*+(?:(?:,|/|&|\bor\b|\band\b)\s*\(?[{_LETTERS}]|\([{_LETTERS}]\))(?![A-Za-z0-9]))",
    re.IGNORECASE,
)


def _letter_from_box(content: str) -> str | None:
    if len(content) > MAX_ANSWER_CHARS:
        return None
    text = content
    inner = _unwrap_text(_strip_math_delimiters(text))
    text = (inner if inner is not None else _strip_math_delimiters(text)).strip()
    single = _ONE_LETTER.match(text)
    if single:
        return single.group(1)
    with_text = _LETTER_THEN_TEXT.match(text)
    if with_text and len(_OPTION_MARKER.findall(text)) == 1:
        return with_text.group(1)
    return None


def _letter_from_text(text: str) -> str | None:
    last = None
    for match in _ANSWER_PHRASE.finditer(text):
        # The letter must be written in upper case: "the answer is a function" is no answer.
        if match.group(1).isupper():
            last = match
    return last.group(1) if last else None


def _extract_letter(text: str) -> str | None:
    boxed = last_boxed_content(text)
    if boxed is not None:
        return _letter_from_box(boxed)
    return _letter_from_text(text)


def extract_final_answer(response: str, kind: str = "math") -> str | None:
    """The final answer a response commits to, or None if it gives none.

    math: the last boxed content (as written); mc: the chosen letter.
    """
    _check_kind(kind)
    text = answer_region(response)
    if text is None:
        return None
    if kind == "math":
        return last_boxed_content(text)
    return _extract_letter(text)


def answer_key(response: str, kind: str = "math") -> str | None:
    """A response's final answer as a key for comparing a problem's k samples with each other (the
    majority vote of agreement confidence, trace/evaluation/calibration.py), or None if it gives none.

    mc: the letter. math: :func:`extract_final_answer` with a ``$...$`` / ``\\text{...}`` wrapper and all
    whitespace removed, ``<bare variable> = value`` reduced to the value (as the grader does), and a plain
    integer in its shortest form (``025``, ``25.0`` and ``25`` are one key). No math-verify here: equal
    values spelled differently (``\\frac{1}{2}``, ``0.5``) are different keys, so agreement can only be
    understated.
    """
    answer = extract_final_answer(response, kind)
    if answer is None or kind == "mc":
        return answer
    text = _strip_math_delimiters(answer)
    text = _unwrap_text(text) or text
    sides = _PLAIN_EQUALS.split(text)
    if len(sides) == 2 and _BARE_VARIABLE.match(sides[0].strip()) and sides[1].strip():
        text = sides[1]
    integer = _as_plain_integer(text)
    return str(integer) if integer is not None else "".join(text.split())


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}")


# ---------------------------------------------------------------------------------------
# Fast paths that need no sympy: plain integers ("025" == "25", "27.0" == "27") and answers
# spelled exactly like the gold. Besides saving time, they keep such answers correct even
# when a loaded machine would push a long expression past the per-item deadline.
# ---------------------------------------------------------------------------------------

_PLAIN_INTEGER = re.compile(r"^[+-]?\d+(?:\.0*)?$")


def _as_plain_integer(latex: str) -> int | None:
    text = _strip_math_delimiters(latex).replace(" ", "")
    if len(text) > 50 or not _PLAIN_INTEGER.match(text):
        return None
    return int(text.split(".")[0])


# "=" that is not part of <=, >=, !=, :=, ==
_PLAIN_EQUALS = re.compile(r"(?<![<>!:=])=(?!=)")
_GREEK = ("alpha|beta|gamma|delta|epsilon|varepsilon|zeta|eta|theta|vartheta|iota|kappa|lambda|mu|nu|xi|pi|"
          "rho|sigma|tau|upsilon|phi|varphi|chi|psi|omega|Gamma|Delta|Theta|Lambda|Xi|Pi|Sigma|Phi|Psi|Omega")
_BARE_VARIABLE = re.compile(rf"^(?:[A-Za-z]|\\(?:{_GREEK}))(?:_(?:\{{[A-Za-z0-9]+\}}|[A-Za-z0-9]))?$")


def _equation_answer(answer: str, gold: str) -> str | None:
    """The part of ``answer`` to grade: the right side of ``<bare variable> = value``, the
    answer itself when it is no equation (or the gold is one), None for any other equation."""
    if _PLAIN_EQUALS.search(_strip_math_delimiters(gold)):
        return answer
    sides = _PLAIN_EQUALS.split(_strip_math_delimiters(answer))
    if len(sides) == 1:
        return answer
    if len(sides) == 2 and _BARE_VARIABLE.match(sides[0].strip()) and sides[1].strip():
        return sides[1].strip()
    return None


def _same_spelling(gold: str, candidates: list[str]) -> bool:
    gold_key = "".join(_strip_math_delimiters(gold).split())
    return any("".join(candidate.split()) == gold_key for candidate in candidates)


# ---------------------------------------------------------------------------------------
# math-verify, in worker processes
# ---------------------------------------------------------------------------------------
# Workers are plain subprocesses (`python -c ...`) that exchange one JSON line per item over
# stdin/stdout. Unlike multiprocessing's spawn/forkserver, this never re-imports the
# caller's __main__ script, so callers need no `if __name__ == "__main__"` guard, and
# nothing from the caller (CUDA state, locks held by other threads) is inherited.

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "import trace.verify as v; v.worker_loop(int(sys.argv[2]))"
)


def worker_loop(inner_timeout_s: int) -> None:
    """Worker side: read {"id", "gold", "candidates"} lines, answer {"id", "ok"} lines."""
    from functools import lru_cache

    from math_verify import LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its timeouts are expected
    latex_only = [LatexExtractionConfig()]

    def parse_boxed(latex: str) -> list:
        return parse("\\boxed{" + latex + "}", extraction_config=latex_only,
                     parsing_timeout=inner_timeout_s)

    @lru_cache(maxsize=4096)  # the trainer grades G rollouts against the same gold
    def parse_gold(gold: str) -> tuple:
        return tuple(parse_boxed(_strip_math_delimiters(gold)))

    def matches(gold: str, candidates: list[str]) -> bool:
        gold_parsed = list(parse_gold(gold))
        if not gold_parsed:
            return False
        for candidate in candidates:
            answer_parsed = parse_boxed(candidate)
            if answer_parsed and verify(gold_parsed, answer_parsed, timeout_seconds=inner_timeout_s):
                return True
        return False

    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        item = json.loads(line)
        try:
            ok = bool(matches(item["gold"], item["candidates"]))
        except BaseException:  # noqa: BLE001 - any failure (RecursionError, MemoryError...) is a wrong answer
            ok = False
        out.write(json.dumps({"id": item["id"], "ok": ok}) + "\n")
        out.flush()


class _Worker:
    """One verifier subprocess and its pipes."""

    def __init__(self, inner_timeout_s: int):
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, REPO_ROOT, str(inner_timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8",
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.stdout = self.process.stdout
        if not multiprocessing.connection.wait([self.stdout], timeout=WORKER_STARTUP_TIMEOUT_S):
            self.kill()
            raise RuntimeError(
                f"trace.verify: a verifier worker did not start within {WORKER_STARTUP_TIMEOUT_S:.0f} s "
                f"(importing math_verify in `{sys.executable}`)")
        if self.stdout.readline().strip() != "ready":
            self.kill()
            raise RuntimeError(
                f"trace.verify: a verifier worker died on start-up; check that "
                f"`{sys.executable} -c 'import math_verify'` works (its error is printed above)")

    def send(self, item_id: int, gold: str, candidates: list[str]) -> None:
        self.process.stdin.write(json.dumps({"id": item_id, "gold": gold, "candidates": candidates}) + "\n")
        self.process.stdin.flush()

    def receive(self) -> bool:
        """The pending item's result; raises EOFError if the worker died."""
        line = self.stdout.readline()
        if not line:
            raise EOFError("verifier worker exited")
        return bool(json.loads(line)["ok"])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class VerifierPool:
    """A few long-lived worker processes with a hard per-item deadline.

    Thread-safe: concurrent callers are served one batch at a time.
    """

    def __init__(self, n_workers: int, timeout_s: float):
        if n_workers < 1:
            raise ValueError(f"TRACE_VERIFY_WORKERS must be >= 1, got {n_workers}")
        if timeout_s <= 0:
            raise ValueError(f"TRACE_VERIFY_TIMEOUT_S must be > 0, got {timeout_s}")
        self.n_workers = n_workers
        self.timeout_s = timeout_s
        # math-verify's own (signal-based) timeouts let a worker give up on most slow items
        # by itself, which is cheaper than killing and restarting it.
        self.inner_timeout_s = max(1, int(timeout_s / 2))
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.owner_pid = os.getpid()
        self.n_timeouts = 0

    def run(self, tasks: Sequence[tuple[str, list[str]]]) -> list[bool]:
        """Grade (gold, answer candidates) pairs; a task past its deadline grades False."""
        with self._lock:
            while len(self._workers) < min(self.n_workers, len(tasks)):
                self._workers.append(_Worker(self.inner_timeout_s))
            results = [False] * len(tasks)
            queue = deque(range(len(tasks)))
            idle = list(self._workers)
            busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (task index, deadline)
            while queue or busy:
                while queue and idle:
                    worker, task_id = idle.pop(), queue.popleft()
                    gold, candidates = tasks[task_id]
                    try:
                        worker.send(task_id, gold, candidates)
                    except OSError:  # it died while idle (e.g. killed for memory): replace it
                        worker = self._replace(worker)
                        worker.send(task_id, gold, candidates)
                    busy[worker] = (task_id, time.monotonic() + self.timeout_s)
                by_pipe = {worker.stdout: worker for worker in busy}
                wait_s = max(0.0, min(deadline for _, deadline in busy.values()) - time.monotonic())
                for pipe in multiprocessing.connection.wait(list(by_pipe), timeout=wait_s):
                    worker = by_pipe[pipe]
                    task_id, _ = busy.pop(worker)
                    try:
                        results[task_id] = worker.receive()
                        idle.append(worker)
                    except (EOFError, OSError, ValueError):  # died (e.g. out of memory): replace it
                        idle.append(self._replace(worker))
                now = time.monotonic()
                for worker, (task_id, deadline) in list(busy.items()):
                    if now >= deadline:
                        del busy[worker]
                        self.n_timeouts += 1
                        log.warning("trace.verify: item timed out after %.1f s; graded False "
                                    "and the worker was restarted", self.timeout_s)
                        idle.append(self._replace(worker))
            return results

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self.inner_timeout_s)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers = []


_POOL: VerifierPool | None = None
_POOL_GUARD = threading.Lock()


def _env_number(name: str, default: float, cast):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a valid {cast.__name__}") from None


def get_pool() -> VerifierPool:
    """The process-wide verifier pool, created on first use (and again after a fork)."""
    global _POOL
    with _POOL_GUARD:
        if _POOL is None or _POOL.owner_pid != os.getpid():
            _POOL = VerifierPool(
                n_workers=_env_number("TRACE_VERIFY_WORKERS", DEFAULT_WORKERS, int),
                timeout_s=_env_number("TRACE_VERIFY_TIMEOUT_S", DEFAULT_TIMEOUT_S, float),
            )
        return _POOL


def close_pool() -> None:
    """Stop the worker processes (they are also stopped at interpreter exit)."""
    global _POOL
    with _POOL_GUARD:
        if _POOL is not None and _POOL.owner_pid == os.getpid():
            _POOL.close()
        _POOL = None


atexit.register(close_pool)


# ---------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------

def _grade_without_math_verify(response: str, gold: str, kind: str):
    """Grade what needs no sympy. Returns a bool, or the math-verify task (gold, candidates)."""
    _check_kind(kind)
    if not isinstance(response, str) or not isinstance(gold, str):
        raise TypeError(f"grade expects str response and gold, got {type(response).__name__} "
                        f"and {type(gold).__name__}")
    answer = extract_final_answer(response, kind)
    if answer is None:
        return False
    if kind == "mc":
        return answer == gold.strip().strip("()").upper()
    if len(answer) > MAX_ANSWER_CHARS:
        return False
    answer = _equation_answer(answer, gold)
    if answer is None:
        return False
    gold_int, answer_int = _as_plain_integer(gold), _as_plain_integer(answer)
    if gold_int is not None and answer_int is not None:
        return gold_int == answer_int
    candidates = answer_candidates(answer)
    if _same_spelling(gold, candidates):
        return True
    return (gold, candidates)


def grade_many(responses: Sequence[str], golds: Sequence[str], kinds: Sequence[str]) -> list[bool]:
    """Grade a batch; math-verify items are spread over the worker pool."""
    if not (len(responses) == len(golds) == len(kinds)):
        raise ValueError(f"grade_many: lengths differ (responses {len(responses)}, golds {len(golds)}, "
                         f"kinds {len(kinds)})")
    results: list[bool] = [False] * len(responses)
    pending_ids, pending_tasks = [], []
    for i, (response, gold, kind) in enumerate(zip(responses, golds, kinds)):
        outcome = _grade_without_math_verify(response, gold, kind)
        if isinstance(outcome, bool):
            results[i] = outcome
        else:
            pending_ids.append(i)
            pending_tasks.append(outcome)
    if pending_tasks:
        for i, ok in zip(pending_ids, get_pool().run(pending_tasks)):
            results[i] = ok
    return results


def grade(response: str, gold: str, kind: str = "math") -> bool:
    """True iff the response's final answer equals the gold answer (see module docstring)."""
    return grade_many([response], [gold], [kind])[0]
