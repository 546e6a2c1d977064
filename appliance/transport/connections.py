"""Which connection a request came on, so a client that disconnects has its requests cancelled.

ZeroMQ hides connections behind routing ids; the socket monitor reports ``ACCEPTED`` and
``DISCONNECTED`` with the connection's file descriptor, and every received frame can tell the
descriptor it arrived on (``SRCFD``). Descriptors are reused, so a descriptor alone cannot say
*which* connection closed: a late ``DISCONNECTED`` for an old connection would cancel the
stranger who got the same number. Each descriptor therefore carries a generation, advanced at every
``ACCEPTED``; a routing id is bound to (descriptor, generation) when its first message arrives,
and a disconnect cancels only the routing ids of the generation that closed.

This relies on libzmq emitting ``DISCONNECTED`` before it closes the descriptor and ``ACCEPTED``
before the new peer's first message can be read, and on the server draining monitor events before
it reads messages; both hold for libzmq 4.3's stream engine.
"""

from __future__ import annotations

import secrets


class Connections:
    """Also names each anonymous connection: a random token drawn when its routing id is first seen and
    forgotten with the connection, so an anonymous identity is neither predictable (libzmq counts routing ids up
    from a fixed value) nor inherited by a later connection that reuses the routing id (a client may set its own)."""

    def __init__(self) -> None:
        self._generation: dict[int, int] = {}
        self._bound: dict[bytes, tuple[int, int]] = {}  # routing id -> (fd, generation)
        self._by_conn: dict[tuple[int, int], set[bytes]] = {}
        self._tokens: dict[bytes, str] = {}  # routing id -> this connection's random name
        self._owner: dict[bytes, str] = {}  # routing id -> the key identity it was admitted for
        self._by_identity: dict[str, set[bytes]] = {}
        self._closed: dict[tuple[int, int], None] = {}  # recently closed (fd, generation), oldest first

    def accepted(self, fd: int) -> None:
        self._generation[fd] = self._generation.get(fd, 0) + 1

    def knows(self, route: bytes) -> bool:
        return route in self._bound

    def seen(self, route: bytes, fd: int | None) -> bool:
        """A message from ``route`` arrived on descriptor ``fd`` (None when libzmq cannot tell). False when it is a
        frame of a connection that already closed (libzmq still held it): nobody can receive its answer, and binding
        it would resurrect a route no disconnect will ever clear."""
        if fd is not None and route not in self._bound and (fd, self._generation.get(fd, 0)) in self._closed:
            return False
        if route not in self._tokens:
            self._tokens[route] = secrets.token_hex(8)
        if fd is None or route in self._bound:
            return True
        conn = (fd, self._generation.get(fd, 0))
        self._bound[route] = conn
        self._by_conn.setdefault(conn, set()).add(route)
        return True

    def disconnected(self, fd: int) -> set[bytes]:
        """The routing ids whose connection just closed (forgotten from now on)."""
        conn = (fd, self._generation.get(fd, 0))
        self._closed[conn] = None
        while len(self._closed) > 4096:
            del self._closed[next(iter(self._closed))]
        routes = self._by_conn.pop(conn, set())
        for route in routes:
            self._bound.pop(route, None)
            self._tokens.pop(route, None)
            owner = self._owner.pop(route, None)
            if owner is not None:
                self._by_identity[owner].discard(route)
                if not self._by_identity[owner]:
                    del self._by_identity[owner]
        return routes

    def admit(self, route: bytes, identity: str, limit: int) -> bool:
        """Whether connection ``route`` may speak for key ``identity``: at most ``limit`` connections per key (a
        key's connections each buffer up to rcvhwm frames in libzmq, so their number bounds its memory)."""
        if route in self._owner:
            return True
        routes = self._by_identity.setdefault(identity, set())
        if len(routes) >= limit:
            return False
        routes.add(route)
        self._owner[route] = identity
        return True

    def connections_of(self, identity: str) -> int:
        return len(self._by_identity.get(identity, ()))

    def token(self, route: bytes) -> str:
        """The random name of the connection ``route`` belongs to (drawn by ``seen``; here only if it was not)."""
        token = self._tokens.get(route)
        if token is None:
            token = self._tokens[route] = secrets.token_hex(8)
        return token

    def __len__(self) -> int:
        return len(self._bound)
