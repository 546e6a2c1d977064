"""Crash safety: `edge-provision install` SIGKILLed at many points never leaves the device unloadable."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisioning.bundle import seal
from provisioning.install import current_bundle, verify_fully
from provisioning.keys import DEVICE_X25519, load_trusted_vendors, load_x25519
from tests.conftest import BIN, run_cli


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    run_cli("edge-provision", "keygen", "--vendor", str(root / "vendor"))
    run_cli("edge-provision", "enroll", "--keys", str(root / "keys"), "--out", str(root / "id.json"))
    (root / "trust").mkdir()
    (root / "trust" / "v.pub").write_bytes((root / "vendor" / "vendor-ed25519.pub").read_bytes())
    src = root / "src"
    src.mkdir()
    (src / "small").write_bytes(os.urandom(1000))
    (src / "big").write_bytes(os.urandom(48 << 20))  # big enough that install takes a while
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from provisioning.keys import DeviceIdentity, load_ed25519

    vendor = load_ed25519("vendor-ed25519.key", root / "vendor")
    device_pub = X25519PublicKey.from_public_bytes(DeviceIdentity.load(root / "id.json").x25519)
    seal(
        {"small": src / "small"},
        root / "v1",
        model_id="m",
        version=1,
        architecture="X",
        engines=[],
        signing_key=vendor,
        recipients=[device_pub],
    )
    seal(
        {"small": src / "small", "big": src / "big"},
        root / "v2",
        model_id="m",
        version=2,
        architecture="X",
        engines=[],
        signing_key=vendor,
        recipients=[device_pub],
    )
    return root


def install_cmd(site, bundle: str) -> list[str]:
    return [
        str(BIN / "edge-provision"),
        "install",
        str(site / bundle),
        "--state",
        str(site / "state"),
        "--trust",
        str(site / "trust"),
        "--keys",
        str(site / "keys"),
    ]


def assert_loadable(site, version: int | None = None) -> int:
    bundle = current_bundle(site / "state", load_trusted_vendors(site / "trust"))
    verify_fully(bundle, load_x25519(DEVICE_X25519, site / "keys"))  # every chunk authenticates
    if version is not None:
        assert bundle.version == version
    return bundle.version


def test_install_killed_at_any_point_leaves_a_loadable_model(site):
    subprocess.run(install_cmd(site, "v1"), check=True, capture_output=True)
    start = time.monotonic()
    subprocess.run(install_cmd(site, "v2"), check=True, capture_output=True)
    full = time.monotonic() - start
    # Reset to v1 and kill v2's install at points spread over its whole run.
    subprocess.run(
        [str(BIN / "edge-provision"), "rollback", "--state", str(site / "state")], check=True, capture_output=True
    )
    assert_loadable(site, 1)
    outcomes = []
    for fraction in (0.1, 0.3, 0.5, 0.65, 0.8, 0.9, 0.97):
        proc = subprocess.Popen(install_cmd(site, "v2"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(full * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcomes.append(assert_loadable(site))  # old or new, never broken
        if outcomes[-1] == 2:
            subprocess.run(
                [str(BIN / "edge-provision"), "rollback", "--state", str(site / "state")],
                check=True,
                capture_output=True,
            )
    assert 1 in outcomes  # at least some kills landed before the switch
    subprocess.run(install_cmd(site, "v2"), check=True, capture_output=True)
    assert_loadable(site, 2)


def test_install_refuses_a_key_file_readable_by_others(site, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / DEVICE_X25519).write_bytes(X25519PrivateKey.generate().private_bytes_raw())
    os.chmod(keys / DEVICE_X25519, 0o644)
    proc = subprocess.run([*install_cmd(site, "v1")[:-1], str(keys)], capture_output=True, text=True)
    assert proc.returncode == 1 and "chmod 600" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v systemd-creds"], capture_output=True).returncode != 0,
    reason="systemd-creds not installed",
)
def test_enroll_into_systemd_credentials_never_writes_plaintext(tmp_path, monkeypatch):
    from provisioning.keys import DeviceIdentity, public_bytes

    store, keys = tmp_path / "credstore.encrypted", tmp_path / "keys"
    run_cli(
        "edge-provision", "enroll", "--keys", str(keys), "--out", str(tmp_path / "id.json"), "--credstore", str(store)
    )
    assert not (keys / DEVICE_X25519).exists()
    sealed = (store / DEVICE_X25519).read_bytes()
    # What systemd does for LoadCredentialEncrypted=: decrypt into a private $CREDENTIALS_DIRECTORY.
    creds = tmp_path / "run-credentials"
    creds.mkdir(mode=0o700)
    subprocess.run(
        ["systemd-creds", "decrypt", f"--name={DEVICE_X25519}", str(store / DEVICE_X25519), str(creds / DEVICE_X25519)],
        check=True,
        capture_output=True,
    )
    os.chmod(creds / DEVICE_X25519, 0o600)
    raw = (creds / DEVICE_X25519).read_bytes()
    assert raw not in sealed and len(raw) == 32
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    key = load_x25519(DEVICE_X25519, None)
    assert public_bytes(key.public_key()) == DeviceIdentity.load(tmp_path / "id.json").x25519


def test_cli_refuses_another_model_id_until_told_and_logs_the_replacement(site, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    from provisioning.install import read_install_log
    from provisioning.keys import DeviceIdentity, load_ed25519

    seal(
        {"small": site / "src" / "small"},
        tmp_path / "other",
        model_id="other",
        version=1_900_000_000,
        architecture="X",
        engines=[],
        signing_key=load_ed25519("vendor-ed25519.key", site / "vendor"),
        recipients=[X25519PublicKey.from_public_bytes(DeviceIdentity.load(site / "id.json").x25519)],
    )
    state = tmp_path / "state"
    cmd = [*install_cmd(site, "v1")[:3], "--state", str(state), *install_cmd(site, "v1")[5:]]
    subprocess.run(cmd, check=True, capture_output=True)
    cmd[2] = str(tmp_path / "other")
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 1 and "--replace-model" in refused.stderr and "Traceback" not in refused.stderr
    done = subprocess.run([*cmd, "--replace-model"], capture_output=True, text=True)
    assert done.returncode == 0 and "replaced model m" in done.stdout, done.stderr
    assert read_install_log(state)[-1]["action"] == "replace-model"
