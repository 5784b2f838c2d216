"""Char offsets of GENERATED completion tokens, for mapping annotated segments onto them.

The student's rollout is a list of sampled token ids. Its text is ``decode(ids)``, but re-encoding
that text does not always give back the same ids (a sampler may emit a non-canonical split), so
a plain ``tokenizer(text, return_offsets_mapping=True)`` can be misaligned with the ids that the
loss is computed on. ``completion_text_and_offsets`` returns a text and one char range per GIVEN
id: exact re-encoding when it round-trips (the fast, common case), else incremental decoding.
"""
from __future__ import annotations

from typing import Any, Sequence


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def completion_text_and_offsets(tokenizer: Any, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """(text, offsets) for the completion ``token_ids`` of a Hugging Face tokenizer.

    Segment and annotate exactly the returned text. Pass the completion ids only (no prompt, no
    padding); a trailing EOS such as ``<|im_end|>`` decodes to literal text, so drop it first and
    give it mask value False. Tokens that carry only part of a multi-byte character share that
    character's range (as a fast tokenizer's offset_mapping does).
    """
    ids = [int(i) for i in token_ids]
    text = _decode(tokenizer, ids)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) == ids:
        return text, [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    return _incremental_offsets(tokenizer, ids)


def _incremental_offsets(tokenizer: Any, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Streaming detokenization (as in vLLM/TGI): decode a short window of already-emitted context
    plus the new token and take the text that appears after the context. Tokens that only add
    an incomplete character (the decode ends in U+FFFD) wait and share the range of the text that
    completes it. Two short decodes per token: about a second for 30k tokens."""
    parts: list[str] = []
    offsets: list[tuple[int, int]] = []
    length, context_start, emitted_until = 0, 0, 0

    def emit(until: int, force: bool) -> bool:
        nonlocal length, context_start, emitted_until
        context = _decode(tokenizer, ids[context_start:emitted_until])
        full = _decode(tokenizer, ids[context_start:until])
        if not force and (len(full) <= len(context) or full.endswith("\ufffd")):
            return False
        delta = full[len(context):]
        offsets.extend([(length, length + len(delta))] * (until - emitted_until))
        parts.append(delta)
        length += len(delta)
        context_start, emitted_until = emitted_until, until
        return True

    for i in range(len(ids)):
        emit(i + 1, force=False)
    if emitted_until < len(ids):   # trailing tokens that never completed a character
        emit(len(ids), force=True)
    return "".join(parts), offsets
