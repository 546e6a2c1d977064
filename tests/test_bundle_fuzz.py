"""Property tests: hostile manifests and payloads only ever raise the package's own errors."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioning.bundle import open_bundle, seal
from provisioning.errors import ProvisioningError
from provisioning.keys import fingerprint, public_bytes

VENDOR = Ed25519PrivateKey.generate()
DEVICE = X25519PrivateKey.generate()
TRUSTED = {fingerprint(public_bytes(VENDOR.public_key())): VENDOR.public_key()}
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_signed(root: Path, manifest_bytes: bytes) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_bytes(manifest_bytes)
    (root / "manifest.sig").write_bytes(VENDOR.sign(manifest_bytes))


def real_bundle(root: Path) -> Path:
    """A genuine two-chunk bundle under ``root/b`` for the tests to damage; returns ``root``."""
    src = root / "plain"
    src.write_bytes(b"y" * 70000)
    seal(
        {"model.onnx": src},
        root / "b",
        model_id="m",
        version=1,
        architecture="X",
        engines=[],
        signing_key=VENDOR,
        recipients=[DEVICE.public_key()],
        chunk_size=1 << 16,
    )
    return root


def exercise(root: Path) -> None:
    try:
        bundle = open_bundle(root, TRUSTED)
        bundle.check_ciphertext()
        key = bundle.unwrap_key(DEVICE)
        for entry in bundle.files():
            bundle.decrypt_into(entry.id, key)
    except ProvisioningError:
        pass


@SETTINGS
@given(raw=st.binary(max_size=300))
def test_signed_garbage_manifest(tmp_path_factory, raw):
    root = tmp_path_factory.mktemp("g")
    write_signed(root, raw)
    exercise(root)


@SETTINGS
@given(
    manifest=st.dictionaries(
        st.sampled_from(
            ["format", "bundle_id", "model_id", "version", "architecture", "engines", "files", "recipients", "created"]
        ),
        json_values,
    )
)
def test_signed_structured_manifest(tmp_path_factory, manifest):
    root = tmp_path_factory.mktemp("s")
    write_signed(root, json.dumps({"format": 1, **manifest}).encode())
    exercise(root)


@SETTINGS
@given(
    field=st.sampled_from(["id", "path", "size", "chunk_size", "chunks", "nonce_prefix", "ciphertext_sha256"]),
    value=json_values,
)
def test_one_bad_file_field_in_a_real_manifest(tmp_path_factory, field, value):
    root = real_bundle(tmp_path_factory.mktemp("f"))
    manifest = json.loads((root / "b" / "manifest.json").read_text())
    manifest["files"][0][field] = value
    write_signed(root / "b", json.dumps(manifest).encode())
    exercise(root / "b")


@SETTINGS
@given(payload=st.binary(max_size=70000), cut=st.integers(min_value=0, max_value=70100))
def test_hostile_payload_bytes(tmp_path_factory, payload, cut):
    root = real_bundle(tmp_path_factory.mktemp("p"))
    enc = root / "b" / "payload" / "000.enc"
    enc.write_bytes((payload + enc.read_bytes())[:cut])
    exercise(root / "b")
