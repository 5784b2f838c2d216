"""Moved to trace/rollout/ (one module for the trainer and the annotator tiers); kept for old imports."""
from trace.rollout import HFRolloutEngine, RolloutBatch, completion_mask_from_ids  # noqa: F401
