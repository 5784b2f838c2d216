"""The OpenAI-compatible HTTP backend against a REAL chat-completions server on 127.0.0.1.

The server (a ThreadingHTTPServer started here) picks its behaviour from a tag in the problem
text, e.g. "TAG=flaky500#1", and counts the requests it receives per tag.
"""
import collections
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trace.annotate import (AnnotationRequest, HttpAnnotator, HttpAnnotatorConfig, MissingApiKeyError, ParseStatus,
                            ReplyCache)
from trace.annotate.http import parse_retry_after

SECRET = "sk-test-5eCr3t-do-not-leak-8472"
KEY_ENV = "TRACE_TEST_ANNOTATOR_KEY"
RESPONSE = "Let x = 3.\nThen 2x = 6.\nSo the answer is 6."
GOOD = {True: '{"key_spans": [[2, 2]], "label": "decisive_computation"}',
        False: '{"error_spans": [[1, 1]], "label": "misread_problem"}'}


class ChatServer:
    """Scripted OpenAI-compatible server; records request counts, arrival times and auth headers."""

    def __init__(self):
        self.counts = collections.Counter()
        self.arrivals = collections.defaultdict(list)
        self.auth_headers = []
        self.in_flight = self.max_in_flight = 0
        self.redirect_to = None   # scenario "redirect": where to send the client
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):   # keep test output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                try:
                    server.handle(self, body)
                except (BrokenPipeError, ConnectionResetError):   # the client gave up (timeout test)
                    pass

            do_GET = do_POST   # a client following a 302 re-sends as GET without a body

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def handle(self, handler, body):
        if body is None:   # a redirected request (GET, no body): answer it like a good annotator would
            with self.lock:
                self.counts["redirected"] += 1
                self.auth_headers.append(handler.headers.get("Authorization"))
            self.reply(handler, GOOD[True])
            return
        user = body["messages"][-1]["content"]
        tag = user.split("TAG=", 1)[1].split()[0]
        scenario = tag.split("#")[0]
        with self.lock:
            self.counts[tag] += 1
            n = self.counts[tag]
            self.arrivals[tag].append(time.monotonic())
            self.auth_headers.append(handler.headers.get("Authorization"))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            is_correct = "## Verdict\nCORRECT" in user
            auth = handler.headers.get("Authorization", "")
            if scenario == "good" or (scenario == "r429" and n > 1) or (scenario == "flaky500" and n > 2):
                self.reply(handler, GOOD[is_correct])
            elif scenario == "delay":
                time.sleep(0.25)
                self.reply(handler, GOOD[is_correct])
            elif scenario == "fenced":
                self.reply(handler, "Sure.\n```json\n" + GOOD[is_correct] + "\n```")
            elif scenario == "garbage":
                self.reply(handler, "I am unable to annotate this response.")
            elif scenario == "slow":
                time.sleep(1.0)
                self.reply(handler, GOOD[is_correct])
            elif scenario == "echo":
                self.reply(handler, GOOD[is_correct][:-1] + f', "note": "you sent {auth}"}}')
            elif scenario in ("r429", "r429long"):
                self.error(handler, 429, "rate limited", {"Retry-After": "1" if scenario == "r429" else "30"})
            elif scenario in ("flaky500", "dead500"):
                self.error(handler, 500, "internal error")
            elif scenario == "bad400":
                self.error(handler, 400, "bad request")
            elif scenario == "echo401":
                self.error(handler, 401, f"invalid key {auth}")
            elif scenario in ("redirect302", "redirect307"):
                code = int(scenario[-3:])
                self.raw(handler, code, b"", headers={"Location": self.redirect_to + "/chat/completions"})
            elif scenario == "notjson":
                self.raw(handler, 200, b"<html>gateway hiccup</html>", "text/html")
            else:
                raise AssertionError(f"unknown scenario {scenario}")
        finally:
            with self.lock:
                self.in_flight -= 1

    def reply(self, handler, content):
        payload = {"id": "x", "object": "chat.completion", "model": "scripted",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}
        self.raw(handler, 200, json.dumps(payload).encode())

    def error(self, handler, code, message, headers=None):
        self.raw(handler, code, json.dumps({"error": {"message": message}}).encode(), headers=headers)

    @staticmethod
    def raw(handler, code, data, content_type="application/json", headers=None):
        handler.send_response(code)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(KEY_ENV, SECRET)
    chat = ChatServer()
    yield chat
    chat.close()


def _annotator(server, cache_dir=None, **overrides):
    settings = dict(base_url=server.base_url, model="scripted-annotator", api_key_env=KEY_ENV, max_concurrency=4,
                    timeout_s=5.0, max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05)
    settings.update(overrides)
    return HttpAnnotator(HttpAnnotatorConfig.from_mapping(settings),
                         cache=ReplyCache(cache_dir) if cache_dir else None)


def _request(tag, is_correct=True):
    words = RESPONSE.split(" ")   # simple offsets: one "token" per space-separated chunk
    offsets, i = [], 0
    for w in words:
        offsets.append((i, i + len(w)))
        i += len(w) + 1
    return AnnotationRequest(f"Find 2x. TAG={tag}", "2x = 6", RESPONSE, is_correct, offsets)


def test_good_repaired_and_unparseable_replies(server):
    annotator = _annotator(server)
    good, fenced, garbage = annotator.annotate([_request("good#1"), _request("fenced#1", False),
                                                _request("garbage#1")])
    assert (good.status, good.spans, good.label) == (ParseStatus.OK, ((1, 1),), "decisive_computation")
    # tokens "3.\nThen" "2x" "=" "6.\nSo" overlap segment 2; the cap (floor(0.25 * 11) = 2) keeps the first two
    assert good.token_mask == [False, False, False, True, True, False, False, False, False, False, False]
    assert good.capped
    assert good.teacher_prefix and good.latency_s > 0 and not good.from_cache
    assert (fenced.status, fenced.spans, fenced.label) == (ParseStatus.REPAIRED, ((0, 0),), "misread_problem")
    assert garbage.status is ParseStatus.FAILED and garbage.spans == () and garbage.teacher_prefix is None
    assert garbage.token_mask == [False] * 11 and garbage.reason_code == "unparseable"
    assert garbage.raw_reply == "I am unable to annotate this response."
    assert server.counts == {"good#1": 1, "fenced#1": 1, "garbage#1": 1}       # 200 replies are not retried
    assert server.auth_headers == [f"Bearer {SECRET}"] * 3
    stats = annotator.last_call_stats
    assert (stats.requested, stats.annotated, stats.repaired, stats.failed, stats.http_requests, stats.retries) == \
        (3, 2, 1, 1, 3, 0)
    assert (stats.prompt_tokens, stats.completion_tokens) == (300, 60)
    assert stats.failure_reasons == {"unparseable": 1} and stats.latency_s_max > 0


def test_retries_on_429_and_5xx_but_not_on_other_4xx(server):
    annotator = _annotator(server)
    results = annotator.annotate([_request("r429#1"), _request("flaky500#1"), _request("dead500#1"),
                                  _request("bad400#1"), _request("notjson#1")])
    assert [r.status for r in results] == [ParseStatus.OK, ParseStatus.OK] + [ParseStatus.FAILED] * 3
    assert [r.reason_code for r in results] == [None, None, "http_500", "http_400", "bad_response"]
    assert "after 3 attempts" in results[2].reason
    assert server.counts == {"r429#1": 2, "flaky500#1": 3, "dead500#1": 3, "bad400#1": 1, "notjson#1": 1}
    first, second = server.arrivals["r429#1"]
    assert second - first >= 0.9                       # Retry-After: 1 was honoured
    stats = annotator.last_call_stats
    assert (stats.http_requests, stats.retries, stats.failed, stats.annotated) == (10, 5, 3, 2)
    assert stats.failure_reasons == {"http_500": 1, "http_400": 1, "bad_response": 1}


def test_timeouts_and_dead_servers_fall_back_to_grpo(server):
    annotator = _annotator(server, timeout_s=0.3, max_retries=1)
    slow, = annotator.annotate([_request("slow#1")])
    assert slow.status is ParseStatus.FAILED and slow.reason_code == "timeout" and slow.spans == ()
    assert annotator.last_call_stats.http_requests == 2 and annotator.last_call_stats.retries == 1
    assert server.counts["slow#1"] == 2

    with socket.socket() as s:   # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    dead = _annotator(server, base_url=f"http://127.0.0.1:{closed_port}/v1", max_retries=1)
    result, = dead.annotate([_request("good#9")])
    assert result.reason_code == "connection" and dead.last_call_stats.http_requests == 2

    # a long Retry-After cannot stall training past the batch deadline
    started = time.monotonic()
    limited = _annotator(server, batch_deadline_s=0.5)
    result, = limited.annotate([_request("r429long#1")])
    assert result.reason_code == "deadline" and time.monotonic() - started < 3
    assert server.counts["r429long#1"] == 1


def test_cache_makes_reruns_free(server, tmp_path):
    batch = [_request("good#1"), _request("good#2", False), _request("garbage#1"), _request("dead500#1")]
    first = _annotator(server, cache_dir=tmp_path)
    before = first.annotate(batch)
    assert dict(server.counts) == {"good#1": 1, "good#2": 1, "garbage#1": 1, "dead500#1": 3}

    rerun = _annotator(server, cache_dir=tmp_path)    # a fresh process would see the same file
    after = rerun.annotate(batch)
    # replies (even unparseable ones) come from the cache; the failed HTTP call is asked again
    assert dict(server.counts) == {"good#1": 1, "good#2": 1, "garbage#1": 1, "dead500#1": 6}
    assert [(r.status, r.spans, r.label) for r in after] == [(r.status, r.spans, r.label) for r in before]
    assert [r.from_cache for r in after] == [True, True, True, False]
    stats = rerun.last_call_stats
    assert (stats.cache_hits, stats.http_requests, stats.prompt_tokens) == (3, 3, 0)

    hotter = _annotator(server, cache_dir=tmp_path, temperature=0.7)   # other sampling: other cache key
    hotter.annotate([_request("good#1")])
    assert server.counts["good#1"] == 2


def test_concurrency_is_bounded(server):
    annotator = _annotator(server, max_concurrency=3)
    started = time.monotonic()
    results = annotator.annotate([_request(f"delay#{i}") for i in range(6)])
    elapsed = time.monotonic() - started
    assert all(r.status is ParseStatus.OK for r in results)
    assert 2 <= server.max_in_flight <= 3
    assert elapsed < 6 * 0.25     # faster than one request at a time


def test_api_key_never_leaks(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="trace.annotate")
    annotator = _annotator(server, cache_dir=tmp_path, max_retries=1)
    results = annotator.annotate([_request("echo#1"), _request("echo401#1"), _request("dead500#1"),
                                  _request("garbage#1")])
    assert server.auth_headers[0] == f"Bearer {SECRET}"                 # the key was really sent ...
    echo, unauthorized = results[0], results[1]
    assert echo.status is ParseStatus.OK and "[REDACTED]" in echo.raw_reply   # ... and echoed back by the server
    assert unauthorized.reason_code == "http_401" and "[REDACTED]" in unauthorized.reason
    annotator.annotate([_request("echo#1")])                              # served from the cache

    places = {
        "results": repr(results),
        "stats": repr(annotator.stats) + json.dumps(annotator.stats.as_dict()),
        "logs": caplog.text,
        "annotator": repr(annotator) + repr(annotator.config) + repr(vars(annotator)),
    }
    for path in tmp_path.rglob("*"):
        if path.is_file():
            places[str(path)] = path.read_bytes().decode("latin-1")
    assert caplog.text        # the failures were logged
    for where, text in places.items():
        assert SECRET not in text, f"API key leaked into {where}"


def test_config_and_key_handling(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = HttpAnnotatorConfig(base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)
    with pytest.raises(MissingApiKeyError, match=KEY_ENV):
        HttpAnnotator(config)
    with pytest.raises(ValueError, match="environment"):
        HttpAnnotatorConfig.from_mapping({"base_url": "x", "model": "m", "api_key": SECRET})
    with pytest.raises(ValueError, match="unknown"):
        HttpAnnotatorConfig.from_mapping({"base_url": "x", "model": "m", "retries": 3})
    no_auth = HttpAnnotator(HttpAnnotatorConfig(base_url="http://127.0.0.1:9/v1", model="m"))   # local vLLM
    assert no_auth.model_identity == {"model": "m", "sampling": {"temperature": 0.0, "max_tokens": 1024}}
    assert parse_retry_after("3") == 3.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0     # a date in the past: retry now


@pytest.mark.parametrize("code", [302, 307])
def test_the_api_key_never_follows_a_redirect_to_another_origin(server, code):
    """Two real servers on 127.0.0.1 (different ports = different origins): the annotator endpoint
    redirects to the other one. The client must not follow (so the key is never sent there and the
    other server's reply is never taken as an annotation): the rollout fails into plain GRPO."""
    other = ChatServer()
    try:
        server.redirect_to = other.base_url
        result, = _annotator(server, max_retries=2).annotate([_request(f"redirect{code}#1")])
        assert other.counts == {} and other.auth_headers == []       # nothing reached the other origin
        assert server.counts == {f"redirect{code}#1": 1}             # a redirect is not retried
        assert result.status is ParseStatus.FAILED and result.spans == ()
        assert result.reason_code == "redirect" and other.base_url.split("/v1")[0] in result.reason
        assert SECRET not in result.reason
    finally:
        other.close()
