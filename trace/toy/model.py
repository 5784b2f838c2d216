"""A tiny Qwen3-architecture model and a locally trained tokenizer for the toy world.

Both are saved as ordinary Hugging Face folders (``save_pretrained``) so every later stage —
SFT, RL, lm-eval — loads them exactly like it would load ``Qwen/Qwen3-8B``, offline.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from trace.settings import ToySize

# Qwen3's chat markup, reduced to what the toy world uses; `enable_thinking=False` emits the
# empty think block exactly like Qwen3's own template, so think-tag handling is exercised.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def train_tokenizer(corpus: list[str], vocab_size: int, out_dir: Path):
    """Byte-level BPE with single-digit splitting (as Qwen's tokenizer), saved as a HF folder."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
                                     model_max_length=1024, padding_side="left")
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def build_model(tokenizer, size: ToySize, seed: int, out_dir: Path | None = None):
    """A randomly initialised Qwen3ForCausalLM; ``size`` holds hidden/layers/heads (config.yaml); the
    head width is hidden_size / num_heads unless ``head_dim`` is given (vLLM on CPU needs >= 32)."""
    size = ToySize.from_mapping(size)  # a mapping (tests) is checked and typed here
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        head_dim=size.head_dim or size.hidden_size // size.num_heads,
        max_position_embeddings=size.max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    if out_dir is not None:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model
