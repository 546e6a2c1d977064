"""The gateway's pure parts: API keys at rest, and the OpenAI <-> daemon translation."""

from __future__ import annotations

import pytest

from appliance.transport import api_keys
from appliance.transport import openai_compat as O
from appliance.transport import protocol as P


def test_minted_key_is_stored_only_as_its_digest_and_verifies(tmp_path):
    key, entry = api_keys.mint("ehr-plugin", "admin")
    (tmp_path / "keys.toml").write_text(api_keys.entry_toml(entry))
    assert key not in (tmp_path / "keys.toml").read_text()
    keys = api_keys.load_keys(tmp_path / "keys.toml")
    assert api_keys.verify(keys, key) == entry and entry.role == "admin"
    assert api_keys.verify(keys, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert entry.identity == f"ehr-plugin:{entry.sha256[:16]}"


def test_malformed_key_file_is_an_error(tmp_path):
    (tmp_path / "keys.toml").write_text('[[key]]\nname = "x"\nsha256 = "abc"\n')
    with pytest.raises(api_keys.ApiKeyError, match="64 lowercase hex"):
        api_keys.load_keys(tmp_path / "keys.toml")


def test_a_gateway_role_cannot_be_minted():
    with pytest.raises(api_keys.ApiKeyError, match="role"):
        api_keys.mint("x", "gateway")


def test_chat_is_rendered_by_the_fallback_when_the_daemon_has_no_templates():
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    call = O.parse_chat(body, "m", daemon_renders_chat=False)
    assert call.fields["prompt"] == "System: Be brief.\nUser: Hi\nAssistant:" and "messages" not in call.fields


def test_chat_messages_are_forwarded_when_the_daemon_renders_them():
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    call = O.parse_chat({"model": "m", "messages": [{"role": "user", "content": parts}]}, "m", True)
    assert call.fields["messages"] == [{"role": "user", "content": "Hello"}] and "prompt" not in call.fields


def test_openai_fields_map_to_daemon_fields():
    body = {"model": "m", "prompt": "p", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "\n"}
    call = O.parse_completion(body, "m")
    assert call.fields == {
        "stream": False,
        "prompt": "p",
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["\n"],
    }


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": True}, "n"),  # a bool is not the integer 1
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),  # the deprecated role
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"max_tokens": "5"}, "max_tokens"),
    ],
)
def test_unsupported_values_name_their_field(extra, param):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(O.ApiError) as err:
        O.parse_chat(body, "m", False)
    assert (err.value.status, err.value.param) == (400, param)


def test_daemon_errors_become_openai_errors():
    call = O.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "m", False)
    call.names["max_tokens"] = "max_completion_tokens"
    bad = O.daemon_error({"code": P.E_BAD_REQUEST, "message": "field 'max_tokens' must be 1..256"}, call)
    assert (bad.status, bad.param) == (400, "max_completion_tokens")
    busy = O.daemon_error({"code": P.E_BUSY, "message": "queue full", "retry_after_ms": 250}, call)
    assert (busy.status, busy.retry_after_s, busy.code) == (429, 1, "rate_limit_exceeded")
    assert O.daemon_error({"code": P.E_TOO_LARGE, "message": "long"}, call).param == "messages"


@pytest.mark.parametrize(
    ("behalf", "message"),
    [
        ({"identity": "x:1", "role": "gateway"}, "on_behalf_of.role"),
        ({"identity": "", "role": "infer"}, "on_behalf_of.identity"),
        ({"identity": "x" * 65, "role": "infer"}, "on_behalf_of.identity"),
    ],
)
def test_on_behalf_of_is_validated_and_cannot_delegate_the_gateway_role(behalf, message):
    frame = P.request(P.OP_GENERATE, "r1", prompt="hi", on_behalf_of=behalf)
    with pytest.raises(P.ProtocolError, match=message) as err:
        P.parse_request(frame, 256)
    assert err.value.code == P.E_BAD_REQUEST


def test_a_refused_request_still_names_its_end_user():
    frame = P.request(
        P.OP_GENERATE, "r2", prompt="hi", max_tokens=10_000, on_behalf_of={"identity": "u", "role": "admin"}
    )
    with pytest.raises(P.ProtocolError) as err:
        P.parse_request(frame, 256)
    assert err.value.on_behalf_of == ("u", "admin")
