"""``edge-appliance http``: the OpenAI-compatible HTTP gateway (docs/HTTP.md), a second process.

The gateway is a client of the daemon with allow-list role ``gateway``: it checks the API key,
forwards the request over ZeroMQ naming the key's identity and role in ``on_behalf_of``, and
streams the replies back as server-sent events. The daemon stays the one place that audits,
queues, limits and schedules; a refused key is reported to it (op ``auth_failed``) and audited
before the 401 leaves. Built on the standard library's ``ThreadingHTTPServer`` (why: ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import socketserver
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from appliance.config import Config, ConfigError, HttpConfig
from appliance.notify import Notifier
from appliance.transport import api_keys
from appliance.transport import openai_compat as O
from appliance.transport import protocol as P
from appliance.transport.bridge import Bridge, BridgeError, Stream

log = logging.getLogger("appliance.http")

INFO_TTL_S = 5.0  # how long the daemon's model id and features are reused before asking again
WATCH_S = 0.25  # how often a waiting request checks that its HTTP client is still connected
PROBE_S = 5.0  # longest wait for the daemon's answer to a start-up attempt or a /health probe


class ClientGone(Exception):
    """The HTTP client closed its connection; its request is cancelled at the daemon."""


class Gateway:
    """What every request thread shares: the bridge to the daemon, the API keys, the daemon's info."""

    def __init__(self, config: HttpConfig, bridge: Bridge, keys: list[api_keys.ApiKey]):
        self.config = config
        self.bridge = bridge
        self.keys = keys
        self._info: dict = {}
        self._info_at = 0.0
        self._lock = threading.Lock()

    def info(self) -> dict:
        with self._lock:
            if time.monotonic() - self._info_at > INFO_TTL_S:
                reply = self.bridge.call(P.OP_INFO)
                if reply["type"] != P.T_RESULT:
                    raise BridgeError(f"the daemon refused 'info': {reply.get('code')}: {reply.get('message')}")
                self._info, self._info_at = reply["result"], time.monotonic()
            return self._info

    def renders_chat(self) -> bool:
        """The daemon applies the model's chat template itself (it advertises ``messages`` in ``features``)."""
        return "messages" in self.info().get("features", ())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked server-sent events
    server_version = "edge-appliance"
    server: GatewayServer
    request_id: str | None = None
    body_read = False

    def setup(self) -> None:
        self.timeout = self.server.gateway.config.timeout_s  # bounds idle keep-alive and writes to a stalled client
        # Every event is a small write: without TCP_NODELAY, Nagle holds it until the client's delayed ACK (~40 ms).
        self.disable_nagle_algorithm = self.server.address_family != socket.AF_UNIX
        super().setup()

    @property
    def gateway(self) -> Gateway:
        return self.server.gateway

    def address_string(self) -> str:
        return self.client_address[0] if self.client_address else "unix"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.info("%s %s", self.address_string(), format % args)

    # -- routing ------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch({"/health": self._health, "/v1/models": self._models})

    def do_POST(self) -> None:
        self._dispatch({"/v1/chat/completions": self._chat, "/v1/completions": self._completions})

    def _dispatch(self, routes: dict) -> None:
        self.request_id = None  # the daemon's id of a forwarded request: X-Request-Id, the audit row's request_id
        self.body_read = False
        path = self.path.split("?", 1)[0]
        try:
            # Framing only by Content-Length: a Transfer-Encoding (alone or beside a Content-Length) or a GET that
            # carries a body would leave bytes a proxy and this server read differently (request smuggling).
            if "Transfer-Encoding" in self.headers:
                self.close_connection = True
                raise O.ApiError(400, "Transfer-Encoding is not accepted; send the body with Content-Length")
            if self.command == "GET" and self.headers.get("Content-Length", "0").strip() not in ("", "0"):
                self.close_connection = True
                raise O.ApiError(400, "a GET request carries no body")
            route = routes.get(path)
            if route is None:
                raise O.ApiError(
                    404 if path not in _ALL_ROUTES else 405, f"no route {self.command} {path}", None, "not_found"
                )
            route()
        except O.ApiError as exc:
            # A body left unread (refused before it was parsed) must not be read as the next request.
            self.close_connection = self.close_connection or (self.command == "POST" and not self.body_read)
            self._send_json(exc.status, exc.body(), exc.retry_after_s)
        except BridgeError as exc:
            log.error("%s", exc)
            self._send_json(503, O.ApiError(503, str(exc), kind="server_error").body(), 1)
        except ClientGone:
            self.close_connection = True

    # -- endpoints ----------------------------------------------------------------------------
    def _health(self) -> None:
        """Unauthenticated liveness for load balancers: only whether the daemon answers and its audit is ok."""
        reply = self.gateway.bridge.call(P.OP_HEALTH, timeout_s=PROBE_S)
        ok = reply["type"] == P.T_RESULT and reply["result"].get("status") == "ok"
        self._send_json(200 if ok else 503, {"status": "ok" if ok else "degraded"})

    def _models(self) -> None:
        self._authenticate()
        info = self.gateway.info()
        model = {"id": info["model_id"], "object": "model", "created": 0, "owned_by": "edge-appliance"}
        self._send_json(200, {"object": "list", "data": [model]})

    def _chat(self) -> None:
        behalf = self._authenticate()
        self._forward(O.parse_chat(self._body(), self.gateway.info()["model_id"], self.gateway.renders_chat()), behalf)

    def _completions(self) -> None:
        behalf = self._authenticate()
        self._forward(O.parse_completion(self._body(), self.gateway.info()["model_id"]), behalf)

    # -- request pieces -----------------------------------------------------------------------
    def _authenticate(self) -> dict:
        header = self.headers.get("Authorization", "")
        presented = header[7:].strip() if header[:7].lower() == "bearer " else ""
        entry = api_keys.verify(self.gateway.keys, presented) if presented else None
        if entry is not None:
            return {"identity": entry.identity, "role": entry.role}
        subject = f"unknown:{api_keys.fingerprint(presented)}" if presented else "anonymous"
        reply = self.gateway.bridge.call(P.OP_AUTH_FAILED, on_behalf_of={"identity": subject, "role": "-"})
        if reply["type"] != P.T_RESULT or not reply["result"].get("audited"):
            log.error("refused API key %s could not be audited: %s", subject, reply.get("message", "audit failed"))
        log.warning("refused API key %s from %s", subject, self.address_string())
        raise O.ApiError(
            401, "invalid or missing API key (send 'Authorization: Bearer <key>')", None, "invalid_api_key"
        )

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise O.ApiError(411, "send the JSON body with a Content-Length header")
        if int(length) > self.gateway.config.max_body_bytes:
            raise O.ApiError(413, f"the body is {length} bytes; the limit is {self.gateway.config.max_body_bytes}")
        data = self.rfile.read(int(length))
        self.body_read = True
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise O.ApiError(400, f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise O.ApiError(400, "the body's JSON is nested too deeply") from None
        except ValueError as exc:  # an integer past Python's digit limit
            raise O.ApiError(400, f"the body's JSON has a value out of range: {exc}") from None

    def _forward(self, call: O.Call, behalf: dict) -> None:
        rid = self.request_id = uuid.uuid4().hex
        stream = self.gateway.bridge.generate(rid, on_behalf_of=behalf, **call.fields)
        try:
            first = self._next(stream)
            if first["type"] == P.T_ERROR:
                raise O.daemon_error(first, call)
            if not call.stream:
                self._send_json(200, O.completion(call, rid, first))
                return
            self._stream(call, rid, stream, first)
        except BridgeError:
            stream.cancel()  # given up on: it must not keep a slot
            raise
        except (ClientGone, OSError) as exc:  # reset, broken pipe, write timeout: nobody is left to read
            stream.cancel()
            log.info("client left: cancelled request %s (%s)", rid, type(exc).__name__)
            raise ClientGone from None
        finally:
            stream.close()

    def _stream(self, call: O.Call, rid: str, stream: Stream, reply: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Request-Id", rid)
        self.end_headers()
        if call.chat:
            self._event(O.chunk(call, rid, "", first=True))
        while True:
            if reply["type"] == P.T_TOKEN:
                self._event(O.chunk(call, rid, reply["text"]))
            elif reply["type"] == P.T_DONE:
                self._event(O.chunk(call, rid, None if call.chat else "", reply["finish_reason"]))
                if call.include_usage:
                    self._event(O.usage_chunk(call, rid, reply))
                break
            else:  # an error after the 200 went out: OpenAI's clients read an error event
                self._event(O.daemon_error(reply, call).body())
                break
            try:
                reply = self._next(stream)
            except BridgeError as exc:
                stream.cancel()
                reply = {"type": P.T_ERROR, "code": "timeout", "message": str(exc)}
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    def _next(self, stream: Stream) -> dict:
        """The daemon's next reply; gives up after the configured timeout, or when the client leaves."""
        deadline = time.monotonic() + self.gateway.config.timeout_s
        while time.monotonic() < deadline:
            reply = stream.poll(WATCH_S)
            if reply is not None:
                return reply
            if self._client_gone():
                raise ClientGone
        raise BridgeError(f"no reply from the daemon in {self.gateway.config.timeout_s:g}s")

    def _client_gone(self) -> bool:
        """A closed connection reads as end-of-file; peek at the raw socket (below TLS) without consuming."""
        sock = self.connection
        with contextlib.suppress(OSError, ValueError):
            if not select.select([sock], [], [], 0)[0]:
                return False
            return socket.socket.recv(sock, 1, socket.MSG_PEEK) == b""
        return True

    # -- writing ------------------------------------------------------------------------------
    def _event(self, obj: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send_json(self, status: int, obj: dict, retry_after_s: int | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after_s is not None:
            self.send_header("Retry-After", str(retry_after_s))
        if self.request_id is not None:
            self.send_header("X-Request-Id", self.request_id)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="edge-appliance"')
        self.end_headers()
        self.wfile.write(body)


_ALL_ROUTES = ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions")


class GatewayServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once (more get 503 without a thread)."""

    daemon_threads = True

    def __init__(self, address, gateway: Gateway, tls: ssl.SSLContext | None):
        self.gateway = gateway
        self.tls = tls
        self.slots = threading.BoundedSemaphore(gateway.config.max_connections)
        # socketserver's default backlog of 5 drops a burst of connections; their SYN is retried after ~1 s.
        self.request_queue_size = gateway.config.max_connections
        super().__init__(address, Handler)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def finish_request(self, request, client_address) -> None:
        if self.tls is not None:  # the handshake runs here, in the connection's thread, never in accept()
            request.settimeout(self.gateway.config.timeout_s)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except OSError as exc:
                log.info("TLS handshake with %s failed: %s", client_address, exc)
                return
            with request:  # the plain socket was detached into this one: close it here
                super().finish_request(request, client_address)
            return
        super().finish_request(request, client_address)


class UnixGatewayServer(GatewayServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.server_address)  # a socket left by a previous run
        socketserver.TCPServer.server_bind(self)
        # Reachable by local users (a reverse proxy has its own uid); every request still needs an API key.
        os.chmod(self.server_address, 0o666)
        self.server_name, self.server_port = "localhost", 0


def tls_context(config: HttpConfig) -> ssl.SSLContext | None:
    if not config.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(config.tls_client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[http] TLS files cannot be used: {exc}") from None
    return ctx


def make_server(gateway: Gateway) -> GatewayServer:
    """Bind ``[http] listen``: ``host:port`` or ``unix:/path``."""
    listen, tls = gateway.config.listen, tls_context(gateway.config)
    try:
        if listen.startswith("unix:"):
            return UnixGatewayServer(listen[5:], gateway, tls)
        host, _, port = listen.rpartition(":")
        return GatewayServer((host.strip("[]"), int(port)), gateway, tls)
    except ValueError:
        raise ConfigError(f'[http] listen = "{listen}": use "host:port" or "unix:/path"') from None
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror} (change [http] listen)") from None


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
        server = make_server(gateway)
        notifier.status("connecting to the daemon")
        health = reach_daemon(bridge, stop, notifier)
        if stop.is_set():
            return 0
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="http")
        thread.start()
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
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
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
