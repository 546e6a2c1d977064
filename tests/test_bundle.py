"""Bundle format with real keys and real AES-GCM: round trip and every way of tampering we know."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from provisioning.bundle import open_bundle, seal
from provisioning.errors import IntegrityError, RecipientError, SignatureError
from provisioning.keys import fingerprint, public_bytes

CHUNK = 1 << 16


@pytest.fixture
def parties():
    vendor, device = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    trusted = {fingerprint(public_bytes(vendor.public_key())): vendor.public_key()}
    return vendor, device, trusted


def make_bundle(
    tmp: Path, vendor, device, name="b", files=None, version=3, model_id="m"
) -> tuple[Path, dict[str, bytes]]:
    contents = files or {"model.onnx": os.urandom(3 * CHUNK + 123), "decoder.json": b'{"x": 1}', "empty": b""}
    src = tmp / f"{name}-src"
    src.mkdir()
    for fid, data in contents.items():
        (src / fid).write_bytes(data)
    out = tmp / name
    seal(
        {fid: src / fid for fid in contents},
        out,
        model_id=model_id,
        version=version,
        architecture="X",
        engines=[],
        signing_key=vendor,
        recipients=[device.public_key()],
        chunk_size=CHUNK,
    )
    return out, contents


def test_round_trip_decrypts_every_file_exactly(tmp_path, parties):
    vendor, device, trusted = parties
    root, contents = make_bundle(tmp_path, vendor, device)
    bundle = open_bundle(root, trusted)
    bundle.check_ciphertext()
    key = bundle.unwrap_key(device)
    for fid, data in contents.items():
        assert bytes(bundle.decrypt_into(fid, key)) == data
    assert bundle.file("model.onnx").chunks == 4


def test_payload_is_not_plaintext(tmp_path, parties):
    vendor, device, _ = parties
    root, contents = make_bundle(tmp_path, vendor, device)
    blob = b"".join(p.read_bytes() for p in (root / "payload").iterdir())
    assert contents["model.onnx"][:64] not in blob


def test_unknown_vendor_is_refused(tmp_path, parties):
    _, device, trusted = parties
    root, _ = make_bundle(tmp_path, Ed25519PrivateKey.generate(), device)
    with pytest.raises(SignatureError, match="trusted vendor"):
        open_bundle(root, trusted)


def test_edited_manifest_fails_signature(tmp_path, parties):
    vendor, device, trusted = parties
    root, _ = make_bundle(tmp_path, vendor, device)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["version"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with pytest.raises(SignatureError):
        open_bundle(root, trusted)


def test_other_device_cannot_unwrap(tmp_path, parties):
    vendor, device, trusted = parties
    root, _ = make_bundle(tmp_path, vendor, device)
    with pytest.raises(RecipientError, match="not addressed to this device"):
        open_bundle(root, trusted).unwrap_key(X25519PrivateKey.generate())


def payload(root: Path, fid: str) -> Path:
    entry = next(f for f in json.loads((root / "manifest.json").read_text())["files"] if f["id"] == fid)
    return root / entry["path"]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tamper", ["flip", "truncate_chunk", "drop_last_chunk", "swap_chunks", "append"])
def test_tampered_payload_fails_with_chunk_named(tmp_path, parties, tamper):
    vendor, device, trusted = parties
    root, _ = make_bundle(tmp_path, vendor, device)
    path = payload(root, "model.onnx")
    data = path.read_bytes()
    sealed = CHUNK + 16
    if tamper == "flip":
        flip_byte(path, sealed + 10)
    elif tamper == "truncate_chunk":
        path.write_bytes(data[:-5])
    elif tamper == "drop_last_chunk":
        path.write_bytes(data[: 3 * sealed])
    elif tamper == "swap_chunks":
        path.write_bytes(data[sealed : 2 * sealed] + data[:sealed] + data[2 * sealed :])
    else:
        path.write_bytes(data + b"x")
    bundle = open_bundle(root, trusted)
    with pytest.raises(IntegrityError):
        bundle.check_ciphertext()
    with pytest.raises(IntegrityError, match="chunk|trailing"):
        bundle.decrypt_into("model.onnx", bundle.unwrap_key(device))


def test_files_spliced_between_bundles_fail(tmp_path, parties):
    """Same device, same vendor: a payload file moved from one bundle into another does not authenticate."""
    vendor, device, trusted = parties
    first, _ = make_bundle(tmp_path, vendor, device, "one")
    second, _ = make_bundle(tmp_path, vendor, device, "two")
    payload(second, "model.onnx").write_bytes(payload(first, "model.onnx").read_bytes())
    bundle = open_bundle(second, trusted)
    with pytest.raises(IntegrityError):
        bundle.decrypt_into("model.onnx", bundle.unwrap_key(device))


def test_seal_moves_inline_weights_out_and_the_model_answers_the_same(tiny_build, device, tmp_path):
    """One weight layout for every size: the demo's graph holds its weights inline, its bundle holds them in
    model.onnx.data (the borrowed, pieced loading path), and both answer with the same greedy tokens."""
    from appliance.config import load_config
    from appliance.engine import DecoderSpec, create_engine
    from appliance.loader import installed_bundle, load_model
    from edge_models.parity import engine_greedy
    from provisioning.layout import EXTERNAL_DATA, externalize

    assert not (tiny_build / "onnx" / EXTERNAL_DATA).exists()  # the export: weights inline
    config = load_config(device.config)
    engines = installed_bundle(config).engines()
    onnx_entry = next(e for e in engines if e.kind == "onnxruntime")
    assert onnx_entry.files == ("model.onnx", EXTERNAL_DATA)
    graph, data = externalize(tiny_build / "onnx" / "model.onnx", tmp_path)
    assert graph.stat().st_size < 64 * 1024 < data.stat().st_size  # the graph without its weights
    spec = DecoderSpec.from_json((tiny_build / "onnx" / "decoder.json").read_text())
    inline = create_engine("onnxruntime", (tiny_build / "onnx" / "model.onnx").read_bytes(), spec, num_slots=2,
                           max_seq_len=128)  # fmt: skip
    prompts = [[spec.bos_token_id, 40, 41, 42], [spec.bos_token_id, 300, 301]]
    served = load_model(config).engine  # decrypted from the bundle: model.onnx.data borrowed, in pieces
    assert engine_greedy(served, prompts, 12, spec.eos_token_id) == engine_greedy(
        inline, prompts, 12, spec.eos_token_id
    )
