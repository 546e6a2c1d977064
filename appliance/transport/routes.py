"""The route table: routing id <-> connection <-> the requests in flight on it, kept consistent in one place.

A streamed request lives here from the moment its runner accepts it (``opened``) until its final frame has been
sent (``reply_to`` with ``final``) or its connection closes (``closed``, which hands back the keys to cancel in the
runners). A ``cancel`` op changes nothing here: the runner answers the cancelled request with a final frame, and
that frame closes it like any other. Connections (descriptor generations, anonymous names, connections per key)
are tracked by ``transport.connections.Connections``, which this table owns, so a disconnect forgets the routing
id and its requests in the same step. Keys are ``serving.admission.scoped`` request ids (identity + request id).
"""

from __future__ import annotations

from appliance.transport.connections import Connections


class Routes:
    def __init__(self) -> None:
        self._connections = Connections()
        self._envelopes: dict[str, list[bytes]] = {}  # scoped request key -> reply envelope
        self._keys: dict[bytes, set[str]] = {}  # routing id -> its requests in flight
        self._owners: dict[str, str] = {}  # scoped request key -> its identity
        self._in_flight: dict[str, int] = {}  # identity -> requests in flight

    # -- connections (see transport/connections.py) ------------------------------------------------
    def accepted(self, fd: int) -> None:
        self._connections.accepted(fd)

    def closed(self, fd: int) -> list[str]:
        """The connection on descriptor ``fd`` closed: its routing ids and their requests are forgotten; returns the
        keys that were in flight on it, for the caller to cancel (nobody is left to answer them)."""
        keys = []
        for route in self._connections.disconnected(fd):
            for key in list(self._keys.get(route, ())):
                keys.append(key)
                self._forget(key)
        return keys

    def knows(self, route: bytes) -> bool:
        return self._connections.knows(route)

    def seen(self, route: bytes, fd: int | None) -> bool:
        return self._connections.seen(route, fd)

    def admit(self, route: bytes, identity: str, limit: int) -> bool:
        return self._connections.admit(route, identity, limit)

    def token(self, route: bytes) -> str:
        return self._connections.token(route)

    @property
    def connected(self) -> int:
        """Connections that have sent at least one message and are still open."""
        return len(self._connections)

    # -- requests in flight -------------------------------------------------------------------------
    def opened(self, key: str, envelope: list[bytes], identity: str) -> None:
        """A streamed request was accepted by a runner: its replies go to ``envelope`` until the final one."""
        self._envelopes[key] = envelope
        self._owners[key] = identity
        self._keys.setdefault(envelope[0], set()).add(key)
        self._in_flight[identity] = self._in_flight.get(identity, 0) + 1

    def reply_to(self, key: str, final: bool) -> list[bytes] | None:
        """Where a reply frame for ``key`` goes (None: nobody waits for it any more); a final frame closes it."""
        envelope = self._envelopes.get(key)
        if envelope is not None and final:
            self._forget(key)
        return envelope

    def in_flight(self, identity: str) -> int:
        return self._in_flight.get(identity, 0)

    def __contains__(self, key: str) -> bool:
        return key in self._envelopes

    def __len__(self) -> int:
        return len(self._envelopes)

    def _forget(self, key: str) -> None:
        envelope = self._envelopes.pop(key, None)
        if envelope is None:
            return
        keys = self._keys.get(envelope[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys[envelope[0]]
        identity = self._owners.pop(key)
        left = self._in_flight.get(identity, 1) - 1
        if left > 0:
            self._in_flight[identity] = left
        else:
            self._in_flight.pop(identity, None)
