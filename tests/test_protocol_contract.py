"""Where the daemon contradicted docs/PROTOCOL.md (found by a client written from the document alone), against a
live daemon over a raw DEALER socket: the document is the contract."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from appliance.config import load_config
from appliance.loader import load_model
from appliance.transport import protocol as P
from appliance.transport.client import Client


@pytest.fixture()
def dealer(device):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.connect(device.endpoint)
    yield sock
    sock.close()
    ctx.term()


def replies(sock, until) -> list[dict]:
    out = []
    while not out or not until(out[-1]):
        out.append(msgpack.unpackb(sock.recv(), raw=False))
    return out


def test_an_op_reusing_an_in_flight_generate_id_gets_duplicate_id_outside_the_stream(daemon, dealer):
    """A health or cancel sent with the id of a running generate was answered `result` inside that token stream."""
    dealer.send(P.request(P.OP_GENERATE, "dup-1", prompt="Return the", max_tokens=200, ignore_eos=True))
    first = replies(dealer, lambda r: True)[0]
    assert first["type"] == P.T_TOKEN
    dealer.send(P.request(P.OP_HEALTH, "dup-1"))
    dealer.send(P.request(P.OP_CANCEL, "dup-1", target="nothing-by-that-name"))
    rest = replies(dealer, lambda r: r["type"] == P.T_DONE)
    errors = [r for r in rest if r["type"] == P.T_ERROR]
    assert [e["code"] for e in errors] == [P.E_DUPLICATE_ID] * 2
    assert not [r for r in rest if r["type"] == P.T_RESULT]
    assert rest[-1]["finish_reason"] == "length"  # the original request went on undisturbed


def test_a_cache_hit_reports_ttft_equal_to_total(daemon, device):
    with Client(device.endpoint, timeout_s=60) as client:
        if "response_cache" not in client.info()["features"]:
            pytest.fail("the test device has the response cache on; info must say so")
        fields = {"max_tokens": 6, "ignore_eos": True, "stream": False}
        client.complete("Cache me, ttft", **fields)
        hit = client.complete("Cache me, ttft", **fields)
    assert hit["cache_hit"] and hit["timings"]["ttft_ms"] == hit["timings"]["total_ms"] > 0


def test_a_prompt_that_fills_the_context_finishes_context(daemon, device):
    """max_tokens larger than the room left: the request ends at the context's end with finish_reason context
    (it used to be cut to the room and reported length)."""
    model = load_model(load_config(device.config))
    limit = model.engine.max_seq_len
    text = ""
    while len(model.tokenizer.encode(text + " conveyor", add_special_tokens=False).ids) < limit - 8:
        text += " conveyor"
    with Client(device.endpoint, timeout_s=60) as client:
        done = client.complete(text, max_tokens=64, ignore_eos=True, stream=False)
    assert done["finish_reason"] == "context", done["usage"]
    assert done["usage"]["prompt_tokens"] + done["usage"]["completion_tokens"] == limit


def test_features_list_only_what_is_on(daemon, device):
    config = load_config(device.config)
    with Client(device.endpoint, timeout_s=60) as client:
        features = client.info()["features"]
    assert ("response_cache" in features) == (config.engine.response_cache > 0)
    assert ("messages" in features) == (load_model(config).chat is not None)
    assert {"reasoning", "json_schema", "unknown_fields_refused"} <= set(features)
    assert "tools" not in features  # the demo model has no chat template


def test_info_tells_the_caller_its_identity(daemon, device):
    with Client(device.endpoint, timeout_s=60) as client:
        info = client.info()
    assert info["identity"].startswith("anonymous:") and len(info["identity"]) == len("anonymous:") + 16
    assert info["role"] == "infer"
