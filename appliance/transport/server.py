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

from appliance import __version__
from appliance.audit import AuditLog, Entry
from appliance.audit.writer import AuditWriter
from appliance.config import Config
from appliance.loader import LoadedModel, load_model
from appliance.notify import Notifier
from appliance.serving.chat import ChatError, opens_reasoning
from appliance.serving.response_cache import ResponseCache, cache_key
from appliance.serving.runner import EngineRunner, Job
from appliance.serving.scheduler import Scheduler, Sequence
from appliance.serving.sessions import Session, SessionBusy, SessionStore
from appliance.transport import protocol as P

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
                raise BindError(
                    f"cannot listen on {endpoint}: {exc.strerror} (is another edge-appliance running? "
                    "change [server] endpoints)"
                ) from None
        # Client disconnects: the monitor reports the closed connection's file descriptor, and every
        # request remembers the descriptor it arrived on (SRCFD), so a vanished client's requests are
        # cancelled at once and free their slots within one engine step.
        self.monitor = self.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._fd_keys: dict[int, set[str]] = {}
        self._key_fd: dict[str, int] = {}
        self.disconnect_cancels = 0
        self.wake_pull = self.ctx.socket(zmq.PULL)
        self.wake_pull.bind(WAKE)
        self._wake_local = threading.local()
        self.writer = AuditWriter(audit) if audit is not None else None
        sc = config.sessions
        self.sessions = SessionStore(sc.max_mb << 20, sc.ttl_s, sc.max_sessions)
        self.responses = ResponseCache(config.engine.response_cache) if config.engine.response_cache else None
        self.runner = self._make_runner(model)
        self._retiring: list[EngineRunner] = []  # previous models finishing their in-flight requests
        self._routes: dict[str, list[bytes]] = {}
        self.reload_event = threading.Event()
        self._loader: threading.Thread | None = None
        self._last_probe = 0.0
        self._loaded: LoadedModel | Exception | None = None

    def _secure(self) -> None:
        from appliance.transport.auth import load_clients, secure_server, start_authenticator
        from provisioning.keys import DEVICE_CURVE, read_private, wipe

        self.clients = {e.user_id: e for e in load_clients(Path(self.config.auth.clients)).values()}
        secret = read_private(DEVICE_CURVE, self.config.key_dir)
        try:
            public = secure_server(self.router, bytes(secret).strip())
        finally:
            wipe(secret)
        self.authenticator = start_authenticator(
            self.ctx, {e.key: e for e in self.clients.values()}, self._audit_denied
        )
        log.info("CURVE on: server key %s, %d allowed client(s)", public, len(self.clients))

    def _audit_denied(self, z85_key: str) -> None:
        """Runs in the ZAP thread: an unknown key tried to connect."""
        from appliance.transport.auth import key_fingerprint

        log.warning("refused CURVE client %s (not in the allow-list)", key_fingerprint(z85_key))
        self.runner.write_audit(
            Entry(
                request_id="-",
                op="connect",
                client=f"unknown:{key_fingerprint(z85_key)}",
                role="-",
                status="rejected",
                error_code=P.E_UNAUTHORIZED,
                model_id=self.model.model_id,
                model_version=self.model.version,
            )
        )

    def _make_runner(self, model: LoadedModel) -> EngineRunner:
        scheduler = Scheduler(
            num_slots=model.engine.num_slots,
            max_queued=self.config.engine.max_queued,
            max_seq_len=model.engine.max_seq_len,
            eos_token_ids=model.spec.eos_token_ids,
            prefill_chunk=self.config.engine.prefill_chunk,
        )
        return EngineRunner(
            model,
            scheduler,
            self.audit,
            wake=self._wake,
            writer=self.writer,
            sessions=self.sessions,
            responses=self.responses,
        )

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
        log.info(
            "reloaded: now serving %s v%d; %d request(s) finish on the previous model",
            loaded.model_id,
            loaded.version,
            sum(old.load().values()),
        )
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
        self.runner.write_audit(
            Entry(
                request_id=exc.request_id or "-",
                op=op,
                client=client,
                status="rejected",
                model_id=self.model.model_id,
                model_version=self.model.version,
                error_code=exc.code,
            )
        )
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
        elif req.op == P.OP_END_SESSION:
            self._reply(
                envelope, P.result_reply(req.id, {"ended": self.sessions.end(req.session), "session": req.session})
            )
        else:
            self._generate(envelope, client, role, req, frames[-1])

    def _generate(self, envelope: list[bytes], client: str, role: str, req: P.Request, frame: zmq.Frame) -> None:
        def refuse(code: str, message: str, **extra) -> None:
            self._reject(envelope, client, P.ProtocolError(code, message, req.id), op=req.op, **extra)

        if self.stop_event.is_set():
            return refuse(P.E_SHUTTING_DOWN, "the daemon is shutting down; retry against the restarted service")
        if not self.runner.audit_ok:
            return refuse(P.E_AUDIT, "the audit store cannot be written; requests are refused until it recovers")
        key = _route_key(envelope, req.id)
        if key in self._routes:
            return refuse(P.E_BAD_REQUEST, f"a request with id {req.id!r} is already in flight on this connection")
        version = self.model.version
        restore = None
        if req.session is not None:
            try:
                restore = self.sessions.acquire(req.session, str(version))
            except SessionBusy:
                return refuse(
                    P.E_SESSION_BUSY,
                    f"session {req.session!r} has a request in flight; send the next turn after its reply",
                )
        try:
            text, ids, chat = self._prompt(req, restore)
        except P.ProtocolError as exc:
            if req.session is not None:
                self.sessions.release(req.session, restore)
            return refuse(exc.code, exc.message)
        history, feed = [], ids
        if restore is not None:  # a later turn: only what the cache lacks is prefilled
            history, feed = restore.tokens[: restore.cached], restore.tokens[restore.cached :] + ids
        context = len(history) + len(feed)
        room = self.model.engine.max_seq_len - context
        if room < 1:
            if req.session is not None:
                self.sessions.release(req.session, restore)
            what = "conversation" if restore is not None else "prompt"
            return refuse(
                P.E_TOO_LARGE,
                f"{what} is {context} tokens; the context holds "
                f"{self.model.engine.max_seq_len}"
                + ("; end the session and start a new one" if restore is not None else ""),
            )
        deadline = time.monotonic() + req.deadline_ms / 1000.0 if req.deadline_ms else None
        seq = Sequence(
            key=key,
            prompt_ids=ids,
            max_tokens=min(req.max_tokens, room),
            sampling=req.sampling,
            deadline=deadline,
            ignore_eos=req.ignore_eos,
            session=req.session,
            feed_ids=feed,
            base_len=len(history),
        )
        job = Job(
            seq=seq,
            request=req,
            client=client,
            role=role,
            restore=restore,
            history=history,
            prompt_text=text,
            chat=chat,
            opens_reasoning=opens_reasoning(text),
            cache_key=cache_key(req, version) if self.responses is not None else None,
        )
        if not self.runner.submit(job):
            if req.session is not None:
                self.sessions.release(req.session, restore)
            return refuse(P.E_BUSY, "the waiting queue is full", retry_after_ms=250)
        self._routes[key] = envelope
        fd = _source_fd(frame)
        if fd is not None:
            self._fd_keys.setdefault(fd, set()).add(key)
            self._key_fd[key] = fd

    def _prompt(self, req: P.Request, restore: Session | None) -> tuple[str, list[int], list[dict] | None]:
        """The text this turn adds, its token ids, and the conversation so far (chat requests).

        ``prompt`` is raw text after the BOS (a new conversation's, when the model has one);
        ``messages`` go through the chat template, which writes any BOS itself. A later turn of a chat
        session renders only what its new messages add after the cached reply."""
        encode = self.model.tokenizer.encode
        if req.messages is None:
            if restore is not None and restore.messages is not None:
                raise P.ProtocolError(
                    P.E_BAD_REQUEST, f"session {req.session!r} is a chat; continue it with 'messages'"
                )
            bos = self.model.spec.bos_token_id
            head = [] if restore is not None or bos is None else [bos]
            return req.prompt, [*head, *encode(req.prompt, add_special_tokens=False).ids], None
        template = self.model.chat
        if template is None:
            raise P.ProtocolError(
                P.E_BAD_REQUEST, f"model {self.model.model_id} has no chat template; send 'prompt' instead"
            )
        new = list(req.messages)
        try:
            if restore is None:
                chat, text = new, template.render(new)
            elif restore.messages is None:
                raise P.ProtocolError(P.E_BAD_REQUEST, f"session {req.session!r} was started with 'prompt'")
            else:
                chat, text = restore.messages + new, template.continuation(restore.messages, new)
        except ChatError as exc:
            raise P.ProtocolError(P.E_BAD_REQUEST, str(exc)) from None
        return text, encode(text, add_special_tokens=False).ids, chat

    def _forget(self, key: str) -> None:
        self._routes.pop(key, None)
        fd = self._key_fd.pop(key, None)
        if fd is not None:
            keys = self._fd_keys.get(fd, set())
            keys.discard(key)
            if not keys:
                self._fd_keys.pop(fd, None)

    def _on_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            for key in list(self._fd_keys.get(int(event["value"]), ())):
                for runner in (self.runner, *self._retiring):
                    if runner.cancel(key):
                        self.disconnect_cancels += 1
                        log.info("client disconnected: cancelled %s", key)
                self._forget(key)  # nobody is left to receive the reply

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

    def health(self) -> dict:
        load = self.runner.load()
        return {
            "status": "ok" if self.runner.audit_ok else "degraded",
            "audit": "ok" if self.runner.audit_ok else "unavailable",
            "model_id": self.model.model_id,
            "version": self.model.version,
            "uptime_s": round(time.monotonic() - self.started, 1),
            **load,
            "tokens_generated": self.runner.tokens_generated,
            "audit_commits": self.writer.commits if self.writer else 0,
            "audit_rows": self.writer.rows if self.writer else 0,
            "disconnect_cancels": self.disconnect_cancels,
            **self.sessions.stats(),
            **(self.responses.stats() if self.responses else {}),
            **_engine_stats(self.model.engine),
        }

    def info(self) -> dict:
        eng = self.config.engine
        return {
            "protocol": P.VERSION,
            "software": __version__,
            "model_id": self.model.model_id,
            "version": self.model.version,
            "bundle_id": self.model.bundle_id,
            "architecture": self.model.spec.architecture,
            "chat_template": self.model.chat is not None,  # whether generate accepts 'messages'
            "engine": self.model.engine.kind,
            "limits": {
                "max_batch": self.model.engine.num_slots,
                "max_queued": eng.max_queued,
                "max_seq_len": self.model.engine.max_seq_len,
                "max_new_tokens": eng.max_new_tokens,
                "max_message_bytes": self.config.server.max_message_bytes,
                "max_prompt_chars": P.MAX_PROMPT_CHARS,
            },
        }

    # -- loop ----------------------------------------------------------------------------------
    def serve_forever(self, drain_s: float = 10.0) -> None:
        if self.writer is not None:
            self.writer.start()
        self.runner.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake_pull, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
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
                if self.monitor in events:
                    self._on_monitor()
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
            self.router.disable_monitor()
            self.monitor.close(linger=0)
            self.router.close(linger=500)
            self.wake_pull.close(linger=0)
            if self.authenticator is not None:
                self.authenticator.stop()
            self.ctx.term()


def _engine_stats(engine) -> dict:
    stats = getattr(engine, "stats", None)
    if stats is None:
        return {}
    return {
        "decode_steps": stats.decode_steps,
        "resident_steps": stats.resident_steps,
        "regathers": stats.regathers,
        "cache_bytes_copied": stats.copied_bytes,
        "prefill_tokens": stats.prefill_tokens,
    }


def _route_key(envelope: list[bytes], rid: str | None) -> str:
    return f"{envelope[0].hex()}:{rid}"


def _source_fd(frame: zmq.Frame) -> int | None:
    try:
        fd = frame.get(zmq.SRCFD)
    except (zmq.ZMQError, AttributeError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def _client_identity(frame: zmq.Frame) -> str:
    """The CURVE public key (``User-Id`` set by ZAP) when authenticated, else 'anonymous'."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError):
        user = None
    return user or "anonymous"
