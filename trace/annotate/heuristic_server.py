"""A heuristic span annotator behind a real OpenAI-compatible HTTP endpoint, for CPU smoke runs.

The smoke study's policies are tiny random-init models: no real annotator model is available
offline, and the tiny models cannot follow the annotation prompt. This server stands in for the
API tier so that the paper path's HTTP client, reply parsing, segment-to-token mapping, coverage
cap, routing and teacher prefixes all run for real. It is NOT a model and its spans carry no
insight: it reads the numbered segments of the annotation prompt (trace/annotate/contract.py) and
marks, for a correct rollout, the last segment (where the boxed answer is) as a key span labelled
``decisive_computation``; for an incorrect one, the first segment as the error span labelled
``other_error``.

    python -m trace.annotate.heuristic_server --port 18731     # serves until SIGINT / SIGTERM
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_SEGMENT = re.compile(r"^\[(\d+)\] ", re.MULTILINE)


def heuristic_reply(user_message: str) -> str:
    """The JSON reply for one annotation prompt (see the module docstring)."""
    numbers = [int(n) for n in _SEGMENT.findall(user_message)]
    if not numbers:
        return '{"spans": [], "label": "other_error"}'
    if "## Verdict\nCORRECT" in user_message:
        return json.dumps({"key_spans": [[max(numbers), max(numbers)]], "label": "decisive_computation"})
    return json.dumps({"error_spans": [[min(numbers), min(numbers)]], "label": "other_error"})


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # one line per request would drown the smoke's log
        pass

    def do_GET(self):  # health check: GET /v1/models
        self._send(200, {"object": "list", "data": [{"id": "heuristic-annotator", "object": "model"}]})

    def do_POST(self):
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            content = heuristic_reply(body["messages"][-1]["content"])
        except (ValueError, KeyError, IndexError, TypeError) as error:
            self._send(400, {"error": {"message": f"bad request: {error}"}})
            return
        self._send(200, {"id": "heuristic", "object": "chat.completion", "model": body.get("model", "heuristic"),
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def serve(port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Start serving in a background thread; ``server.shutdown()`` stops it."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = serve(args.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"heuristic annotator on http://127.0.0.1:{args.port}/v1", flush=True)
    stop.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
