"""Conversation sessions: a request carrying ``session`` continues a conversation whose KV cache
the daemon kept, so the next turn prefills only its new tokens.

Memory, not disk: a saved cache is an engine-owned copy (never written anywhere). The store is
bounded by total bytes and count, evicts least recently used first, and drops sessions idle for
longer than the TTL. A session is used by one request at a time; a second concurrent request on
the same session is refused (``session_busy``) rather than forking the conversation.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


class SessionBusy(Exception):
    """Another request is using this session right now."""


@dataclass
class Session:
    tokens: list[int]  # the whole conversation so far (prompts and outputs), as token ids
    cache: list[Any]  # engine.save(): the KV cache of tokens[:cached]
    cached: int
    nbytes: int
    model_version: str
    last_used: float = field(default_factory=time.monotonic)
    messages: list[dict] | None = None  # a chat's conversation so far, replies included (None: raw prompts)


def owner(sid: str) -> str:
    """The identity a scoped session id belongs to (``identity\x1fname``, admission.scoped)."""
    return sid.split("\x1f", 1)[0]


class SessionStore:
    """``max_per_identity``: sessions one identity may keep; past it that identity's least recently used session is
    evicted, never another identity's (a client opening sessions in a loop only pushes out its own)."""

    def __init__(self, max_bytes: int, ttl_s: float, max_sessions: int, max_per_identity: int | None = None):
        self.max_bytes, self.ttl_s, self.max_sessions = max_bytes, ttl_s, max_sessions
        self.max_per_identity = max_per_identity or max_sessions
        self._items: OrderedDict[str, Session] = OrderedDict()
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self.evicted = 0
        self.expired = 0

    def acquire(self, sid: str, model_version: str) -> Session | None:
        """Take ``sid`` for one request; None starts a new conversation. Raises ``SessionBusy``."""
        with self._lock:
            self._expire(time.monotonic())
            if sid in self._busy:
                raise SessionBusy(sid)
            self._busy.add(sid)
            session = self._items.pop(sid, None)
            if session is not None and session.model_version != model_version:
                return None  # a cache from another model is meaningless: start over
            return session

    def release(self, sid: str, session: Session | None) -> None:
        """End the request's use of ``sid``, storing ``session`` (the new state, or the old one back)."""
        with self._lock:
            self._busy.discard(sid)
            if session is None or session.nbytes > self.max_bytes:
                return
            session.last_used = time.monotonic()
            self._items[sid] = session
            self._items.move_to_end(sid)
            who = owner(sid)
            mine = [k for k in self._items if owner(k) == who]  # oldest first
            for k in mine[: max(0, len(mine) - self.max_per_identity)]:
                del self._items[k]
                self.evicted += 1
            while len(self._items) > self.max_sessions or self.bytes > self.max_bytes:
                self._items.popitem(last=False)
                self.evicted += 1

    def end(self, sid: str) -> bool:
        """Forget a session (the ``end_session`` op); True when it existed."""
        with self._lock:
            return self._items.pop(sid, None) is not None

    def _expire(self, now: float) -> None:
        for sid in [s for s, v in self._items.items() if now - v.last_used > self.ttl_s]:
            del self._items[sid]
            self.expired += 1

    @property
    def bytes(self) -> int:
        return sum(s.nbytes for s in self._items.values())

    def stats(self) -> dict:
        with self._lock:
            self._expire(time.monotonic())
            return {
                "sessions": len(self._items),
                "session_bytes": self.bytes,
                "sessions_in_use": len(self._busy),
                "sessions_evicted": self.evicted,
                "sessions_expired": self.expired,
            }
