"""Nothing readable — model, data key, decrypted tokenizer — lies under the device's state directory."""

from __future__ import annotations

from pathlib import Path

from appliance.transport.client import Client
from provisioning.bundle import open_bundle
from provisioning.keys import DEVICE_X25519, load_trusted_vendors, load_x25519


def test_state_directory_holds_no_plaintext_model_or_key(daemon, device, tiny_build):
    with Client(daemon.endpoint) as client:
        client.complete("Return the", max_tokens=4)
    plain_model = (tiny_build / "onnx" / "model.onnx").read_bytes()
    plain_tokenizer = (tiny_build / "onnx" / "tokenizer.json").read_bytes()
    bundle = open_bundle(device.state / "current", load_trusted_vendors(device.trust))
    data_key = bytes(bundle.unwrap_key(load_x25519(DEVICE_X25519, device.keys)))
    probes = {
        "model bytes": plain_model[len(plain_model) // 2 : len(plain_model) // 2 + 64],
        "model header": plain_model[:32],
        "tokenizer": plain_tokenizer[:48],
        "data key": data_key,
        "onnx producer": b"pytorch",
    }
    files = [p for p in Path(device.state).rglob("*") if p.is_file()]
    assert files, "state directory is empty"
    for path in files:
        blob = path.read_bytes()
        for what, probe in probes.items():
            assert probe not in blob, f"{what} found in plaintext in {path}"
