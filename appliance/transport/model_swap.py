"""Reload (SIGHUP) as a model swap, in the manner of gunicorn's arbiter: load the installed bundle beside the serving
model on a thread, start a runner for it between two loop turns, and let the previous runner drain: it finishes the
requests it holds while new ones go to the new runner, and is stopped once idle. A failed load changes nothing; the
old model keeps serving. Every outcome is published for ``edge-appliance reload`` (``appliance.reload``).

``ModelSwap`` owns the serving runner and the retiring ones; the serving loop calls ``begin`` when a reload is asked
for and ``step`` every turn (finish a completed load, stop drained runners, free retired models).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

from appliance import reload
from appliance.audit.writer import AuditWriter
from appliance.config import Config
from appliance.engine.ort_engine import trim_heap
from appliance.errors import ApplianceError
from appliance.loader import LoadedModel, load_model
from appliance.metrics import METRICS
from appliance.notify import Notifier
from appliance.serving.response_cache import ResponseCache
from appliance.serving.runner import EngineRunner
from appliance.serving.scheduler import Scheduler
from appliance.serving.sessions import SessionStore
from appliance.serving.speculative import SpeculationConfig, build_speculator

log = logging.getLogger("appliance.server")


def build_runner(
    config: Config,
    model: LoadedModel,
    writer: AuditWriter,
    *,
    wake: Callable[[], None],
    sessions: SessionStore,
    responses: ResponseCache | None,
) -> EngineRunner:
    """A runner for ``model``; the others are the daemon-wide parts every runner shares."""
    scheduler = Scheduler(
        num_slots=model.engine.num_slots,
        max_queued=config.engine.max_queued,
        max_seq_len=model.engine.max_seq_len,
        eos_token_ids=model.spec.eos_token_ids,
        prefill_chunk=config.engine.prefill_chunk,
    )
    eng = config.engine
    speculation = SpeculationConfig(eng.speculative, eng.draft_tokens, eng.speculative_max_batch)
    return EngineRunner(
        model,
        scheduler,
        writer,
        wake=wake,
        sessions=sessions,
        responses=responses,
        speculator=build_speculator(speculation, model.draft),
    )


class ModelSwap:
    def __init__(
        self,
        config: Config,
        model: LoadedModel,
        make_runner: Callable[[LoadedModel], EngineRunner],
        notifier: Notifier,
        wake: Callable[[], None],
    ):
        self.config = config
        self.model = model
        self.notifier = notifier
        self._make_runner = make_runner
        self._wake = wake
        self.runner = make_runner(model)
        self._retiring: list[EngineRunner] = []  # previous models finishing their in-flight requests
        self._released: list[weakref.ref] = []  # engines of retired runners, until collected (_collect_released)
        self._next_collect = 0.0
        self._loader: threading.Thread | None = None
        self._loaded: LoadedModel | Exception | None = None
        self._loaded_in = 0.0  # seconds the last reload's load took
        self.reloads = 0  # generation published to `edge-appliance reload` (appliance.reload)

    def status_line(self) -> str:
        """systemd's StatusText while serving (also after every reload, failed or not)."""
        return f"serving {self.model.model_id} v{self.model.version} on {', '.join(self.config.server.endpoints)}"

    def runners(self) -> tuple[EngineRunner, ...]:
        """The serving runner first, then the retiring ones."""
        return (self.runner, *self._retiring)

    def oldest_first(self) -> tuple[EngineRunner, ...]:
        """The retiring runners in the order they were retired, then the serving one."""
        return (*self._retiring, self.runner)

    def retiring(self) -> int:
        """Previous models not yet freed: runners still draining, and engines not yet collected (health)."""
        return len(self._retiring) + len(self._released)

    def stop(self) -> None:
        for runner in self.runners():
            runner.stop()
            runner.join(timeout=5)

    # -- the swap --------------------------------------------------------------------------------
    def begin(self) -> None:
        """Start loading the installed bundle beside the serving model (once: a reload asked for during a load is
        folded into it)."""
        if self._loader is not None:
            return
        self.notifier.status("reloading model")
        log.info("reload requested: loading the installed bundle beside the serving model")

        def load() -> None:
            start = time.monotonic()
            try:
                self._loaded = load_model(self.config)
                self._loaded_in = time.monotonic() - start
            except Exception as exc:  # any failure keeps the old model serving
                self._loaded = exc
            self._wake()

        self._loader = threading.Thread(target=load, name="reload", daemon=True)
        self._loader.start()

    def step(self) -> None:
        """Once a loop turn: swap in a finished load, stop the runners that drained, free the models they held."""
        self._finish()
        self._reap_retired()
        self._collect_released()  # after _reap_retired returned: its locals no longer hold a runner

    def _finish(self) -> None:
        if self._loader is None or self._loader.is_alive():
            return
        loaded, self._loader, self._loaded = self._loaded, None, None
        if isinstance(loaded, Exception):
            if not isinstance(loaded, ApplianceError):  # a bug or a missing module: name it, traceback at debug
                log.debug("reload failure", exc_info=loaded)
                loaded = ApplianceError(f"{type(loaded).__name__}: {loaded}")
            log.error("reload failed, still serving %s v%d: %s", self.model.model_id, self.model.version, loaded)
            self.notifier.status(f"reload failed; {self.status_line()}")
            self._publish(False, f"reload failed, still serving v{self.model.version}: {loaded}")
            METRICS.reloads.labels("failed").inc()
            return
        old = self.runner
        self.runner = self._make_runner(loaded)
        self.runner.start()
        self.model = loaded
        self._retiring.append(old)
        log.info(
            "reloaded: now serving %s v%d; %d request(s) finish on the previous model",
            loaded.model_id,
            loaded.version,
            sum(old.load().values()),
        )
        self.notifier.ready(self.status_line())
        self._publish(True, f"now serving {loaded.model_id} v{loaded.version}")
        METRICS.reloads.labels("ok").inc()
        METRICS.model_loaded(loaded.model_id, loaded.version, self._loaded_in)

    def _publish(self, ok: bool, message: str) -> None:
        self.reloads += 1
        try:
            reload.publish(self.config.state_dir, reload.ReloadStatus(os.getpid(), self.reloads, ok, message))
        except OSError as exc:  # the reload itself is done; only its reporting is lost
            log.error("cannot write the reload status to %s: %s", self.config.state_dir, exc)

    def _reap_retired(self) -> None:
        for old in [r for r in self._retiring if r.idle()]:
            old.stop()
            old.join(timeout=5)
            self._retiring.remove(old)
            self._released.append(weakref.ref(old.model.engine))

    def _collect_released(self) -> None:
        """Free retired models. A runner and its model sit in reference cycles that only a full collection breaks,
        and the audit writer may still hold the runner's last callback for a moment; so collect (at most once a
        second) until every retired engine is gone, then give the C heap's free pages back. Without this each
        reload kept the previous model resident (1.5B q4: 1.49 GB after start, 2.9-3.4 GB after reloads)."""
        now = time.monotonic()
        if not self._released or now < self._next_collect:
            return
        self._next_collect = now + 1.0
        gc.collect()
        self._released = [ref for ref in self._released if ref() is not None]
        if not self._released:
            trim_heap()
