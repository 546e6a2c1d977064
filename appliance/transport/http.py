"""``edge-appliance http``: the OpenAI-compatible HTTP gateway (docs/HTTP.md), a second process.

The gateway is a client of the daemon with allow-list role ``gateway``: it checks the API key,
forwards the request over ZeroMQ naming the key's identity and role in ``on_behalf_of``, and
streams the replies back as server-sent events. The daemon stays the one place that audits,
queues, limits and schedules; a refused key is reported to it (op ``auth_failed``) and audited
before the 401 leaves. HTTP itself is uvicorn's over h11 (a strict HTTP/1.1 parser, keep-alive,
graceful shutdown), with a deadline for each request head added here; this module is an ASGI app
on one event loop (why: ARCHITECTURE.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import threading
import uuid
from collections import Counter
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from appliance.config import Config, ConfigError, HttpConfig
from appliance.notify import Notifier
from appliance.transport import api_keys
from appliance.transport import openai_compat as O
from appliance.transport import protocol as P
from appliance.transport.bridge import AsyncStream, Bridge, BridgeError

log = logging.getLogger("appliance.http")

INFO_TTL_S = 5.0  # how long the daemon's model id and features are reused before asking again
PROBE_S = 5.0  # longest wait for the daemon's answer to a start-up attempt or a /health probe
GRACE_S = 10.0  # on stop: how long requests in flight may finish before their connections are closed
UNIX_SOURCE = "unix"  # every request over a unix socket comes from one place: the reverse proxy in front


class ClientGone(Exception):
    """The HTTP client closed its connection; its request is cancelled at the daemon."""


class Gateway:
    """What every request shares: the bridge to the daemon, the API keys, the daemon's info, the admission counts."""

    def __init__(self, config: HttpConfig, bridge: Bridge, keys: list[api_keys.ApiKey]):
        self.config = config
        self.bridge = bridge
        self.keys = keys
        self._info: dict = {}
        self._info_at = -INFO_TTL_S
        self.in_flight = 0
        self.per_source: Counter[str] = Counter()

    async def info(self) -> dict:
        loop = asyncio.get_running_loop()
        if loop.time() - self._info_at > INFO_TTL_S:
            reply = await self.bridge.acall(P.OP_INFO)
            if reply["type"] != P.T_RESULT:
                raise BridgeError(f"the daemon refused 'info': {reply.get('code')}: {reply.get('message')}")
            self._info, self._info_at = reply["result"], loop.time()
        return self._info

    async def renders_chat(self) -> bool:
        """The daemon applies the model's chat template itself (it advertises ``messages`` in ``features``)."""
        return "messages" in (await self.info()).get("features", ())

    @contextlib.contextmanager
    def admitted(self, source: str):
        """A request in flight: at most ``max_connections`` in all (503) and ``max_per_source`` from one client
        address (429), so one client cannot take every slot. Unix-socket requests share the proxy's source: only
        the global cap applies to them (the proxy in front limits its own clients)."""
        if self.in_flight >= self.config.max_connections:
            raise O.ApiError(
                503,
                f"the gateway has {self.in_flight} requests in flight; retry shortly",
                kind="server_error",
                retry_after_s=1,
            )
        if source != UNIX_SOURCE and self.per_source[source] >= self.config.max_per_source:
            raise O.ApiError(
                429,
                f"{self.per_source[source]} requests from {source} are in flight already ([http] max_per_source)",
                1,
            )
        self.in_flight += 1
        self.per_source[source] += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self.per_source[source] -= 1
            if not self.per_source[source]:
                del self.per_source[source]


class Exchange:
    """One HTTP request and its response over ASGI: headers, the body under its deadline, whether the client is
    still there, and exactly one response (``started`` guards against a second)."""

    def __init__(self, gateway: Gateway, scope: dict, receive, send):
        self.gateway = gateway
        self.scope = scope
        self.receive = receive
        self._send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {}
        self.repeated: set[str] = set()
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            if key in self.headers:
                self.repeated.add(key)
            self.headers[key] = value.decode("latin-1")
        client = scope.get("client")
        self.source = client[0] if client and client[0] else UNIX_SOURCE
        self.request_id: str | None = None  # the daemon's id of a forwarded request: X-Request-Id, the audit row's
        self.started = False
        self.body_read = False
        self.gone = asyncio.Event()
        self._watch: asyncio.Task | None = None

    # -- reading --------------------------------------------------------------------------------
    async def body(self) -> dict:
        length = self.headers.get("content-length")
        if length is None or not length.isdigit() or "content-length" in self.repeated:
            raise O.ApiError(411, "send the JSON body with one Content-Length header")
        limit = self.gateway.config.max_body_bytes
        if int(length) > limit:
            raise O.ApiError(413, f"the body is {length} bytes; the limit is {limit}")
        try:
            data = await asyncio.wait_for(self._read(int(length)), self.gateway.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise O.ApiError(408, f"the body did not arrive within {self.gateway.config.body_timeout_s:g}s") from None
        self.body_read = True
        self._watch = asyncio.ensure_future(self._watch_disconnect())
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise O.ApiError(400, f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise O.ApiError(400, "the body's JSON is nested too deeply") from None
        except ValueError as exc:  # an integer past Python's digit limit
            raise O.ApiError(400, f"the body's JSON has a value out of range: {exc}") from None

    async def _read(self, length: int) -> bytes:
        chunks, got = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            got += len(chunk)
            if got > length:  # h11 frames by Content-Length; kept as a guard, never more than declared
                raise O.ApiError(400, "the body is longer than its Content-Length")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def watch(self) -> None:
        """Notice the client leaving from now on (a request without a body: nothing more to read first)."""
        self.body_read = True
        self._watch = asyncio.ensure_future(self._watch_disconnect())

    async def _watch_disconnect(self) -> None:
        """The server reports a client that closed (or half-closed) its side as ``http.disconnect``."""
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone.set()

    async def next_reply(self, stream: AsyncStream) -> dict:
        """The daemon's next reply; gives up after the configured timeout, or as soon as the client leaves."""
        get = asyncio.ensure_future(stream.next(self.gateway.config.timeout_s))
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not get.done():
            get.cancel()
            raise ClientGone
        return get.result()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    # -- writing --------------------------------------------------------------------------------
    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        if self.started:
            raise RuntimeError("a second response on one request")  # a bug here, never two answers on the wire
        self.started = True
        if self.request_id is not None:
            headers.append(("X-Request-Id", self.request_id))
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
            }
        )

    async def write(self, data: bytes, more: bool = True) -> None:
        """One piece of the body; a client that stops reading for ``timeout_s`` is treated as gone (its slot and
        its request at the daemon are freed), never waited on forever."""
        message = {"type": "http.response.body", "body": data, "more_body": more}
        try:
            await asyncio.wait_for(self._send(message), self.gateway.config.timeout_s)
        except asyncio.TimeoutError:
            self.gone.set()
            raise ClientGone from None

    async def send_json(self, status: int, obj: dict, retry_after_s: int | None = None) -> None:
        body = json.dumps(obj).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if retry_after_s is not None:
            headers.append(("Retry-After", str(retry_after_s)))
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="edge-appliance"'))
        if status >= 400 and (self.method != "GET" and not self.body_read or status in (408, 411, 413, 505)):
            headers.append(("Connection", "close"))  # an unread body must never be read as the next request
        await self.start(status, headers)
        await self.write(body, more=False)

    async def event(self, obj: dict) -> None:
        await self.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


ROUTES = {
    ("GET", "/health"): "health",
    ("GET", "/v1/models"): "models",
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/completions"): "completions",
}


class App:
    """The ASGI application: routing, refusals as one OpenAI error body, and the four endpoints."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":  # nothing to set up: the bridge is open before serving starts
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": f"{message['type']}.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":  # websocket: nothing here speaks it
            return
        ex = Exchange(self.gateway, scope, receive, send)
        try:
            await self._handle(ex)
        except O.ApiError as exc:
            await self._refuse(ex, exc.status, exc.body(), exc.retry_after_s)
        except BridgeError as exc:
            log.error("%s", exc)
            await self._refuse(ex, 503, O.ApiError(503, str(exc), kind="server_error").body(), 1)
        except ClientGone:
            pass
        except Exception:  # a bug must cost one request a 500, never the gateway or a second response
            log.exception("request %s %s failed", ex.method, ex.path)
            await self._refuse(ex, 500, O.ApiError(500, "internal error in the gateway", kind="server_error").body())
        finally:
            ex.close()

    @staticmethod
    async def _refuse(ex: Exchange, status: int, body: dict, retry_after_s: int | None = None) -> None:
        if not ex.started and not ex.gone.is_set():
            with contextlib.suppress(Exception):  # the client may have gone while we answered
                await ex.send_json(status, body, retry_after_s)

    async def _handle(self, ex: Exchange) -> None:
        log.debug("%s %s %s", ex.source, ex.method, ex.path)
        if (version := ex.scope.get("http_version")) and version not in ("1.0", "1.1"):
            raise O.ApiError(505, f"HTTP/{version} is not served; use HTTP/1.1")
        # Framing only by Content-Length: a Transfer-Encoding (alone or beside a Content-Length) or a GET that
        # carries a body would leave bytes a proxy and this server read differently (request smuggling).
        if "transfer-encoding" in ex.headers:
            raise O.ApiError(400, "Transfer-Encoding is not accepted; send the body with Content-Length")
        if ex.method == "GET" and ex.headers.get("content-length", "0").strip() not in ("", "0"):
            raise O.ApiError(400, "a GET request carries no body")
        route = ROUTES.get((ex.method, ex.path))
        if route is None:
            known = any(path == ex.path for _, path in ROUTES)
            raise O.ApiError(405 if known else 404, f"no route {ex.method} {ex.path}", None, "not_found")
        with self.gateway.admitted(ex.source):
            await getattr(self, route)(ex)

    # -- endpoints ----------------------------------------------------------------------------
    async def health(self, ex: Exchange) -> None:
        """Unauthenticated liveness for load balancers: only whether the daemon answers and its audit is ok."""
        reply = await self.gateway.bridge.acall(P.OP_HEALTH, timeout_s=PROBE_S)
        ok = reply["type"] == P.T_RESULT and reply["result"].get("status") == "ok"
        await ex.send_json(200 if ok else 503, {"status": "ok" if ok else "degraded"})

    async def models(self, ex: Exchange) -> None:
        await self._authenticate(ex)
        info = await self.gateway.info()
        model = {"id": info["model_id"], "object": "model", "created": 0, "owned_by": "edge-appliance"}
        await ex.send_json(200, {"object": "list", "data": [model]})

    async def chat(self, ex: Exchange) -> None:
        behalf = await self._authenticate(ex)
        body = await ex.body()
        info = await self.gateway.info()
        await self._forward(ex, O.parse_chat(body, info["model_id"], await self.gateway.renders_chat()), behalf)

    async def completions(self, ex: Exchange) -> None:
        behalf = await self._authenticate(ex)
        body = await ex.body()
        await self._forward(ex, O.parse_completion(body, (await self.gateway.info())["model_id"]), behalf)

    # -- request pieces -----------------------------------------------------------------------
    async def _authenticate(self, ex: Exchange) -> dict:
        header = ex.headers.get("authorization", "")
        presented = header[7:].strip() if header[:7].lower() == "bearer " else ""
        entry = api_keys.verify(self.gateway.keys, presented) if presented else None
        if entry is not None:
            return {"identity": entry.identity, "role": entry.role}
        subject = f"unknown:{api_keys.fingerprint(presented)}" if presented else "anonymous"
        reply = await self.gateway.bridge.acall(P.OP_AUTH_FAILED, on_behalf_of={"identity": subject, "role": "-"})
        if reply["type"] != P.T_RESULT or not reply["result"].get("audited"):
            log.error("refused API key %s could not be audited: %s", subject, reply.get("message", "audit failed"))
        log.warning("refused API key %s from %s", subject, ex.source)
        raise O.ApiError(
            401, "invalid or missing API key (send 'Authorization: Bearer <key>')", None, "invalid_api_key"
        )

    async def _forward(self, ex: Exchange, call: O.Call, behalf: dict) -> None:
        rid = ex.request_id = uuid.uuid4().hex
        stream = self.gateway.bridge.open(P.OP_GENERATE, rid, on_behalf_of=behalf, **call.fields)
        try:
            first = await ex.next_reply(stream)
            if first["type"] == P.T_ERROR:
                raise O.daemon_error(first, call)
            if not call.stream:
                await ex.send_json(200, O.completion(call, rid, first))
                return
            await self._stream(ex, call, rid, stream, first)
        except BridgeError:
            stream.cancel()  # given up on: it must not keep a slot
            raise
        except (ClientGone, OSError, asyncio.CancelledError) as exc:  # reset, broken pipe: nobody is left to read
            stream.cancel()
            log.info("client left: cancelled request %s (%s)", rid, type(exc).__name__)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ClientGone from None
        finally:
            stream.close()

    async def _stream(self, ex: Exchange, call: O.Call, rid: str, stream: AsyncStream, reply: dict) -> None:
        await ex.start(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")])
        if call.chat:
            await ex.event(O.chunk(call, rid, "", first=True))
        streamed = calls_streamed = False
        while True:
            if reply["type"] == P.T_TOKEN:
                streamed = True
                deltas = O.call_deltas(call, reply.get("tool_calls", []))
                if reply["text"] or not deltas:
                    await ex.event(O.chunk(call, rid, reply["text"]))
                if deltas:
                    calls_streamed = True
                    await ex.event(O.chunk(call, rid, None, calls=deltas))
            elif reply["type"] == P.T_DONE:
                if not streamed and reply["text"]:  # nothing was streamed (docs/HTTP.md)
                    await ex.event(O.chunk(call, rid, reply["text"]))
                if reply.get("tool_calls") and not calls_streamed:
                    await ex.event(O.chunk(call, rid, None, calls=O.whole_calls(call, reply)))
                await ex.event(O.chunk(call, rid, None if call.chat else "", reply["finish_reason"]))
                if call.include_usage:
                    await ex.event(O.usage_chunk(call, rid, reply))
                break
            else:  # an error after the 200 went out: OpenAI's clients read an error event
                await ex.event(O.daemon_error(reply, call).body())
                break
            try:
                reply = await ex.next_reply(stream)
            except BridgeError as exc:
                stream.cancel()
                reply = {"type": P.T_ERROR, "code": "timeout", "message": str(exc)}
        await ex.write(b"data: [DONE]\n\n", more=False)


def tls_context(config: HttpConfig) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(config.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[http] TLS files cannot be used: {exc}") from None
    return ctx


def bind(listen: str) -> socket.socket:
    """Bind ``[http] listen`` (``host:port`` or ``unix:/path``) here, so a bad address is one line before serving."""
    try:
        if listen.startswith("unix:"):
            path = listen[5:]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a socket left by a previous run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            # Reachable by local users (a reverse proxy has its own uid); every request still needs an API key.
            os.chmod(path, 0o666)
        else:
            host, _, port = listen.rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            # proto named, so asyncio sets TCP_NODELAY on each accepted connection (it checks for IPPROTO_TCP);
            # without it Nagle held every small SSE event for the client's delayed ACK: +44 ms per stream, measured.
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
    except ValueError:
        raise ConfigError(f'[http] listen = "{listen}": use "host:port" or "unix:/path"') from None
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror} (change [http] listen)") from None
    sock.set_inheritable(True)
    return sock


class HeadDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for every request head, counted from the connection (or the previous
    response) to the head's last byte, and a cap on requests per connection. uvicorn's own keep-alive timer is not
    armed before the first request and restarts on every byte: a client sending a header byte every 20 s kept its
    connection forever. A request whose head has arrived is not cut here (its body has its own deadline)."""

    head_timeout_s = 10.0
    max_requests = 1000
    max_open = 256  # connections open at once, idle ones included (each costs a descriptor)
    max_open_per_source = 32  # of them from one client address (not applied to a Unix socket: one proxy)
    open_by_source: Counter[str]  # set per server (Server makes the subclass)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._answered = 0
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_overdue)
        self._source = self.client[0] if self.client and self.client[0] else UNIX_SOURCE
        counts = self.open_by_source
        over_source = self._source != UNIX_SOURCE and counts[self._source] >= self.max_open_per_source
        self._counted = not (over_source or sum(counts.values()) >= self.max_open)
        if not self._counted:
            transport.close()  # refused before a byte is read, and never counted
            return
        counts[self._source] += 1

    def handle_events(self) -> None:  # where uvicorn starts each request, arriving or pipelined
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete and self._answered + 1 >= self.max_requests:
            self.cycle.keep_alive = False  # closed after this answer, which says so (uvicorn echoes the header)
            if (b"connection", b"close") not in self.scope["headers"]:
                self.scope["headers"].append((b"connection", b"close"))

    def _head_overdue(self) -> None:
        if self.cycle is None or self.cycle.response_complete:  # no request since the connection or the last answer
            self.timeout_keep_alive_handler()  # uvicorn's own close of an idle connection

    def on_response_complete(self) -> None:
        self._answered += 1
        self._head_timer.cancel()
        if self._answered >= self.max_requests:
            self.server_state.total_requests += 1
            self.transport.close()  # the response is complete: the client sees a clean close
            return
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_overdue)
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer.cancel()
        if self._counted:
            counts = self.open_by_source
            counts[self._source] -= 1
            if counts[self._source] <= 0:
                del counts[self._source]
        super().connection_lost(exc)


class Server:
    """uvicorn serving the app on its own thread and event loop; ``stop`` is a graceful shutdown (requests in
    flight get ``GRACE_S`` to finish)."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.tls = tls_context(gateway.config)
        self.sock = bind(gateway.config.listen)
        http = gateway.config
        limits = {
            "head_timeout_s": http.header_timeout_s,
            "max_requests": http.keep_alive_requests,
            "max_open": http.max_open_connections,
            "max_open_per_source": http.max_open_per_source,
            "open_by_source": Counter(),
        }
        protocol = type("Http", (HeadDeadline,), limits)
        config = uvicorn.Config(
            App(gateway),
            http=protocol,
            ws="none",  # no upgrades: an Upgrade header is ignored, the request answered as HTTP/1.1
            lifespan="off",
            interface="asgi3",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=max(1, int(http.header_timeout_s)),
            timeout_graceful_shutdown=int(GRACE_S),
            h11_max_incomplete_event_size=http.max_header_bytes,
            backlog=max(128, http.max_connections),
        )
        config.load()
        config.ssl = self.tls  # our context: TLS 1.2+, HTTP/1.1 by ALPN, client CAs
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=GRACE_S + 5)
        self.sock.close()


def open_bridge(config: Config) -> Bridge:
    """The DEALER to the daemon, with the gateway's CURVE key: the daemon must know it as a gateway."""
    from appliance.transport.auth import server_public_key
    from provisioning.keys import read_private

    http = config.http
    if not config.auth.curve:
        raise ConfigError(
            "the HTTP gateway needs [auth] curve = true: the daemon trusts 'on_behalf_of' only from a client "
            'whose CURVE key is allow-listed with role = "gateway" (docs/HTTP.md)'
        )
    if not (http.client_key and http.server_key):
        raise ConfigError("[http] client_key and server_key are required with CURVE (docs/HTTP.md)")
    path = Path(http.client_key)
    secret = bytes(read_private(path.name, path.parent)).strip()
    import zmq

    bridge = Bridge(
        http.daemon or config.server.endpoints[0],
        http.timeout_s,
        curve_server_key=server_public_key(http.server_key),
        curve_keypair=(zmq.curve_public(secret), secret),
    )
    bridge.start()
    return bridge


def reach_daemon(bridge: Bridge, stop: threading.Event, notifier: Notifier) -> dict:
    """Wait for the daemon, and check it accepts this gateway's ``on_behalf_of`` (audited as role gateway)."""
    while not stop.is_set():
        try:
            # A short wait per try, so a stop request during start-up is honoured within seconds.
            check = {"identity": "gateway-startup-check", "role": "infer"}
            reply = bridge.call(P.OP_HEALTH, timeout_s=PROBE_S, on_behalf_of=check)
        except BridgeError as exc:
            reply = {"type": P.T_ERROR, "code": None, "message": str(exc)}
        if bridge.key_refused():
            raise ConfigError(
                "the daemon refused this gateway's CURVE key (not in its allow-list): add the public key of "
                '[http] client_key to [auth] clients with role = "gateway", then restart the daemon'
            ) from None
        if reply["type"] == P.T_ERROR and reply["code"] in (None, P.E_BUSY):  # no answer, or not reading yet
            notifier.status(f"waiting for the daemon: {reply['message']}")
            log.warning("%s; retrying", reply["message"])
            stop.wait(1.0 if reply["code"] else 0)  # a busy pipe answers at once: do not spin on it
            continue
        if reply["type"] == P.T_ERROR:
            raise ConfigError(
                f"the daemon refused this gateway ({reply['code']}): allow-list the key of [http] client_key "
                'with role = "gateway"'
            )
        return reply["result"]
    return {}


def run_gateway(config: Config) -> int:
    if not config.http.keys:
        raise ConfigError('[http] keys = "<file>" is required; mint a key with `edge-appliance http-keygen`')
    keys = api_keys.load_keys(Path(config.http.keys))
    notifier = Notifier()
    stop, reload = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    bridge = open_bridge(config)
    try:
        gateway = Gateway(config.http, bridge, keys)
        server = Server(gateway)
        notifier.status("connecting to the daemon")
        health = reach_daemon(bridge, stop, notifier)
        if stop.is_set():
            return 0
        server.start()
        thread = server.thread
        scheme = "https" if server.tls else "http"
        notifier.ready(f"serving {health.get('model_id')} over {scheme} on {config.http.listen}")
        log.info("ready: %s on %s, %d API key(s)", scheme, config.http.listen, len(keys))
        interval = notifier.watchdog_interval
        while not stop.wait(0.2 if interval is None else min(0.2, interval / 2)):
            if thread.is_alive() and bridge.alive():  # a dead half must let the watchdog restart us
                notifier.watchdog()
            if reload.is_set():
                reload.clear()
                _reload_keys(gateway, Path(config.http.keys))
        notifier.stopping()
        server.stop()
    finally:
        bridge.close()
    log.info("stopped cleanly")
    return 0


def _reload_keys(gateway: Gateway, path: Path) -> None:
    """SIGHUP: re-read the key file (a revoked key stops working at once); a bad file keeps the old keys."""
    try:
        gateway.keys = api_keys.load_keys(path)
        log.info("reloaded %d API key(s)", len(gateway.keys))
    except api_keys.ApiKeyError as exc:
        log.error("kept the previous API keys: %s", exc)
