"""Build an annotator from the ``annotator:`` section of a run config.

    annotator:
      backend: http                 # http (OpenAI-compatible server) | generate (a Python function)
      alpha: 0.25                   # coverage cap
      cache_dir: results/cache/annotator   # optional; replies are reused on reruns
      http:                         # backend: http only (see HttpAnnotatorConfig)
        base_url: https://.../v1
        model: qwen3.5-plus
        api_key_env: DASHSCOPE_API_KEY
      model_identity: {...}         # backend: generate + cache_dir only: names the fixed model

For ``backend: generate`` the caller passes the ``generate`` function (online self, frozen model,
static initial student); the online policy must not be cached.
"""
from __future__ import annotations

from typing import Any, Mapping

from .backends import Annotator, CallableAnnotator, GenerateFn
from .cache import ReplyCache
from .contract import DEFAULT_ALPHA, MAX_SEGMENT_CHARS
from .http import HttpAnnotator, HttpAnnotatorConfig

_KNOWN = {"backend", "alpha", "cache_dir", "max_segment_chars", "http", "model_identity"}


def build_annotator(config: Mapping[str, Any], generate: GenerateFn | None = None) -> Annotator:
    unknown = sorted(set(config) - _KNOWN)
    if unknown:
        raise ValueError(f"unknown annotator settings {unknown}; known: {sorted(_KNOWN)}")
    common = dict(alpha=float(config.get("alpha", DEFAULT_ALPHA)),
                  max_segment_chars=int(config.get("max_segment_chars", MAX_SEGMENT_CHARS)),
                  cache=ReplyCache(config["cache_dir"]) if config.get("cache_dir") else None)
    backend = config.get("backend")
    if backend == "http":
        if generate is not None:
            raise ValueError("backend 'http' takes no generate function")
        return HttpAnnotator(HttpAnnotatorConfig.from_mapping(config.get("http") or {}), **common)
    if backend == "generate":
        if generate is None:
            raise ValueError("backend 'generate' needs the generate function")
        return CallableAnnotator(generate, model_identity=config.get("model_identity"), **common)
    raise ValueError(f"annotator backend must be 'http' or 'generate', got {backend!r}")
