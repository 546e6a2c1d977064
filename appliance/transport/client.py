"""Python client: a DEALER socket, per-reply timeout, bounded retries (the ZeroMQ guide's Lazy Pirate).

with Client("tcp://127.0.0.1:5555") as c:
    for event in c.generate("How do I reset the conveyor?"):
        print(event["text"], end="")
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterator
from typing import Any

import zmq

from appliance.config import DEFAULT_ENDPOINT
from appliance.errors import ApplianceError
from appliance.transport import protocol as P


class ClientError(ApplianceError):
    """The daemon answered with an error, or did not answer in time."""

    def __init__(self, code: str, message: str, reply: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply = reply or {}


class Client:
    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        timeout_s: float = 30.0,
        retries: int = 3,
        curve_server_key: bytes | None = None,
        curve_keypair: tuple[bytes, bytes] | None = None,
    ):
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self.retries = retries
        self._curve = (curve_server_key, curve_keypair)
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._pending: dict[str, deque[dict]] = {}

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            server_key, keypair = self._curve
            if server_key and keypair:
                sock.curve_serverkey, (sock.curve_publickey, sock.curve_secretkey) = server_key, keypair
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        """Drop the socket after a timeout: a fresh one has no stale replies queued (Lazy Pirate)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._pending.clear()

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, rid: str) -> dict | None:
        """Next reply for ``rid``; replies for other requests on this socket are kept for their reader."""
        if self._pending.get(rid):
            return self._pending[rid].popleft()
        sock = self._socket()
        while sock.poll(self.timeout_ms, zmq.POLLIN):
            reply = P.decode_reply(sock.recv_multipart()[-1])
            if reply.get("id") in (rid, None):
                return reply
            self._pending.setdefault(reply.get("id"), deque()).append(reply)
        return None

    def send_raw(self, frame: bytes) -> dict:
        """Send one raw frame and return the first reply (for diagnostics and tests of hostile input)."""
        self._socket().send(frame)
        reply = self._recv_any()
        if reply is None:
            raise ClientError("timeout", f"no reply from {self.endpoint}")
        return reply

    def _recv_any(self) -> dict | None:
        sock = self._socket()
        if sock.poll(self.timeout_ms, zmq.POLLIN):
            return P.decode_reply(sock.recv_multipart()[-1])
        return None

    def call(self, op: str, **fields: Any) -> dict:
        """A one-reply op (``health``, ``info``, ``cancel``); retried on timeout."""
        rid = uuid.uuid4().hex
        for _attempt in range(self.retries):
            self._socket().send(P.request(op, rid, **fields))
            reply = self._recv(rid)
            if reply is not None:
                if reply["type"] == P.T_ERROR:
                    raise ClientError(reply["code"], reply["message"], reply)
                return reply["result"]
            self._reset()
        raise ClientError("timeout", f"no reply from {self.endpoint} after {self.retries} attempt(s)")

    def health(self) -> dict:
        return self.call(P.OP_HEALTH)

    def info(self) -> dict:
        return self.call(P.OP_INFO)

    def generate(self, prompt: str | None = None, request_id: str | None = None, **params: Any) -> Iterator[dict]:
        """Stream a generation: yields ``token`` events, then the final ``done`` event. Give ``prompt``
        or ``messages=[{"role": ..., "content": ...}]`` (rendered with the model's chat template).

        Retried (same id) only while nothing has been received; once tokens flowed a timeout raises.
        """
        rid = request_id or uuid.uuid4().hex
        received = False
        for _attempt in range(self.retries):
            self._socket().send(P.request(P.OP_GENERATE, rid, prompt=prompt, **params))
            while True:
                reply = self._recv(rid)
                if reply is None:
                    break
                received = True
                if reply["type"] == P.T_ERROR:
                    raise ClientError(reply["code"], reply["message"], reply)
                yield reply
                if reply["type"] == P.T_DONE:
                    return
            self._reset()
            if received:
                raise ClientError("timeout", f"stream from {self.endpoint} stalled for {self.timeout_ms} ms")
        raise ClientError("timeout", f"no reply from {self.endpoint} after {self.retries} attempt(s)")

    def complete(self, prompt: str | None = None, **params: Any) -> dict:
        """Run a generation to the end and return the final ``done`` event."""
        final: dict = {}
        for event in self.generate(prompt, **params):
            final = event
        return final

    def cancel(self, target: str, identity: str | None = None) -> dict:
        """Cancel this client's request ``target`` (an admin may name another client's ``identity``)."""
        return self.call(P.OP_CANCEL, target=target, identity=identity)

    def end_session(self, session: str, identity: str | None = None) -> dict:
        """Forget a conversation's kept cache (``generate`` with ``session=`` starts or continues one);
        an admin may name another client's ``identity``."""
        return self.call(P.OP_END_SESSION, session=session, identity=identity)
