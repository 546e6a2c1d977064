"""Group commit: one thread writes audit rows so the engine never waits for an fsync.

Producers hand over a batch of entries with a callback; the writer commits everything that
queued up while its previous commit was being fsynced in a single transaction, then calls each
callback with the outcome. Final replies are sent from those callbacks, so a reply still never
leaves before its row is durable.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from appliance.audit.chain import AuditError, AuditLog, Entry
from appliance.metrics import METRICS

log = logging.getLogger("appliance.audit")


class AuditWriter(threading.Thread):
    def __init__(self, audit: AuditLog):
        super().__init__(name="audit-writer", daemon=True)
        self.audit = audit
        self.healthy = True
        self.commits = 0
        self.rows = 0
        self._queue: queue.SimpleQueue[tuple[list[Entry], Callable[[bool], None]] | None] = queue.SimpleQueue()

    def submit(self, entries: list[Entry], done: Callable[[bool], None]) -> None:
        self._queue.put((entries, done))

    def run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(more)
            self._commit(batch)

    def _commit(self, batch: list[tuple[list[Entry], Callable[[bool], None]]]) -> None:
        entries = [e for group, _ in batch for e in group]
        try:
            with METRICS.audit_commit.time():
                self.audit.record_many(entries)
            ok = True
        except AuditError as exc:
            METRICS.audit_failures.inc()
            if self.healthy:
                log.error("audit store unavailable: %s", exc)
            ok = False
        self.healthy = ok
        self.commits += 1
        self.rows += len(entries) if ok else 0
        for _, done in batch:
            done(ok)

    def stop(self) -> None:
        self._queue.put(None)
        self.join(timeout=30)
