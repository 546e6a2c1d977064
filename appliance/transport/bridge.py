"""The gateway's connection to the daemon: one DEALER socket shared by every HTTP request.

ZeroMQ sockets belong to one thread, so a single I/O thread owns the DEALER: requests hand it
frames through an inproc PUSH socket (used under a lock) and read the replies for their request
id from their own inbox: a thread's queue, or an asyncio queue fed through the loop
(``AsyncStream``, what the gateway's ASGI app reads). One connection for all requests keeps the
gateway a single, allow-listed client of the daemon; a request that loses its HTTP client is
ended with an explicit ``cancel``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from typing import Any, TypeVar

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from appliance.transport import protocol as P

SUBMIT = "inproc://gateway-submit"
_R = TypeVar("_R", bound="_Replies")


class BridgeError(Exception):
    """The daemon did not answer in time (it is down, restarting, or refuses this gateway's key)."""


class Bridge:
    def __init__(
        self,
        endpoint: str,
        timeout_s: float,
        curve_server_key: bytes | None = None,
        curve_keypair: tuple[bytes, bytes] | None = None,
    ):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = zmq.Context()
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        self._refusals = None  # CURVE handshakes the daemon refused (its ZAP handler: the key is not allow-listed)
        if curve_server_key and curve_keypair:
            self._dealer.curve_serverkey = curve_server_key
            self._dealer.curve_publickey, self._dealer.curve_secretkey = curve_keypair
            self._refusals = self._dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(SUBMIT)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(SUBMIT)
        self._push_lock = threading.Lock()
        self._waiting: dict[str, queue.SimpleQueue[dict]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bridge", daemon=True)

    def start(self) -> None:
        self._dealer.connect(self.endpoint)
        self._thread.start()

    def key_refused(self) -> bool:
        """Whether the daemon refused this gateway's CURVE key during a handshake. Under CURVE a refused key gets
        no reply at all, only this event, so without it the gateway could only keep waiting. Call from one thread."""
        if self._refusals is None:
            return False
        refused = False
        while self._refusals.poll(0):
            refused |= recv_monitor_message(self._refusals)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        return refused

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._refusals is not None:
            self._dealer.disable_monitor()
            self._refusals.close(linger=0)
        for sock in (self._push, self._pull, self._dealer):
            sock.close(linger=0)
        self._ctx.term()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        while not self._stop.is_set():
            events = dict(poller.poll(200))
            if self._pull in events:
                while self._pull.poll(0):
                    self._forward(self._pull.recv())
            if self._dealer in events:
                while self._dealer.poll(0):
                    reply = P.decode_reply(self._dealer.recv_multipart()[-1])
                    with self._lock:
                        inbox = self._waiting.get(reply.get("id"))
                    if inbox is not None:  # replies for a request nobody waits for any more are dropped
                        inbox.put(reply)

    def _forward(self, frame: bytes) -> None:
        """Never block this thread on a daemon that is gone: its pipe full, the request is answered busy."""
        try:
            self._dealer.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            rid = msgpack.unpackb(frame, raw=False).get("id")
            with self._lock:
                inbox = self._waiting.get(rid)
            if inbox is not None:
                inbox.put(
                    {
                        "type": P.T_ERROR,
                        "id": rid,
                        "code": P.E_BUSY,
                        "message": "the daemon is not reading",
                        "retry_after_ms": 1000,
                    }
                )

    def _send(self, rid: str, op: str, fields: dict[str, Any], stream: _R | None = None) -> _R:
        stream = stream or Stream(self, rid, fields.get("on_behalf_of"))  # type: ignore[assignment]
        with self._lock:
            self._waiting[rid] = stream.inbox
        self._submit(P.request(op, rid, **fields))
        return stream

    def _submit(self, frame: bytes) -> None:
        with self._push_lock:
            self._push.send(frame)

    def cancel(self, rid: str, on_behalf_of: dict | None = None) -> None:
        """Ask the daemon to end request ``rid`` (its HTTP client left); the slot is freed within one step.
        Request ids are scoped to the identity that sent them, so the cancel names the same end user."""
        self._submit(P.request(P.OP_CANCEL, uuid.uuid4().hex, target=rid, on_behalf_of=on_behalf_of))

    def _forget(self, rid: str) -> None:
        with self._lock:
            self._waiting.pop(rid, None)

    def call(self, op: str, timeout_s: float | None = None, **fields: Any) -> dict:
        """A one-reply op; returns the reply map (``result`` or ``error``)."""
        stream = self._send(uuid.uuid4().hex, op, fields)
        try:
            return stream.next(timeout_s or self.timeout_s)
        finally:
            stream.close()

    def generate(self, rid: str, **fields: Any) -> Stream:
        """Start a generation; read its ``token``/``done``/``error`` replies from the stream."""
        return self._send(rid, P.OP_GENERATE, fields)

    def open(self, op: str, rid: str | None = None, **fields: Any) -> AsyncStream:
        """Send ``op`` from a coroutine; await its replies with ``AsyncStream.next`` (on the calling loop)."""
        rid = rid or uuid.uuid4().hex
        stream = AsyncStream(self, rid, fields.get("on_behalf_of"))
        return self._send(rid, op, fields, stream)

    async def acall(self, op: str, timeout_s: float | None = None, **fields: Any) -> dict:
        """``call`` for a coroutine: a one-reply op, awaited without holding a thread."""
        stream = self.open(op, **fields)
        try:
            return await stream.next(timeout_s or self.timeout_s)
        finally:
            stream.close()


class _Replies:
    """One request's id, its end user (cancels name the same), and the inbox the bridge's thread fills."""

    inbox: queue.SimpleQueue[dict] | _LoopInbox

    def __init__(self, bridge: Bridge, rid: str, on_behalf_of: dict | None = None):
        self.bridge = bridge
        self.id = rid
        self.on_behalf_of = on_behalf_of

    def cancel(self) -> None:
        self.bridge.cancel(self.id, self.on_behalf_of)

    def close(self) -> None:
        self.bridge._forget(self.id)


class Stream(_Replies):
    """The replies to one request, in order, read by a thread."""

    def __init__(self, bridge: Bridge, rid: str, on_behalf_of: dict | None = None):
        super().__init__(bridge, rid, on_behalf_of)
        self.inbox: queue.SimpleQueue[dict] = queue.SimpleQueue()

    def poll(self, timeout_s: float) -> dict | None:
        """The next reply, or None after ``timeout_s``."""
        try:
            return self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def next(self, timeout_s: float) -> dict:
        reply = self.poll(timeout_s)
        if reply is None:
            raise BridgeError(f"no reply from the daemon at {self.bridge.endpoint} in {timeout_s:g}s")
        return reply


class _LoopInbox:
    """Replies put by the bridge's thread, delivered on the event loop that opened the stream."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[dict] = asyncio.Queue()

    def put(self, reply: dict) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, reply)


class AsyncStream(_Replies):
    """The replies to one request, in order, awaited on the event loop that opened it."""

    def __init__(self, bridge: Bridge, rid: str, on_behalf_of: dict | None = None):
        super().__init__(bridge, rid, on_behalf_of)
        self.inbox = _LoopInbox()

    async def poll(self, timeout_s: float) -> dict | None:
        try:
            return await asyncio.wait_for(self.inbox.queue.get(), timeout_s)
        except asyncio.TimeoutError:
            return None

    async def next(self, timeout_s: float) -> dict:
        reply = await self.poll(timeout_s)
        if reply is None:
            raise BridgeError(f"no reply from the daemon at {self.bridge.endpoint} in {timeout_s:g}s")
        return reply
