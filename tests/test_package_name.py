"""Fails loudly when `import trace` resolves to the stdlib module instead of this project."""
import pathlib

import trace

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_trace_is_this_project():
    assert getattr(trace, "IS_TRACE_REPRO", False), (
        f"`import trace` resolved to {getattr(trace, '__file__', '?')} (the stdlib module?). "
        "Run from the repository root with the repo first on sys.path."
    )
    assert pathlib.Path(trace.__file__).resolve().parent == REPO_ROOT / "trace"
