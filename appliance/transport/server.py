"""The daemon's serving loop: one ZeroMQ ROUTER socket, msgpack frames, streamed replies.

The loop owns every socket; the engine runs in its own thread (``serving.runner.EngineRunner``) and
wakes the loop through an inproc PUSH/PULL pair when replies are ready, so a slow step never blocks
``health`` or the watchdog. Every message is checked here before anything else looks at it: exactly
a routing envelope and one payload frame, a bounded size, bounded msgpack; each loop turn reads for
a bounded time. Generate requests go through ``serving.admission``; every audit row goes through
the group-commit writer, refusals aggregated so that a flood costs a bounded number of rows.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import queue
import threading
import time
import weakref
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from appliance import __version__, reload
from appliance.audit import AuditLog, Entry
from appliance.audit.aggregate import Aggregator
from appliance.audit.writer import AuditWriter
from appliance.config import Config
from appliance.engine.ort_engine import trim_heap
from appliance.errors import ApplianceError
from appliance.loader import LoadedModel, load_model
from appliance.metrics import METRICS
from appliance.notify import Notifier
from appliance.serving import roles
from appliance.serving.admission import Admission, Peer, scoped
from appliance.serving.response_cache import ResponseCache
from appliance.serving.runner import EngineRunner
from appliance.serving.scheduler import Scheduler
from appliance.serving.sessions import SessionStore
from appliance.serving.speculative import SpeculationConfig, build_speculator
from appliance.serving.tools import tools_supported
from appliance.transport import protocol as P
from appliance.transport.connections import Connections

log = logging.getLogger("appliance.server")

WAKE = "inproc://engine-wake"
# Frames up to this many times the configured limit are read and answered ``too_large``; libzmq
# drops the connection of anything larger (MAXMSGSIZE) before it is buffered.
HARD_FRAME_FACTOR = 4
_MONITOR_EVENTS = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class ThreadDied(ApplianceError):
    """The engine or audit writer thread ended by itself: the daemon cannot serve and exits, so systemd restarts
    it (a watchdog ping from a loop whose workers are gone would keep a wedged daemon up forever)."""


class BindError(ApplianceError):
    """An endpoint cannot be bound (in use, bad address, no permission)."""


class Server:
    def __init__(self, config: Config, model: LoadedModel, audit: AuditLog | None, notifier: Notifier | None = None):
        self.config = config
        self.model = model
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self._released: list[weakref.ref] = []  # engines of retired runners, until collected (_collect_released)
        self._next_collect = 0.0
        self.started = time.monotonic()
        sc = config.server
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, sc.max_message_bytes * HARD_FRAME_FACTOR)
        self.router.setsockopt(zmq.RCVHWM, sc.rcvhwm)
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.writer = AuditWriter(audit)
        self.aggregator = Aggregator(
            self.writer.submit,
            interval_s=config.audit.aggregate_s,
            unauth_interval_s=config.audit.aggregate_unauthenticated_s,
        )
        self._denied: queue.SimpleQueue[str] = queue.SimpleQueue()  # ZAP thread -> loop
        self.authenticator = None
        self.roles: dict[str, str] = {}  # CURVE User-Id -> role
        if config.auth.curve:
            self._secure()
        # The monitor starts before bind so no connection is missed (see transport/connections.py).
        self.monitor = self.router.get_monitor_socket(_MONITOR_EVENTS)
        self.connections = Connections()
        for endpoint in sc.endpoints:
            try:
                self.router.bind(endpoint)
            except zmq.ZMQError as exc:
                self._close_sockets()
                raise BindError(
                    f"cannot listen on {endpoint}: {exc.strerror} (is another edge-appliance running? "
                    "change [server] endpoints)"
                ) from None
        self.wake_pull = self.ctx.socket(zmq.PULL)
        self.wake_pull.bind(WAKE)
        self._wake_local = threading.local()
        ss = config.sessions
        self.sessions = SessionStore(ss.max_mb << 20, ss.ttl_s, ss.max_sessions, ss.max_per_identity)
        self.responses = ResponseCache(config.engine.response_cache) if config.engine.response_cache else None
        self.admission = Admission(self.sessions, self.responses, sc.max_per_client)
        self.runner = self._make_runner(model)
        self._retiring: list[EngineRunner] = []  # previous models finishing their in-flight requests
        self._routes: dict[str, list[bytes]] = {}  # scoped request key -> reply envelope
        self._route_keys: dict[bytes, set[str]] = {}  # routing id -> its requests in flight
        self._in_flight: dict[str, int] = {}  # identity -> requests in flight
        self._owners: dict[str, str] = {}  # scoped request key -> its identity
        self._loader: threading.Thread | None = None
        self._loaded: LoadedModel | Exception | None = None
        self.disconnect_cancels = 0
        self.frames_refused = 0
        self.late_frames = 0  # frames of connections that had closed before they were read
        self._loaded_in = 0.0  # seconds the last reload's load took
        self.reloads = 0  # generation published to `edge-appliance reload` (appliance.reload)
        METRICS.watch(self)

    def status_line(self) -> str:
        """systemd's StatusText while serving (also after every reload, failed or not)."""
        return f"serving {self.model.model_id} v{self.model.version} on {', '.join(self.config.server.endpoints)}"

    def _publish_reload(self, ok: bool, message: str) -> None:
        self.reloads += 1
        try:
            reload.publish(self.config.state_dir, reload.ReloadStatus(os.getpid(), self.reloads, ok, message))
        except OSError as exc:  # the reload itself is done; only its reporting is lost
            log.error("cannot write the reload status to %s: %s", self.config.state_dir, exc)

    def _secure(self) -> None:
        from appliance.transport.auth import load_clients, secure_server, start_authenticator
        from provisioning.keys import DEVICE_CURVE, read_private, wipe

        clients = load_clients(Path(self.config.auth.clients))
        self.roles = {e.user_id: e.role for e in clients.values()}
        secret = read_private(DEVICE_CURVE, self.config.key_dir)
        try:
            public = secure_server(self.router, bytes(secret).strip())
        finally:
            wipe(secret)
        self.authenticator = start_authenticator(self.ctx, clients, self._denied.put)
        log.info("CURVE on: server key %s, %d allowed client(s)", public, len(clients))

    def _make_runner(self, model: LoadedModel) -> EngineRunner:
        scheduler = Scheduler(
            num_slots=model.engine.num_slots,
            max_queued=self.config.engine.max_queued,
            max_seq_len=model.engine.max_seq_len,
            eos_token_ids=model.spec.eos_token_ids,
            prefill_chunk=self.config.engine.prefill_chunk,
        )
        eng = self.config.engine
        speculation = SpeculationConfig(eng.speculative, eng.draft_tokens, eng.speculative_max_batch)
        return EngineRunner(
            model,
            scheduler,
            self.writer,
            wake=self._wake,
            sessions=self.sessions,
            responses=self.responses,
            speculator=build_speculator(speculation, model.draft),
        )

    # -- reload (SIGHUP): load beside the serving model, then swap between requests --------------
    def _start_reload(self) -> None:
        self.reload_event.clear()
        if self._loader is not None:
            return  # one reload at a time; a second SIGHUP during loading is folded into it
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

    def _finish_reload(self) -> None:
        if self._loader is None or self._loader.is_alive():
            return
        loaded, self._loader, self._loaded = self._loaded, None, None
        if isinstance(loaded, Exception):
            if not isinstance(loaded, ApplianceError):  # a bug or a missing module: name it, traceback at debug
                log.debug("reload failure", exc_info=loaded)
                loaded = ApplianceError(f"{type(loaded).__name__}: {loaded}")
            log.error("reload failed, still serving %s v%d: %s", self.model.model_id, self.model.version, loaded)
            self.notifier.status(f"reload failed; {self.status_line()}")
            self._publish_reload(False, f"reload failed, still serving v{self.model.version}: {loaded}")
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
        self._publish_reload(True, f"now serving {loaded.model_id} v{loaded.version}")
        METRICS.reloads.labels("ok").inc()
        METRICS.model_loaded(loaded.model_id, loaded.version, self._loaded_in)

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

    def _wake(self) -> None:
        sock = getattr(self._wake_local, "sock", None)
        if sock is None:
            sock = self._wake_local.sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(WAKE)
        with contextlib.suppress(zmq.Again):  # wake-ups already queued: the loop will flush everything
            sock.send(b"", zmq.NOBLOCK)

    # -- receiving -----------------------------------------------------------------------------
    def _receive(self) -> bool:
        """Read one message; False when none is waiting. Only the routing id, an optional empty
        delimiter and one payload frame are kept: any further frame is dropped as it is read, so a
        message of many frames costs no memory beyond libzmq's own buffer and is never echoed."""
        try:
            first = self.router.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        parts, count = [first], 1
        while self.router.rcvmore:
            part = self.router.recv(copy=False)
            count += 1
            if count <= 3:
                parts.append(part)
        route = first.bytes
        delimited = len(parts) == 3 and len(parts[1].bytes) == 0
        envelope = [route, b""] if delimited or (len(parts) > 1 and len(parts[1].bytes) == 0) else [route]
        payload = parts[-1] if count == len(parts) else None
        if payload is None or not (count == 2 or delimited):
            peer = self._peer(route, parts[-1] if count > 1 else first)
            self._refuse(
                envelope,
                peer,
                P.ProtocolError(
                    P.E_MALFORMED,
                    f"a request is exactly one frame after the routing envelope; got {count - 1} frames",
                ),
            )
            return True
        if not self.connections.knows(route):
            # A new connection: its ACCEPTED (and any DISCONNECTED of a previous owner of its descriptor)
            # may have been queued while this turn was reading; attribute those first.
            self._on_monitor()
        if not self.connections.seen(route, _source_fd(payload)):
            self.late_frames += 1  # its connection closed while libzmq still held it: no one to answer
            return True
        peer = self._peer(route, payload)
        limit = self.config.server.max_connections_per_client
        if not peer.identity.startswith("anonymous:") and not self.connections.admit(route, peer.identity, limit):
            op, rid = "?", None
            if len(payload) <= self.config.server.max_message_bytes:  # answer under the request's own id
                try:
                    req = P.parse_request(payload.bytes, self.config.engine.max_new_tokens)
                    op, rid = req.op, req.id
                except P.ProtocolError:
                    pass
            message = f"this key already has {limit} connections open, the per-client limit; send on one of those"
            self._refuse(envelope, peer, P.ProtocolError(P.E_BUSY, message), op=op, rid=rid)
            return True
        self._handle(envelope, peer, payload)
        return True

    def _peer(self, route: bytes, frame: zmq.Frame) -> Peer:
        """The identity is the CURVE ``User-Id`` set by ZAP, or a random name of the connection."""
        try:
            user = frame.get("User-Id")
        except (zmq.ZMQError, AttributeError):
            user = None
        if user:
            return Peer(user, self.roles.get(user, roles.INFER), route)
        # a random name per connection: not the routing id, which is predictable and reusable by a reconnecting peer
        return Peer(f"anonymous:{self.connections.token(route)}", self.config.auth.anonymous_role, route)

    def _handle(self, envelope: list[bytes], peer: Peer, payload: zmq.Frame) -> None:
        if len(payload) > self.config.server.max_message_bytes:
            return self._refuse(
                envelope,
                peer,
                P.ProtocolError(
                    P.E_TOO_LARGE,
                    f"frame is {len(payload)} bytes; the limit is {self.config.server.max_message_bytes}",
                ),
            )
        try:
            req = P.parse_request(payload.bytes, self.config.engine.max_new_tokens)
            peer = self._subject(peer, req.op, req.on_behalf_of, req.id)
            roles.check(peer.role, req)
        except P.ProtocolError as exc:
            if exc.on_behalf_of is not None and peer.role == roles.GATEWAY:  # audited as the user it names
                peer = Peer(*exc.on_behalf_of, peer.route)
            return self._refuse(envelope, peer, exc, op=exc.op)
        if req.op == P.OP_GENERATE:
            return self._generate(envelope, peer, req)
        if scoped(peer.identity, req.id) in self._routes:  # its reply would land inside that request's stream
            err = P.ProtocolError(
                P.E_DUPLICATE_ID,
                f"a generate with id {req.id!r} is in flight for this client; give this {req.op} another id",
            )
            return self._refuse(envelope, peer, err, op=req.op, rid=req.id)
        if req.op == P.OP_AUTH_FAILED:  # a gateway refused a credential: audit it as that subject
            refused = Peer(req.on_behalf_of[0], "-", peer.route)
            self._audit(refused, req.op, req.id, "rejected", error_code=P.E_UNAUTHORIZED)
            # queued for the group-commit writer; false while the store cannot write (health: audit unavailable)
            return self._reply(envelope, P.result_reply(req.id, {"audited": self.writer.healthy}))
        METRICS.request(req.op, "ok")  # before the reply: a scrape after it must see it
        if req.op == P.OP_HEALTH:
            result = self.health()
        elif req.op == P.OP_INFO:
            result = {**self.info(), "identity": peer.identity, "role": peer.role}  # who the daemon sees: the caller
        elif req.op == P.OP_CANCEL:
            result = self._cancel(peer, req)
        elif req.op == P.OP_METRICS:
            result = {"format": "prometheus-text", "text": METRICS.render()}
        else:
            result = self._end_session(peer, req)
        changed = result.get("cancelled") or result.get("ended")
        self._audit(peer, req.op, req.id, "ok", aggregate=not changed)
        self._reply(envelope, P.result_reply(req.id, result))

    @staticmethod
    def _subject(peer: Peer, op: str, on_behalf_of: tuple[str, str] | None, rid: str) -> Peer:
        """The one place a request's subject (audit client and role, scope of its state) is decided:
        the sender itself, or the end user a ``gateway`` names in ``on_behalf_of``."""
        if on_behalf_of is None and op != P.OP_AUTH_FAILED:
            return peer
        if peer.role != roles.GATEWAY:
            raise P.ProtocolError(
                P.E_NOT_GATEWAY,
                f"field 'on_behalf_of' (and op {P.OP_AUTH_FAILED!r}) is accepted only from a gateway client",
                rid,
                op=op,
            )
        return peer if op == P.OP_AUTH_FAILED else Peer(*on_behalf_of, peer.route)

    def _cancel(self, peer: Peer, req: P.Request) -> dict:
        key = scoped(req.identity or peer.identity, req.target)
        found = any(r.cancel(key) for r in (self.runner, *self._retiring))
        return {"cancelled": found, "target": req.target}

    def _end_session(self, peer: Peer, req: P.Request) -> dict:
        ended = self.sessions.end(scoped(req.identity or peer.identity, req.session))
        return {"ended": ended, "session": req.session}

    def _generate(self, envelope: list[bytes], peer: Peer, req: P.Request) -> None:
        if self.stop_event.is_set():
            err = P.ProtocolError(P.E_SHUTTING_DOWN, "the daemon is shutting down; retry against the restarted service")
            return self._refuse(envelope, peer, err, op=req.op, rid=req.id)
        if not self.writer.healthy:
            err = P.ProtocolError(
                P.E_AUDIT, "the audit store cannot be written; requests are refused until it recovers"
            )
            return self._refuse(envelope, peer, err, op=req.op, rid=req.id)
        key = scoped(peer.identity, req.id)
        if key in self._routes:
            err = P.ProtocolError(
                P.E_DUPLICATE_ID,
                f"a request with id {req.id!r} is already in flight for this client; this reply refers to the "
                "duplicate, the original goes on",
            )
            return self._refuse(envelope, peer, err, op=req.op, rid=req.id)
        try:
            job = self.admission.admit(self.model, req, peer, self._in_flight.get(peer.identity, 0))
        except P.ProtocolError as exc:
            return self._refuse(envelope, peer, exc, op=req.op, rid=req.id)
        except Exception as exc:  # a bug admitting one request must cost that request, never the serving loop
            log.exception("admitting request %s failed", req.id)
            err = P.ProtocolError(P.E_INTERNAL, f"the request could not be admitted: {type(exc).__name__}")
            return self._refuse(envelope, peer, err, op=req.op, rid=req.id)
        if not self.runner.submit(job):
            self.admission.abandon(job)
            err = P.ProtocolError(P.E_BUSY, "the waiting queue is full")
            return self._refuse(envelope, peer, err, op=req.op, rid=req.id, retry_after_ms=250)
        self._routes[key] = envelope
        self._owners[key] = peer.identity
        self._route_keys.setdefault(peer.route, set()).add(key)
        self._in_flight[peer.identity] = self._in_flight.get(peer.identity, 0) + 1

    def _forget(self, key: str) -> None:
        envelope = self._routes.pop(key, None)
        if envelope is None:
            return
        keys = self._route_keys.get(envelope[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._route_keys[envelope[0]]
        identity = self._owners.pop(key)
        left = self._in_flight.get(identity, 1) - 1
        if left > 0:
            self._in_flight[identity] = left
        else:
            self._in_flight.pop(identity, None)

    # -- replies and audit of refusals -----------------------------------------------------------
    def _reply(self, envelope: list[bytes], frame: bytes) -> None:
        self.router.send_multipart([*envelope, frame])

    def _refuse(
        self,
        envelope: list[bytes],
        peer: Peer,
        exc: P.ProtocolError,
        op: str = "?",
        rid: str | None = None,
        **extra,
    ) -> None:
        rid = rid or exc.request_id
        self.frames_refused += 1
        METRICS.request(op, "rejected", exc.code)  # before the reply: a scrape after it must see it
        log.debug("refused %s from %s: %s %s", op, peer.identity, exc.code, exc.message)
        self._audit(peer, op, rid, "rejected", error_code=exc.code)
        self._reply(envelope, P.error_reply(rid, exc.code, exc.message, **extra))

    def _audit(
        self, peer: Peer, op: str, rid: str | None, status: str, error_code: str | None = None, aggregate: bool = True
    ) -> None:
        entry = Entry(
            request_id=rid or "-",
            op=op,
            client=peer.identity,
            role=peer.role,
            status=status,
            error_code=error_code,
            model_id=self.model.model_id,
            model_version=self.model.version,
        )
        if aggregate:
            self.aggregator.add(entry)
        else:
            self.writer.submit([entry])

    def _on_monitor(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind, fd = event["event"], int(event["value"])
            if kind == zmq.EVENT_ACCEPTED:
                self.connections.accepted(fd)
            elif kind == zmq.EVENT_DISCONNECTED:
                for route in self.connections.disconnected(fd):
                    self._drop_route(route)
            else:  # a handshake that failed: plaintext to a CURVE endpoint, or a broken client
                entry = Entry(
                    request_id="-",
                    op="connect",
                    client="unauthenticated",
                    role="-",
                    status="rejected",
                    error_code="handshake_failed",
                )
                self.aggregator.add(entry)

    def _drop_route(self, route: bytes) -> None:
        """The connection behind ``route`` closed: cancel its requests, nobody is left to answer."""
        for key in list(self._route_keys.get(route, ())):
            for runner in (self.runner, *self._retiring):
                if runner.cancel(key):
                    self.disconnect_cancels += 1
                    log.info("client disconnected: cancelled %s", key.replace("\x1f", " "))
            self._forget(key)

    def _drain_denied(self) -> None:
        from appliance.transport.auth import key_fingerprint

        while True:
            try:
                z85 = self._denied.get_nowait()
            except queue.Empty:
                return
            self.aggregator.add(
                Entry(
                    request_id="-",
                    op="connect",
                    client=f"unknown:{key_fingerprint(z85)}",
                    role="-",
                    status="rejected",
                    error_code=P.E_UNAUTHORIZED,
                )
            )

    def _flush_outbox(self) -> None:
        for runner in (*self._retiring, self.runner):
            while not runner.outbox.empty():
                out = runner.outbox.get()
                envelope = self._routes.get(out.key)
                if envelope is None:
                    continue
                self._reply(envelope, out.frame)
                if out.final:
                    self._forget(out.key)

    # -- status ----------------------------------------------------------------------------------
    def health(self) -> dict:
        """Every field is always present (zero when its feature is off), so clients can rely on it."""
        healthy = self.writer.healthy
        responses = self.responses.stats() if self.responses else dict.fromkeys(_RESPONSE_FIELDS, 0)
        return {
            "status": "ok" if healthy else "degraded",
            "audit": "ok" if healthy else "unavailable",
            "model_id": self.model.model_id,
            "version": self.model.version,
            "uptime_s": round(time.monotonic() - self.started, 1),
            **self.runner.load(),
            "clients_connected": len(self.connections),
            "tokens_generated": self.runner.tokens_generated,
            "request_failures": self.runner.request_failures,
            "audit_commits": self.writer.commits,
            "audit_rows": self.writer.rows,
            "audit_failures": self.writer.failures,
            "refused": self.frames_refused,
            "disconnect_cancels": self.disconnect_cancels,
            "models_retiring": len(self._retiring) + len(self._released),
            **self.sessions.stats(),
            **responses,
            **_engine_stats(self.model.engine),
        }

    def _offers(self, feature: str) -> bool:
        """Features that depend on the model or the config are listed only where they are on."""
        if feature == "messages":
            return self.model.chat is not None
        if feature == "response_cache":
            return self.config.engine.response_cache > 0
        if feature == "tools":
            return self.model.chat is not None and tools_supported(self.model.chat.source)
        if feature == "speculative":
            return self.runner.speculator is not None
        return True

    def info(self) -> dict:
        eng, srv = self.config.engine, self.config.server
        return {
            "protocol": P.VERSION,
            "protocol_minor": P.MINOR,
            # 'messages' only where the model has a chat template to render them with
            "features": [f for f in P.FEATURES if self._offers(f)],
            "software": __version__,
            "model_id": self.model.model_id,
            "version": self.model.version,
            "bundle_id": self.model.bundle_id,
            "architecture": self.model.spec.architecture,
            "chat_template": self.model.chat is not None,  # whether generate accepts 'messages'
            "engine": self.model.engine.kind,
            # the drafter speculative decoding uses (ngram, draft), or null when off
            "speculative": None if self.runner.speculator is None else self.runner.speculator.name,
            "limits": {
                "max_batch": self.model.engine.num_slots,
                "max_queued": eng.max_queued,
                "max_per_client": srv.max_per_client,
                "max_seq_len": self.model.engine.max_seq_len,
                "max_new_tokens": eng.max_new_tokens,
                "max_message_bytes": srv.max_message_bytes,
                "max_prompt_chars": P.MAX_PROMPT_CHARS,
            },
        }

    # -- loop ----------------------------------------------------------------------------------
    def serve_forever(self, drain_s: float = 10.0) -> None:
        self.writer.start()
        self.runner.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_pull, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        interval = self.notifier.watchdog_interval
        timeout_ms = 200 if interval is None else min(200, int(interval * 500))
        budget_s = self.config.server.turn_budget_ms / 1000.0
        drain_until = None
        try:
            while True:
                for name, thread in (("audit writer", self.writer), ("engine", self.runner)):
                    if not thread.is_alive():
                        raise ThreadDied(
                            f"the {name} thread stopped unexpectedly (its traceback is above); exiting so systemd "
                            "restarts the daemon"
                        )
                self.notifier.watchdog()
                events = dict(poller.poll(timeout_ms))
                if self.wake_pull in events:
                    while self.wake_pull.poll(0):
                        self.wake_pull.recv()
                self._on_monitor()
                self._drain_denied()
                self._flush_outbox()
                if self.reload_event.is_set():
                    self._start_reload()
                self._finish_reload()
                self._reap_retired()
                self._collect_released()  # after _reap_retired returned: its locals no longer hold a runner
                if self.router in events:
                    # Bounded in time, so replies, health and the watchdog are never starved by a flood;
                    # monitor events go first so a disconnect is attributed before a reused descriptor's
                    # next message (see transport/connections.py).
                    turn_end = time.monotonic() + budget_s
                    self._on_monitor()
                    while time.monotonic() < turn_end and self._receive():
                        pass
                self.aggregator.flush()
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
            self.aggregator.flush(force=True)
            self.writer.stop()  # commits what is queued; their replies are flushed below
            self._flush_outbox()
            self._close_sockets()

    def _close_sockets(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.router.disable_monitor()
        for sock in (getattr(self, "monitor", None), getattr(self, "wake_pull", None)):
            if sock is not None:
                sock.close(linger=0)
        self.router.close(linger=500)
        if self.authenticator is not None:
            self.authenticator.stop()
        self.ctx.term()


_RESPONSE_FIELDS = ("response_cache_entries", "response_cache_hits", "response_cache_misses")


def _engine_stats(engine) -> dict:
    stats = engine.stats
    return {
        "decode_steps": stats.decode_steps,
        "resident_steps": stats.resident_steps,
        "regathers": stats.regathers,
        "cache_bytes_copied": stats.copied_bytes,
        "prefill_tokens": stats.prefill_tokens,
        "verify_steps": stats.verify_steps,
        "verified_tokens": stats.verified_tokens,
    }


def _source_fd(frame: zmq.Frame) -> int | None:
    try:
        fd = frame.get(zmq.SRCFD)
    except (zmq.ZMQError, AttributeError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None
