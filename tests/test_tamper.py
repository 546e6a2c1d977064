"""Tamper suite: every alteration of a bundle is refused with its specific error and nothing is installed."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisioning.bundle import seal
from provisioning.errors import (
    BundleFormatError,
    InstallError,
    IntegrityError,
    ProvisioningError,
    RecipientError,
    SignatureError,
)
from provisioning.install import current_bundle, install
from provisioning.keys import fingerprint, public_bytes

CHUNK = 1 << 16


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A device with v1 installed, and a pristine v2 bundle to tamper with (copied per test)."""
    root = tmp_path_factory.mktemp("tamper")
    vendor, device = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    trusted = {fingerprint(public_bytes(vendor.public_key())): vendor.public_key()}
    src = root / "src"
    src.mkdir()
    (src / "model.onnx").write_bytes(os.urandom(3 * CHUNK + 500))
    (src / "tokenizer.json").write_bytes(b'{"vocab": {}}' * 50)
    files = {f.name: f for f in src.iterdir()}
    for version in (1, 2):
        seal(
            files,
            root / f"v{version}",
            model_id="m",
            version=version,
            architecture="X",
            engines=[],
            signing_key=vendor,
            recipients=[device.public_key()],
            chunk_size=CHUNK,
        )
    state = root / "state"
    install(root / "v1", state, trusted, device)
    return {"root": root, "vendor": vendor, "device": device, "trusted": trusted, "state": state, "files": files}


def fresh_copy(site, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "v2"
    shutil.copytree(site["root"] / "v2", dst)
    return dst


def refuse(site, bundle: Path, error: type[ProvisioningError], device=None) -> ProvisioningError:
    with pytest.raises(error) as exc:
        install(bundle, site["state"], site["trusted"], device or site["device"])
    assert current_bundle(site["state"], site["trusted"]).version == 1, "state changed by a refused install"
    assert "\n" not in str(exc.value) and len(str(exc.value)) > 20
    return exc.value


def payload_file(bundle: Path, fid: str = "model.onnx") -> Path:
    entry = next(f for f in json.loads((bundle / "manifest.json").read_text())["files"] if f["id"] == fid)
    return bundle / entry["path"]


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_flipped_manifest_byte_fails_signature(site, tmp_path, fraction):
    bundle = fresh_copy(site, tmp_path)
    path = bundle / "manifest.json"
    flip(path, int(len(path.read_bytes()) * fraction))
    refuse(site, bundle, SignatureError)


@pytest.mark.parametrize("offset", [0, 13, 31, 32, 50, 63])
def test_flipped_signature_byte_fails(site, tmp_path, offset):
    bundle = fresh_copy(site, tmp_path)
    flip(bundle / "manifest.sig", offset)
    refuse(site, bundle, SignatureError)


@pytest.mark.parametrize(
    "where", ["first byte", "chunk 0 middle", "chunk 0 tag", "chunk 1 start", "chunk 2 tag", "last chunk", "last byte"]
)
def test_flipped_payload_byte_fails_integrity(site, tmp_path, where):
    bundle = fresh_copy(site, tmp_path)
    sealed = CHUNK + 16
    offsets = {
        "first byte": 0,
        "chunk 0 middle": CHUNK // 2,
        "chunk 0 tag": CHUNK + 3,
        "chunk 1 start": sealed,
        "chunk 2 tag": 3 * sealed - 1,
        "last chunk": 3 * sealed + 10,
        "last byte": -1,
    }
    flip(payload_file(bundle), offsets[where])
    err = refuse(site, bundle, IntegrityError)
    assert "model" in str(err) or ".enc" in str(err)


def test_flipped_tokenizer_byte_fails(site, tmp_path):
    bundle = fresh_copy(site, tmp_path)
    flip(payload_file(bundle, "tokenizer.json"), 100)
    refuse(site, bundle, IntegrityError)


@pytest.mark.parametrize("edit", ["truncate", "drop chunk", "reorder", "duplicate chunk", "append", "delete file"])
def test_structural_payload_edits_fail(site, tmp_path, edit):
    bundle = fresh_copy(site, tmp_path)
    path = payload_file(bundle)
    data, s = path.read_bytes(), CHUNK + 16
    chunks = [data[i : i + s] for i in range(0, len(data), s)]
    new = {
        "truncate": lambda: data[:-100],
        "drop chunk": lambda: b"".join(chunks[:1] + chunks[2:]),
        "reorder": lambda: b"".join([chunks[1], chunks[0], *chunks[2:]]),
        "duplicate chunk": lambda: b"".join([chunks[0], chunks[0], *chunks[2:]]),
        "append": lambda: data + b"\0" * 16,
        "delete file": lambda: None,
    }[edit]()
    if new is None:
        path.unlink()
    else:
        path.write_bytes(new)
    refuse(site, bundle, IntegrityError)


def resign(site, bundle: Path, mutate) -> None:
    """A vendor-signed but inconsistent bundle: what a buggy or compromised build host could produce."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    mutate(manifest)
    raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (bundle / "manifest.json").write_bytes(raw)
    (bundle / "manifest.sig").write_bytes(site["vendor"].sign(raw))


def test_corrupt_wrapped_key_fails_unwrap(site, tmp_path):
    bundle = fresh_copy(site, tmp_path)

    def corrupt(m):
        raw = bytearray(base64.b64decode(m["recipients"][0]["wrapped_key"]))
        raw[5] ^= 1
        m["recipients"][0]["wrapped_key"] = base64.b64encode(bytes(raw)).decode()

    resign(site, bundle, corrupt)
    assert "does not unwrap" in str(refuse(site, bundle, RecipientError))


def test_payload_path_outside_the_bundle_is_refused(site, tmp_path):
    bundle = fresh_copy(site, tmp_path)
    resign(site, bundle, lambda m: m["files"][0].update(path="../../../etc/passwd"))
    refuse(site, bundle, BundleFormatError)


def test_chunk_from_another_bundle_with_the_same_key_fails(site, tmp_path):
    """Same data key, same file id, different bundle id: the AAD binding still refuses the splice."""
    root = tmp_path / "pair"
    key = os.urandom(32)
    for name in ("x", "y"):
        seal(
            site["files"],
            root / name,
            model_id="m",
            version=5,
            architecture="X",
            engines=[],
            signing_key=site["vendor"],
            recipients=[site["device"].public_key()],
            chunk_size=CHUNK,
            data_key=key,
        )
    victim, donor = payload_file(root / "y"), payload_file(root / "x")
    s = CHUNK + 16
    victim.write_bytes(donor.read_bytes()[:s] + victim.read_bytes()[s:])
    resign(
        site,
        root / "y",
        lambda m: m["files"][[f["id"] for f in m["files"]].index("model.onnx")].update(
            ciphertext_sha256=__import__("hashlib").sha256(victim.read_bytes()).hexdigest()
        ),
    )
    err = refuse(site, root / "y", IntegrityError)
    assert "chunk 0" in str(err)


def test_wrong_device_is_refused(site, tmp_path):
    err = refuse(site, fresh_copy(site, tmp_path), RecipientError, device=X25519PrivateKey.generate())
    assert "not addressed to this device" in str(err)


def test_untrusted_vendor_is_refused(site, tmp_path):
    bundle = tmp_path / "rogue"
    seal(
        site["files"],
        bundle,
        model_id="m",
        version=9,
        architecture="X",
        engines=[],
        signing_key=Ed25519PrivateKey.generate(),
        recipients=[site["device"].public_key()],
        chunk_size=CHUNK,
    )
    refuse(site, bundle, SignatureError)


def test_downgrade_is_refused(site, tmp_path):
    bundle = tmp_path / "old"
    seal(
        site["files"],
        bundle,
        model_id="m",
        version=0,
        architecture="X",
        engines=[],
        signing_key=site["vendor"],
        recipients=[site["device"].public_key()],
        chunk_size=CHUNK,
    )
    refuse(site, bundle, InstallError)


def test_untampered_v2_installs(site, tmp_path):
    """Control: the pristine copy passes, so each refusal above is caused by its tampering."""
    result = install(fresh_copy(site, tmp_path), tmp_path / "other-state", site["trusted"], site["device"])
    assert result.version == 2 and result.changed
