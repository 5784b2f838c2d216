"""TRACE reproduction: token-routed self on-policy distillation on top of GRPO.

This package shares its name with the stdlib module ``trace``; always run from the
repository root (``python -m trace ...``) so that this package wins on ``sys.path``.
"""

__version__ = "0.1.0"
IS_TRACE_REPRO = True  # tests/test_package_name.py checks this to catch the stdlib shadowing
