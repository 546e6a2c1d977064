"""The daemon's serving loop: one ZeroMQ ROUTER socket, msgpack frames, streamed replies.

The loop owns every socket; the engine runs in its own thread (``runner.EngineRunner``) and wakes
the loop through an inproc PUSH/PULL pair when replies are ready, so a slow step never blocks
``health`` or the watchdog.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

import zmq

from . import __version__
from . import protocol as P
from .audit import AuditLog, Entry
from .audit_writer import AuditWriter
from .config import Config
from .loader import LoadedModel, load_model
from .notify import Notifier
from .runner import EngineRunner, Job
from .scheduler import Scheduler, Sequence

log = logging.getLogger("appliance.server")


class BindError(Exception):
    """An endpoint cannot be bound (in use, bad address, no permission)."""
WAKE = "inproc://engine-wake"


class Server:
    def __init__(self, config: Config, model: LoadedModel, audit: AuditLog | None, notifier: Notifier | None = None):
        self.config = config
        self.model = model
        self.audit = audit
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self.started = time.monotonic()
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, config.server.max_message_bytes)
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.authenticator = None
        self.clients: dict = {}
        if config.auth.curve:
            self._secure()
        for endpoint in config.server.endpoints:
            try:
                self.router.bind(endpoint)
            except zmq.ZMQError as exc:
                self.router.close(linger=0)
                self.ctx.term()
                raise BindError(f"cannot listen on {endpoint}: {exc.strerror} (is another edge-appliance running? "
                                "change [server] endpoints)") from None
        self.wake_pull = self.ctx.socket(zmq.PULL)
        self.wake_pull.bind(WAKE)
        self._wake_local = threading.local()
        self.writer = AuditWriter(audit) if audit is not None else None
        self.runner = self._make_runner(model)
        self._retiring: list[EngineRunner] = []  # previous models finishing their in-flight requests
        self._routes: dict[str, list[bytes]] = {}
        self.reload_event = threading.Event()
        self._loader: threading.Thread | None = None
        self._last_probe = 0.0
        self._loaded: LoadedModel | Exception | None = None

    def _secure(self) -> None:
        from provisioning.keys import DEVICE_CURVE, read_private, wipe

        from .auth import load_clients, secure_server, start_authenticator

        self.clients = {e.user_id: e for e in load_clients(Path(self.config.auth.clients)).values()}
        secret = read_private(DEVICE_CURVE, self.config.key_dir)
        try:
            public = secure_server(self.router, bytes(secret).strip())
        finally:
            wipe(secret)
        self.authenticator = start_authenticator(self.ctx, {e.key: e for e in self.clients.values()},
                                                 self._audit_denied)
        log.info("CURVE on: server key %s, %d allowed client(s)", public, len(self.clients))

    def _audit_denied(self, z85_key: str) -> None:
        """Runs in the ZAP thread: an unknown key tried to connect."""
        from .auth import key_fingerprint

        log.warning("refused CURVE client %s (not in the allow-list)", key_fingerprint(z85_key))
        self.runner.write_audit(Entry(request_id="-", op="connect", client=f"unknown:{key_fingerprint(z85_key)}",
                                      role="-", status="rejected", error_code=P.E_UNAUTHORIZED,
                                      model_id=self.model.model_id, model_version=self.model.version))

    def _make_runner(self, model: LoadedModel) -> EngineRunner:
        scheduler = Scheduler(num_slots=model.engine.num_slots, max_queued=self.config.engine.max_queued,
                              max_seq_len=model.engine.max_seq_len, eos_token_id=model.spec.eos_token_id)
        return EngineRunner(model, scheduler, self.audit, wake=self._wake, writer=self.writer)

    # -- reload (SIGHUP): load beside the serving model, then swap between requests --------------
    def _start_reload(self) -> None:
        self.reload_event.clear()
        if self._loader is not None:
            return  # one reload at a time; a second SIGHUP during loading is folded into it
        self.notifier.status("reloading model")
        log.info("reload requested: loading the installed bundle beside the serving model")

        def load() -> None:
            try:
                self._loaded = load_model(self.config)
            except Exception as exc:  # any failure keeps the old model serving
                self._loaded = exc
            self._wake()

        self._loader = threading.Thread(target=load, name="reload", daemon=True)
        self._loader.start()

    def _finish_reload(self) -> None:
        if self._loader is None or self._loader.is_alive():
            return
        loaded, self._loader, self._loaded = self._loaded, None, None
        if isinstance(loaded, Exception):
            log.error("reload failed, still serving %s v%d: %s", self.model.model_id, self.model.version, loaded)
            self.notifier.status(f"reload failed; serving {self.model.model_id} v{self.model.version}")
            return
        old = self.runner
        self.runner = self._make_runner(loaded)
        self.runner.start()
        self.model = loaded
        self._retiring.append(old)
        log.info("reloaded: now serving %s v%d; %d request(s) finish on the previous model", loaded.model_id,
                 loaded.version, sum(old.load().values()))
        self.notifier.ready(f"serving {loaded.model_id} v{loaded.version}")

    def _probe_audit(self) -> None:
        """Leave the fail-closed state by itself once the audit store can write again."""
        now = time.monotonic()
        if self.runner.audit_ok or self.audit is None or now - self._last_probe < 1.0:
            return
        self._last_probe = now
        if self.audit.probe():
            log.warning("audit store writable again; accepting requests")
            self.runner.audit_ok = True

    def _reap_retired(self) -> None:
        for old in [r for r in self._retiring if r.idle()]:
            old.stop()
            old.join(timeout=5)
            self._retiring.remove(old)

    def _wake(self) -> None:
        sock = getattr(self._wake_local, "sock", None)
        if sock is None:
            sock = self._wake_local.sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(WAKE)
        with contextlib.suppress(zmq.Again):  # wake-ups already queued: the loop will flush everything
            sock.send(b"", zmq.NOBLOCK)

    # -- request handling ----------------------------------------------------------------------
    def _reply(self, envelope: list[bytes], frame: bytes) -> None:
        self.router.send_multipart([*envelope, frame])

    def _reject(self, envelope: list[bytes], client: str, exc: P.ProtocolError, op: str = "?", **extra) -> None:
        self.runner.write_audit(Entry(request_id=exc.request_id or "-", op=op, client=client, status="rejected",
                                      model_id=self.model.model_id, model_version=self.model.version,
                                      error_code=exc.code))
        self._reply(envelope, P.error_reply(exc.request_id, exc.code, exc.message, **extra))

    def _handle(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return  # no routing envelope: nothing to answer
        envelope = [f.bytes for f in frames[:-1]]
        client = _client_identity(frames[-1])
        role = self.clients[client].role if client in self.clients else "infer"
        try:
            req = P.parse_request(frames[-1].bytes, self.config.engine.max_new_tokens)
        except P.ProtocolError as exc:
            log.info("rejected request from %s: %s %s", client, exc.code, exc.message)
            self._reject(envelope, client, exc)
            return
        if req.op == P.OP_HEALTH:
            self._reply(envelope, P.result_reply(req.id, self.health()))
        elif req.op == P.OP_INFO:
            self._reply(envelope, P.result_reply(req.id, self.info()))
        elif req.op == P.OP_CANCEL:
            key = _route_key(envelope, req.target)
            found = any(r.cancel(key) for r in (self.runner, *self._retiring))
            self._reply(envelope, P.result_reply(req.id, {"cancelled": found, "target": req.target}))
        else:
            self._generate(envelope, client, role, req)

    def _generate(self, envelope: list[bytes], client: str, role: str, req: P.Request) -> None:
        def refuse(code: str, message: str, **extra) -> None:
            self._reject(envelope, client, P.ProtocolError(code, message, req.id), op=req.op, **extra)

        if self.stop_event.is_set():
            return refuse(P.E_SHUTTING_DOWN, "the daemon is shutting down; retry against the restarted service")
        if not self.runner.audit_ok:
            return refuse(P.E_AUDIT, "the audit store cannot be written; requests are refused until it recovers")
        key = _route_key(envelope, req.id)
        if key in self._routes:
            return refuse(P.E_BAD_REQUEST, f"a request with id {req.id!r} is already in flight on this connection")
        spec = self.model.spec
        ids = [spec.bos_token_id, *self.model.tokenizer.encode(req.prompt).ids]
        room = self.model.engine.max_seq_len - len(ids)
        if room < 1:
            return refuse(P.E_TOO_LARGE, f"prompt is {len(ids)} tokens; the context holds "
                                         f"{self.model.engine.max_seq_len}")
        deadline = time.monotonic() + req.deadline_ms / 1000.0 if req.deadline_ms else None
        seq = Sequence(key=key, prompt_ids=ids, max_tokens=min(req.max_tokens, room), sampling=req.sampling,
                       deadline=deadline, ignore_eos=req.ignore_eos)
        if not self.runner.submit(Job(seq=seq, request=req, client=client, role=role)):
            return refuse(P.E_BUSY, "the waiting queue is full", retry_after_ms=250)
        self._routes[key] = envelope

    def _flush_outbox(self) -> None:
        for runner in (*self._retiring, self.runner):
            while not runner.outbox.empty():
                out = runner.outbox.get()
                envelope = self._routes.get(out.key)
                if envelope is None:
                    continue
                self._reply(envelope, out.frame)
                if out.final:
                    del self._routes[out.key]

    def health(self) -> dict:
        load = self.runner.load()
        return {"status": "ok" if self.runner.audit_ok else "degraded",
                "audit": "ok" if self.runner.audit_ok else "unavailable",
                "model_id": self.model.model_id, "version": self.model.version,
                "uptime_s": round(time.monotonic() - self.started, 1), **load,
                "tokens_generated": self.runner.tokens_generated,
                "audit_commits": self.writer.commits if self.writer else 0,
                "audit_rows": self.writer.rows if self.writer else 0}

    def info(self) -> dict:
        eng = self.config.engine
        return {"protocol": P.VERSION, "software": __version__, "model_id": self.model.model_id,
                "version": self.model.version, "bundle_id": self.model.bundle_id,
                "architecture": self.model.spec.architecture, "engine": self.model.engine.kind,
                "limits": {"max_batch": self.model.engine.num_slots, "max_queued": eng.max_queued,
                           "max_seq_len": self.model.engine.max_seq_len, "max_new_tokens": eng.max_new_tokens,
                           "max_message_bytes": self.config.server.max_message_bytes,
                           "max_prompt_chars": P.MAX_PROMPT_CHARS}}

    # -- loop ----------------------------------------------------------------------------------
    def serve_forever(self, drain_s: float = 10.0) -> None:
        if self.writer is not None:
            self.writer.start()
        self.runner.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_pull, zmq.POLLIN)
        interval = self.notifier.watchdog_interval
        timeout_ms = 200 if interval is None else min(200, int(interval * 500))
        drain_until = None
        try:
            while True:
                self.notifier.watchdog()
                events = dict(poller.poll(timeout_ms))
                if self.wake_pull in events:
                    while self.wake_pull.poll(0):
                        self.wake_pull.recv()
                self._flush_outbox()
                self._probe_audit()
                if self.reload_event.is_set():
                    self._start_reload()
                self._finish_reload()
                self._reap_retired()
                if self.router in events:
                    for _ in range(64):  # bounded so replies and the watchdog are never starved
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                if self.stop_event.is_set():
                    if drain_until is None:
                        self.notifier.stopping()
                        drain_until = time.monotonic() + drain_s
                        log.info("stopping: draining %d in-flight request(s)", len(self._routes))
                    if not self._routes or time.monotonic() >= drain_until:
                        break
        finally:
            for runner in (self.runner, *self._retiring):
                runner.stop()
                runner.join(timeout=5)
            if self.writer is not None:
                self.writer.stop()  # commits what is queued; their replies are flushed below
            self._flush_outbox()
            self.router.close(linger=500)
            self.wake_pull.close(linger=0)
            if self.authenticator is not None:
                self.authenticator.stop()
            self.ctx.term()


def _route_key(envelope: list[bytes], rid: str | None) -> str:
    return f"{envelope[0].hex()}:{rid}"


def _client_identity(frame: zmq.Frame) -> str:
    """The CURVE public key (``User-Id`` set by ZAP) when authenticated, else 'anonymous'."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        user = None
    return user or "anonymous"
