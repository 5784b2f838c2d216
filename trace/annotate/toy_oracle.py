"""The toy world's programmatic annotator: a perfect span oracle behind the same contract.

It writes the reply an ideal annotator would write (key steps of a correct rollout, the first
broken step of an incorrect one, with a type label) and sends it through the very same parsing,
validation, segment→token mapping and coverage cap as every model-backed tier. It stands in for
the strong-API tier (qwen3.5-plus) of the paper: the best annotation available in the toy world.
"""
from __future__ import annotations

import json
from typing import Sequence

from trace.toy.task import oracle_spans

from .backends import AnnotationRequest, LocalReplyAnnotator
from .contract import Segment


def _segments_of_lines(segments: Sequence[Segment], text: str, lines: Sequence[int]) -> list[int]:
    """Indices of the segments that overlap the given lines of ``text``."""
    starts, offset = [], 0
    for line in text.split("\n"):
        starts.append((offset, offset + len(line)))
        offset += len(line) + 1
    ranges = [starts[i] for i in lines if 0 <= i < len(starts)]
    return [s.index for s in segments if any(s.start < end and start < s.end for start, end in ranges)]


def oracle_reply(request: AnnotationRequest, segments: Sequence[Segment]) -> str:
    verdict = oracle_spans(request.reference_solution, request.response_text, bool(request.is_correct))
    marked = _segments_of_lines(segments, request.response_text, verdict.lines)
    field = "key_spans" if request.is_correct else "error_spans"
    return json.dumps({field: [[i + 1, i + 1] for i in marked], "label": verdict.label})


class ToyOracleAnnotator(LocalReplyAnnotator):
    name = "toy_oracle"

    def replies(self, requests: Sequence[AnnotationRequest],
                segmented: Sequence[Sequence[Segment]]) -> list[str | None]:
        return [oracle_reply(request, segments) if segments else None
                for request, segments in zip(requests, segmented)]
