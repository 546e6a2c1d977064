"""The daemon as a real subprocess: READY/WATCHDOG, streamed generation, audit, hostile frames."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from appliance.audit import AuditLog
from appliance.config import load_config
from appliance.loader import load_model
from appliance.transport import protocol as P
from appliance.transport.client import Client, ClientError
from tests.conftest import wait_for_rows

PROMPT = "How do I reset the conveyor?"


def in_process_greedy(config_path, prompt: str, max_tokens: int) -> str:
    """The same greedy request run on the engine in this process, no daemon involved."""
    model = load_model(load_config(config_path))
    ids = [model.spec.bos_token_id, *model.tokenizer.encode(prompt).ids]
    out: list[int] = []
    logits = model.engine.prefill([(0, ids)])
    for _ in range(max_tokens):
        token = int(np.argmax(logits[0]))
        if token == model.spec.eos_token_id:
            break
        out.append(token)
        logits = model.engine.decode([(0, token)])
    return model.tokenizer.decode(out)


def test_ready_and_watchdog_arrive_on_notify_socket(daemon):
    assert "STATUS=serving tiny v1" in daemon.wait_for("READY=1")
    daemon.clear()
    daemon.wait_for("WATCHDOG=1", timeout=5)


def test_streamed_generation_equals_in_process_engine(daemon, device):
    with Client(daemon.endpoint, timeout_s=30) as client:
        events = list(client.generate(PROMPT, max_tokens=24))
    tokens, final = events[:-1], events[-1]
    assert final["type"] == "done"
    assert all(e["type"] == "token" for e in tokens) and len(tokens) >= 1
    assert [e["index"] for e in tokens] == list(range(len(tokens)))
    assert "".join(e["text"] for e in tokens) == final["text"]
    assert final["text"] == in_process_greedy(device.config, PROMPT, 24)
    assert final["usage"]["completion_tokens"] >= len(tokens)
    assert final["timings"]["ttft_ms"] > 0


def test_every_request_has_an_audit_row(daemon, device):
    with Client(daemon.endpoint) as client:
        final = client.complete("Return the", max_tokens=8, request_id="audit-me")
    rows = [r for r in AuditLog(load_config(device.config).audit_db).rows() if r.request_id == "audit-me"]
    assert len(rows) == 1
    row = rows[0]
    assert row.status == "ok" and row.op == "generate" and row.model_id == "tiny" and row.model_version == 1
    import hashlib

    assert row.prompt_sha256 == hashlib.sha256(b"Return the").hexdigest()
    assert row.output_sha256 == hashlib.sha256(final["text"].encode()).hexdigest()
    assert row.completion_tokens == final["usage"]["completion_tokens"]


def test_audit_list_cli_shows_rows(daemon, device):
    from tests.conftest import run_cli

    with Client(daemon.endpoint) as client:
        client.complete("Return the", max_tokens=4, request_id="listed-request")
    out = run_cli("edge-appliance", "--config", str(device.config), "audit", "list").stdout
    assert "listed-reque" in out
    assert "OK:" in run_cli("edge-appliance", "--config", str(device.config), "audit", "verify").stdout


def test_health_and_info(daemon):
    with Client(daemon.endpoint) as client:
        health, info = client.health(), client.info()
    assert health["status"] == "ok" and health["audit"] == "ok"
    assert info["model_id"] == "tiny" and info["engine"] == "onnxruntime"
    assert info["architecture"] == "DeepseekV3ForCausalLM"
    assert info["limits"]["max_message_bytes"] == 1 << 20


@pytest.mark.parametrize(
    "frame, code",
    [
        (b"\xc1\xff garbage", P.E_MALFORMED),
        (msgpack.packb({"v": 1, "op": "generate", "prompt": "x"})[:-1], P.E_MALFORMED),
        (msgpack.packb([1, 2, 3]), P.E_MALFORMED),
        (msgpack.packb({"v": 1, "op": "generate", "prompt": 42}), P.E_BAD_REQUEST),
        (msgpack.packb({"v": 1, "op": "generate", "prompt": "x", "max_tokens": "many"}), P.E_BAD_REQUEST),
        (msgpack.packb({"v": 1, "op": "generate", "prompt": "x", "max_tokens": True}), P.E_BAD_REQUEST),
        (msgpack.packb({"v": 1, "op": "launch-missiles"}), P.E_UNKNOWN_OP),
        (msgpack.packb({"v": 99, "op": "health"}), P.E_VERSION),
    ],
)
def test_hostile_frame_gets_specific_error_then_service_continues(daemon, frame, code):
    with Client(daemon.endpoint, timeout_s=10) as client:
        reply = client.send_raw(frame)
        assert reply["type"] == "error" and reply["code"] == code, reply
        assert client.complete("Return the", max_tokens=2)["type"] == "done"


def test_oversize_frame_is_answered_too_large_and_its_connection_survives(daemon):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    sock.send(msgpack.packb({"v": 1, "op": "generate", "id": "long", "prompt": "Return the", "max_tokens": 40}))
    sock.send(msgpack.packb({"v": 1, "op": "generate", "id": "big", "prompt": "x" * (2 << 20)}))
    replies = {}  # the oversize frame is not decoded, so its error carries id None
    while "long" not in replies or replies["long"]["type"] == "token" or None not in replies:
        assert sock.poll(30_000), replies
        reply = msgpack.unpackb(sock.recv())
        replies[reply["id"]] = reply
    assert replies[None]["code"] == P.E_TOO_LARGE
    assert replies["long"]["type"] == "done"  # the other stream on the connection was not killed
    sock.close()


def test_rejected_requests_are_audited(daemon, device):
    with Client(daemon.endpoint, timeout_s=10) as client:
        client.send_raw(msgpack.packb({"v": 1, "op": "nope", "id": "rejected-one"}))
    rows = wait_for_rows(device, lambda r: r.request_id == "rejected-one")
    assert [(r.status, r.error_code) for r in rows] == [("rejected", P.E_UNKNOWN_OP)]


def test_bad_sampling_parameters_are_refused_by_name(daemon):
    with Client(daemon.endpoint, timeout_s=10) as client, pytest.raises(ClientError) as err:
        client.complete("x", top_p=1.5)
    assert err.value.code == P.E_BAD_REQUEST and "top_p" in err.value.message


def test_concurrent_clients_each_get_their_own_stream(daemon, device):
    import threading

    results: dict[int, str] = {}

    def ask(i: int) -> None:
        with Client(daemon.endpoint, timeout_s=60) as client:
            results[i] = client.complete(PROMPT, max_tokens=12)["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = in_process_greedy(device.config, PROMPT, 12)
    assert results == {i: expected for i in range(6)}


def test_stop_string_truncates_and_finishes_with_reason_stop(daemon, device):
    expected = in_process_greedy(device.config, PROMPT, 24)
    stop = expected[2:4]  # whatever the model says, a 2-character stop string from inside its answer
    assert len(stop) == 2, expected
    with Client(daemon.endpoint) as client:
        events = list(client.generate(PROMPT, max_tokens=24, stop=[stop]))
    final = events[-1]
    assert final["finish_reason"] == "stop"
    assert final["text"] == expected[: expected.find(stop)]
    assert "".join(e["text"] for e in events[:-1]) == final["text"]
