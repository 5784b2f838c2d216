"""Shared fixtures: a tiny toy world (data, tokenizer, model) built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

TINY_SIZE = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    from trace.toy.world import write_toy_data

    out = tmp_path_factory.mktemp("toy_data")
    write_toy_data({"seed": 0, "n_train": 200, "n_sft_choice": 20, "sft_slip_rate": 0.0, "n_val": 8, "n_test": 8}, out)
    return out


@pytest.fixture(scope="session")
def tiny_base(toy_data, tmp_path_factory) -> Path:
    """A tiny Qwen3 'base' after a few SFT steps: real weights on disk, loaded like any HF model."""
    import torch

    from trace.toy.world import build_toy_base

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny_base")
    build_toy_base({"size": TINY_SIZE, "seed": 0, "thinking": False, "tokenizer_vocab": 400,
                    "sft": {"steps": 300, "batch_size": 16, "lr": 1e-2, "warmup": 2, "weight_decay": 0.0}},
                   toy_data, out)
    return out


QWEN3_TOKENIZER = REPO_ROOT.parent / "shared" / "models" / "qwen3"


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A tiny random Qwen3 (hidden 64, 2 layers, head_dim 32) with the REAL Qwen3 tokenizer and chat
    template, whose turns end (trace/tiny_qwen3.py): the paper-scale path (vLLM, 151,936-token
    vocabulary) on CPU."""
    from trace.tiny_qwen3 import build_tiny_qwen3

    if not (QWEN3_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"the real Qwen3 tokenizer is not at {QWEN3_TOKENIZER}")
    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), QWEN3_TOKENIZER)


def write_finished_base(folder: Path, config_name: str = "config.Qwen3-1.7B.json") -> Path:
    """A base-model folder as the base_model job leaves it, without 3.4 GB of weights: the real Qwen3
    config (a minimal one without ../shared) and an empty weights file, which the planning check requires."""
    folder.mkdir(parents=True, exist_ok=True)
    real = QWEN3_TOKENIZER / config_name
    (folder / "config.json").write_text(real.read_text() if real.exists() else '{"model_type": "qwen3"}')
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def write_teacher_checks(root: Path, model: str, contexts=("label",)) -> None:
    """The teacher_gap job's outputs for one base (a training run waits for them), as if it had run."""
    for context in contexts:
        folder = root / "results" / "teacher_gap" / model
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{context}.json").write_text("{}")
        (folder / f"{context}.probe.pt").write_bytes(b"")
