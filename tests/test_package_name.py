"""Fails loudly when `import trace` resolves to the stdlib module instead of this project."""
import os
import pathlib
import subprocess
import sys

import pytest

import trace

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_trace_is_this_project():
    assert getattr(trace, "IS_TRACE_REPRO", False), (
        f"`import trace` resolved to {getattr(trace, '__file__', '?')} (the stdlib module?). "
        "Run from the repository root with the repo first on sys.path."
    )
    assert pathlib.Path(trace.__file__).resolve().parent == REPO_ROOT / "trace"


@pytest.mark.slow  # a fresh Python that imports torch and transformers
def test_job_start_up_skips_scikit_learn_but_generation_still_works():
    """Every torch stage declares scikit-learn absent to transformers (4 s of each job's start-up);
    HF generation must still import and run, and scikit-learn stays importable for lm-eval."""
    code = (
        "import sys\n"
        "from trace.runtime import skip_sklearn_in_transformers\n"
        "skip_sklearn_in_transformers()\n"
        "import torch, transformers\n"
        "from transformers.generation.utils import GenerationMixin\n"
        "assert 'sklearn' not in sys.modules, 'transformers imported scikit-learn'\n"
        "config = transformers.Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8)\n"
        "model = transformers.Qwen3ForCausalLM(config).eval()\n"
        "out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=True, pad_token_id=0)\n"
        "assert out.shape == (1, 7), out.shape\n"
        "import sklearn.metrics\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
