"""Flood control for the audit trail: repeated identical events become one row with a count.

Refusals (bad frames, unknown CURVE keys, forbidden ops) and status reads cost the attacker nothing
to send; writing a row for each would let one peer fill the disk and stall every request behind
its fsyncs. The first ``burst`` events of each (peer, op, code) in an interval are written at once,
each with its own request id (ordinary refusals stay individually visible); the rest are counted
and written as one row (``occurrences`` = the count) when the interval ends. Nothing is dropped:
every event is in exactly one row's count.

Parties that failed to authenticate — a refused CURVE key (``unknown:…``), a failed handshake
(``unauthenticated``), an HTTP request without a valid API key (``anonymous``/``unknown:…``) — cost nothing to
multiply (a fresh key per connection is a new party),
so they share one global budget instead of a bucket each: the first ``unauth_rows`` (1) of their events per
``unauth_interval_s`` (60 s) are written as they come (the first offender stays visible, key fingerprint and
all), every later one is folded into one row per (op, code) for the interval, under ``UNAUTHENTICATED_PEER``. A
flood of fresh keys at full speed therefore adds one row plus one per distinct refusal reason a minute (3 rows a
minute for a CURVE key flood: ~4,300 rows, ~6 MB of audit database a day), and
never takes a bucket from an authenticated client, whose refusals keep its identity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from appliance.audit.store import Entry

OVERFLOW_PEER = "*"  # where events go when too many distinct peers flood at once
UNAUTHENTICATED_PEER = "*unauthenticated"  # folded events of parties without a verified identity


def unauthenticated(client: str) -> bool:
    """A party that tried to authenticate and failed: a refused key (``unknown:…``), a failed handshake, an HTTP
    request with no key (``anonymous``). Connections of a device run without CURVE (``anonymous:…``) keep their
    own buckets: there every client is anonymous, and its refusals stay individually visible."""
    return client.startswith("unknown:") or client in ("unauthenticated", "anonymous")


@dataclass
class _Bucket:
    first: Entry  # the row written when the interval opened
    opened: float
    written: int = 1  # events of this interval written as their own rows
    extra: int = 0  # events past the burst, not yet written


class Aggregator:
    """Not thread-safe: owned by the serving loop, which calls ``flush`` every turn."""

    def __init__(
        self,
        write: Callable[[list[Entry]], None],
        interval_s: float = 10.0,
        burst: int = 10,
        max_keys: int = 4096,
        unauth_rows: int = 1,
        unauth_interval_s: float = 60.0,
    ):
        self._write = write
        self.interval_s = interval_s
        self.burst = burst
        self.max_keys = max_keys
        self.unauth_rows, self.unauth_interval_s = unauth_rows, unauth_interval_s
        self._buckets: dict[tuple[str, str, str], _Bucket] = {}
        self._unauth_opened: float | None = None
        self._unauth_written = 0
        self._folded: dict[tuple[str, str], tuple[Entry, int]] = {}
        self.events = 0
        self.rows = 0
        self.folded_unauthenticated = 0  # events of unauthenticated parties folded into summary rows, ever

    def add(self, entry: Entry, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.events += 1
        if unauthenticated(entry.client):
            return self._add_unauthenticated(entry, now)
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

    def _add_unauthenticated(self, entry: Entry, now: float) -> None:
        if self._unauth_opened is None or now - self._unauth_opened >= self.unauth_interval_s:
            self._close_unauthenticated()
            self._unauth_opened = now
        if self._unauth_written < self.unauth_rows:
            self._unauth_written += 1
            self._emit([entry])
            return
        key = (entry.op, entry.error_code or entry.status)
        first, count = self._folded.get(key, (entry, 0))
        self._folded[key] = (first, count + 1)
        self.folded_unauthenticated += 1

    def _close_unauthenticated(self) -> None:
        rows = [
            replace(first, client=UNAUTHENTICATED_PEER, role="-", request_id="-", occurrences=count)
            for first, count in self._folded.values()
        ]
        self._folded.clear()
        self._unauth_written = 0
        self._unauth_opened = None
        if rows:
            self._emit(rows)

    def flush(self, now: float | None = None, force: bool = False) -> None:
        """Write one summary row per interval that ended (every open one when ``force``)."""
        now = time.monotonic() if now is None else now
        if self._unauth_opened is not None and (force or now - self._unauth_opened >= self.unauth_interval_s):
            self._close_unauthenticated()
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
