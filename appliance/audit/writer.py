"""Group commit: the one path every audit row takes, and the one owner of audit health.

Producers (the engine thread, the serving loop, the ZAP handler) hand over entries, optionally with
a callback; the writer commits everything that queued up while its previous commit was being
fsynced in a single transaction, then calls each callback with the outcome. Final replies are sent
from those callbacks, so a reply still never leaves before its row is durable, and no producer
ever waits for an fsync.

While the store cannot be written the writer is unhealthy (the daemon fails closed); it probes the
store once a second and becomes healthy again by itself.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from appliance.audit.schema import AuditError
from appliance.audit.store import AuditLog, Entry
from appliance.metrics import METRICS

log = logging.getLogger("appliance.audit")

Done = Callable[[bool], None]
_STOP = None


class AuditWriter(threading.Thread):
    """``audit`` None means auditing is off (benchmarks): every submit succeeds at once."""

    def __init__(self, audit: AuditLog | None, probe_every_s: float = 1.0):
        super().__init__(name="audit-writer", daemon=True)
        self.audit = audit
        self.healthy = True
        self.commits = 0
        self.rows = 0
        self.failures = 0
        self.last_commit_s = 0.0
        self.probe_every_s = probe_every_s
        self._queue: queue.SimpleQueue[tuple[list[Entry], Done | None] | None] = queue.SimpleQueue()

    def submit(self, entries: list[Entry], done: Done | None = None) -> None:
        if self.audit is None:
            if done is not None:
                done(True)
            return
        self._queue.put((entries, done))

    def run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.probe_every_s)
            except queue.Empty:
                self._probe()
                continue
            if item is _STOP:
                return
            batch = [item]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._queue.put(_STOP)  # finish this batch, then stop
                    break
                batch.append(more)
            self._commit(batch)
            # Drop the batch before waiting: its callbacks reach their runner, and a retired runner (after a
            # reload) must not be kept alive, with its whole model, until the next commit.
            batch = item = more = None

    def _commit(self, batch: list[tuple[list[Entry], Done | None]]) -> None:
        entries = [e for group, _ in batch for e in group]
        start = time.perf_counter()
        try:
            with METRICS.audit_commit.time():
                self.audit.record_many(entries)
            ok = True
        except AuditError as exc:
            METRICS.audit_failures.inc()
            if self.healthy:
                log.error("audit store unavailable: %s", exc)
            ok = False
        self.last_commit_s = time.perf_counter() - start
        self._set_health(ok)
        self.commits += 1
        self.rows += len(entries) if ok else 0
        self.failures += 0 if ok else 1
        for _, done in batch:
            if done is not None:
                done(ok)

    def _probe(self) -> None:
        if not self.healthy and self.audit is not None and self.audit.probe():
            self._set_health(True)

    def _set_health(self, ok: bool) -> None:
        if ok and not self.healthy:
            log.warning("audit store writable again; accepting requests")
        self.healthy = ok

    def stop(self) -> None:
        if self.audit is None or not self.is_alive():
            return
        self._queue.put(_STOP)
        self.join(timeout=30)
