"""OpenAI-compatible chat-completions backend (strong API tier, or a served frozen model).

Stdlib only (urllib + a thread pool). Per prompt: POST {base_url}/chat/completions, retried with
exponential backoff and jitter on 429, 5xx, timeouts and connection errors (a Retry-After header
is honoured, up to ``max_retry_after_s``); other 4xx are not retried. Redirects are never followed
(urllib would resend the Authorization header to whatever origin a 3xx names, and take that
server's reply as the annotation): a 3xx fails the prompt with reason ``redirect`` naming the target,
so set ``base_url`` to the final endpoint. The API key is read from
the environment variable NAMED by ``api_key_env`` and is redacted from every error, reply, log
line and result this module produces; the cache key never contains it.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Mapping, NamedTuple

from .backends import Completion, Messages, PromptedAnnotator

logger = logging.getLogger(__name__)
REDACTED = "[REDACTED]"


class MissingApiKeyError(RuntimeError):
    """Raised at construction (a configuration error), never during training."""


class _Secret:
    """Holds the API key so that repr(), vars() and debuggers never show it."""
    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "_Secret(****)"


@dataclass(frozen=True)
class HttpAnnotatorConfig:
    base_url: str                         # e.g. "http://127.0.0.1:8000/v1" (vLLM) or a provider's ".../v1"
    model: str                            # e.g. "qwen3.5-plus" for the strong API tier
    api_key_env: str | None = None        # NAME of the env var holding the key; None: no auth header
    max_concurrency: int = 8
    timeout_s: float = 120.0              # per attempt (socket timeout: connect and each read)
    max_retries: int = 4                  # attempts = 1 + max_retries
    backoff_base_s: float = 1.0           # delay before retry k: min(max, base * 2**(k-1)) * U(0.5, 1)
    backoff_max_s: float = 30.0
    max_retry_after_s: float = 120.0      # a server's Retry-After is honoured up to this
    batch_deadline_s: float | None = None  # stop retrying once one annotate() call has run this long
    temperature: float = 0.0              # (?) the paper does not give the annotator's sampling
    top_p: float | None = None
    max_tokens: int = 1024
    extra_body: Mapping[str, Any] = field(default_factory=dict)  # provider extras, e.g. {"enable_thinking": False}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> HttpAnnotatorConfig:
        if "api_key" in values:
            raise ValueError("never put an API key in a config file: set it in the environment and name "
                             "the variable in api_key_env")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown HTTP annotator settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    def sampling(self) -> dict[str, Any]:
        """The request fields besides model/messages; part of the cache key."""
        params: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.top_p is not None:
            params["top_p"] = self.top_p
        params.update(self.extra_body)
        return params


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: the 3xx surfaces as an HTTPError and no second request is made."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class _Attempt(NamedTuple):
    completion: Completion | None = None   # set on success
    error: str | None = None               # "<code>: <detail>" on failure
    retryable: bool = False
    retry_after: float | None = None


class HttpAnnotator(PromptedAnnotator):
    def __init__(self, config: HttpAnnotatorConfig, **kwargs: Any):
        self.config = config
        self._api_key = self._read_api_key(config.api_key_env)
        kwargs.setdefault("model_identity", {"model": config.model, "sampling": config.sampling()})
        super().__init__(**kwargs)
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._rng = random.Random()   # jitter only; results never depend on it

    @staticmethod
    def _read_api_key(env_name: str | None) -> _Secret | None:
        if env_name is None:
            return None
        key = os.environ.get(env_name, "").strip()
        if not key:
            raise MissingApiKeyError(f"the annotator's API key variable {env_name} is not set or empty")
        return _Secret(key)

    def __repr__(self) -> str:
        return f"HttpAnnotator(model={self.config.model!r}, base_url={self.config.base_url!r})"

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key.value, REDACTED) if self._api_key and text else text

    # -- batch -----------------------------------------------------------------------------------
    def _complete(self, conversations: list[Messages]) -> list[Completion]:
        deadline = (time.monotonic() + self.config.batch_deadline_s
                    if self.config.batch_deadline_s is not None else None)
        workers = max(1, min(self.config.max_concurrency, len(conversations)))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="annotator-http")
        try:
            futures = [pool.submit(self._request_with_retries, messages, deadline) for messages in conversations]
            # Workers honour the deadline themselves; the grace covers one in-flight attempt.
            grace = None if deadline is None else max(0.0, deadline - time.monotonic()) + self.config.timeout_s + 1
            done, _ = wait(futures, timeout=grace)
            late = Completion(None, error="deadline: no reply before the batch deadline")
            return [self._outcome(f) if f in done else late for f in futures]
        finally:
            pool.shutdown(wait=deadline is None, cancel_futures=True)

    def _outcome(self, future: Any) -> Completion:
        """A finished worker's completion; a bug in a worker fails that prompt only."""
        exc = future.exception()
        if exc is not None:
            return Completion(None, error=f"backend_error: {type(exc).__name__}: {self._redact(str(exc))[:200]}")
        return future.result()

    # -- one prompt ------------------------------------------------------------------------------
    def _request_with_retries(self, messages: Messages, deadline: float | None) -> Completion:
        body = json.dumps({"model": self.config.model, "messages": messages, **self.config.sampling()}).encode()
        started, attempts = time.monotonic(), 0
        while True:
            timeout = self.config.timeout_s
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    return self._give_up("deadline: batch deadline reached", started, attempts)
            attempts += 1
            attempt = self._post_once(body, timeout)
            if attempt.completion is not None:
                c = attempt.completion
                return Completion(c.text, latency_s=time.monotonic() - started, prompt_tokens=c.prompt_tokens,
                                  completion_tokens=c.completion_tokens, http_requests=attempts, retries=attempts - 1)
            if not attempt.retryable or attempts > self.config.max_retries:
                return self._give_up(f"{attempt.error} (after {attempts} attempt{'s' * (attempts > 1)})",
                                     started, attempts)
            delay = (min(attempt.retry_after, self.config.max_retry_after_s) if attempt.retry_after is not None
                     else min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempts - 1))
                     * self._rng.uniform(0.5, 1.0))
            if deadline is not None and time.monotonic() + delay >= deadline:
                return self._give_up(f"deadline: no time left to retry after {attempt.error}", started, attempts)
            logger.debug("annotator request attempt %d failed (%s); retrying in %.2fs", attempts, attempt.error, delay)
            time.sleep(delay)

    @staticmethod
    def _give_up(error: str, started: float, attempts: int) -> Completion:
        return Completion(None, error=error, latency_s=time.monotonic() - started,
                          http_requests=attempts, retries=max(attempts - 1, 0))

    def _post_once(self, body: bytes, timeout: float) -> _Attempt:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key.value}"
        request = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                target = _origin(urllib.parse.urljoin(self._url, exc.headers.get("Location") or ""))
                return _Attempt(error=f"redirect: HTTP {exc.code} to {self._redact(target)[:200]} not followed "
                                      "(credentials are never sent on; set base_url to the final endpoint)")
            detail = self._redact(_body_snippet(exc))
            return _Attempt(error=f"http_{exc.code}: {detail}", retryable=exc.code == 429 or exc.code >= 500,
                            retry_after=parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None))
        except TimeoutError:
            return _Attempt(error=f"timeout: no reply within {timeout:.1f}s", retryable=True)
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                return _Attempt(error=f"timeout: no connection within {timeout:.1f}s", retryable=True)
            return _Attempt(error=f"connection: {self._redact(str(exc.reason))[:200]}", retryable=True)
        except (OSError, http.client.HTTPException) as exc:   # resets, remote disconnects, bad status lines
            return _Attempt(error=f"connection: {type(exc).__name__}: {self._redact(str(exc))[:200]}", retryable=True)
        return self._read_reply(raw)

    def _read_reply(self, raw: bytes) -> _Attempt:
        try:
            payload = json.loads(raw)
            content = payload["choices"][0]["message"]["content"]
            usage = payload.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            snippet = self._redact(raw[:200].decode("utf-8", "replace"))
            return _Attempt(error=f"bad_response: {type(exc).__name__} reading {snippet!r}")
        if not isinstance(content, str):
            return _Attempt(error="bad_response: the reply has no text content")
        return _Attempt(completion=Completion(self._redact(content), prompt_tokens=prompt_tokens,
                                              completion_tokens=completion_tokens))


def _body_snippet(exc: urllib.error.HTTPError, limit: int = 300) -> str:
    try:
        return exc.read(limit).decode("utf-8", "replace").strip()
    except Exception:  # noqa: BLE001 - the body is only used for the error message
        return ""
