"""Response cache: identical deterministic requests are answered from memory.

A request is deterministic when it is greedy (temperature 0) or carries a fixed ``seed``, and it
is not part of a conversation session. The key covers everything that decides the output: model
version, the client's identity, prompt, max_tokens, every sampling field, stop strings, stream and
ignore_eos. Bounded LRU by
entry count; held in memory only (prompts never reach disk through it). The audit row of a hit
is written like any other, marked ``cache_hit``.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import msgpack

from appliance.transport.protocol import Request


@dataclass(frozen=True)
class CachedResponse:
    text: str
    output_ids: tuple[int, ...]
    finish: str
    prompt_tokens: int


def cache_key(req: Request, model_version: object, identity: str) -> str | None:
    """The key for ``req`` sent by ``identity``, or None when its output is not reproducible (sampled
    without a seed). Scoped to the identity: one client's prompts and answers are never another's."""
    s = req.sampling
    if req.session is not None or not (s.greedy or s.seed is not None):
        return None
    blob = msgpack.packb(
        [
            identity,
            str(model_version),
            req.prompt,
            list(req.messages or ()),
            req.reasoning,
            req.stream,
            req.max_tokens,
            s.temperature,
            s.top_k,
            s.top_p,
            s.repetition_penalty,
            s.seed,
            list(req.stop),
            req.ignore_eos,
            req.constraint.digest if req.constraint else None,
            req.max_reasoning_tokens,
            list(req.tools or ()),
            req.tool_choice,
            req.tool_name,
        ],
        use_bin_type=True,
    )
    return hashlib.sha256(blob).hexdigest()


class ResponseCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, CachedResponse] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedResponse | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: CachedResponse) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def stats(self) -> dict:
        with self._lock:
            return {
                "response_cache_entries": len(self._items),
                "response_cache_hits": self.hits,
                "response_cache_misses": self.misses,
            }
