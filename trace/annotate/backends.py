"""Annotator interface and the pipeline shared by every backend.

    annotator.annotate([AnnotationRequest, ...]) -> [AnnotationResult, ...]   (same order)

``PromptedAnnotator`` does everything except producing the chat replies: segmentation, prompt,
cache look-up, de-duplication, parsing, validation, token mask, coverage cap and counters.
A backend only implements ``_complete(conversations) -> [Completion]``:
  * ``CallableAnnotator``: any ``generate(list_of_message_lists) -> list_of_replies`` function
    (online self-annotation, a frozen local model, the static initial student);
  * ``HttpAnnotator`` (http.py): an OpenAI-compatible chat-completions server (strong API tier,
    or a served frozen model).

Failure policy: an annotator fault of any kind (backend exception, HTTP error after retries,
timeout, unparseable or invalid reply, cache I/O error) yields a result with no spans and status
``failed``, is counted in ``AnnotationStats`` and is never raised: the rollout trains with plain
GRPO. Malformed REQUESTS (a caller bug, e.g. offsets outside the text) raise ValueError up front.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Protocol, Sequence

from .cache import CachedReply, ReplyCache, cache_key
from .contract import (DEFAULT_ALPHA, MAX_SEGMENT_CHARS, PROMPT_VERSION, ParseResult, ParseStatus, Segment, SpanStatus,
                       build_annotation_prompt, build_token_mask, label_to_teacher_prefix, parse_annotation,
                       segment_response)

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class AnnotationRequest:
    """One graded rollout. ``token_offsets`` (optional) are the char ranges of the completion
    tokens in ``response_text`` (see offsets.completion_text_and_offsets); with them the result
    carries the capped per-token mask."""
    problem: str
    reference_solution: str
    response_text: str
    is_correct: bool
    token_offsets: Sequence[tuple[int, int]] | None = None


@dataclass(frozen=True)
class Completion:
    """One chat reply produced by a backend, or the reason there is none."""
    text: str | None
    error: str | None = None          # "<code>: <detail>", e.g. "http_500: ..." or "timeout: ..."
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    http_requests: int = 0
    retries: int = 0


@dataclass(frozen=True)
class AnnotationResult(SpanStatus):
    status: ParseStatus
    spans: tuple[tuple[int, int], ...]      # 0-based inclusive segment ranges (empty unless ok/repaired)
    label: str | None
    is_correct: bool
    segments: tuple[Segment, ...]
    token_mask: list[bool] | None           # capped mask over the completion tokens; None without offsets
    capped: bool                            # the coverage cap removed tokens
    reason: str | None                      # "<code>: <detail>" for failed / empty
    repairs: tuple[str, ...]
    raw_reply: str | None
    latency_s: float
    from_cache: bool

    @property
    def span_kind(self) -> str | None:
        """"key" (correct rollout, FKL branch) or "error" (incorrect rollout, RKL branch)."""
        return None if not self.has_spans else ("key" if self.is_correct else "error")

    @property
    def teacher_prefix(self) -> str | None:
        """The teacher's private context, or None when the rollout has no spans (plain GRPO)."""
        return label_to_teacher_prefix(self.label) if self.has_spans and self.label else None


@dataclass
class AnnotationStats:
    """Counters the trainer logs per step (``last_call_stats``) and per run (``stats``)."""
    requested: int = 0
    annotated: int = 0          # got spans (ok + repaired)
    repaired: int = 0
    empty: int = 0
    failed: int = 0
    capped: int = 0
    cache_hits: int = 0
    backend_prompts: int = 0    # prompts sent to the backend (after the cache and de-duplication)
    http_requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0      # billed annotator tokens (cache hits cost none)
    completion_tokens: int = 0
    latency_s_sum: float = 0.0  # over backend calls
    latency_s_max: float = 0.0
    wall_s: float = 0.0         # over annotate() calls
    span_tokens: int = 0        # marked completion tokens after the cap ...
    response_tokens: int = 0    # ... out of this many (requests with offsets only)
    failure_reasons: collections.Counter = field(default_factory=collections.Counter)
    labels: collections.Counter = field(default_factory=collections.Counter)

    def merge(self, other: AnnotationStats) -> None:
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "latency_s_max":
                setattr(self, f.name, max(mine, theirs))
            elif isinstance(mine, collections.Counter):
                mine.update(theirs)
            else:
                setattr(self, f.name, mine + theirs)

    def as_dict(self, prefix: str = "annotator/") -> dict[str, float]:
        """Flat numbers for a metrics logger, with rates and per-reason / per-label counts."""
        out: dict[str, float] = {f"{prefix}{f.name}": getattr(self, f.name) for f in fields(self)
                                 if not isinstance(getattr(self, f.name), collections.Counter)}
        out[f"{prefix}failure_rate"] = self.failed / self.requested if self.requested else 0.0
        out[f"{prefix}annotated_rate"] = self.annotated / self.requested if self.requested else 0.0
        out[f"{prefix}span_coverage"] = self.span_tokens / self.response_tokens if self.response_tokens else 0.0
        out[f"{prefix}latency_s_mean"] = self.latency_s_sum / self.backend_prompts if self.backend_prompts else 0.0
        out.update({f"{prefix}failed/{code}": n for code, n in self.failure_reasons.items()})
        out.update({f"{prefix}label/{label}": n for label, n in self.labels.items()})
        return out


class Annotator(Protocol):
    stats: AnnotationStats
    last_call_stats: AnnotationStats

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[AnnotationResult]: ...


def _check_request(i: int, request: AnnotationRequest) -> None:
    if not isinstance(request, AnnotationRequest):
        raise ValueError(f"request {i} is a {type(request).__name__}, not an AnnotationRequest")
    for name in ("problem", "reference_solution", "response_text"):
        if not isinstance(getattr(request, name), str):
            raise ValueError(f"request {i}: {name} must be str, got {type(getattr(request, name)).__name__}")
    if request.is_correct not in (True, False):
        raise ValueError(f"request {i}: is_correct must be a binary verdict, got {request.is_correct!r}")
    if request.token_offsets is not None:
        n_chars = len(request.response_text)
        for t, (start, end) in enumerate(request.token_offsets):
            if not 0 <= start <= end <= n_chars:
                raise ValueError(f"request {i}: token {t} offset ({start}, {end}) is not inside the "
                                 f"{n_chars}-char response text; offsets must index response_text itself")


class PromptedAnnotator:
    """The shared pipeline; subclasses implement ``_complete``.

    ``model_identity`` (model name + sampling parameters) keys the reply cache; it is required
    when a cache is given, so that replies of different annotators never mix.
    """

    name = "prompted"  # shown in log lines

    def __init__(self, *, alpha: float = DEFAULT_ALPHA, cache: ReplyCache | None = None,
                 model_identity: Mapping[str, Any] | None = None, max_segment_chars: int = MAX_SEGMENT_CHARS):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if cache is not None and not model_identity:
            raise ValueError("a reply cache needs a model_identity (model name + sampling parameters)")
        self.alpha = alpha
        self.cache = cache
        self.model_identity = dict(model_identity or {})
        self.max_segment_chars = max_segment_chars
        self.stats = AnnotationStats()
        self.last_call_stats = AnnotationStats()

    # -- backend hooks ---------------------------------------------------------------------
    def _complete(self, conversations: list[Messages]) -> list[Completion]:
        raise NotImplementedError

    def _redact(self, text: str) -> str:
        """Backends holding a secret remove it from any text they hand back (see http.py)."""
        return text

    # -- pipeline ------------------------------------------------------------------------------
    def _begin(self, requests: Sequence[AnnotationRequest]) -> tuple[float, AnnotationStats, list[tuple[Segment, ...]]]:
        """Validate the requests; the call's start time, its counters and each response's segments."""
        started = time.monotonic()
        for i, request in enumerate(requests):
            _check_request(i, request)
        segmented = [tuple(segment_response(r.response_text, self.max_segment_chars)) for r in requests]
        return started, AnnotationStats(requested=len(requests)), segmented

    def _finish(self, call: AnnotationStats, started: float) -> None:
        """Close the call's counters, log failures (those rollouts train with plain GRPO), keep the stats."""
        call.wall_s = time.monotonic() - started
        if call.failed:
            logger.warning("annotator %s: %d/%d rollouts failed and train with plain GRPO (%s)", self.name,
                           call.failed, call.requested,
                           ", ".join(f"{c}: {n}" for c, n in call.failure_reasons.most_common()))
        self.last_call_stats = call
        self.stats.merge(call)

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[AnnotationResult]:
        started, call, segmented = self._begin(requests)
        conversations: dict[str, Messages] = {}   # cache key -> prompt; identical prompts are asked once
        keys: list[str | None] = []
        for request, segments in zip(requests, segmented):
            if not segments:
                keys.append(None)
                continue
            messages = build_annotation_prompt(request.problem, request.reference_solution,
                                               bool(request.is_correct), segments, self.alpha)
            key = cache_key(self.model_identity, PROMPT_VERSION, messages)
            conversations.setdefault(key, messages)
            keys.append(key)

        cached = self._cache_get(list(conversations))
        to_ask = [k for k in conversations if k not in cached]
        fresh = dict(zip(to_ask, self._complete_safely([conversations[k] for k in to_ask])))
        call.backend_prompts = len(fresh)
        for completion in fresh.values():
            call.http_requests += completion.http_requests
            call.retries += completion.retries
            call.prompt_tokens += completion.prompt_tokens
            call.completion_tokens += completion.completion_tokens
            call.latency_s_sum += completion.latency_s
            call.latency_s_max = max(call.latency_s_max, completion.latency_s)
        self._cache_put({k: CachedReply(c.text, c.prompt_tokens, c.completion_tokens)
                         for k, c in fresh.items() if c.error is None and isinstance(c.text, str)})

        results = []
        for request, segments, key in zip(requests, segmented, keys):
            if key is None:
                parsed = ParseResult(ParseStatus.EMPTY, reason="empty: the response has no text to annotate")
                results.append(self._result(request, segments, parsed, None, 0.0, False, call))
            elif key in cached:
                reply = cached[key].text
                parsed = parse_annotation(reply, len(segments), bool(request.is_correct))
                results.append(self._result(request, segments, parsed, reply, 0.0, True, call))
            else:
                completion = fresh[key]
                parsed = (ParseResult(ParseStatus.FAILED, reason=completion.error) if completion.error
                          else parse_annotation(completion.text, len(segments), bool(request.is_correct)))
                results.append(self._result(request, segments, parsed, completion.text,
                                            completion.latency_s, False, call))
        self._finish(call, started)
        return results

    def _result(self, request: AnnotationRequest, segments: tuple[Segment, ...], parsed: ParseResult,
                raw_reply: str | None, latency_s: float, from_cache: bool, call: AnnotationStats) -> AnnotationResult:
        """Build one result and count it."""
        reason = self._redact(parsed.reason) if parsed.reason else None
        reply = self._redact(raw_reply) if isinstance(raw_reply, str) else None
        token_mask, capped = None, False
        if request.token_offsets is not None:
            if parsed.has_spans:
                built = build_token_mask(segments, parsed.spans, request.token_offsets, self.alpha)
                token_mask, capped = built.mask, built.capped
            else:
                token_mask = [False] * len(request.token_offsets)
            call.response_tokens += len(token_mask)
            call.span_tokens += sum(token_mask)
        call.cache_hits += from_cache
        call.capped += capped
        call.annotated += parsed.has_spans
        call.repaired += parsed.status is ParseStatus.REPAIRED
        call.empty += parsed.status is ParseStatus.EMPTY
        if parsed.status is ParseStatus.FAILED:
            call.failed += 1
            call.failure_reasons[parsed.reason_code or "unknown"] += 1
            logger.debug("annotation failed: %s", reason)
        if parsed.has_spans and parsed.label:
            call.labels[parsed.label] += 1
        return AnnotationResult(status=parsed.status, spans=parsed.spans if parsed.has_spans else (),
                                label=parsed.label if parsed.has_spans else None,
                                is_correct=bool(request.is_correct), segments=segments, token_mask=token_mask,
                                capped=capped, reason=reason, repairs=parsed.repairs, raw_reply=reply,
                                latency_s=latency_s, from_cache=from_cache)

    def _complete_safely(self, conversations: list[Messages]) -> list[Completion]:
        if not conversations:
            return []
        try:
            completions = list(self._complete(conversations))
            if len(completions) != len(conversations):
                raise RuntimeError(f"backend returned {len(completions)} replies for {len(conversations)} prompts")
            return completions
        except Exception as exc:  # noqa: BLE001 - an annotator fault must never stop training
            error = f"backend_error: {type(exc).__name__}: {self._redact(str(exc))[:300]}"
            logger.warning("annotator backend raised; %d rollouts fall back to GRPO: %s", len(conversations), error)
            return [Completion(None, error=error)] * len(conversations)

    def _cache_get(self, keys: list[str]) -> dict[str, CachedReply]:
        if self.cache is None or not keys:
            return {}
        try:
            return self.cache.get_many(keys)
        except Exception as exc:  # noqa: BLE001 - a cache fault must never stop training
            logger.warning("annotator cache read failed (%s); asking the backend instead", exc)
            return {}

    def _cache_put(self, entries: dict[str, CachedReply]) -> None:
        if self.cache is None or not entries:
            return
        try:
            skipped = self.cache.put_many(entries, model=str(self.model_identity.get("model", "")))
        except Exception as exc:  # noqa: BLE001 - a cache fault must never stop training
            logger.warning("annotator cache write failed (%s); continuing without caching", exc)
            return
        if skipped:
            logger.warning("annotator cache: %d replies not cached (text not encodable as UTF-8)", skipped)


GenerateFn = Callable[[list[Messages]], Sequence["str | Completion"]]


class CallableAnnotator(PromptedAnnotator):
    """Annotator backed by any batched chat ``generate`` function.

    ``generate(conversations)`` receives one list of chat messages per rollout and returns one
    reply string per conversation (or a ``Completion`` to report token counts). The lead plugs in
    the training policy (online self), a frozen model or the static initial student. The batch
    wall time is split evenly over its replies as their latency. Give a ``cache`` only for a
    FIXED model (frozen / static tiers) and describe it in ``model_identity``; never for the
    online policy, whose replies change as it trains.
    """

    def __init__(self, generate: GenerateFn, **kwargs: Any):
        super().__init__(**kwargs)
        self.generate = generate

    def _complete(self, conversations: list[Messages]) -> list[Completion]:
        started = time.monotonic()
        outputs = list(self.generate(conversations))
        per_reply = (time.monotonic() - started) / max(len(outputs), 1)
        return [out if isinstance(out, Completion) else Completion(text=out, latency_s=per_reply)
                for out in outputs]


class LocalReplyAnnotator(PromptedAnnotator):
    """An annotator that WRITES each reply itself instead of prompting a model for it (the toy
    oracle, the likelihood annotator). Subclasses implement ``replies``; the reply then goes
    through the same parse / validate / segment→token / cap path and counters as every tier.
    A fault while writing replies fails the whole call into GRPO-only; it never stops training.
    """
    name = "local"

    def replies(self, requests: Sequence[AnnotationRequest],
                segmented: Sequence[Sequence[Segment]]) -> list[str | None]:
        """The JSON reply per request (None for a response with no segments)."""
        raise NotImplementedError

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[AnnotationResult]:
        started, call, segmented = self._begin(requests)
        try:
            replies, error = self.replies(requests, segmented), None
        except Exception as exc:  # noqa: BLE001 - an annotator fault must never stop training
            replies, error = [None] * len(requests), f"backend_error: {type(exc).__name__}: {str(exc)[:300]}"
        call.backend_prompts = sum(bool(s) for s in segmented)
        latency = (time.monotonic() - started) / max(call.backend_prompts, 1)
        results = []
        for request, segments, reply in zip(requests, segmented, replies):
            if not segments:
                parsed = ParseResult(ParseStatus.EMPTY, reason="empty: the response has no text to annotate")
            elif error is not None:
                parsed = ParseResult(ParseStatus.FAILED, reason=error)
            else:
                parsed = parse_annotation(reply, len(segments), bool(request.is_correct))
            results.append(self._result(request, segments, parsed, reply, latency if segments else 0.0, False, call))
        call.latency_s_sum = latency * call.backend_prompts
        call.latency_s_max = latency if call.backend_prompts else 0.0
        self._finish(call, started)
        return results
