"""Flood control for the audit trail: repeated identical events become one row with a count.

Refusals (bad frames, unknown CURVE keys, forbidden ops) and status reads cost the attacker nothing
to send; writing a row for each would let one peer fill the disk and stall every request behind
its fsyncs. The first ``burst`` events of each (peer, op, code) in an interval are written at once,
each with its own request id (ordinary refusals stay individually visible); the rest are counted
and written as one row (``occurrences`` = the count) when the interval ends. Nothing is dropped:
every event is in exactly one row's count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from appliance.audit.chain import Entry

OVERFLOW_PEER = "*"  # where events go when too many distinct peers flood at once


@dataclass
class _Bucket:
    first: Entry  # the row written when the interval opened
    opened: float
    written: int = 1  # events of this interval written as their own rows
    extra: int = 0  # events past the burst, not yet written


class Aggregator:
    """Not thread-safe: owned by the serving loop, which calls ``flush`` every turn."""

    def __init__(
        self, write: Callable[[list[Entry]], None], interval_s: float = 10.0, burst: int = 10, max_keys: int = 4096
    ):
        self._write = write
        self.interval_s = interval_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[tuple[str, str, str], _Bucket] = {}
        self.events = 0
        self.rows = 0

    def add(self, entry: Entry, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.events += 1
        key = (entry.client, entry.op, entry.error_code or entry.status)
        bucket = self._buckets.get(key)
        if bucket is None and len(self._buckets) >= self.max_keys:
            key = (OVERFLOW_PEER, entry.op, entry.error_code or entry.status)
            entry = replace(entry, client=OVERFLOW_PEER, request_id="-")
            bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = _Bucket(entry, now)
            self._emit([entry])
        elif bucket.written < self.burst:
            bucket.written += 1
            self._emit([entry])
        else:
            bucket.extra += 1

    def flush(self, now: float | None = None, force: bool = False) -> None:
        """Write one summary row per interval that ended (every open one when ``force``)."""
        now = time.monotonic() if now is None else now
        due = [k for k, b in self._buckets.items() if force or now - b.opened >= self.interval_s]
        rows = []
        for key in due:
            bucket = self._buckets.pop(key)
            if bucket.extra:
                rows.append(replace(bucket.first, request_id="-", occurrences=bucket.extra))
        if rows:
            self._emit(rows)

    def _emit(self, entries: list[Entry]) -> None:
        self.rows += len(entries)
        self._write(entries)
