"""The annotator a run uses, from its ``annotator`` config: the paper's annotator tiers (Table 3).

    annotator:
      tier: toy_oracle | api | self | frozen | static
      mode: likelihood | prompted        # self / frozen / static only
      model: <folder>                    # frozen only (local model); or http: {...} for a served one
      http: {base_url, model, api_key_env, ...}   # api (required), frozen without a model folder
      cache_dir: <dir> | null            # reply cache: api, and frozen / static in prompted mode
      batch_size: 64                     # rollouts per forward (likelihood) / per generate call (prompted)
      likelihood: {context, error_threshold, key_threshold}      # mode: likelihood (likelihood.py)
      prompted: {max_new_tokens, do_sample, thinking}            # mode: prompted (local.py)

Tiers, at real scale (paper) and in the toy world:
    api        strong API (qwen3.5-plus) through an OpenAI-compatible server (http.py).
    toy_oracle the toy world's perfect programmatic annotator; the toy stand-in for ``api``.
    self       online self-annotation: the LIVE training policy (the same object, so it follows
               every update). prompted: the policy is prompted through the rollout engine; never
               cached. likelihood: its own likelihoods (likelihood.py).
    static     a frozen copy of the initial student, loaded from the base model folder (also when
               a run resumes from a checkpoint).
    frozen     a fixed model: a local folder (``annotator.model``; paper: Qwen3-32B, toy study:
               the toy-large base when training toy-small) or, prompted, a served endpoint
               (``annotator.http``).
Every tier goes through the same parse / validate / segment→token / α-cap pipeline and the
same ``AnnotationStats`` (the trainer logs them per step as ``annotator/*``).
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from trace.methods import get_method
from trace.rollout import build_engine
from trace.settings import AnnotatorServer, TrainRun

from .cache import ReplyCache
from .http import HttpAnnotator, HttpAnnotatorConfig
from .toy_oracle import ToyOracleAnnotator

TIERS = ("toy_oracle", "api", "self", "frozen", "static")
MODES = ("likelihood", "prompted")
MODEL_TIERS = ("self", "frozen", "static")


def _device(settings: TrainRun):
    import torch

    wanted = settings.device
    return torch.device(wanted if wanted != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def _http_annotator(ann, common: dict):
    """A model behind an OpenAI-compatible server (the api tier, or a served frozen model)."""
    return HttpAnnotator(HttpAnnotatorConfig.from_mapping(ann.http), cache=ReplyCache(ann.cache_dir) if ann.cache_dir else None,
                         **common)


def annotator_for(settings: TrainRun, base_model: Path, policy=None, tokenizer=None, engine=None):
    """None for methods that route without annotations; otherwise the configured tier (``settings.annotator``).

    ``policy`` (and optionally its ``tokenizer``) is the live training policy, required by the
    self tier; the Trainer passes it, and its rollout ``engine``, through which the prompted self
    tier decodes. Static and frozen annotators load their own frozen copy; with
    ``train.rollout.engine: vllm`` (prompted) the static tier gets its own frozen vLLM engine and
    the frozen tier a vLLM server started for ``annotator.model`` (trace/rollout/server.py).
    """
    settings = TrainRun.from_mapping(settings)
    if not get_method(settings.method).needs_annotation:
        return None
    ann = settings.annotator
    tier, mode = ann.tier, ann.mode
    common: dict[str, Any] = {"alpha": settings.kl.alpha}
    if ann.max_segment_chars is not None:
        common["max_segment_chars"] = int(ann.max_segment_chars)

    if tier == "toy_oracle":
        return ToyOracleAnnotator(**common)
    if tier == "api":
        if not ann.http:
            raise ValueError("annotator.tier 'api' needs annotator.http (base_url, model, api_key_env)")
        return _http_annotator(ann, common)
    batch_size = ann.batch_size  # checked (>= 1) by the schema
    if tier == "self" and ann.cache_dir:
        raise ValueError("annotator.cache_dir must be null for the self tier: the live policy's replies change "
                         "as it trains")

    # the annotator network and where it comes from
    source = None
    vllm = settings.rollout.engine == "vllm"
    if tier == "self":
        if policy is None:
            raise ValueError("annotator.tier 'self' annotates with the live training policy: pass policy= "
                             "(the Trainer does this when it builds the annotator)")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = policy
    elif tier == "frozen" and not ann.model:
        if mode == "prompted" and ann.http:
            return _http_annotator(ann, common)
        raise ValueError("annotator.tier 'frozen' needs annotator.model (a local model folder, e.g. the toy-large "
                         "base or Qwen3-32B)" + ("" if mode == "likelihood" else " or annotator.http (a served model)"))
    elif mode == "prompted" and vllm:
        from transformers import AutoTokenizer

        # decoded by vLLM (its own engine, or a server): no Hugging Face copy in the training process
        source = Path(ann.model) if tier == "frozen" else Path(base_model)
        model, tokenizer = None, AutoTokenizer.from_pretrained(source)
    else:
        from .local import load_frozen_model

        source = Path(ann.model) if tier == "frozen" else Path(base_model)
        device = next(policy.parameters()).device if policy is not None else _device(settings)
        model, tokenizer = load_frozen_model(source, device, settings.dtype)

    name = f"{tier}:{source or 'policy'}"
    if mode == "likelihood":
        from .likelihood import LikelihoodAnnotator

        return LikelihoodAnnotator(model, tokenizer, batch_size=batch_size, thinking=settings.thinking, name=name,
                                   **dataclasses.asdict(ann.likelihood), **common)

    from .backends import CallableAnnotator
    from .local import ChatGenerate, weights_fingerprint

    prompted = dataclasses.asdict(ann.prompted)
    if prompted["thinking"] is None:
        prompted["thinking"] = settings.thinking
    identity = None
    if ann.cache_dir:
        identity = {"model": str(source), "weights": weights_fingerprint(source), "tier": tier, **prompted}
        if prompted["do_sample"]:
            sampling = settings.sampling
            identity["sampling"] = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                    "top_k": sampling.top_k}
    cache = ReplyCache(ann.cache_dir) if identity else None
    if tier == "frozen" and vllm:
        return _served_annotator(settings, source, prompted, identity, cache, common)
    if tier == "static" and vllm:   # a frozen copy: its own engine on the base folder, never synced
        engine = build_engine(settings, tokenizer, source, Path(tempfile.mkdtemp(prefix="trace_vllm_")))
    elif tier != "self":
        engine = None               # a Hugging Face engine on the frozen model
    generate = ChatGenerate(model, tokenizer, engine=engine, batch_size=batch_size,
                            sampling=settings.sampling.as_dict(), **prompted)
    return CallableAnnotator(generate, cache=cache, model_identity=identity, **common)


def _served_annotator(settings: TrainRun, source: Path, prompted: dict, identity, cache, common: dict):
    """The frozen tier at scale: a vLLM server for ``annotator.model`` that this job starts (and
    stops with the annotator), asked through the HTTP backend with the prompted tier's decoding."""
    from trace.rollout.server import VLLMServer

    sampling = settings.sampling
    decoding = (dict(temperature=sampling.temperature, top_p=sampling.top_p) if prompted["do_sample"]
                else dict(temperature=0.0))
    extra = {"chat_template_kwargs": {"enable_thinking": prompted["thinking"]}}
    if prompted["do_sample"] and sampling.top_k:
        extra["top_k"] = sampling.top_k
    server_settings = settings.rollout.annotator_server or AnnotatorServer.from_mapping({})
    server = VLLMServer(source, server_settings, settings.dtype, Path(tempfile.mkdtemp(prefix="trace_vllm_server_")),
                        seed=settings.seed)
    http = {**(settings.annotator.http or {}), "base_url": server.base_url, "model": server.name,
            "max_tokens": prompted["max_new_tokens"], "extra_body": extra, **decoding}
    annotator = HttpAnnotator(HttpAnnotatorConfig.from_mapping(http), cache=cache,
                              model_identity=identity or {"model": str(source), "tier": "frozen", **prompted}, **common)
    annotator.server = server  # lives, and is stopped, with its annotator (or at exit)
    return annotator
