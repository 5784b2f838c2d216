"""Process set-up shared by every torch-using entry point (``python -m trace <stage>``, the bench)."""
from __future__ import annotations

import os


def threads_from_env() -> None:
    """Few threads and passive waiting: two processes sharing 2 cores otherwise slow down ~30x."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(int(os.environ.get("TRACE_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))))


def skip_sklearn_in_transformers() -> None:
    """transformers' generation utilities import scikit-learn (4 s of a job's ~15 s start-up on this
    CPU) only to tune assisted decoding's draft threshold, which no rollout or evaluation here uses.
    Declaring it absent to transformers leaves scikit-learn importable for anyone else (lm-eval)."""
    import transformers.utils

    transformers.utils.is_sklearn_available = lambda: False
