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

from pathlib import Path
from typing import Any, Mapping

from trace.methods import get_method
from trace.rollout import rollout_settings

from .factory import build_annotator
from .toy_oracle import ToyOracleAnnotator

TIERS = ("toy_oracle", "api", "self", "frozen", "static")
MODES = ("likelihood", "prompted")
MODEL_TIERS = ("self", "frozen", "static")
KEYS = {"tier", "mode", "model", "http", "cache_dir", "batch_size", "likelihood", "prompted", "max_segment_chars"}
LIKELIHOOD_KEYS = {"context", "error_threshold", "key_threshold"}
PROMPTED_KEYS = {"max_new_tokens", "do_sample", "thinking"}


def _device(cfg: Mapping[str, Any]):
    import torch

    wanted = cfg.get("device", "auto")
    return torch.device(wanted if wanted != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def _section(ann: Mapping[str, Any], name: str, known: set[str]) -> dict:
    section = ann.get(name) or {}
    if not isinstance(section, Mapping):
        raise ValueError(f"annotator.{name} must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown} in annotator.{name}; known: {sorted(known)}")
    return dict(section)


def _http_annotator(ann: dict, common: dict):
    """A model behind an OpenAI-compatible server (the api tier, or a served frozen model)."""
    return build_annotator({"backend": "http", **common, "cache_dir": ann.get("cache_dir"), "http": ann["http"]})


def annotator_for(cfg: dict, base_model: Path, policy=None, tokenizer=None, engine=None):
    """None for methods that route without annotations; otherwise the configured tier.

    ``policy`` (and optionally its ``tokenizer``) is the live training policy, required by the
    self tier; the Trainer passes it, and its rollout ``engine``, through which the prompted self
    tier decodes. Static and frozen annotators load their own frozen copy; with
    ``train.rollout.engine: vllm`` (prompted) the static tier gets its own frozen vLLM engine and
    the frozen tier a vLLM server started for ``annotator.model`` (trace/rollout/server.py).
    """
    if not get_method(cfg["method"]).needs_annotation:
        return None
    ann = dict(cfg.get("annotator") or {})
    unknown = sorted(set(ann) - KEYS)
    if unknown:
        raise ValueError(f"unknown annotator settings {unknown} (config keys annotator.*); known: {sorted(KEYS)}")
    tier = ann.get("tier") or "toy_oracle"
    alpha = cfg["kl"]["alpha"]
    common: dict[str, Any] = {"alpha": alpha}
    if ann.get("max_segment_chars") is not None:
        common["max_segment_chars"] = int(ann["max_segment_chars"])

    if tier == "toy_oracle":
        return ToyOracleAnnotator(**common)
    if tier == "api":
        if not ann.get("http"):
            raise ValueError("annotator.tier 'api' needs annotator.http (base_url, model, api_key_env)")
        return _http_annotator(ann, common)
    if tier not in MODEL_TIERS:
        raise ValueError(f"unknown annotator tier {tier!r} (config key annotator.tier); choose from {TIERS}")

    mode = ann.get("mode") or "likelihood"
    if mode not in MODES:
        raise ValueError(f"unknown annotator mode {mode!r} (config key annotator.mode); choose from {MODES}")
    batch_size = int(ann.get("batch_size") or 64)  # checked (>= 1) by the annotator it is passed to
    if tier == "self" and ann.get("cache_dir"):
        raise ValueError("annotator.cache_dir must be null for the self tier: the live policy's replies change "
                         "as it trains")

    # the annotator network and where it comes from
    source = None
    vllm = rollout_settings(cfg)["engine"] == "vllm"
    if tier == "self":
        if policy is None:
            raise ValueError("annotator.tier 'self' annotates with the live training policy: pass policy= "
                             "(the Trainer does this when it builds the annotator)")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = policy
    elif tier == "frozen" and not ann.get("model"):
        if mode == "prompted" and ann.get("http"):
            return _http_annotator(ann, common)
        raise ValueError("annotator.tier 'frozen' needs annotator.model (a local model folder, e.g. the toy-large "
                         "base or Qwen3-32B)" + ("" if mode == "likelihood" else " or annotator.http (a served model)"))
    elif mode == "prompted" and vllm:
        from transformers import AutoTokenizer

        # decoded by vLLM (its own engine, or a server): no Hugging Face copy in the training process
        source = Path(ann["model"]) if tier == "frozen" else Path(base_model)
        model, tokenizer = None, AutoTokenizer.from_pretrained(source)
    else:
        from .local import load_frozen_model

        source = Path(ann["model"]) if tier == "frozen" else Path(base_model)
        device = next(policy.parameters()).device if policy is not None else _device(cfg)
        model, tokenizer = load_frozen_model(source, device, cfg.get("dtype", "float32"))

    thinking = bool(cfg.get("thinking", False))
    name = f"{tier}:{source or 'policy'}"
    if mode == "likelihood":
        from .likelihood import LikelihoodAnnotator

        settings = _section(ann, "likelihood", LIKELIHOOD_KEYS)
        return LikelihoodAnnotator(model, tokenizer, batch_size=batch_size, thinking=thinking, name=name,
                                   **settings, **common)

    from .backends import CallableAnnotator
    from .cache import ReplyCache
    from .local import ChatGenerate, weights_fingerprint

    settings = _section(ann, "prompted", PROMPTED_KEYS)
    settings.setdefault("max_new_tokens", 512)
    settings.setdefault("do_sample", False)
    settings.setdefault("thinking", thinking)
    identity = None
    if ann.get("cache_dir"):
        identity = {"model": str(source), "weights": weights_fingerprint(source), "tier": tier, **settings}
        if settings["do_sample"]:
            identity["sampling"] = {k: cfg["sampling"][k] for k in ("temperature", "top_p", "top_k")}
    cache = ReplyCache(ann["cache_dir"]) if identity else None
    if tier == "frozen" and vllm:
        return _served_annotator(cfg, ann, source, settings, identity, cache, common)
    if tier == "static" and vllm:   # a frozen copy: its own engine on the base folder, never synced
        import tempfile

        from trace.rollout import build_engine

        engine = build_engine(cfg, tokenizer, source, Path(tempfile.mkdtemp(prefix="trace_vllm_")))
    elif tier != "self":
        engine = None               # a Hugging Face engine on the frozen model
    generate = ChatGenerate(model, tokenizer, engine=engine, batch_size=batch_size, sampling=cfg.get("sampling"),
                            **settings)
    return CallableAnnotator(generate, cache=cache, model_identity=identity, **common)


def _served_annotator(cfg: dict, ann: dict, source: Path, settings: dict, identity, cache, common: dict):
    """The frozen tier at scale: a vLLM server for ``annotator.model`` that this job starts (and
    stops with the annotator), asked through the HTTP backend with the prompted tier's decoding."""
    import tempfile

    from trace.rollout.server import VLLMServer, server_settings

    from .http import HttpAnnotator, HttpAnnotatorConfig

    sampling = cfg["sampling"]
    decoding = (dict(temperature=sampling["temperature"], top_p=sampling["top_p"]) if settings["do_sample"]
                else dict(temperature=0.0))
    extra = {"chat_template_kwargs": {"enable_thinking": settings["thinking"]}}
    if settings["do_sample"] and sampling.get("top_k"):
        extra["top_k"] = sampling["top_k"]
    server = VLLMServer(source, server_settings(rollout_settings(cfg)["annotator_server"], cfg.get("dtype", "float32")),
                        Path(tempfile.mkdtemp(prefix="trace_vllm_server_")), seed=int(cfg.get("seed", 0)))
    http = {**(ann.get("http") or {}), "base_url": server.base_url, "model": server.name,
            "max_tokens": settings["max_new_tokens"], "extra_body": extra, **decoding}
    annotator = HttpAnnotator(HttpAnnotatorConfig.from_mapping(http), cache=cache,
                              model_identity=identity or {"model": str(source), "tier": "frozen", **settings}, **common)
    annotator.server = server  # lives, and is stopped, with its annotator (or at exit)
    return annotator
