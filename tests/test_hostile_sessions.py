"""One client opening sessions in a loop evicts only its own oldest conversations, never another client's
(``[sessions] max_per_identity``): the store's policy, and the same through a real daemon."""

from __future__ import annotations

import time

from appliance.client import Client
from appliance.serving.admission import scoped
from appliance.serving.sessions import Session, SessionStore


def _session(n: int = 1) -> Session:
    return Session(tokens=[1] * n, cache=[], cached=n, nbytes=100, model_version="1")


def test_a_flood_of_one_identity_evicts_only_its_own():
    store = SessionStore(max_bytes=1 << 30, ttl_s=600, max_sessions=1024, max_per_identity=64)
    keep = scoped("alice", "ward-3")
    store.acquire(keep, "1")
    store.release(keep, _session())
    for i in range(1104):  # the reviewer's flood: 1,104 sessions in a loop
        sid = scoped("mallory", f"s{i}")
        store.acquire(sid, "1")
        store.release(sid, _session())
    assert store.acquire(keep, "1") is not None  # alice's conversation is still there
    assert store.stats()["sessions"] == 64  # mallory's newest 64; alice's is in use
    assert store.acquire(scoped("mallory", "s1103"), "1") is not None
    assert store.acquire(scoped("mallory", "s0"), "1") is None


def test_through_the_daemon_another_clients_session_survives(daemon):
    with Client(daemon.endpoint, timeout_s=30) as alice, Client(daemon.endpoint, timeout_s=30) as mallory:
        first = alice.complete("The valve", session="ward-3", max_tokens=4)
        for i in range(80):  # more than max_per_identity (64)
            mallory.complete("x", session=f"s{i}", max_tokens=1)
        second = alice.complete(" and then", session="ward-3", max_tokens=4)
        assert second["usage"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
        again = mallory.complete(" y", session="s0", max_tokens=1)
        assert again["usage"]["cached_tokens"] == 0  # mallory's oldest went


def test_a_reused_routing_id_inherits_nothing(daemon, device):
    """Without CURVE a client may choose its routing id; a later connection that reuses a disconnected client's id
    gets a new random identity: not its sessions, and no identity derived from the routing id."""
    import msgpack
    import zmq

    from appliance.audit.store import AuditLog
    from appliance.config import load_config
    from appliance.transport import protocol as P

    ctx = zmq.Context.instance()

    def ask(text: str, rid: str) -> dict:
        """One request on a fresh connection with the chosen routing id. libzmq ignores a connection whose routing
        id a connection it has not cleaned up yet still holds, so retry (a new connection) until one is heard."""
        deadline = time.monotonic() + 30
        while True:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, b"victim-route")
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(daemon.endpoint)
            try:
                sock.send(P.request(P.OP_GENERATE, rid, prompt=text, session="chart", max_tokens=2))
                while sock.poll(2_000):
                    reply = msgpack.unpackb(sock.recv_multipart()[-1])
                    if reply["type"] in ("done", "error"):
                        return reply
            finally:
                sock.close()
            assert time.monotonic() < deadline, "the daemon never heard the reused routing id"

    first = ask("The patient", "r1")
    assert first["type"] == "done"
    second = ask(" is", "r2")  # same routing id, new connection
    assert second["type"] == "done" and second["usage"]["cached_tokens"] == 0
    device_rows = AuditLog(load_config(device.config).audit_db).rows()
    clients = {r.client for r in device_rows if r.request_id in ("r1", "r2")}
    assert len(clients) >= 2 and all(len(c.removeprefix("anonymous:")) == 16 for c in clients), clients
    assert not any(b"victim-route".hex() in c for c in clients)
