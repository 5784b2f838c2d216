"""A tiny, randomly initialised Qwen3 with the REAL Qwen3 tokenizer and chat template.

For CPU smoke runs and tests of the paper-scale path (vLLM rollouts, the real 151,936-entry
vocabulary, Qwen3's chat markup): the architecture and every config value are Qwen3-1.7B's
(../shared/models/qwen3/config.Qwen3-1.7B.json: tied embeddings, RoPE θ, RMSNorm ε), only the sizes
shrink. It cannot do maths; it samples random but well-formed token streams.

    build_tiny_qwen3(out_dir)      # tests/conftest.py fixture ``tiny_qwen3``

Sizes: hidden 64, 2 layers, 4 query / 2 KV heads, head_dim 32 (9.8M parameters, almost all in the
embedding). head_dim must be ≥ 32: vLLM's CPU attention rejects 16 ("Unsupported CPU attention
configuration"; ../shared/notes/vllm-cpu.md).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

QWEN3_DIR = Path(__file__).resolve().parents[2] / "shared" / "models" / "qwen3"
TEMPLATE_CONFIG = "config.Qwen3-1.7B.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json")
DEFAULT_SIZE = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096}


def build_tiny_qwen3(out_dir: Path | str, qwen3_dir: Path | str = QWEN3_DIR, seed: int = 0,
                     end_of_turn_margin: float | None = 6.0, **size) -> Path:
    """Write a Hugging Face folder (config, fp32 safetensors, tokenizer files) to ``out_dir``.

    ``end_of_turn_margin``: see ``make_turns_end`` (None: leave the random weights as they are; a
    random model then never ends its turn: p(eos) ≈ 1/151,936 per token).
    """
    qwen3_dir, out_dir = Path(qwen3_dir), Path(out_dir)
    missing = [f for f in (TEMPLATE_CONFIG, *TOKENIZER_FILES) if not (qwen3_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"the Qwen3 tokenizer/config folder {qwen3_dir} lacks {missing} "
                                "(see ../shared/models/qwen3/PROVENANCE.md)")
    unknown = sorted(set(size) - set(DEFAULT_SIZE))
    if unknown:
        raise ValueError(f"unknown tiny-qwen3 sizes {unknown}; known: {sorted(DEFAULT_SIZE)}")
    model, model_config = random_qwen3(qwen3_dir / TEMPLATE_CONFIG, {**DEFAULT_SIZE, **size}, seed)
    if end_of_turn_margin is not None:
        make_turns_end(model, model_config["eos_token_id"], end_of_turn_margin)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    copy_tokenizer(qwen3_dir, out_dir)
    return out_dir


def random_qwen3(template_config: Path | str, size: dict, seed: int):
    """A randomly initialised fp32 Qwen3ForCausalLM: every value of a real Qwen3 config but ``size``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model_config = json.loads(Path(template_config).read_text())
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype"):
        model_config.pop(key, None)
    model_config.update(size, max_window_layers=size.get("num_hidden_layers", model_config["num_hidden_layers"]))
    if model_config["head_dim"] < 32:
        raise ValueError(f"head_dim {model_config['head_dim']} < 32: vLLM's CPU attention needs head_dim >= 32")
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**model_config)).float(), model_config


def copy_tokenizer(qwen3_dir: Path | str, out_dir: Path | str) -> None:
    """The real tokenizer + chat template, and Qwen3's published sampling defaults."""
    for name in TOKENIZER_FILES:
        if (Path(qwen3_dir) / name).exists():
            shutil.copyfile(Path(qwen3_dir) / name, Path(out_dir) / name)


def make_turns_end(model, eos_id: int, margin: float) -> None:
    """Make a random model end its turns: <|im_end|>'s logit ≈ every other token's + ``margin``.

    Every hidden state gets one constant coordinate (0): all embeddings hold 1.0 there and no layer
    writes to it, so after the final RMSNorm it is ≈ √d·w₀ (the other coordinates are ~0.02).
    The tied output row of <|im_end|> holds 1 + margin/(√d·w₀) there, every other row 1.0, which
    shifts all logits equally except the end-of-turn token's. At temperature T each token ends the
    turn with probability ≈ e^(margin/T) / (e^(margin/T) + 151,936): margin 6 at T 0.6 gives ≈ 0.13,
    i.e. replies of a few to a few dozen tokens, some cut at max_new_tokens.
    """
    import math

    import torch

    with torch.no_grad():
        embed = model.get_input_embeddings().weight      # tied with the output layer (Qwen3-1.7B's config)
        embed[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        scale = math.sqrt(model.config.hidden_size) * float(model.model.norm.weight[0])
        embed[eos_id, 0] = 1.0 + margin / scale
