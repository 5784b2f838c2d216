"""The annotator a run uses, from its ``annotator`` config (the tier is a config choice)."""
from __future__ import annotations

from pathlib import Path

from trace.methods import get_method

from .factory import build_annotator
from .toy_oracle import ToyOracleAnnotator

TIERS = ("toy_oracle", "api")


def annotator_for(cfg: dict, base_model: Path):
    """None for methods that route without annotations; otherwise the configured tier."""
    if not get_method(cfg["method"]).needs_annotation:
        return None
    ann = dict(cfg.get("annotator") or {})
    tier = ann.pop("tier", "toy_oracle")
    if tier == "toy_oracle":
        return ToyOracleAnnotator(alpha=cfg["kl"]["alpha"])
    if tier == "api":
        return build_annotator({"backend": "http", "alpha": cfg["kl"]["alpha"], **ann})
    raise ValueError(f"unknown annotator tier {tier!r} (config key annotator.tier); choose from {TIERS}")
