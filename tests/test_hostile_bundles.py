"""A vendor-signed bundle whose graph describes impossible external-data ranges is refused at load with one line
naming the tensor — before any session is built, so neither the borrowed-weights path nor the copy fallback can
serve weights another tensor's release zeroed or a negative offset misplaced."""

from __future__ import annotations

import onnx
import pytest

from appliance.engine import DecoderSpec, create_engine
from appliance.engine.weights import ExternalRangeError


def _tamper(graph: onnx.ModelProto, name: str, **fields) -> bytes:
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    for tensor in model.graph.initializer:
        if tensor.name == name:
            for entry in tensor.external_data:
                if entry.key in fields:
                    entry.value = str(fields[entry.key])
    return model.SerializeToString()


def _external(graph: onnx.ModelProto) -> list[tuple[str, int, int]]:
    out = []
    for t in graph.graph.initializer:
        where = {e.key: e.value for e in t.external_data}
        if where.get("location") == "model.onnx.data":
            out.append((t.name, int(where.get("offset", 0)), int(where["length"])))
    return sorted(out, key=lambda r: r[1])


@pytest.mark.parametrize("attack", ["negative", "past_end", "overlap", "length", "missing_file"])
def test_impossible_ranges_are_refused_naming_the_tensor(external_build, attack):
    graph = onnx.load(str(external_build / "model.onnx"), load_external_data=False)
    data = bytearray((external_build / "model.onnx.data").read_bytes())
    spec = DecoderSpec.from_json((external_build / "decoder.json").read_text())
    (first, first_offset, first_length), (second, second_offset, _) = _external(graph)[:2]
    victim, fields = {
        "negative": (second, {"offset": -4096}),
        "past_end": (second, {"offset": len(data) - 16}),
        "overlap": (second, {"offset": first_offset}),
        "length": (first, {"length": first_length - 4}),
        "missing_file": (first, {"location": "other.data"}),
    }[attack]
    with pytest.raises(ExternalRangeError) as err:
        create_engine(
            "onnxruntime",
            _tamper(graph, victim, **fields),
            spec,
            num_slots=1,
            max_seq_len=64,
            external={"model.onnx.data": data},
            load_pieces=2,
        )
    message = str(err.value)
    assert victim in message and "\n" not in message, message


def test_the_untampered_graph_loads(external_build):
    graph = (external_build / "model.onnx").read_bytes()
    data = bytearray((external_build / "model.onnx.data").read_bytes())
    spec = DecoderSpec.from_json((external_build / "decoder.json").read_text())
    engine = create_engine(
        "onnxruntime", graph, spec, num_slots=1, max_seq_len=64, external={"model.onnx.data": data}, load_pieces=2
    )
    assert engine.prefill([(0, [1, 5, 6, 7])]).shape[-1] == spec.vocab_size


def test_manifest_paths_and_names_must_match_whole(tmp_path):
    """A trailing newline passed the payload-path check (``$`` matches before it); a model id with terminal escape
    codes was printed raw by health, logs and audit listings. Both refused, at seal and at verify."""
    from provisioning.bundle import BundleFormatError, validate_manifest

    good = {
        "format": 2,
        "bundle_id": "0" * 32,
        "model_id": "r1-distill_1.5b",
        "version": 1,
        "architecture": "Qwen2ForCausalLM",
        "engines": [],
        "files": [
            {
                "id": "model.onnx",
                "path": "payload/000.enc",
                "size": 10,
                "chunk_size": 1 << 16,
                "chunks": 1,
                "nonce_prefix": "00" * 7,
                "ciphertext_sha256": "00" * 32,
            }
        ],
        "recipients": [],
        "created": 0,
    }
    validate_manifest(good, tmp_path)
    bad_files = [{**good["files"][0], "path": "payload/000.enc\n"}]
    for field, value in (
        ("files", bad_files),
        ("model_id", "tiny\x1b[2J\x1b[31mOK"),
        ("model_id", "tiny\n"),
        ("model_id", ""),
        ("architecture", "Qwen2\x1b]0;pwned\x07"),
        ("bundle_id", "0" * 32 + "\n"),
    ):
        with pytest.raises(BundleFormatError):
            validate_manifest({**good, field: value}, tmp_path)


def test_seal_refuses_an_unprintable_model_id(tiny_build, tmp_path):
    from tests.conftest import run_cli

    run_cli("edge-provision", "keygen", "--vendor", str(tmp_path / "vendor"))
    run_cli("edge-provision", "enroll", "--keys", str(tmp_path / "keys"), "--out", str(tmp_path / "id.json"))
    proc = run_cli(
        "edge-provision",
        "seal",
        "--model",
        str(tiny_build / "onnx"),
        "--model-id",
        "tiny\x1b[31m",
        "--version",
        "1",
        "--signing-key",
        str(tmp_path / "vendor" / "vendor-ed25519.key"),
        "--recipient",
        str(tmp_path / "id.json"),
        "--out",
        str(tmp_path / "bundle"),
        check=False,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and "model id" in lines[0], proc.stderr
