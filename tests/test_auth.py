"""CurveZMQ: allow-listed keys are served and audited by name; unknown keys get nothing and are audited."""

from __future__ import annotations

import hashlib

import pytest
import zmq
import zmq.utils.z85

from appliance.audit import AuditLog
from appliance.config import load_config
from appliance.transport import protocol as P
from appliance.transport.auth import AuthConfigError, load_clients
from appliance.transport.client import Client, ClientError
from provisioning.keys import DeviceIdentity
from tests.conftest import Daemon, provision_device, run_cli


@pytest.fixture(scope="module")
def secured(tiny_build, tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    device = provision_device(tiny_build, root / "site")
    out = run_cli("edge-appliance", "client-keygen", "--out", str(root / "press4"), "--name", "press-line-4").stdout
    (device.config.parent / "clients.toml").write_text(out[out.index("[[client]]") :])
    secured_config = device.config.read_text().replace("curve = false", 'curve = true\nclients = "clients.toml"')
    device.config.write_text(secured_config)
    daemon = Daemon(device, root / "run")
    daemon.wait_for("READY=1")
    yield device, root, daemon
    daemon.stop()


def curve_client(device, root, key_dir="press4", **kw) -> Client:
    secret = (root / key_dir / "client.key").read_bytes()
    server = DeviceIdentity.load(device.identity).curve_public.encode()
    return Client(device.endpoint, curve_server_key=server, curve_keypair=(zmq.curve_public(secret), secret), **kw)


def test_allowed_key_is_served_and_audited_by_name(secured):
    device, root, _ = secured
    with curve_client(device, root) as client:
        assert client.complete("Return the", max_tokens=3, request_id="curve-ok")["type"] == "done"
    row = next(r for r in AuditLog(load_config(device.config).audit_db).rows() if r.request_id == "curve-ok")
    assert row.client.startswith("press-line-4:") and len(row.client) == len("press-line-4:") + 16
    assert row.role == "infer"


def test_cli_ask_with_curve_keys(secured):
    device, root, _ = secured
    out = run_cli(
        "edge-appliance",
        "ask",
        "Return the",
        "--max-tokens",
        "3",
        "--endpoint",
        device.endpoint,
        "--server-key",
        str(device.identity),
        "--client-key",
        str(root / "press4" / "client.key"),
    )
    assert out.returncode == 0 and "tokens" in out.stderr


def test_unknown_key_gets_no_service_and_is_audited(secured):
    device, root, daemon = secured
    run_cli("edge-appliance", "client-keygen", "--out", str(root / "intruder"), "--name", "intruder")
    with curve_client(device, root, "intruder", timeout_s=1, retries=1) as client, pytest.raises(ClientError) as err:
        client.health()
    assert err.value.code == "timeout"
    daemon.wait_for("READY=1")  # still alive
    rows = [r for r in AuditLog(load_config(device.config).audit_db).rows() if r.error_code == P.E_UNAUTHORIZED]
    assert rows and rows[-1].client.startswith("unknown:") and rows[-1].status == "rejected"


def test_plaintext_client_gets_nothing(secured):
    device, _, _ = secured
    with Client(device.endpoint, timeout_s=1, retries=1) as client, pytest.raises(ClientError):
        client.health()


def test_malformed_allow_list_is_an_error(tmp_path):
    (tmp_path / "c.toml").write_text('[[client]]\nname = "x"\nkey = "short"\n')
    with pytest.raises(AuthConfigError, match="40-character"):
        load_clients(tmp_path / "c.toml")


def test_a_client_can_form_and_learn_its_identity(secured):
    """client-keygen prints the identity; info returns the caller's; both match the audit's and the documented
    derivation (name, ':', the first 16 hex digits of SHA-256 of the 32-byte public key)."""
    device, root, _ = secured
    public = (root / "press4" / "client.pub").read_text().strip()
    expected = "press-line-4:" + hashlib.sha256(zmq.utils.z85.decode(public.encode())).hexdigest()[:16]
    printed = run_cli("edge-appliance", "client-keygen", "--out", str(root / "other"), "--name", "press-line-5").stdout
    other = (root / "other" / "client.pub").read_text().strip()
    assert "press-line-5:" + hashlib.sha256(zmq.utils.z85.decode(other.encode())).hexdigest()[:16] in printed
    with curve_client(device, root) as client:
        info = client.info()
        client.complete("Return the", max_tokens=2, request_id="whoami")
    assert (info["identity"], info["role"]) == (expected, "infer")
    row = next(r for r in AuditLog(load_config(device.config).audit_db).rows() if r.request_id == "whoami")
    assert row.client == expected
