"""The software installs in the air gap from a vendor-signed stick: exactly the locked wheels, nothing else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from provisioning.keys import fingerprint, public_bytes
from provisioning.stick import ed25519_verify
from provisioning.wheelhouse import build_wheelhouse, compatible_platforms, runtime_requirements

VENDOR = Ed25519PrivateKey.generate()


def test_jetson_target_accepts_older_manylinux_wheels():
    tags = compatible_platforms("manylinux_2_35_aarch64")
    assert tags[0] == "manylinux_2_35_aarch64" and "manylinux_2_17_aarch64" in tags
    assert tags[-1] == "manylinux2014_aarch64"
    assert compatible_platforms("win_amd64") == ["win_amd64"]


def test_markers_resolved_for_the_target_python():
    assert any(r.startswith("tomli") for r in runtime_requirements("3.10"))
    assert not any(r.startswith("tomli") for r in runtime_requirements("3.12"))
    assert not any(r.startswith(("torch", "transformers")) for r in runtime_requirements("3.10"))


def test_stdlib_ed25519_verify_agrees_with_openssl():
    # RFC 8032 section 7.1, test 1 (empty message).
    public = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig = bytes.fromhex(
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    assert ed25519_verify(public, b"", sig)
    for n in range(20):
        key = Ed25519PrivateKey.generate()
        message = os.urandom(n * 7)
        sig = key.sign(message)
        pub = public_bytes(key.public_key())
        assert ed25519_verify(pub, message, sig)
        assert not ed25519_verify(pub, message + b"x", sig)
        assert not ed25519_verify(pub, message, sig[:40] + bytes([sig[40] ^ 1]) + sig[41:])
        assert not ed25519_verify(public_bytes(VENDOR.public_key()), message, sig)
    too_big_s = sig[:32] + (2**253).to_bytes(32, "little")  # s >= L is refused (malleability)
    assert not ed25519_verify(pub, message, too_big_s)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    out = tmp_path_factory.mktemp("stick") / "wheelhouse"
    build_wheelhouse(out, platform=None, python_version=None, signing_key=VENDOR)
    return out


@pytest.fixture
def trust(tmp_path) -> Path:
    path = tmp_path / "trusted-vendors"
    path.mkdir()
    (path / "vendor.pub").write_bytes(public_bytes(VENDOR.public_key()))
    return path


def copy_stick(wheelhouse: Path, tmp_path: Path) -> Path:
    """A copy of the stick (hard links: cheap; tests replace files, never write into them)."""
    stick = tmp_path / "stick"
    shutil.copytree(wheelhouse, stick, copy_function=os.link)
    return stick


def offline_env() -> dict[str, str]:
    # No pip configuration (no extra indexes or find-links): only the stick.
    return dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")


def install_offline(stick: Path, prefix: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(stick / "install-offline.sh"), str(prefix), *args],
        capture_output=True,
        text=True,
        env=dict(offline_env(), PYTHON=sys.executable),
        timeout=timeout,
    )


def test_install_offline_script_installs_a_working_runtime(wheelhouse, tmp_path):
    """First install on a device with an empty trust store: the operator gives the vendor key's fingerprint."""
    prefix, trust = tmp_path / "venv", tmp_path / "trusted-vendors"
    wrong = install_offline(wheelhouse, prefix, "--trust", str(trust), "--first-trust", "00" * 16)
    assert wrong.returncode == 1 and "not the vendor's key" in wrong.stderr and not prefix.exists()
    right = fingerprint(public_bytes(VENDOR.public_key()))
    proc = install_offline(wheelhouse, prefix, "--trust", str(trust), "--first-trust", right, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (trust / "vendor.pub").read_bytes() == public_bytes(VENDOR.public_key())
    check = subprocess.run(
        [
            str(prefix / "bin" / "python"),
            "-c",
            "import appliance.transport.server, appliance.engine.ort_engine, provisioning.bundle, importlib.util;"
            "print(importlib.util.find_spec('torch') is None)",
        ],
        capture_output=True,
        text=True,
    )
    assert check.stdout.strip() == "True", check.stderr  # serving needs no torch
    assert subprocess.run([str(prefix / "bin" / "edge-appliance"), "--help"], capture_output=True).returncode == 0
    # The unit travels on the stick inside the locked wheel and installs byte for byte the repository's.
    unit = (Path(__file__).resolve().parents[1] / "systemd" / "edge-appliance.service").read_bytes()
    assert (prefix / "share" / "edge-appliance" / "edge-appliance.service").read_bytes() == unit
    http_unit = (Path(__file__).resolve().parents[1] / "systemd" / "edge-appliance-http.service").read_bytes()
    assert (prefix / "share" / "edge-appliance" / "edge-appliance-http.service").read_bytes() == http_unit
    for doc in ("SYSTEMD.md", "HTTP.md", "PROTOCOL.md"):  # what the units' Documentation= and the docs link to
        assert (prefix / "share" / "doc" / "edge-appliance" / doc).is_file(), doc


def evil_wheel(stick: Path, marker: Path) -> Path:
    """A higher version of a real dependency whose .pth file runs code at every interpreter start."""
    wheel = stick / "msgpack-99.0.0-py3-none-any.whl"
    info = "msgpack-99.0.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("msgpack/__init__.py", "")
        z.writestr("zz_evil.pth", f"import os; open({str(marker)!r}, 'w').write('ran')\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: msgpack\nVersion: 99.0.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return wheel


def test_unlisted_higher_version_wheel_is_refused_and_never_executed(wheelhouse, tmp_path, trust):
    stick = copy_stick(wheelhouse, tmp_path)
    marker = tmp_path / "evil-ran"
    evil_wheel(stick, marker)
    proc = install_offline(stick, tmp_path / "venv", "--trust", str(trust))
    assert proc.returncode == 1
    assert "msgpack-99.0.0-py3-none-any.whl is not in the signed lock" in proc.stderr, proc.stderr
    assert not (tmp_path / "venv").exists() and not marker.exists()


def test_modified_lock_fails_the_signature(wheelhouse, tmp_path, trust):
    stick = copy_stick(wheelhouse, tmp_path)
    evil = evil_wheel(stick, tmp_path / "evil-ran")
    lock = json.loads((stick / "wheels.lock").read_text())
    lock["wheels"].append({"file": evil.name, "name": "msgpack", "version": "99.0.0", "sha256": "0" * 64})
    (stick / "wheels.lock").unlink()
    (stick / "wheels.lock").write_text(json.dumps(lock, indent=2, sort_keys=True))
    proc = install_offline(stick, tmp_path / "venv", "--trust", str(trust))
    assert proc.returncode == 1 and "signature does not verify with any trusted vendor key" in proc.stderr
    assert not (tmp_path / "venv").exists()


def test_lock_signed_by_another_vendor_is_refused(wheelhouse, tmp_path):
    other = tmp_path / "other-vendor"
    other.mkdir()
    (other / "vendor.pub").write_bytes(public_bytes(Ed25519PrivateKey.generate().public_key()))
    proc = install_offline(wheelhouse, tmp_path / "venv", "--trust", str(other))
    assert proc.returncode == 1 and "signature does not verify" in proc.stderr


def test_corrupt_wheel_is_refused(wheelhouse, tmp_path, trust):
    stick = copy_stick(wheelhouse, tmp_path)
    victim = next(stick.glob("msgpack-*.whl"))
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[:-10])
    proc = install_offline(stick, tmp_path / "venv", "--trust", str(trust))
    assert proc.returncode != 0 and "corrupt" in proc.stderr
    assert not (tmp_path / "venv").exists()


def test_installer_on_the_stick_uses_only_the_standard_library(wheelhouse):
    """Run with -I -S (no site-packages at all): the installer's --help works, so nothing else is imported."""
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(wheelhouse / "install-offline.py"), "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--first-trust" in proc.stdout, proc.stderr


def test_device_installer_refuses_the_same_tampered_stick(wheelhouse, tmp_path, trust):
    """`edge-provision install-software` (the device's installed copy of the installer) applies the same checks."""
    stick = copy_stick(wheelhouse, tmp_path)
    evil_wheel(stick, tmp_path / "evil-ran")
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "edge-provision"),
            "install-software",
            str(stick),
            "--prefix",
            str(tmp_path / "venv"),
            "--trust",
            str(trust),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "is not in the signed lock" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def runtime_only(wheelhouse, tmp_path_factory) -> Path:
    """A venv with nothing but the stick's locked runtime wheels, installed offline."""
    root = tmp_path_factory.mktemp("runtime-only")
    trust = root / "trusted-vendors"
    trust.mkdir()
    (trust / "vendor.pub").write_bytes(public_bytes(VENDOR.public_key()))
    proc = install_offline(wheelhouse, root / "venv", "--trust", str(trust), timeout=600)
    assert proc.returncode == 0, proc.stderr
    return root / "venv"


def test_the_runtime_alone_loads_a_model_with_external_weights(runtime_only, tiny_build, external_build, tmp_path):
    """The path a real-size model takes (weights in model.onnx.data: borrowed buffers, loading in pieces), run by
    `edge-appliance selftest` in a venv holding only the locked runtime wheels: no build-side package is needed."""
    from tests.conftest import provision_device

    device = provision_device(tiny_build, tmp_path / "site", onnx=external_build.name)
    env = dict(offline_env(), EDGE_APPLIANCE_CONFIG=str(device.config))
    script = (
        "import sys; from appliance.cli import main; code = main(['selftest', '--tokens', '8']); "
        "side = ('torch', 'transformers', 'edge_models', 'onnxscript'); "
        "build = sorted(m for m in sys.modules if m.split('.')[0] in side); "
        "print('build-side modules:', build); sys.exit(code)"
    )
    proc = subprocess.run(
        [str(runtime_only / "bin" / "python"), "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0 and "onnxruntime" in proc.stdout, proc.stdout + proc.stderr
    assert "build-side modules: []" in proc.stdout, proc.stdout
    absent = subprocess.run(
        [str(runtime_only / "bin" / "python"), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
        capture_output=True,
        text=True,
    )
    assert absent.stdout.strip() == "None", absent.stdout + absent.stderr


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("file", "../../outside.whl", "invalid file"),  # joined to the stick and to staging: a path outside both
        ("file", "/tmp/outside.whl", "invalid file"),
        ("name", "msgpack\n/tmp/other.whl", "invalid name"),  # written into the requirements file: a second line
        ("version", "1.0 --index-url=http://x", "invalid version"),
        ("file", "pytest-9.2.0-py3-none-any.whl", "does not match name and version"),
    ],
)
def test_a_vendor_signed_lock_with_a_hostile_entry_is_refused(wheelhouse, tmp_path, trust, field, value, why):
    """Signed by the vendor (a vendor's mistake, or a stolen key), yet refused before anything is read or written."""
    stick = copy_stick(wheelhouse, tmp_path)
    lock = json.loads((stick / "wheels.lock").read_text())
    lock["wheels"][0][field] = value
    raw = json.dumps(lock, indent=2, sort_keys=True).encode()
    for name, data in (("wheels.lock", raw), ("wheels.lock.sig", VENDOR.sign(raw))):
        (stick / name).unlink()
        (stick / name).write_bytes(data)
    proc = install_offline(stick, tmp_path / "venv", "--trust", str(trust))
    assert proc.returncode == 1 and why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "venv").exists()


SMALL_ORDER = [
    (1).to_bytes(32, "little"),  # the identity (order 1)
    (2**255 - 19 - 1).to_bytes(32, "little"),  # y = -1 (order 2)
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),  # order 8
]


@pytest.mark.parametrize("raw", SMALL_ORDER)
def test_small_order_vendor_keys_are_refused_everywhere(raw, tmp_path, wheelhouse):
    """A small-order 'public key' verifies a forged signature over any message; no trust store takes one."""
    from provisioning.errors import KeyMaterialError
    from provisioning.keys import load_trusted_vendors
    from provisioning.stick import public_key_problem

    forged = (1).to_bytes(32, "little") + bytes(32)  # R = identity, s = 0
    assert "small-order" in public_key_problem(raw)
    assert not ed25519_verify(raw, b"any message at all", forged)
    trust = tmp_path / "trusted-vendors"
    trust.mkdir()
    (trust / "vendor.pub").write_bytes(raw)
    with pytest.raises(KeyMaterialError, match="small-order"):
        load_trusted_vendors(trust)
    proc = install_offline(wheelhouse, tmp_path / "venv", "--trust", str(trust))
    assert proc.returncode == 1 and "small-order" in proc.stderr and not (tmp_path / "venv").exists(), proc.stderr


def test_a_non_canonical_key_encoding_is_refused():
    from provisioning.stick import public_key_problem

    assert "not a canonical" in public_key_problem((2**255 - 19 + 1).to_bytes(32, "little"))  # y >= p
    assert public_key_problem(public_bytes(VENDOR.public_key())) is None
