"""Span annotation for TRACE (paper §2, step 2): contract, backends, cache, token offsets.

Typical use per training step::

    results = annotator.annotate([AnnotationRequest(problem, reference, text, is_correct, offsets), ...])
    results[i].token_mask      # capped per-token mask (K for correct, E for incorrect rollouts)
    results[i].teacher_prefix  # private context for the teacher, None -> plain GRPO for that rollout
    annotator.last_call_stats.as_dict()   # counters to log

The annotator tiers of the paper (strong API, online self, frozen larger model, static initial
student) and their toy-world stand-ins are built from a run's config by
``trace.annotate.setup.annotator_for`` (likelihood.py: toy scale; local.py / http.py: prompted).
"""
from .backends import (AnnotationRequest, AnnotationResult, AnnotationStats, Annotator, CallableAnnotator,
                       Completion, PromptedAnnotator)
from .cache import ReplyCache, cache_key
from .contract import (DEFAULT_ALPHA, ERROR_LABELS, KEY_LABELS, LABELS, PROMPT_VERSION, ParseResult, ParseStatus,
                       Segment, build_annotation_prompt, build_token_mask, cap_coverage, label_to_teacher_prefix,
                       labels_for, parse_annotation, segment_response, spans_to_token_mask)
from .http import HttpAnnotator, HttpAnnotatorConfig, MissingApiKeyError
from .offsets import completion_text_and_offsets

__all__ = [
    "AnnotationRequest", "AnnotationResult", "AnnotationStats", "Annotator", "CallableAnnotator", "Completion",
    "PromptedAnnotator", "ReplyCache", "cache_key", "DEFAULT_ALPHA", "ERROR_LABELS", "KEY_LABELS", "LABELS",
    "PROMPT_VERSION", "ParseResult", "ParseStatus", "Segment", "build_annotation_prompt", "build_token_mask",
    "cap_coverage", "label_to_teacher_prefix", "labels_for", "parse_annotation", "segment_response",
    "spans_to_token_mask", "HttpAnnotator", "HttpAnnotatorConfig", "MissingApiKeyError",
    "completion_text_and_offsets",
]
