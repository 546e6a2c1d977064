"""The daemon's serving loop: one ZeroMQ ROUTER socket, msgpack frames, streamed replies.

The loop owns every socket; the engine runs in its own thread (``serving.runner.EngineRunner``) and
wakes the loop through an inproc PUSH/PULL pair when replies are ready, so a slow step never blocks
``health`` or the watchdog. Every message is checked here before anything else looks at it: exactly
a routing envelope and one payload frame, a bounded size, bounded msgpack; each loop turn reads for
a bounded time. What a request does is ``transport.ops`` (subject, role check, one handler per op);
which connection and envelope its replies go to is ``transport.routes``; reload is
``transport.model_swap``. Generate requests go through ``serving.admission``; every audit row goes through
the group-commit writer, refusals aggregated so that a flood costs a bounded number of rows.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from appliance.audit import AuditLog, Entry
from appliance.audit.aggregate import Aggregator
from appliance.audit.writer import AuditWriter
from appliance.config import Config
from appliance.errors import ApplianceError
from appliance.loader import LoadedModel
from appliance.metrics import METRICS
from appliance.notify import Notifier
from appliance.serving import roles
from appliance.serving.admission import Admission, Peer
from appliance.serving.response_cache import ResponseCache
from appliance.serving.runner import EngineRunner
from appliance.serving.sessions import SessionStore
from appliance.transport import ops
from appliance.transport import protocol as P
from appliance.transport.model_swap import ModelSwap, build_runner
from appliance.transport.routes import Routes

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
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
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
        self.routes = Routes()  # routing id <-> connection <-> requests in flight
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
        make_runner = functools.partial(
            build_runner, config, writer=self.writer, wake=self._wake, sessions=self.sessions, responses=self.responses
        )
        self.swap = ModelSwap(config, model, make_runner, self.notifier, self._wake)  # the serving and retiring runners
        self.disconnect_cancels = 0
        self.frames_refused = 0
        self.late_frames = 0  # frames of connections that had closed before they were read
        METRICS.watch(self)

    @property
    def model(self) -> LoadedModel:
        """The model new requests are served by (changes on reload)."""
        return self.swap.model

    @property
    def runner(self) -> EngineRunner:
        """The runner new requests are submitted to (changes on reload)."""
        return self.swap.runner

    def status_line(self) -> str:
        """systemd's StatusText while serving (also after every reload, failed or not)."""
        return self.swap.status_line()

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
            self.refuse(
                envelope,
                peer,
                P.ProtocolError(
                    P.E_MALFORMED,
                    f"a request is exactly one frame after the routing envelope; got {count - 1} frames",
                ),
            )
            return True
        if not self.routes.knows(route):
            # A new connection: its ACCEPTED (and any DISCONNECTED of a previous owner of its descriptor)
            # may have been queued while this turn was reading; attribute those first.
            self._on_monitor()
        if not self.routes.seen(route, _source_fd(payload)):
            self.late_frames += 1  # its connection closed while libzmq still held it: no one to answer
            return True
        peer = self._peer(route, payload)
        limit = self.config.server.max_connections_per_client
        if not peer.identity.startswith("anonymous:") and not self.routes.admit(route, peer.identity, limit):
            op, rid = "?", None
            if len(payload) <= self.config.server.max_message_bytes:  # answer under the request's own id
                try:
                    req = P.parse_request(payload.bytes, self.config.engine.max_new_tokens)
                    op, rid = req.op, req.id
                except P.ProtocolError:
                    pass
            message = f"this key already has {limit} connections open, the per-client limit; send on one of those"
            self.refuse(envelope, peer, P.ProtocolError(P.E_BUSY, message), op=op, rid=rid)
            return True
        if len(payload) > self.config.server.max_message_bytes:
            err = P.ProtocolError(
                P.E_TOO_LARGE, f"frame is {len(payload)} bytes; the limit is {self.config.server.max_message_bytes}"
            )
            self.refuse(envelope, peer, err)
            return True
        ops.handle(self, envelope, peer, payload.bytes)
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
        return Peer(f"anonymous:{self.routes.token(route)}", self.config.auth.anonymous_role, route)

    # -- replies and audit (also used by transport.ops) --------------------------------------------
    def reply(self, envelope: list[bytes], frame: bytes) -> None:
        self.router.send_multipart([*envelope, frame])

    def refuse(
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
        self.audit(peer, op, rid, "rejected", error_code=exc.code)
        self.reply(envelope, P.error_reply(rid, exc.code, exc.message, **extra))

    def audit(
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

    # -- the other sources of a turn ----------------------------------------------------------------
    def _on_monitor(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            kind, fd = event["event"], int(event["value"])
            if kind == zmq.EVENT_ACCEPTED:
                self.routes.accepted(fd)
            elif kind == zmq.EVENT_DISCONNECTED:  # cancel its requests: nobody is left to answer
                for key in self.routes.closed(fd):
                    for runner in self.swap.runners():
                        if runner.cancel(key):
                            self.disconnect_cancels += 1
                            log.info("client disconnected: cancelled %s", key.replace("\x1f", " "))
            else:  # a handshake that failed: plaintext to a CURVE endpoint, or a broken client
                self._connect_refused("unauthenticated", "handshake_failed")

    def _drain_denied(self) -> None:
        from appliance.transport.auth import key_fingerprint

        while True:
            try:
                z85 = self._denied.get_nowait()
            except queue.Empty:
                return
            self._connect_refused(f"unknown:{key_fingerprint(z85)}", P.E_UNAUTHORIZED)  # a CURVE key not allowed

    def _connect_refused(self, client: str, error_code: str) -> None:
        entry = Entry(request_id="-", op="connect", client=client, role="-", status="rejected", error_code=error_code)
        self.aggregator.add(entry)

    def _flush_outbox(self) -> None:
        for runner in self.swap.oldest_first():
            while not runner.outbox.empty():
                out = runner.outbox.get()
                envelope = self.routes.reply_to(out.key, out.final)
                if envelope is not None:
                    self.reply(envelope, out.frame)

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
                    self.reload_event.clear()
                    self.swap.begin()
                self.swap.step()
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
                        log.info("stopping: draining %d in-flight request(s)", len(self.routes))
                    if not self.routes or time.monotonic() >= drain_until:
                        break
        finally:
            self.swap.stop()
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


def _source_fd(frame: zmq.Frame) -> int | None:
    try:
        fd = frame.get(zmq.SRCFD)
    except (zmq.ZMQError, AttributeError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None
