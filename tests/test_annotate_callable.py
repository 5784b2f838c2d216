"""The shared annotation pipeline through the generate-function backend (online self / frozen / static tiers)."""
import threading

import pytest

from trace.annotate import (AnnotationRequest, CallableAnnotator, Completion, HttpAnnotator, ParseStatus, ReplyCache,
                            label_to_teacher_prefix)
from trace.annotate.cache import CachedReply

RESPONSE = "Let n be even.\nCase 1: n = 0 gives 0.\nCase 2: n > 0 gives 2n.\nSo the answer is 7.\nDone."


def _offsets_per_word(text):
    """Whitespace-separated words as 'tokens' (char ranges into text)."""
    offsets, i = [], 0
    for word in text.split():
        start = text.index(word, i)
        offsets.append((start, start + len(word)))
        i = start + len(word)
    return offsets


class ScriptedGenerate:
    """A stand-in chat model: replies depend on the verdict shown in the prompt; records every call."""

    def __init__(self, correct_reply, incorrect_reply):
        self.replies = {True: correct_reply, False: incorrect_reply}
        self.calls = []

    def __call__(self, conversations):
        self.calls.append(conversations)
        return [self.replies["## Verdict\nCORRECT" in c[1]["content"]] for c in conversations]


def _request(is_correct, problem="Find the sum.", text=RESPONSE, offsets=True):
    return AnnotationRequest(problem, "The answer is 7.", text, is_correct,
                             _offsets_per_word(text) if offsets else None)


def test_results_masks_prefix_and_stats():
    generate = ScriptedGenerate('{"key_spans": [[2, 3]], "label": "case_split"}',
                                '```json\n{"error_spans": [[4, 4]], "label": "Missed Case"}\n```')
    annotator = CallableAnnotator(generate, alpha=0.25)
    right, wrong = annotator.annotate([_request(True), _request(False, problem="Other problem.")])

    assert len(generate.calls) == 1 and len(generate.calls[0]) == 2          # one batched call
    assert (right.status, right.spans, right.label, right.span_kind) == (ParseStatus.OK, ((1, 2),), "case_split", "key")
    assert right.teacher_prefix == label_to_teacher_prefix("case_split")
    words = RESPONSE.split()                                                   # 24 "tokens", budget 6
    assert [w for w, m in zip(words, right.token_mask) if m] == ["Case", "1:", "n", "=", "0", "gives"]
    assert right.capped and sum(right.token_mask) == 6
    assert (wrong.status, wrong.spans, wrong.label, wrong.span_kind) == (ParseStatus.REPAIRED, ((3, 3),),
                                                                          "missed_case", "error")
    assert [w for w, m in zip(words, wrong.token_mask) if m] == ["So", "the", "answer", "is", "7."]
    assert not wrong.capped and wrong.segments[3].text == "So the answer is 7."

    stats = annotator.last_call_stats
    assert (stats.requested, stats.annotated, stats.repaired, stats.failed, stats.capped) == (2, 2, 1, 0, 1)
    assert (stats.span_tokens, stats.response_tokens, stats.backend_prompts) == (11, 48, 2)
    logged = stats.as_dict()
    assert logged["annotator/span_coverage"] == pytest.approx(11 / 48)
    assert logged["annotator/label/case_split"] == 1 and logged["annotator/failure_rate"] == 0.0
    annotator.annotate([_request(True)])
    assert annotator.stats.requested == 3 and annotator.last_call_stats.requested == 1


def test_backend_faults_never_raise_and_fall_back_to_grpo():
    def exploding(conversations):
        raise RuntimeError("CUDA out of memory")

    annotator = CallableAnnotator(exploding)
    results = annotator.annotate([_request(True), _request(False)])
    assert all(r.status is ParseStatus.FAILED and not r.spans and r.teacher_prefix is None for r in results)
    assert all(r.token_mask == [False] * 24 for r in results)
    assert results[0].reason.startswith("backend_error: RuntimeError: CUDA out of memory")
    assert annotator.last_call_stats.failure_reasons == {"backend_error": 2}

    too_few = CallableAnnotator(lambda conversations: ["{}"])
    assert [r.reason_code for r in too_few.annotate([_request(True), _request(False)])] == ["backend_error"] * 2

    odd = CallableAnnotator(lambda conversations: [None, 'no json here'])
    results = odd.annotate([_request(True), _request(False)])
    assert [r.reason_code for r in results] == ["unparseable", "unparseable"]
    assert odd.last_call_stats.failed == 2 and odd.last_call_stats.as_dict()["annotator/failure_rate"] == 1.0


def test_duplicates_asked_once_empty_responses_skipped_and_token_counts_reported():
    seen = []

    def generate(conversations):
        seen.extend(conversations)
        return [Completion('{"key_spans": [[1, 1]], "label": "key_insight"}', prompt_tokens=50, completion_tokens=9)
                for _ in conversations]

    annotator = CallableAnnotator(generate)
    results = annotator.annotate([_request(True), _request(True), _request(True, text="  \n ", offsets=False)])
    assert len(seen) == 1
    assert [r.status for r in results] == [ParseStatus.OK, ParseStatus.OK, ParseStatus.EMPTY]
    assert results[2].reason.startswith("empty") and results[2].token_mask is None
    stats = annotator.last_call_stats
    assert (stats.prompt_tokens, stats.completion_tokens, stats.empty, stats.backend_prompts) == (50, 9, 1, 1)


def test_cache_for_a_fixed_model(tmp_path):
    generate = ScriptedGenerate('{"key_spans": [[2, 2]], "label": "key_insight"}', "{}")
    identity = {"model": "static-initial-student", "temperature": 0.6}
    first = CallableAnnotator(generate, cache=ReplyCache(tmp_path), model_identity=identity)
    first.annotate([_request(True)])
    again = CallableAnnotator(generate, cache=ReplyCache(tmp_path), model_identity=identity)
    result, = again.annotate([_request(True)])
    assert len(generate.calls) == 1 and result.from_cache and result.spans == ((1, 1),)
    assert again.last_call_stats.cache_hits == 1
    other_model = CallableAnnotator(generate, cache=ReplyCache(tmp_path), model_identity={"model": "other"})
    other_model.annotate([_request(True)])
    assert len(generate.calls) == 2
    with pytest.raises(ValueError, match="model_identity"):
        CallableAnnotator(generate, cache=ReplyCache(tmp_path))


def test_lone_surrogates_with_a_reply_cache_never_stop_annotation(tmp_path):
    """A lone surrogate (not encodable as UTF-8) in a reply or in the response text: the rollouts
    are still annotated, the unencodable reply is simply not cached, and nothing raises."""
    reply = '{"key_spans": [[2, 2]], "label": "key_insight"} \ud800'
    generate = ScriptedGenerate(reply, "{}")
    identity = {"model": "static-initial-student"}
    annotator = CallableAnnotator(generate, cache=ReplyCache(tmp_path), model_identity=identity)
    text_with_surrogate = RESPONSE.replace("Done.", "Done \udc80.")
    first, second = annotator.annotate([_request(True), _request(True, text=text_with_surrogate)])
    assert first.status == ParseStatus.REPAIRED and first.spans == ((1, 1),)
    assert second.status == ParseStatus.REPAIRED and second.spans == ((1, 1),)
    assert len(ReplyCache(tmp_path)) == 0   # nothing unencodable was written ...
    again, = annotator.annotate([_request(True)])
    assert not again.from_cache and again.spans == ((1, 1),)   # ... so the same prompt is asked again
    clean = CallableAnnotator(ScriptedGenerate('{"key_spans": [[2, 2]], "label": "key_insight"}', "{}"),
                              cache=ReplyCache(tmp_path), model_identity=identity)
    clean.annotate([_request(True)])
    assert len(ReplyCache(tmp_path)) == 1  # encodable replies are still cached


def test_malformed_requests_are_caller_bugs():
    annotator = CallableAnnotator(ScriptedGenerate("{}", "{}"))
    with pytest.raises(ValueError, match="offset"):
        annotator.annotate([AnnotationRequest("p", "r", "short", True, [(0, 3), (3, 99)])])
    with pytest.raises(ValueError, match="binary verdict"):
        annotator.annotate([AnnotationRequest("p", "r", "text", 0.5)])
    assert annotator.stats.requested == 0


def test_api_tier_from_run_settings(tmp_path, monkeypatch):
    """The api tier (train.annotator.tier api) is an HTTP annotator with the run's α cap and reply cache;
    a key in the config itself is refused."""
    from trace.annotate.setup import annotator_for
    from trace.settings import default_run

    monkeypatch.setenv("TEST_ANNOTATOR_KEY", "sk-test")
    http = {"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "TEST_ANNOTATOR_KEY"}
    run = default_run("trace_fkl", kl={"alpha": 0.5}, annotator={"tier": "api", "cache_dir": str(tmp_path), "http": http})
    annotator = annotator_for(run, tmp_path / "unused-base")
    assert isinstance(annotator, HttpAnnotator) and annotator.alpha == 0.5
    assert annotator.cache is not None and "sk-test" not in repr(annotator)
    with pytest.raises(ValueError, match="never put an API key in a config file"):
        annotator_for(default_run("trace_fkl", annotator={"tier": "api", "http": {**http, "api_key": "sk-test"}}),
                      tmp_path / "unused-base")


def test_reply_cache_is_safe_for_concurrent_writers(tmp_path):
    cache = ReplyCache(tmp_path)

    def writer(worker):
        for i in range(25):
            cache.put_many({f"{worker}-{i}": CachedReply(f"reply {worker} {i}", 1, 2)}, model="m")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ReplyCache(tmp_path)) == 100
    assert cache.get_many(["3-24", "missing"]) == {"3-24": CachedReply("reply 3 24", 1, 2)}
