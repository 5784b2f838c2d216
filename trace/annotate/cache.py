"""Persistent cache of raw annotator replies, so that a rerun of the same step costs nothing.

One SQLite file (WAL mode) in ``cache_dir``: every write is a transaction, so it is atomic, and a
connection per operation makes it safe across threads and processes. We cache the RAW reply, not
the parsed annotation: parsing is deterministic, so an improved parser reuses old replies.
Failed calls are never cached. Nothing secret goes in: the key hashes the model name, prompt
version, messages and sampling parameters, never credentials.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

CACHE_FILE_NAME = "annotator_replies.sqlite"


def cache_key(model_identity: Mapping[str, Any], prompt_version: str, messages: Sequence[Mapping[str, str]]) -> str:
    """sha256 over a canonical JSON of (model + sampling params, prompt version, messages)."""
    payload = {"model": model_identity, "prompt_version": prompt_version, "messages": list(messages)}
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    # surrogatepass: a lone surrogate in a rollout's text must still give a key, never an error
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class CachedReply:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ReplyCache:
    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir) / CACHE_FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn, conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL, "
                         "prompt_tokens INTEGER, completion_tokens INTEGER, model TEXT, created REAL)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30.0)

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedReply]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, CachedReply] = {}
        with closing(self._connect()) as conn:
            for chunk_start in range(0, len(keys), 500):   # stay under SQLite's bound-parameter limit
                chunk = keys[chunk_start:chunk_start + 500]
                rows = conn.execute(f"SELECT key, reply, prompt_tokens, completion_tokens FROM replies "
                                    f"WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                found.update({k: CachedReply(r, p or 0, c or 0) for k, r, p, c in rows})
        return found

    def put_many(self, entries: Mapping[str, CachedReply], model: str = "") -> int:
        """Store the replies; returns how many were NOT stored because SQLite cannot hold their text
        (not encodable as UTF-8, e.g. a lone surrogate): those are asked again next time."""
        rows = [(k, e.text, e.prompt_tokens, e.completion_tokens, model) for k, e in entries.items()
                if _utf8_encodable(e.text)]
        if rows:
            now = time.time()
            with closing(self._connect()) as conn, conn:   # one transaction: all or nothing
                conn.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?)",
                                 [(*row, now) for row in rows])
        return len(entries) - len(rows)

    def __len__(self) -> int:
        with closing(self._connect()) as conn:
            return conn.execute("SELECT COUNT(*) FROM replies").fetchone()[0]


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
