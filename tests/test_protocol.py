"""Request parsing: every malformed or mistyped field gets its own error code and names the field."""

from __future__ import annotations

import msgpack
import pytest

from appliance.transport import protocol as P


def parse(**fields):
    return P.parse_request(msgpack.packb({"v": 1, **fields}), max_tokens_limit=256)


def test_generate_defaults():
    req = parse(op="generate", prompt="hi", id="r1")
    assert (req.op, req.id, req.prompt, req.max_tokens, req.stream) == (
        "generate",
        "r1",
        "hi",
        P.DEFAULT_MAX_TOKENS,
        True,
    )
    assert req.sampling.greedy


def test_generate_with_messages():
    req = parse(op="generate", messages=[{"role": "user", "content": "hi"}], reasoning="hide")
    assert (req.messages, req.prompt, req.reasoning) == (({"role": "user", "content": "hi"},), "", "hide")
    assert (
        parse(op="generate", prompt="hi").reasoning == "separate" and parse(op="generate", prompt="hi").messages is None
    )


def test_missing_id_gets_a_generated_one():
    assert len(parse(op="health").id) == 32


@pytest.mark.parametrize(
    "fields, code, needle",
    [
        ({"op": "generate"}, P.E_BAD_REQUEST, "prompt"),
        ({"op": "generate", "prompt": ""}, P.E_BAD_REQUEST, "prompt"),
        ({"op": "generate", "prompt": "x", "max_tokens": 0}, P.E_BAD_REQUEST, "max_tokens"),
        ({"op": "generate", "prompt": "x", "max_tokens": 257}, P.E_BAD_REQUEST, "max_tokens"),
        ({"op": "generate", "prompt": "x", "temperature": "hot"}, P.E_BAD_REQUEST, "temperature"),
        ({"op": "generate", "prompt": "x", "seed": -1}, P.E_BAD_REQUEST, "seed"),
        ({"op": "generate", "prompt": "x", "stop": ["a"] * 5}, P.E_BAD_REQUEST, "stop"),
        ({"op": "generate", "prompt": "x", "stop": "a"}, P.E_BAD_REQUEST, "stop"),
        ({"op": "generate", "prompt": "x", "stream": 1}, P.E_BAD_REQUEST, "stream"),
        ({"op": "generate", "prompt": "x" * (P.MAX_PROMPT_CHARS + 1)}, P.E_TOO_LARGE, "prompt"),
        ({"op": "generate", "prompt": "x", "id": "x" * 65}, P.E_BAD_REQUEST, "id"),
        (
            {"op": "generate", "prompt": "x", "messages": [{"role": "user", "content": "x"}]},
            P.E_BAD_REQUEST,
            "exactly one",
        ),
        ({"op": "generate", "messages": []}, P.E_BAD_REQUEST, "messages"),
        ({"op": "generate", "messages": [{"role": "user"}]}, P.E_BAD_REQUEST, "messages[0]"),
        ({"op": "generate", "messages": [{"role": "user", "content": 1}]}, P.E_BAD_REQUEST, "content"),
        ({"op": "generate", "messages": [{"role": "", "content": "x"}]}, P.E_BAD_REQUEST, "role"),
        ({"op": "generate", "messages": "hi"}, P.E_BAD_REQUEST, "messages"),
        (
            {"op": "generate", "messages": [{"role": "user", "content": "x" * (P.MAX_PROMPT_CHARS + 1)}]},
            P.E_TOO_LARGE,
            "messages",
        ),
        ({"op": "generate", "prompt": "x", "reasoning": "show"}, P.E_BAD_REQUEST, "reasoning"),
        ({"op": "cancel"}, P.E_BAD_REQUEST, "target"),
        ({"op": "reboot"}, P.E_UNKNOWN_OP, "reboot"),
    ],
)
def test_invalid_fields_are_named(fields, code, needle):
    with pytest.raises(P.ProtocolError) as err:
        parse(**fields)
    assert err.value.code == code
    assert needle in err.value.message


@pytest.mark.parametrize(
    "msg, code, needle",
    [
        ({"op": "health", "id": None}, P.E_BAD_REQUEST, "'id'"),  # nil is not absent
        ({"op": "health"}, P.E_BAD_REQUEST, "'v' is required"),
        ({"v": 1.0, "op": "health"}, P.E_BAD_REQUEST, "integer"),
        ({"v": True, "op": "health"}, P.E_BAD_REQUEST, "integer"),
        ({"v": 1}, P.E_BAD_REQUEST, "'op' is required"),
        ({"v": 2, "op": "health"}, P.E_VERSION, "not supported"),
        ({"v": 1, "op": "generate", "prompt": "x", "json_scheme": {}}, P.E_BAD_REQUEST, "'json_scheme'"),
    ],
    ids=["id-nil", "v-missing", "v-float", "v-bool", "op-missing", "v-2", "unknown-field"],
)
def test_envelope_fields_are_exact(msg, code, needle):
    """Protocol 1.3: a missing v or op is bad_request, v must be the integer 1, id nil is not id absent, and an
    unknown generate field is refused (it could be a constraint this daemon would otherwise ignore)."""
    with pytest.raises(P.ProtocolError) as err:
        P.parse_request(msgpack.packb(msg), 256)
    assert err.value.code == code and needle in err.value.message, err.value.message


def test_version_is_checked_and_id_echoed():
    with pytest.raises(P.ProtocolError) as err:
        P.parse_request(msgpack.packb({"v": 2, "op": "health", "id": "abc"}), 256)
    assert err.value.code == P.E_VERSION and err.value.request_id == "abc"


@pytest.mark.parametrize("frame", [b"", b"\xc1", b"\x92\x01", msgpack.packb("a string"), msgpack.packb({1: 2})])
def test_non_map_or_broken_msgpack_is_malformed(frame):
    with pytest.raises(P.ProtocolError) as err:
        P.parse_request(frame, 256)
    assert err.value.code == P.E_MALFORMED


def test_replies_round_trip():
    reply = P.decode_reply(P.done_reply("r", "text", "eos", {"prompt_tokens": 1}, {"total_ms": 2.0}))
    assert reply == {
        "v": 1,
        "id": "r",
        "type": "done",
        "text": "text",
        "finish_reason": "eos",
        "usage": {"prompt_tokens": 1},
        "timings": {"total_ms": 2.0},
    }
    err = P.decode_reply(P.error_reply("r", P.E_BUSY, "full", retry_after_ms=250))
    assert err["code"] == "busy" and err["retry_after_ms"] == 250
