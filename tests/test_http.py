"""The OpenAI-compatible HTTP gateway: a live daemon (CURVE on) and a live `edge-appliance http` process,
real sockets, the official `openai` client."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from appliance.audit.chain import sha256_text
from appliance.transport import api_keys
from appliance.transport import protocol as P
from tests.conftest import BIN, Daemon, free_port, http_site, run_cli

MODEL = "tiny"


@pytest.fixture(scope="module")
def site(tiny_build, tmp_path_factory):
    with http_site(tiny_build, tmp_path_factory.mktemp("http")) as started:
        yield started


def test_gateway_is_ready_and_pings_the_watchdog(site):
    assert "serving tiny over http" in site.gateway.wait_for("READY=1")
    site.gateway.clear()
    site.gateway.wait_for("WATCHDOG=1", timeout=5)


def test_openai_client_streams_a_chat_completion(site):
    stream = site.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reset the conveyor"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices == []
    rid = chunks[0].id.removeprefix("chatcmpl-")
    assert {c.id for c in chunks} == {chunks[0].id}
    row = site.wait_for_row(request_id=rid)
    entry = api_keys.load_keys(site.device.config.parent / "http-keys.toml")[0]
    assert (row.client, row.role, row.status, row.completion_tokens) == (entry.identity, "infer", "ok", 8)
    assert row.output_sha256 == sha256_text(text)  # the audited output is what the client received


def test_non_streamed_completion_models_and_admin_role(site):
    client = site.openai(site.admin_key)
    assert [m.id for m in client.models.list().data] == [MODEL]
    reply = client.completions.create(model=MODEL, prompt="Return the", max_tokens=4, extra_body={"ignore_eos": True})
    assert reply.object == "text_completion" and reply.usage.completion_tokens == 4
    assert reply.choices[0].finish_reason == "length"
    row = site.wait_for_row(request_id=reply.id.removeprefix("cmpl-"))
    assert row.client.startswith("ops-console:") and row.role == "admin"


def test_wrong_api_key_gets_401_and_is_audited(site):
    wrong = "ea-not-a-real-key"
    with pytest.raises(openai.AuthenticationError) as err:
        site.openai(wrong).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    row = site.wait_for_row(op=P.OP_AUTH_FAILED, client=f"unknown:{api_keys.fingerprint(wrong)}")
    assert (row.status, row.error_code) == ("rejected", P.E_UNAUTHORIZED)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
        ({"temperature": 9}, "temperature"),
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_a_request_over_the_limits_gets_400_naming_the_field(site, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        site.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body=extra
        )
    assert err.value.status_code == 400 and err.value.param == param


def test_a_refused_request_is_audited_as_the_end_user(site):
    with pytest.raises(openai.BadRequestError) as err:
        site.openai().completions.create(model=MODEL, prompt="hi", max_tokens=100_000)
    row = site.wait_for_row(request_id=err.value.response.headers["x-request-id"])
    assert row.client.startswith("ehr-plugin:") and (row.status, row.error_code) == ("rejected", P.E_BAD_REQUEST)


def test_unknown_model_is_404(site):
    with pytest.raises(openai.NotFoundError) as err:
        site.openai().completions.create(model="gpt-4o", prompt="hi", max_tokens=1)
    assert err.value.param == "model"


def test_sse_text_is_the_zeromq_reply_for_the_same_greedy_request(site):
    prompt = "The conveyor belt"
    # Different seeds keep both out of the response cache; greedy decoding ignores the seed.
    with site.zmq_client() as client:
        expected = client.complete(prompt, max_tokens=24, ignore_eos=True, seed=1)["text"]
    stream = site.openai().completions.create(
        model=MODEL, prompt=prompt, max_tokens=24, temperature=0, seed=2, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    assert len(chunks) > 2 and expected
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert not site.audit_rows(request_id=chunks[0].id.removeprefix("cmpl-"))[0].cache_hit


def _post_stream(site, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
    headers = {"Authorization": f"Bearer {site.key}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/completions", json.dumps(body), headers)
    return conn, conn.getresponse()


def test_client_disconnect_mid_stream_frees_the_slot(site):
    body = {"model": MODEL, "prompt": "Return the", "max_tokens": 256, "stream": True, "ignore_eos": True}
    conn, resp = _post_stream(site, body)
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    first = resp.readline()  # the first event: generation is running
    rid = json.loads(first.removeprefix(b"data: "))["id"].removeprefix("cmpl-")
    conn.sock.close()
    resp.close()
    row = site.wait_for_row(request_id=rid)
    assert (row.status, row.error_code) == ("error", P.E_CANCELLED)
    assert row.completion_tokens < 256
    with site.zmq_client() as client:
        assert client.health()["running"] == 0


def test_streamed_error_before_the_first_token_is_an_http_status(site):
    body = {"model": MODEL, "prompt": "x" * (P.MAX_PROMPT_CHARS + 1), "stream": True}
    conn, resp = _post_stream(site, body)
    error = json.loads(resp.read())["error"]
    conn.close()
    assert resp.status == 400 and error["param"] == "prompt"


def test_on_behalf_of_from_a_non_gateway_client_is_refused_and_audited(site):
    frame = P.request(
        P.OP_GENERATE, "forged-1", prompt="hi", on_behalf_of={"identity": "ehr-plugin:0", "role": "admin"}
    )
    with site.zmq_client() as client:
        reply = client.send_raw(frame)
    assert (reply["type"], reply["code"]) == (P.T_ERROR, P.E_NOT_GATEWAY)
    row = site.wait_for_row(request_id="forged-1")
    assert row.client.startswith("press-line-4:") and (row.status, row.error_code) == ("rejected", P.E_NOT_GATEWAY)


def test_health_needs_no_key(site):
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"status": "ok"}
    conn.close()


def _tls_files(out) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer, issuer_key, ca=False, san=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name, obj):
        if isinstance(obj, x509.Certificate):
            data = obj.public_bytes(serialization.Encoding.PEM)
        else:
            data = obj.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        (out / name).write_bytes(data)

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    write("ca.pem", cert("test-ca", ca_key, "test-ca", ca_key, ca=True))
    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server.pem", cert("gw", server_key, "test-ca", ca_key, san=loopback))
    write("server.key", server_key)
    write("client.pem", cert("ehr", client_key, "test-ca", ca_key))
    write("client.key", client_key)


def test_tls_with_client_certificates(site):
    """A second gateway on the same daemon, serving HTTPS that requires a client certificate."""
    import dataclasses
    import ssl

    tls = site.root / "tls"
    tls.mkdir()
    _tls_files(tls)
    port = free_port()
    text = site.device.config.read_text().replace(f'listen = "127.0.0.1:{site.port}"', f'listen = "127.0.0.1:{port}"')
    text = text.replace(
        "timeout_s = 30",
        f'timeout_s = 30\ntls_cert = "{tls}/server.pem"\ntls_key = "{tls}/server.key"\ntls_client_ca = "{tls}/ca.pem"',
    )
    config = site.device.config.with_name("appliance-tls.toml")
    config.write_text(text)
    gateway = Daemon(dataclasses.replace(site.device, config=config), site.root / "gw-tls", command="http")
    try:
        assert "over https" in gateway.wait_for("READY=1")
        ctx = ssl.create_default_context(cafile=str(tls / "ca.pem"))
        ctx.load_cert_chain(str(tls / "client.pem"), str(tls / "client.key"))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {site.key}"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["data"][0]["id"] == MODEL
        conn.close()
        no_cert = ssl.create_default_context(cafile=str(tls / "ca.pem"))
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=no_cert, timeout=30)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {site.key}"})
            conn.getresponse()
    finally:
        gateway.stop()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        import socket

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def test_unix_socket_listener(site):
    import dataclasses

    path = site.root / "http.sock"
    text = site.device.config.read_text().replace(f'listen = "127.0.0.1:{site.port}"', f'listen = "unix:{path}"')
    config = site.device.config.with_name("appliance-unix.toml")
    config.write_text(text)
    gateway = Daemon(dataclasses.replace(site.device, config=config), site.root / "gw-unix", command="http")
    try:
        gateway.wait_for("READY=1")
        conn = _UnixConnection(str(path))
        body = json.dumps({"model": MODEL, "prompt": "Return the", "max_tokens": 2})
        conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {site.key}"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] <= 2
        conn.close()
    finally:
        gateway.stop()


def test_a_gateway_whose_key_the_daemon_refuses_stops_at_once_with_one_line(site, tmp_path):
    """Under CURVE a refused key gets no reply, only a failed handshake: the gateway reads that event and stops
    with one line saying what to do, instead of waiting for the daemon until systemd gives up."""
    run_cli("edge-appliance", "client-keygen", "--out", str(tmp_path / "stranger"), "--name", "stranger")
    text = site.device.config.read_text().replace(str(site.root / "gateway"), str(tmp_path / "stranger"))
    config = site.device.config.with_name("appliance-stranger.toml")
    config.write_text(text.replace(f'listen = "127.0.0.1:{site.port}"', f'listen = "127.0.0.1:{free_port()}"'))
    start = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "edge-appliance"), "--config", str(config), "http"], capture_output=True, text=True, timeout=120
    )
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 1 and "refused this gateway's CURVE key" in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60


class Ticket(pydantic.BaseModel):
    """What a maintenance integration parses the answer into (the official client's structured-output helper)."""

    machine: Literal["press", "conveyor", "robot"]
    severity: Literal[1, 2, 3, 4, 5]
    stopped: bool


def test_structured_output_with_the_official_clients_parse_helper(site):
    completion = site.openai().chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Report the fault on line 4 as a ticket."}],
        response_format=Ticket,
        max_tokens=120,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Ticket), message.content
    assert completion.choices[0].finish_reason == "stop"
    row = site.wait_for_row(request_id=completion.id.removeprefix("chatcmpl-"))
    assert row.constraint_kind == "json_schema" and len(row.constraint_sha256) == 64


def test_json_schema_streamed_and_json_object_on_completions(site):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    stream = site.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the press ok?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "status", "schema": schema, "strict": True}},
        max_tokens=40,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), schema)
    reply = site.openai().completions.create(
        model=MODEL, prompt="Status:", max_tokens=60, extra_body={"guided_choice": ["ok", "fault"]}
    )
    assert reply.choices[0].text in ("ok", "fault") and reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "extra,param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"guided_regex": "("}, "guided_regex"),
    ],
    ids=["bad-schema", "bad-type", "two-constraints", "bad-regex"],
)
def test_a_constraint_that_cannot_be_used_is_a_400_naming_the_field(site, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        site.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8, extra_body=extra
        )
    assert err.value.body["param"] == param, err.value.body
