"""The annotation contract: segmentation, prompt, reply parsing, segment->token mask, coverage cap."""
import math
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trace.annotate import (ERROR_LABELS, KEY_LABELS, LABELS, PROMPT_VERSION, ParseStatus, build_annotation_prompt,
                            build_token_mask, cap_coverage, completion_text_and_offsets, label_to_teacher_prefix,
                            parse_annotation, segment_response, spans_to_token_mask)
from trace.annotate.contract import coverage_budget

MULTIBYTE_TEXT = ("<think>\nPremière étape: on pose x = 2, déjà vu.\n中文的第二行 😀 ok 👩‍👩‍👧 fin\n"
                  "Step 3: x² = 4 ✓ done.\n</think>\n\nRéponse: \\boxed{4} 🎉")


@pytest.fixture(scope="module")
def byte_bpe():
    """A real byte-level BPE (GPT-2/Qwen style) trained here on a few strings, wrapped by transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<think>", "</think>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([MULTIBYTE_TEXT, "Step 1: the answer is 42.", "première étape déjà 中文 行"] * 3,
                            trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# ---------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------
def test_segments_are_stripped_lines_with_exact_offsets():
    text = "  First line.\n\n   \nSecond line\twith tab  \nThird"
    segments = segment_response(text)
    assert [s.text for s in segments] == ["First line.", "Second line\twith tab", "Third"]
    assert [s.index for s in segments] == [0, 1, 2]
    assert all(text[s.start:s.end] == s.text for s in segments)
    assert segments[0].start == 2 and segments[2].end == len(text)


def test_inline_step_markers_start_new_segments():
    text = "We set up. Step 1: let x = 2. **Step 2:** square it. See step 3 later."
    assert [s.text for s in segment_response(text)] == [
        "We set up.", "Step 1: let x = 2.", "**Step 2:** square it. See step 3 later."]


def test_think_block_sections_and_tags_outside_segments():
    segments = segment_response(MULTIBYTE_TEXT)
    assert [s.section for s in segments] == ["think", "think", "think", "answer"]
    assert segments[1].text == "中文的第二行 😀 ok 👩‍👩‍👧 fin"
    assert all("<think>" not in s.text and "</think>" not in s.text for s in segments)
    assert all(MULTIBYTE_TEXT[s.start:s.end] == s.text for s in segments)
    # opening tag in the prompt (only </think> generated), and a truncated, unclosed think block
    only_close = segment_response("reasoning here\n</think>\nanswer 5")
    assert [(s.text, s.section) for s in only_close] == [("reasoning here", "think"), ("answer 5", "answer")]
    unclosed = segment_response("<think>\nstill thinking\nand more")
    assert [(s.text, s.section) for s in unclosed] == [("still thinking", "think"), ("and more", "think")]


def test_long_lines_split_at_sentence_ends_and_repacked():
    sentence = "This sentence has exactly forty chars.. "   # 40 chars including the trailing space
    line = sentence * 20 + "最后一句。还有一句！"
    segments = segment_response(line, max_segment_chars=100)
    assert len(segments) > 5
    assert all(len(s.text) <= 100 for s in segments)
    assert all(line[s.start:s.end] == s.text for s in segments)
    assert "".join(s.text.replace(" ", "") for s in segments) == line.replace(" ", "")   # nothing lost
    assert segment_response("   \n\t\n ") == []


# ---------------------------------------------------------------------------------------------
# prompt
# ---------------------------------------------------------------------------------------------
def test_prompt_shows_problem_reference_verdict_and_numbered_segments():
    segments = segment_response("Let x = 2.\nThen x^2 = 4.\nAnswer: 4")
    correct = build_annotation_prompt("Compute x^2 for x = 2.", "x^2 = 4, so 4.", True, segments)
    assert PROMPT_VERSION == "v1"
    assert [m["role"] for m in correct] == ["system", "user"]
    user = correct[1]["content"]
    for needle in ("Compute x^2 for x = 2.", "x^2 = 4, so 4.", "CORRECT", "[1] Let x = 2.", "[2] Then x^2 = 4.",
                   "[3] Answer: 4", '"key_spans"', "1 to 3", "25%"):
        assert needle in user, needle
    assert all(label in user for label in KEY_LABELS) and not any(label in user for label in ERROR_LABELS)

    wrong = build_annotation_prompt("p", "r", False, segments, alpha=0.1)[1]["content"]
    assert "INCORRECT" in wrong and '"error_spans"' in wrong and "10%" in wrong
    assert all(label in wrong for label in ERROR_LABELS) and not any(label in wrong for label in KEY_LABELS)
    with pytest.raises(ValueError):
        build_annotation_prompt("p", "r", True, [])


# ---------------------------------------------------------------------------------------------
# parsing and validation (reply numbering is 1-based; returned spans are 0-based)
# ---------------------------------------------------------------------------------------------
OK, REPAIRED, EMPTY, FAILED = ParseStatus.OK, ParseStatus.REPAIRED, ParseStatus.EMPTY, ParseStatus.FAILED
PARSE_CASES = [
    # reply, is_correct, status, spans, label
    ('{"key_spans": [[2, 3], [5, 5]], "label": "case_split"}', True, OK, ((1, 2), (4, 4)), "case_split"),
    ('{"error_spans": [[4, 4]], "label": "missed_case"}', False, OK, ((3, 3),), "missed_case"),
    ('{"spans": [[1, 1]], "label": "sign_error"}', False, OK, ((0, 0),), "sign_error"),
    ('```json\n{"key_spans": [[2, 3]], "label": "key_insight"}\n```', True, REPAIRED, ((1, 2),), "key_insight"),
    ('{"key_spans": [[2, 3],], "label": "key_insight",}', True, REPAIRED, ((1, 2),), "key_insight"),
    ("{'key_spans': [[2, 3]], 'label': 'key_insight'}", True, REPAIRED, ((1, 2),), "key_insight"),
    ('Here is my annotation: {"key_spans": [[2, 3]], "label": "key_insight"} Hope it helps!', True, REPAIRED,
     ((1, 2),), "key_insight"),
    ('<think>the error is in step {4}...</think>{"error_spans": [[4, 4]], "label": "arithmetic_slip"}', False, OK,
     ((3, 3),), "arithmetic_slip"),
    ('{"annotation": {"key_spans": [[2, 3]], "label": "key_insight"}}', True, REPAIRED, ((1, 2),), "key_insight"),
    ('{{ {"key_spans": [[1, 1]], "label": "key_insight"} draft } {"key_spans": [[2, 3]], "label": "key_insight"}',
     True, REPAIRED, ((1, 2),), "key_insight"),                                     # the last object wins
    ('{"key_spans": [["2", "3"]], "label": "key_insight"}', True, REPAIRED, ((1, 2),), "key_insight"),
    ('{"key_spans": [[2.0, 3.0]], "label": "key_insight"}', True, REPAIRED, ((1, 2),), "key_insight"),
    ('{"key_spans": [2, [5, 6]], "label": "key_insight"}', True, REPAIRED, ((1, 1), (4, 5)), "key_insight"),
    ('{"key_spans": [2, 5, 7], "label": "key_insight"}', True, REPAIRED, ((1, 1), (4, 4), (6, 6)), "key_insight"),
    ('{"key_spans": [2, 3], "label": "key_insight"}', True, REPAIRED, ((1, 2),), "key_insight"),   # bare pair
    ('{"key_spans": "2-3, 6", "label": "key_insight"}', True, REPAIRED, ((1, 2), (5, 5)), "key_insight"),
    ('{"key_spans": [{"start": 2, "end": 3}], "label": "key_insight"}', True, REPAIRED, ((1, 2),), "key_insight"),
    ('{"key_spans": [[3, 2]], "label": "key_insight"}', True, REPAIRED, ((1, 2),), "key_insight"),
    ('{"key_spans": [[1, 2], [2, 4], [6, 6]], "label": "key_insight"}', True, OK, ((0, 3), (5, 5)), "key_insight"),
    ('{"key_spans": [[5, 99]], "label": "key_insight"}', True, REPAIRED, ((4, 7),), "key_insight"),   # clipped
    ('{"key_spans": [[0, 0], [3, 3]], "label": "key_insight"}', True, REPAIRED, ((2, 2),), "key_insight"),
    ('{"key_spans": [[-3, -1], [50, 60], [3, 3]], "label": "Key Insight"}', True, REPAIRED, ((2, 2),),
     "key_insight"),
    ('{"error_spans": [[2, 2]], "label": "MISSED-CASE"}', False, REPAIRED, ((1, 1),), "missed_case"),
    ('{"error_spans": [[2, 2]], "label": "missed cases"}', False, REPAIRED, ((1, 1),), "missed_case"),  # near miss
    ('{"error_spans": [[2, 2]], "label": "bad vibes"}', False, REPAIRED, ((1, 1),), "other_error"),     # unknown
    ('{"key_spans": [[2, 2]]}', True, REPAIRED, ((1, 1),), "other_key_step"),                            # no label
    ('{"key_spans": [], "label": "key_insight"}', True, EMPTY, (), "key_insight"),
    ('{"error_spans": [], "label": "other_error"}', False, EMPTY, (), "other_error"),
    # failures
    ('{"error_spans": [[2, 2]], "label": "missed_case"}', True, FAILED, (), None),      # error spans, correct
    ('{"key_spans": [[2, 2]], "label": "key_insight"}', False, FAILED, (), None),       # key spans, incorrect
    ('{"spans": [[2, 2]], "label": "missed_case"}', True, FAILED, (), None),            # error label, correct
    ('{"spans": [[2, 2]], "label": "case_split"}', False, FAILED, (), None),            # key label, incorrect
    ('{"key_spans": [[20, 30]], "label": "key_insight"}', True, FAILED, (), None),      # nothing in range
    ('{"key_spans": [[true, "x"]], "label": "key_insight"}', True, FAILED, (), None),
    ('{"key_spans": 7.5, "label": "key_insight"}', True, FAILED, (), None),
    ('{"label": "key_insight"}', True, FAILED, (), None),
    ('I think segments 2-3 are key.', True, FAILED, (), None),
    ('{"key_spans": [[2, 3]], "label": "key_ins', True, FAILED, (), None),              # truncated
    ("", True, FAILED, (), None),
]


@pytest.mark.parametrize("reply,is_correct,status,spans,label", PARSE_CASES)
def test_parse_annotation_cases(reply, is_correct, status, spans, label):
    result = parse_annotation(reply, 8, is_correct)
    assert (result.status, result.spans, result.label) == (status, spans, label), result
    assert (result.status is REPAIRED) == bool(result.repairs) or result.status in (EMPTY, FAILED)
    if status is FAILED:
        assert result.reason and result.reason_code in {"invalid", "unparseable"}


def test_parse_reports_reasons_and_repairs():
    failed = parse_annotation('{"key_spans": [[2, 2]], "label": "key_insight"}', 8, is_correct=False)
    assert failed.reason == "invalid: key_spans given for an incorrect rollout"
    wrong_label = parse_annotation('{"spans": [[2, 2]], "label": "sign_error"}', 8, True)
    assert wrong_label.reason == "invalid: label 'sign_error' is an error label but the rollout is correct"
    fixed = parse_annotation("```json\n{'key_spans': [[3, 2]], 'label': 'Case-Split'}\n```", 8, True)
    assert fixed.status is REPAIRED and fixed.spans == ((1, 2),) and fixed.label == "case_split"
    assert {"removed markdown code fence", "reversed span"} <= set(fixed.repairs)
    assert parse_annotation(None, 8, True).reason_code == "unparseable"
    assert parse_annotation('{"key_spans": [[1, 1]], "label": "key_insight"}', 0, True).status is FAILED


# ---------------------------------------------------------------------------------------------
# segments -> token mask (exact on multi-byte text)
# ---------------------------------------------------------------------------------------------
def _char_oracle(segments, spans, offsets):
    """Brute force: a token is marked iff one of its characters lies in a marked segment."""
    marked_chars = {c for a, b in spans for seg in segments[a:b + 1] for c in range(seg.start, seg.end)}
    return [any(c in marked_chars for c in range(s, e)) for s, e in offsets]


def test_token_mask_exact_on_multibyte_text(byte_bpe):
    segments = segment_response(MULTIBYTE_TEXT)
    enc = byte_bpe(MULTIBYTE_TEXT, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert len(ids) > len(MULTIBYTE_TEXT) // 4   # a real subword split, not one token per line
    for spans in [((1, 1),), ((0, 0), (3, 3)), ((0, 3),), ((2, 2),), ()]:
        mask = spans_to_token_mask(segments, spans, offsets)
        assert mask == _char_oracle(segments, spans, offsets)
    # The marked tokens of the 中文/emoji line decode to exactly that line (each emoji's bytes are
    # spread over several tokens that all share the emoji's char range, so all are marked).
    mask = spans_to_token_mask(segments, ((1, 1),), offsets)
    assert byte_bpe.decode([i for i, m in zip(ids, mask) if m]) == "中文的第二行 😀 ok 👩‍👩‍👧 fin"
    assert byte_bpe.decode([i for i, m in zip(ids, mask) if not m]).count("😀") == 0
    # the special tokens <think> / </think> belong to no segment
    think_ids = set(byte_bpe.convert_tokens_to_ids(["<think>", "</think>"]))
    all_marked = spans_to_token_mask(segments, ((0, 3),), offsets)
    assert not any(m for i, m in zip(ids, all_marked) if i in think_ids)
    assert spans_to_token_mask(segments, ((0, 0),), [(0, 0), (9, 9), (9, 10)]) == [False, False, True]
    with pytest.raises(ValueError):
        spans_to_token_mask(segments, ((2, 9),), offsets)


def test_offsets_of_generated_ids_fast_and_noncanonical_paths(byte_bpe):
    canonical = byte_bpe(MULTIBYTE_TEXT, add_special_tokens=False)["input_ids"]
    text, offsets = completion_text_and_offsets(byte_bpe, canonical)
    assert text == MULTIBYTE_TEXT and len(offsets) == len(canonical)

    # A sampler can emit a non-canonical split: here every character is its own token sequence,
    # so re-encoding the text would NOT give these ids back and the slow exact path is used.
    body = MULTIBYTE_TEXT[len("<think>"):]
    odd_ids = byte_bpe.convert_tokens_to_ids(["<think>"]) + [
        i for ch in body for i in byte_bpe(ch, add_special_tokens=False)["input_ids"]]
    assert byte_bpe(byte_bpe.decode(odd_ids), add_special_tokens=False)["input_ids"] != odd_ids
    text, offsets = completion_text_and_offsets(byte_bpe, odd_ids)
    assert text == byte_bpe.decode(odd_ids) == MULTIBYTE_TEXT
    assert len(offsets) == len(odd_ids) and offsets[0] == (0, len("<think>")) and offsets[-1][1] == len(text)
    for token_id, (start, end) in zip(odd_ids, offsets):
        piece = byte_bpe.decode([token_id])
        if "\ufffd" not in piece:                 # whole characters: the range is exactly its text
            assert text[start:end] == piece
        else:                                     # a byte fragment: the range is its whole character
            assert end - start == 1 and ord(text[start]) > 0x7F
    segments = segment_response(text)
    mask = spans_to_token_mask(segments, ((1, 1),), offsets)
    assert byte_bpe.decode([i for i, m in zip(odd_ids, mask) if m]) == segments[1].text


# ---------------------------------------------------------------------------------------------
# coverage cap
# ---------------------------------------------------------------------------------------------
def test_cap_never_exceeds_alpha_and_keeps_earliest_tokens():
    rng = random.Random(0)
    for _ in range(3000):
        n = rng.randint(0, 300)
        density = rng.random()
        mask = [rng.random() < density for _ in range(n)]
        alpha = rng.choice([0.0, 0.1, 0.25, 0.29, 0.5, 1.0, rng.random()])
        capped = cap_coverage(mask, alpha)
        kept = sum(capped)
        assert len(capped) == n and kept <= math.floor(alpha * n + 1e-9) and kept <= alpha * n + 1e-9
        assert all(m for m, c in zip(mask, capped) if c)                    # subset of the marked tokens
        marked_positions = [i for i, m in enumerate(mask) if m]
        assert [i for i, c in enumerate(capped) if c] == marked_positions[:kept]   # the earliest ones
        assert kept == min(len(marked_positions), coverage_budget(n, alpha))


def test_cap_budget_is_exact_floor_and_span_is_cut():
    assert coverage_budget(100, 0.29) == 29 and coverage_budget(8, 0.25) == 2 and coverage_budget(7, 0.25) == 1
    assert cap_coverage([True] * 100, 0.29).count(True) == 29
    mask = [False, True, True, False, True, True, True, False]       # two spans, 5 tokens, budget 2
    assert cap_coverage(mask, 0.25) == [False, True, True, False, False, False, False, False]
    with pytest.raises(ValueError):
        cap_coverage(mask, 1.5)
    segments = segment_response("a b c d\ne f g h")
    built = build_token_mask(segments, ((0, 1),), [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13),
                                                   (14, 15)], alpha=0.25)
    assert built.mask == [True, True] + [False] * 6 and built.capped and built.marked_before_cap == 8


# ---------------------------------------------------------------------------------------------
# teacher prefix
# ---------------------------------------------------------------------------------------------
def test_teacher_prefix_carries_label_and_description_only():
    prefix = label_to_teacher_prefix("missed_case")
    assert "missed case" in prefix and ERROR_LABELS["missed_case"] in prefix and "pitfall" in prefix
    key_prefix = label_to_teacher_prefix("case_split")
    assert "case split" in key_prefix and KEY_LABELS["case_split"] in key_prefix and "decisive" in key_prefix
    assert not any(ch.isdigit() for ch in prefix + key_prefix)          # no segment numbers / positions
    assert len({label_to_teacher_prefix(label) for label in LABELS}) == len(LABELS)
    with pytest.raises(ValueError):
        label_to_teacher_prefix("made_up")
