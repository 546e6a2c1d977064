"""The engine thread: takes jobs from the serving loop, runs each scheduler plan on the engine
(``engine_core.EngineCore``) and hands the logits to the output processor (``output.OutputProcessor``), which
samples, detokenizes, audits and queues encoded replies for the ZeroMQ loop (which never waits on the engine)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from appliance.audit.writer import AuditWriter
from appliance.loader import LoadedModel
from appliance.serving.engine_core import EngineCore
from appliance.serving.output import Job, Outgoing, OutputProcessor
from appliance.serving.response_cache import ResponseCache
from appliance.serving.scheduler import Finish, Scheduler, StepPlan
from appliance.serving.sessions import SessionStore
from appliance.serving.speculative import Speculator
from appliance.transport import protocol as P

__all__ = ["EngineRunner", "Job", "Outgoing"]

log = logging.getLogger("appliance.runner")


class EngineRunner(threading.Thread):
    def __init__(
        self,
        model: LoadedModel,
        scheduler: Scheduler,
        writer: AuditWriter,
        wake: Callable[[], None],
        sessions: SessionStore | None = None,
        responses: ResponseCache | None = None,
        speculator: Speculator | None = None,
    ):
        super().__init__(name="engine", daemon=True)
        self.model = model
        self.scheduler = scheduler
        self.speculator = speculator
        self._lock = threading.Lock()  # the scheduler's, shared with the output processor
        self._work = threading.Condition(self._lock)
        self._stopping = False
        self.output = OutputProcessor(model, scheduler, writer, wake, self._lock, sessions, responses, speculator)
        self.core = EngineCore(model, scheduler, self.output, speculator)
        self.outbox = self.output.outbox  # read by the serving loop
        self._wake = wake

    @property
    def tokens_generated(self) -> int:
        return self.output.tokens_generated

    @property
    def request_failures(self) -> int:
        """Requests ended by a fault in their own sampling/detokenization."""
        return self.output.request_failures

    # -- called from the server thread ---------------------------------------------------------
    def submit(self, job: Job) -> bool:
        """Queue a job; False when the waiting queue is full."""
        hit = self.output.prepare(job)
        with self._work:
            if hit is not None:  # answered from memory: finished at once, audited like any other request
                self.output.answer_from_cache(job, hit)
                self.scheduler.finish_now(job.seq, Finish(hit.finish))
            elif not self.scheduler.add(job.seq):
                return False
            self.output.jobs[job.seq.key] = job
            self._work.notify()
            return True

    def cancel(self, key: str) -> bool:
        with self._work:
            found = self.scheduler.cancel(key) is not None
            self._work.notify()
            return found

    def load(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running)}

    def idle(self) -> bool:
        """No request waiting, running or awaiting its final reply."""
        with self._lock:
            return self.output.idle() and self.scheduler.idle

    def stop(self) -> None:
        """End the thread (at its next turn)."""
        with self._work:
            self._stopping = True
            self._work.notify()

    # -- engine thread -------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            with self._work:
                while self.scheduler.idle and not self._stopping:
                    self._work.wait(timeout=1.0)
                if self._stopping:
                    self.core.close()
                    return
                plan = self.scheduler.schedule()
            try:
                self._step(plan)
            except Exception as exc:  # an engine fault must not kill the daemon: fail the requests in the step
                log.exception("engine step failed")
                with self._work:
                    for key in plan.keys:
                        self.scheduler.cancel(key)
                    failed = self.scheduler.take_finished()
                self.output.end(failed, (P.E_INTERNAL, f"engine step failed: {exc}"))
            if self.outbox.qsize():
                self._wake()

    def _step(self, plan: StepPlan) -> None:
        """End what the plan found finished, run it on the engine, then end what finished in it."""
        self.output.end(plan.finished)
        self.core.step(plan)
        with self._lock:
            finished = self.scheduler.take_finished()
        self.output.end(finished)
