"""The span-annotation contract: how a rollout is shown to the annotator and how its reply is read.

Pipeline for one rollout (paper §2, step 2):

    segments = segment_response(response_text)
    messages = build_annotation_prompt(problem, reference_solution, is_correct, segments)
    reply    = <any chat model>(messages)
    parsed   = parse_annotation(reply, len(segments), is_correct)
    mask     = cap_coverage(spans_to_token_mask(segments, parsed.spans, token_offsets), alpha)
    prefix   = label_to_teacher_prefix(parsed.label)      # the teacher's private context

Conventions used throughout:
  * Segment numbers SHOWN to the annotator (prompt and reply) are 1-based: "[1]", "[2]", ...
  * Span indices RETURNED by ``parse_annotation`` and consumed by ``spans_to_token_mask`` are
    0-based, inclusive ``(first, last)`` segment indices.
  * Character offsets are Python ``str`` indices (code points), the unit of a fast tokenizer's
    ``offset_mapping``; they are never byte offsets.
"""
from __future__ import annotations

import ast
import bisect
import collections
import difflib
import enum
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Sequence

PROMPT_VERSION = "v1"  # bump whenever the prompt text or the reply format changes (it keys the cache)
DEFAULT_ALPHA = 0.25   # coverage cap |K ∪ E| <= alpha * |y| (paper §2)

# The label vocabulary and the teacher's private prefix live with the prompts (trace/prompting.py).
from trace.prompting import (ERROR_LABELS, FALLBACK_ERROR_LABEL, FALLBACK_KEY_LABEL, KEY_LABELS,  # noqa: E402
                             LABELS, label_to_teacher_prefix)


def labels_for(is_correct: bool) -> dict[str, str]:
    """The labels an annotator may use for a rollout with this verdict."""
    return KEY_LABELS if is_correct else ERROR_LABELS


# ----------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """One numbered unit of a response: ``text == response[start:end]`` (stripped, non-empty)."""
    index: int      # 0-based; shown to the annotator as index + 1
    start: int      # char offset (inclusive)
    end: int        # char offset (exclusive)
    text: str
    section: str    # "think" (inside <think>...</think>) or "answer"


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
MAX_SEGMENT_CHARS = 300
_STEP_MARKER = re.compile(r"(?<=\S)\s+(?=(?:\*\*|__)?Step\s+\d+\s*(?:[:.)]|\*\*))")  # inline "Step k:" starts a segment
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")


def _sections(text: str) -> list[tuple[int, int, str]]:
    """Char ranges of the think block's content and of the answer; the tags themselves are skipped.

    Handles: a full ``<think>...</think>`` block; only ``</think>`` (the opening tag was part of the
    prompt); an unclosed ``<think>`` (a truncated rollout: everything after it is reasoning); none.
    """
    open_at, close_at = text.find(THINK_OPEN), text.find(THINK_CLOSE)
    if close_at != -1 and (open_at == -1 or open_at < close_at):
        think_start = open_at + len(THINK_OPEN) if open_at != -1 else 0
        return [(0, max(open_at, 0), "answer"),              # text before <think> (rare)
                (think_start, close_at, "think"),
                (close_at + len(THINK_CLOSE), len(text), "answer")]
    if open_at != -1:
        return [(0, open_at, "answer"), (open_at + len(THINK_OPEN), len(text), "think")]
    return [(0, len(text), "answer")]


def _split_long(text: str, start: int, end: int, max_chars: int) -> list[tuple[int, int]]:
    """Greedily pack whole sentences of ``text[start:end]`` into pieces of at most ``max_chars``.

    A single sentence longer than ``max_chars`` stays whole (we never cut inside a sentence).
    """
    if end - start <= max_chars:
        return [(start, end)]
    cuts = [start] + [start + m.end() for m in _SENTENCE_END.finditer(text[start:end])] + [end]
    sentences = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    pieces: list[tuple[int, int]] = []
    for a, b in sentences:
        if pieces and b - pieces[-1][0] <= max_chars:
            pieces[-1] = (pieces[-1][0], b)
        else:
            pieces.append((a, b))
    return pieces


def segment_response(text: str, max_segment_chars: int = MAX_SEGMENT_CHARS) -> list[Segment]:
    """Split a response into numbered segments with exact char offsets.

    Rule: (1) the content of a ``<think>`` block and the answer after it are segmented separately
    and the tags belong to no segment; (2) every line is a segment; (3) an inline "Step k:" marker
    starts a new segment; (4) a piece longer than ``max_segment_chars`` is split at sentence ends
    (``.!?`` + whitespace, or ``。！？``) and the sentences are greedily re-packed up to that length;
    (5) each piece is stripped of surrounding whitespace, and whitespace-only pieces are skipped.
    """
    segments: list[Segment] = []
    for sec_start, sec_end, section in _sections(text):
        line_start = sec_start
        while line_start < sec_end:
            newline = text.find("\n", line_start, sec_end)
            line_end = sec_end if newline == -1 else newline
            step_cuts = [line_start + m.end() for m in _STEP_MARKER.finditer(text[line_start:line_end])]
            bounds = [line_start] + step_cuts + [line_end]
            for a, b in zip(bounds, bounds[1:]):
                for p_start, p_end in _split_long(text, a, b, max_segment_chars):
                    piece = text[p_start:p_end]
                    stripped = piece.strip()
                    if stripped:
                        s = p_start + (len(piece) - len(piece.lstrip()))
                        segments.append(Segment(len(segments), s, s + len(stripped), stripped, section))
            line_start = line_end + 1
    return segments


# ----------------------------------------------------------------------------------------------
# Prompt
# ----------------------------------------------------------------------------------------------
SYSTEM_PROMPT = (
    "You are a meticulous grader of mathematical reasoning. You annotate a student's solution "
    "attempt at the level of its numbered segments. Reply with a single JSON object and nothing else."
)


def _format_segments(segments: Sequence[Segment]) -> str:
    lines, section = [], None
    for seg in segments:
        if seg.section != section:
            section = seg.section
            lines.append("(reasoning inside <think>)" if section == "think" else "(final response)")
        lines.append(f"[{seg.index + 1}] {seg.text}")
    return "\n".join(lines)


def build_annotation_prompt(problem: str, reference_solution: str, is_correct: bool,
                            segments: Sequence[Segment], alpha: float = DEFAULT_ALPHA) -> list[dict[str, str]]:
    """Chat messages asking for key spans (correct rollout) or error spans (incorrect rollout) + a label."""
    if not segments:
        raise ValueError("cannot build an annotation prompt for a response with no segments")
    n = len(segments)
    if is_correct:
        verdict = "CORRECT: the final answer matches the reference."
        task = ("Mark the KEY spans: the few decisive reasoning steps that made this solution succeed "
                "(where the crucial idea, setup, case split or computation happens). Do not mark "
                "restatements of the problem, routine algebra or the final answer line unless it is decisive.")
        spans_key = "key_spans"
    else:
        verdict = "INCORRECT: the final answer does not match the reference (or is missing)."
        task = ("Mark the ERROR spans: the root-cause step(s) where the reasoning first goes wrong. "
                "Do not mark later steps that merely carry an earlier error forward.")
        spans_key = "error_spans"
    menu = "\n".join(f"- {name}: {desc}" for name, desc in labels_for(is_correct).items())
    user = (
        f"## Problem\n{problem.strip()}\n\n"
        f"## Reference solution\n{reference_solution.strip()}\n\n"
        f"## Verdict\n{verdict}\n\n"
        f"## Student response, split into {n} numbered segments\n{_format_segments(segments)}\n\n"
        f"## Task\n{task}\n"
        f"A span is an inclusive range [first, last] of segment numbers as shown above (1 to {n}); "
        f"a single segment k is [k, k]. Mark as little as needed: all spans together should cover at "
        f"most {round(alpha * 100)}% of the response.\n"
        f"Then choose the ONE label that best describes the marked step(s):\n{menu}\n\n"
        f"## Output\nReply with exactly one JSON object of this form:\n"
        f'{{"{spans_key}": [[first, last], ...], "label": "<one label from the list>"}}\n'
        f'Use "{spans_key}": [] only if no step can be singled out.'
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------------------------
# Reply parsing
# ----------------------------------------------------------------------------------------------
class ParseStatus(str, enum.Enum):
    OK = "ok"              # strict JSON, valid as is
    REPAIRED = "repaired"  # usable after documented repairs (see ParseResult.repairs)
    EMPTY = "empty"        # a valid reply that marks nothing (or a response with no segments)
    FAILED = "failed"      # unusable: the rollout gets no spans and trains with plain GRPO


class SpanStatus:
    """What a parse (or an annotation built on it) says about spans, from its ``status`` and ``reason``."""
    status: ParseStatus
    reason: str | None

    @property
    def has_spans(self) -> bool:
        return self.status in (ParseStatus.OK, ParseStatus.REPAIRED)

    @property
    def reason_code(self) -> str | None:
        """The failure/empty category, e.g. "timeout", "http_429", "unparseable", "invalid"."""
        return None if self.reason is None else self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class ParseResult(SpanStatus):
    status: ParseStatus
    spans: tuple[tuple[int, int], ...] = ()   # 0-based inclusive segment ranges, sorted, disjoint
    label: str | None = None
    reason: str | None = None                 # "<code>: <detail>" when failed/empty
    repairs: tuple[str, ...] = ()


def _failed(reason: str, repairs: Sequence[str] = ()) -> ParseResult:
    return ParseResult(ParseStatus.FAILED, reason=reason, repairs=tuple(dict.fromkeys(repairs)))


MAX_REPLY_CHARS = 200_000   # longer replies are rejected rather than scanned
MAX_JSON_CANDIDATES = 64    # the LAST this many {...} candidates are tried (bounds replies full of stray braces) ...
REPLY_BUDGET = 300_000      # ... and all scanning + loading of one reply together (see _Budget)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_JSON_LITERALS = {"true": "True", "false": "False", "null": "None"}
_INT_TEXT = re.compile(r"[+-]?\d{1,9}")
# applied to a STRIPPED string: no two adjacent optional whitespace runs, so matching is linear
_RANGE_TEXT = re.compile(r"\[?([+-]?\d{1,9})\s*(?:-|–|—|,|\.\.|to)\s*([+-]?\d{1,9})\]?")
_SPAN_KEYS = {"key_spans": "key", "error_spans": "error", "spans": None}
_SCAN_STOP = re.compile(r"[{}\"']")   # the only characters the brace scanner acts on outside quotes
MAX_LABEL_CHARS = 100       # a longer "label" is not a label (and would make difflib slow)


class _Budget:
    """Work units left for ONE reply, shared by every step that parses it (brace scanning, JSON /
    literal loading, nested searches). Each step costs at most ~its input length, so a reply
    costs O(REPLY_BUDGET) in total, whatever it contains; an exhausted budget fails the reply."""

    def __init__(self, units: int = REPLY_BUDGET):
        self.left = units

    def spend(self, units: int) -> bool:
        self.left -= units
        return self.left >= 0


class _OutOfBudget(Exception):
    pass


def _strip_think_blocks(text: str) -> str:
    """``text`` without ``<think>...</think>`` blocks (non-greedy, like re.sub with .*?), in one pass."""
    pieces, at = [], 0
    while (open_at := text.find(THINK_OPEN, at)) != -1:
        close_at = text.find(THINK_CLOSE, open_at + len(THINK_OPEN))
        if close_at == -1:   # no later <think> can be closed either
            break
        pieces.append(text[at:open_at])
        at = close_at + len(THINK_CLOSE)
    pieces.append(text[at:])
    return "".join(pieces)


def _fenced_blocks(text: str) -> list[str]:
    """Contents of markdown code fences (```json ... ```), in one pass: an opening fence, an
    optional ``json`` info string on its line, then everything up to the next ```."""
    blocks, at = [], 0
    while (open_at := text.find("```", at)) != -1:
        start = open_at + 3
        header_end = text.find("\n", start)
        header = text[start:header_end if header_end != -1 else len(text)]
        if header.strip() in ("", "json", "JSON"):
            start = header_end + 1 if header_end != -1 else len(text)
        else:   # content on the fence line itself: ```{"key_spans": ...}```
            start += len(header) - len(header.lstrip(" \t"))
            if header.lstrip(" \t")[:4] in ("json", "JSON"):
                start += 4
        close_at = text.find("```", start)
        if close_at == -1:
            break
        blocks.append(text[start:close_at])
        at = close_at + 3
    return blocks


def _balanced_objects(text: str, budget: _Budget) -> list[str]:
    """Top-level ``{...}`` substrings, respecting quoted strings ('...' or "..."); an unclosed
    brace is skipped so that a stray '{' in prose does not swallow the real object after it.
    Each character scanned (also on a rescan after an unclosed brace) costs one budget unit; only the
    last MAX_JSON_CANDIDATES objects are kept (a model that drafts and corrects itself ends with its answer)."""
    found, i = collections.deque(maxlen=MAX_JSON_CANDIDATES), text.find("{")
    while i != -1:
        depth, quote, j, end = 0, None, i, None
        while j < len(text):
            if quote:   # jump to the closing quote, honouring backslash escapes
                k = j
                while True:
                    k = text.find(quote, k)
                    if k == -1:
                        break
                    p = k   # an even run of backslashes before the quote escapes nothing
                    while p > j and text[p - 1] == "\\":
                        p -= 1
                    if (k - p) % 2 == 0:
                        break
                    k += 1
                if k == -1:
                    j = len(text)
                    break
                j, quote = k + 1, None
                continue
            m = _SCAN_STOP.search(text, j)
            if m is None:
                j = len(text)
                break
            j, ch = m.start(), m.group()
            if ch in "\"'":
                quote = ch
            elif ch == "{":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    end = j
                    break
            j += 1
        if not budget.spend(j - i + 1):
            raise _OutOfBudget
        if end is not None:
            found.append(text[i:end + 1])
            i = text.find("{", end + 1)
        else:
            i = text.find("{", i + 1)
    return list(found)


def _load_literal(candidate: str, budget: _Budget) -> tuple[Any, str | None]:
    """Parse one JSON-ish value: strict JSON, then JSON without trailing commas, then a Python
    literal (single quotes, True/None). Returns (value or None, name of the repair used or None).
    Costs 3 budget units per character (one per attempt, each linear in the text)."""
    if not budget.spend(3 * len(candidate)):
        raise _OutOfBudget
    attempts = (
        (None, lambda s: json.loads(s)),
        ("removed trailing commas", lambda s: json.loads(_TRAILING_COMMA.sub(r"\1", s))),
        ("read as a Python-style literal (single quotes)",
         lambda s: ast.literal_eval(re.sub(r"\b(true|false|null)\b", lambda m: _JSON_LITERALS[m.group(1)], s))),
    )
    for repair, load in attempts:
        try:
            with warnings.catch_warnings():   # literal_eval warns about odd escapes in model text
                warnings.simplefilter("ignore")
                return load(candidate), repair
        except Exception:  # noqa: BLE001 - any parser error just means "try the next repair"
            continue
    return None, None


def _is_annotation(obj: Any) -> bool:
    return isinstance(obj, dict) and any(_norm_key(k) in _SPAN_KEYS or _norm_key(k) == "label" for k in obj)


def _find_annotation(source: str, budget: _Budget, depth: int = 0) -> tuple[dict | None, str, str | None]:
    """(object, its source text, load repair) for the LAST annotation-like object in ``source``
    (a model that drafts and then corrects itself ends with its answer). An object that does not
    load or lacks the fields is searched for a nested one, e.g. {"annotation": {...}}."""
    for candidate in reversed(_balanced_objects(source, budget)):
        obj, repair = _load_literal(candidate, budget)
        if _is_annotation(obj):
            return obj, candidate, repair
        if depth < 2:
            inner, inner_text, inner_repair = _find_annotation(candidate[1:-1], budget, depth + 1)
            if inner is not None:
                return inner, inner_text, inner_repair
    return None, "", None


def _extract_object(reply: str, budget: _Budget) -> tuple[dict | None, list[str]]:
    """The annotation object in a reply, plus the syntax repairs that were needed to get it."""
    body = _strip_think_blocks(reply)
    if THINK_CLOSE in body:                       # reasoning whose opening tag was in the prompt
        body = body.rsplit(THINK_CLOSE, 1)[1]
    body = body.strip()
    try:
        obj = json.loads(body)
        if _is_annotation(obj):
            return obj, []
    except Exception:  # noqa: BLE001
        pass
    fenced = _fenced_blocks(body)
    sources = [(f, "removed markdown code fence") for f in fenced] + [(body, "ignored text around the JSON object")]
    for source, where in sources:
        obj, text, repair = _find_annotation(source, budget)
        if obj is not None:
            repairs = [] if text.strip() == body else [where]
            return obj, repairs + ([repair] if repair else [])
    return None, []


def _norm_key(key: Any) -> str:
    return re.sub(r"[\s\-]+", "_", str(key).strip().lower())


def _as_int(value: Any) -> int | None:
    """An index given as int, integral float or digit string; None for anything else (bools too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _as_pair(item: Any) -> tuple[tuple[int, int] | None, str | None]:
    """One span item -> (first, last) in prompt numbering, plus the repair used (or None)."""
    single = _as_int(item)
    if single is not None:
        return (single, single), ("single index instead of a [first, last] pair" if isinstance(item, int)
                                  else "index given as text or float")
    if isinstance(item, str):
        m = _RANGE_TEXT.fullmatch(item.strip())
        return ((int(m.group(1)), int(m.group(2))), "span given as text") if m else (None, None)
    as_dict = isinstance(item, dict)
    if as_dict:
        norm = {_norm_key(k): v for k, v in item.items()}
        for a, b in (("start", "end"), ("first", "last"), ("from", "to")):
            if a in norm and b in norm:
                item = [norm[a], norm[b]]
                break
        else:
            return None, None
    if isinstance(item, (list, tuple)) and 1 <= len(item) <= 2:
        ends = [_as_int(v) for v in item]
        if None in ends:
            return None, None
        exact = not as_dict and len(item) == 2 and all(type(v) is int for v in item)
        return (ends[0], ends[-1]), None if exact else "span given as a single-element list, dict, text or float"
    return None, None


def _span_items(value: Any, budget: _Budget) -> tuple[list[Any] | None, list[str]]:
    """The list of span items; a string is read as a JSON/Python list or as "3-5, 7"."""
    repairs = []
    if isinstance(value, str):
        loaded, _ = _load_literal(value, budget)
        repairs.append("spans given as a string")
        value = loaded if isinstance(loaded, (list, tuple)) else [p for p in re.split(r"[;,]", value) if p.strip()]
    if not isinstance(value, (list, tuple)):
        return None, repairs
    value = list(value)
    if len(value) == 2 and all(_as_int(v) is not None for v in value):
        # [3, 5] is read as the single span 3..5 (the common slip of dropping the outer list),
        # not as segments 3 and 5; a longer flat list [3, 5, 8] is read as single segments.
        return [value], repairs + ["bare [first, last] pair wrapped in a list"]
    return value, repairs


def _read_label(raw: Any, is_correct: bool) -> tuple[str | None, str | None, list[str]]:
    """(label, failure reason, repairs). Casing/space/hyphen slips and near-misspellings
    (difflib ratio >= 0.8) are repaired; an unknown label becomes the kind's fallback label
    (``other_key_step`` / ``other_error``) because the spans are still usable; a label of the
    WRONG kind (an error label on a correct rollout or vice versa) fails the whole annotation,
    since it means the annotator disagrees with the verifier."""
    fallback = FALLBACK_KEY_LABEL if is_correct else FALLBACK_ERROR_LABEL
    if not isinstance(raw, str) or not raw.strip():
        return fallback, None, [f"missing label -> {fallback}"]
    if len(raw) > MAX_LABEL_CHARS:
        return fallback, None, [f"unknown label {raw[:40]!r}... -> {fallback}"]
    norm = _norm_key(raw).strip("_'\"`.")
    repairs = [] if norm == raw else [f"normalised label {raw[:40]!r}"]
    if norm not in LABELS:
        close = difflib.get_close_matches(norm, list(LABELS), n=1, cutoff=0.8)
        if not close:
            return fallback, None, [f"unknown label {raw[:40]!r} -> {fallback}"]
        norm, repairs = close[0], [f"label {raw[:40]!r} -> {close[0]}"]
    if (norm in KEY_LABELS) != is_correct:
        kind = "a key" if norm in KEY_LABELS else "an error"
        verdict = "correct" if is_correct else "incorrect"
        return None, f"invalid: label {norm!r} is {kind} label but the rollout is {verdict}", repairs
    return norm, None, repairs


def _merge(spans: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return tuple(merged)


def parse_annotation(reply_text: Any, n_segments: int, is_correct: bool) -> ParseResult:
    """Read an annotator reply; never raises.

    Accepted reply: ``{"key_spans" | "error_spans" | "spans": [[first, last], ...], "label": str}``
    with 1-based inclusive segment numbers as shown in the prompt. Returned spans are 0-based.

    Repairs (-> status ``repaired``): a ``<think>`` block or prose around the object, markdown
    fences, trailing commas, single quotes / Python literals, indices as strings or integral
    floats, a single index instead of a pair, ``{"start", "end"}`` dicts, "3-5" strings, reversed
    pairs, spans partly outside 1..n (clipped) or wholly outside (dropped), label slips (see
    ``_read_label``). Overlapping/adjacent spans are merged silently (same token mask).

    Failures: no JSON object, no spans field, spans of the wrong kind ("key_spans" on an
    incorrect rollout or "error_spans" on a correct one), a label of the wrong kind, or spans given
    but none usable. ``empty``: the reply marks nothing (an explicit empty list).
    """
    try:
        return _parse(reply_text, n_segments, is_correct)
    except _OutOfBudget:
        return _failed(f"unparseable: the reply needs more than {REPLY_BUDGET} parsing steps")
    except Exception as exc:  # noqa: BLE001 - the parser must never take training down
        return _failed(f"parser_error: {type(exc).__name__}")


def _parse(reply_text: Any, n_segments: int, is_correct: bool) -> ParseResult:
    if not isinstance(reply_text, str):
        return _failed(f"unparseable: reply is {type(reply_text).__name__}, not text")
    if len(reply_text) > MAX_REPLY_CHARS:
        return _failed(f"unparseable: reply longer than {MAX_REPLY_CHARS} characters")
    if n_segments < 1:
        return _failed("invalid: the response has no segments")
    budget = _Budget()
    obj, repairs = _extract_object(reply_text, budget)
    if obj is None:
        return _failed("unparseable: no JSON object with a spans or label field")
    fields = {_norm_key(k): v for k, v in obj.items()}

    right_key, wrong_key = ("key_spans", "error_spans") if is_correct else ("error_spans", "key_spans")
    if fields.get(wrong_key):   # marked spans of the wrong kind contradict the verifier
        verdict = "a correct" if is_correct else "an incorrect"
        return _failed(f"invalid: {wrong_key} given for {verdict} rollout", repairs)
    present = [key for key in (right_key, "spans", wrong_key) if key in fields]
    if not present:
        return _failed("invalid: no key_spans/error_spans field", repairs)
    span_value = fields[present[0]]   # an (empty) wrong-kind list only counts as "marks nothing"

    label, label_error, label_repairs = _read_label(fields.get("label"), is_correct)
    repairs += label_repairs
    if label_error:
        return _failed(label_error, repairs)

    items, item_repairs = _span_items(span_value, budget)
    repairs += item_repairs
    if items is None:
        return _failed(f"invalid: spans must be a list, got {type(span_value).__name__}", repairs)

    spans: list[tuple[int, int]] = []
    for item in items:
        pair, repair = _as_pair(item)
        if pair is None:
            repairs.append("dropped a malformed span")
            continue
        if repair:
            repairs.append(repair)
        first, last = pair[0] - 1, pair[1] - 1          # prompt numbering (1-based) -> 0-based
        if first > last:
            first, last = last, first
            repairs.append("reversed span")
        if last < 0 or first >= n_segments:
            repairs.append("dropped an out-of-range span")
            continue
        if first < 0 or last >= n_segments:
            first, last = max(first, 0), min(last, n_segments - 1)
            repairs.append("clipped a span to the segment range")
        spans.append((first, last))

    if not spans:
        if items:
            return _failed(f"invalid: none of the {len(items)} given spans is usable", repairs)
        return ParseResult(ParseStatus.EMPTY, label=label, reason="empty: the annotator marked nothing",
                           repairs=tuple(dict.fromkeys(repairs)))
    status = ParseStatus.REPAIRED if repairs else ParseStatus.OK
    return ParseResult(status, spans=_merge(spans), label=label, repairs=tuple(dict.fromkeys(repairs)))


# ----------------------------------------------------------------------------------------------
# Segments -> tokens, and the coverage cap
# ----------------------------------------------------------------------------------------------
def spans_to_token_mask(segments: Sequence[Segment], span_indices: Sequence[tuple[int, int]],
                        offsets: Sequence[tuple[int, int]]) -> list[bool]:
    """Per-token membership in the marked segments.

    ``offsets[t] = (start, end)`` is the char range of completion token t in the response text
    that was segmented. A token is marked iff its (non-empty) range overlaps a marked segment;
    zero-width tokens (special tokens with (0, 0)) are never marked. Byte-level BPE pieces of one
    multi-byte character share that character's range, so they are marked together.
    """
    marked: set[int] = set()
    for first, last in span_indices:
        if not (0 <= first <= last < len(segments)):
            raise ValueError(f"span ({first}, {last}) is outside segments 0..{len(segments) - 1}")
        marked.update(range(first, last + 1))
    intervals = sorted((segments[i].start, segments[i].end) for i in marked)   # disjoint: segments never overlap
    starts = [a for a, _ in intervals]
    mask = []
    for start, end in offsets:
        if end < start:
            raise ValueError(f"token offset ({start}, {end}) ends before it starts")
        # The last interval starting before `end` is the only candidate for an overlap,
        # because the intervals are disjoint and sorted.
        i = bisect.bisect_left(starts, end) - 1
        mask.append(end > start and i >= 0 and intervals[i][1] > start)
    return mask


def coverage_budget(n_tokens: int, alpha: float) -> int:
    """floor(alpha * n_tokens), computed exactly for decimal alphas (0.29 * 100 is 29, not 28)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return math.floor(Fraction(str(alpha)) * n_tokens)


def cap_coverage(token_mask: Sequence[bool], alpha: float = DEFAULT_ALPHA) -> list[bool]:
    """Keep at most floor(alpha·|y|) marked tokens: the EARLIEST ones, so earlier spans are kept
    whole and the span that crosses the budget is cut there. Earliest-first suits error spans (the
    root cause precedes what it propagates to) and is deterministic."""
    budget = coverage_budget(len(token_mask), alpha)
    capped, kept = [], 0
    for marked in token_mask:
        keep = bool(marked) and kept < budget
        kept += keep
        capped.append(keep)
    return capped


@dataclass(frozen=True)
class TokenMask:
    mask: list[bool] = field(repr=False)
    capped: bool            # True when the cap removed at least one token
    marked_before_cap: int


def build_token_mask(segments: Sequence[Segment], span_indices: Sequence[tuple[int, int]],
                     offsets: Sequence[tuple[int, int]], alpha: float = DEFAULT_ALPHA) -> TokenMask:
    """spans_to_token_mask followed by cap_coverage, reporting whether the cap bit."""
    raw = spans_to_token_mask(segments, span_indices, offsets)
    capped = cap_coverage(raw, alpha)
    n_raw = sum(raw)
    return TokenMask(capped, n_raw > sum(capped), n_raw)
