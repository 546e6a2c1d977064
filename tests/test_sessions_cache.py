"""Conversation sessions, the response cache and client disconnects, through the real daemon."""

from __future__ import annotations

import sqlite3
import time

import msgpack
import numpy as np
import zmq

from appliance.config import load_config
from appliance.loader import load_model
from appliance.transport import protocol as P
from appliance.transport.client import Client

TURN1, TURN2 = "Return the", " Raise ValueError if"


def greedy_ids(model, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    logits = model.engine.prefill([(0, ids)])
    for _ in range(n):
        out.append(int(np.argmax(logits[0])))
        logits = model.engine.decode([(0, out[-1])])
    model.engine.release(0)
    return out


def test_session_turn_equals_full_reprefill_and_prefills_only_new_tokens(daemon, device):
    with Client(daemon.endpoint) as client:
        first = client.complete(TURN1, max_tokens=6, ignore_eos=True, session="conv-1")
        before = client.health()
        second = client.complete(TURN2, max_tokens=6, ignore_eos=True, session="conv-1")
        after = client.health()
    assert before["sessions"] >= 1 and before["session_bytes"] > 0
    model = load_model(load_config(device.config))
    tok, bos = model.tokenizer, model.spec.bos_token_id
    p1 = [bos, *tok.encode(TURN1).ids]
    out1 = greedy_ids(model, p1, 6)
    assert first["text"] == tok.decode(out1)
    # the whole conversation re-prefilled from scratch: turn 1, its answer, turn 2 (no second BOS)
    full = p1 + out1 + tok.encode(TURN2).ids
    assert second["text"] == tok.decode(greedy_ids(model, full, 6))
    # usage counts the whole context the model attends to, and how much of it came from the kept cache
    assert second["usage"]["prompt_tokens"] == len(full)
    assert second["usage"]["cached_tokens"] == len(full) - 1 - len(tok.encode(TURN2).ids)
    # prefilled this turn: the last answer token (never fed) and turn 2's tokens, not the history
    assert after["prefill_tokens"] - before["prefill_tokens"] == 1 + len(tok.encode(TURN2).ids)


def test_end_session_forgets_and_a_busy_session_is_refused(daemon):
    with Client(daemon.endpoint) as client:
        client.complete(TURN1, max_tokens=2, session="conv-2")
        assert client.end_session("conv-2") == {"ended": True, "session": "conv-2"}
        assert client.end_session("conv-2")["ended"] is False
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    sock.send(P.request(P.OP_GENERATE, "a", prompt=TURN1, max_tokens=200, ignore_eos=True, session="conv-3"))
    sock.send(P.request(P.OP_GENERATE, "b", prompt=TURN1, max_tokens=4, session="conv-3"))
    finals = {}
    while len(finals) < 2:
        assert sock.poll(20000)
        reply = msgpack.unpackb(sock.recv_multipart()[-1])
        if reply["type"] != "token":
            finals[reply["id"]] = reply
    assert finals["b"]["code"] == P.E_SESSION_BUSY and finals["a"]["type"] == "done"
    sock.close()


def test_identical_greedy_request_is_a_cache_hit_and_audited_as_one(daemon, device):
    prompt = "The socket module"
    with Client(daemon.endpoint) as client:
        miss = client.complete(prompt, max_tokens=8, request_id="cache-miss")
        hits_before = client.health()["response_cache_hits"]
        hit = client.complete(prompt, max_tokens=8, request_id="cache-hit")
        streamed = list(client.generate(prompt, max_tokens=8, request_id="cache-hit-stream"))
        sampled = client.complete(prompt, max_tokens=8, temperature=0.8, request_id="sampled")
        health = client.health()
    assert hit["text"] == miss["text"] and hit["usage"] == miss["usage"]
    assert "".join(r.get("text", "") for r in streamed if r["type"] == "token") == miss["text"]
    assert health["response_cache_hits"] == hits_before + 2
    assert sampled["type"] == "done"
    db = sqlite3.connect(load_config(device.config).audit_db)
    rows = dict(
        db.execute(
            "SELECT request_id, cache_hit FROM audit_log WHERE request_id IN "
            "('cache-miss', 'cache-hit', 'cache-hit-stream', 'sampled')"
        ).fetchall()
    )
    assert rows == {"cache-miss": None, "cache-hit": 1, "cache-hit-stream": 1, "sampled": None}


def test_a_disconnected_client_frees_its_slot(daemon):
    """Eight long streamed requests (two rounds of max_batch), the client gone right after its first token: the
    rest is cancelled, not generated. Synchronised on that token: the tiny model may finish one request in less
    time than a health round trip, so no check waits for a request to be seen running."""
    with Client(daemon.endpoint) as client:
        start = client.health()
        before = start["disconnect_cancels"]
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(daemon.endpoint)
        for i in range(8):
            sock.send(P.request(P.OP_GENERATE, f"gone-{i}", prompt=TURN1, max_tokens=250, ignore_eos=True))
        assert sock.poll(30_000), "no first token"
        sock.close(linger=0)
        ctx.term()
        deadline = time.monotonic() + 5
        while (client.health()["running"] or client.health()["waiting"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        health = client.health()
    assert health["running"] == 0 and health["waiting"] == 0 and health["disconnect_cancels"] >= before + 1
    assert health["tokens_generated"] - start["tokens_generated"] < 8 * 250  # the cancelled rest never ran
