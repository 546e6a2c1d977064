"""Engine kinds in the bundle (manifest format 2): what a sealed bundle lists, which kind a device
picks and why, refusal of TensorRT plans built for another GPU or TensorRT version, and plans
built on the device cached encrypted. Manifests are real and signed; device capabilities are
given explicitly (no GPU or TensorRT exists here to probe)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from appliance.engine import EngineError
from appliance.engine.plan_cache import PlanCache
from appliance.engine.select import DeviceCaps, PlanMismatchError, choose_engine, probe_device
from provisioning.bundle import EngineEntry, open_bundle, seal
from provisioning.errors import BundleFormatError
from provisioning.keys import fingerprint, public_bytes

ORIN = DeviceCaps(cuda=True, compute_capability="8.7", tensorrt="10.3.0", torch=True)
H100_NO_TRT = DeviceCaps(cuda=True, compute_capability="9.0", tensorrt=None, torch=True)
CPU = DeviceCaps(torch=True)
PLAN_ORIN = EngineEntry("tensorrt", ("plan-sm87.plan",), "float16", {"compute_capability": "8.7", "tensorrt": "10.3.0"})
PLAN_ADA = EngineEntry("tensorrt", ("plan-sm89.plan",), "float16", {"compute_capability": "8.9", "tensorrt": "10.3.1"})
ORT = EngineEntry("onnxruntime", ("model.onnx",), "float32", {})
TORCH = EngineEntry("torch", ("model.safetensors", "config.json"), "bfloat16", {})


@pytest.fixture
def vendor():
    key = Ed25519PrivateKey.generate()
    return key, {fingerprint(public_bytes(key.public_key())): key.public_key()}


def sealed(tmp: Path, vendor, engines, name="b"):
    key, trusted = vendor
    src = tmp / f"{name}-src"
    src.mkdir()
    ids = {f for e in engines for f in e.files} | {"decoder.json"}
    for fid in ids:
        (src / fid).write_bytes(os.urandom(100))
    seal(
        {f: src / f for f in ids},
        tmp / name,
        model_id="m",
        version=1,
        architecture="X",
        engines=engines,
        signing_key=key,
        recipients=[X25519PrivateKey.generate().public_key()],
    )
    return open_bundle(tmp / name, trusted)


def resign(root: Path, vendor, manifest: dict) -> None:
    raw = json.dumps(manifest).encode()
    (root / "manifest.json").write_bytes(raw)
    (root / "manifest.sig").write_bytes(vendor[0].sign(raw))


def test_the_signed_manifest_lists_each_engine_with_its_files_dtype_and_target(tmp_path, vendor):
    bundle = sealed(tmp_path, vendor, [ORT, TORCH, PLAN_ORIN])
    assert bundle.manifest["format"] == 2
    assert bundle.engines() == [ORT, TORCH, PLAN_ORIN]


def test_a_format_1_bundle_still_opens_as_onnx_only(tmp_path, vendor):
    root = tmp_path / "b"
    sealed(tmp_path, vendor, [ORT])
    manifest = json.loads((root / "manifest.json").read_text())
    resign(root, vendor, {**manifest, "format": 1, "engines": [{"kind": "onnxruntime", "file": "model.onnx"}]})
    bundle = open_bundle(root, vendor[1])
    assert bundle.engines() == [EngineEntry("onnxruntime", ("model.onnx",), "float32", {})]


@pytest.mark.parametrize(
    "bad_engine",
    [
        {"kind": "cuda-magic", "files": ["model.onnx"], "dtype": "float32"},
        {"kind": "onnxruntime", "files": ["absent.onnx"], "dtype": "float32"},
        {"kind": "tensorrt", "files": ["model.onnx"], "dtype": "float16", "target": {"compute_capability": "8.7"}},
        {"kind": "tensorrt", "files": ["model.onnx"], "dtype": "float16", "target": {"compute_capability": "sm87"}},
    ],
)
def test_malformed_engine_entries_are_refused_at_open(tmp_path, vendor, bad_engine):
    root = tmp_path / "b"
    sealed(tmp_path, vendor, [ORT])
    manifest = json.loads((root / "manifest.json").read_text())
    resign(root, vendor, {**manifest, "engines": [bad_engine]})
    with pytest.raises(BundleFormatError, match="engine|tensorrt"):
        open_bundle(root, vendor[1])


def test_auto_takes_the_plan_built_for_this_gpu():
    choice = choose_engine("auto", [ORT, TORCH, PLAN_ADA, PLAN_ORIN], ORIN)
    assert choice.entry == PLAN_ORIN and "sm 8.7" in choice.reason


def test_auto_passes_over_a_foreign_plan_to_torch_on_cuda_and_says_why():
    choice = choose_engine("auto", [ORT, TORCH, PLAN_ADA], ORIN)
    assert choice.entry == TORCH
    assert "tensorrt refused" in choice.reason and "8.9" in choice.reason


def test_auto_on_a_cpu_box_serves_onnxruntime_even_with_a_checkpoint():
    choice = choose_engine("auto", [ORT, TORCH, PLAN_ORIN], CPU)
    assert choice.entry == ORT and "no CUDA GPU" in choice.reason


def test_auto_falls_back_to_torch_on_cpu_when_the_bundle_has_no_onnx():
    assert choose_engine("auto", [TORCH], CPU).entry == TORCH


def test_a_plan_for_another_gpu_is_refused_naming_both_capabilities():
    with pytest.raises(PlanMismatchError, match=r"compute capability 8\.9, this device has 8\.7"):
        choose_engine("tensorrt", [PLAN_ADA], ORIN)


def test_a_plan_for_another_tensorrt_release_is_refused_naming_both_versions():
    other = EngineEntry("tensorrt", ("p.plan",), "float16", {"compute_capability": "8.7", "tensorrt": "10.1.0"})
    with pytest.raises(PlanMismatchError, match=r"TensorRT 10\.1\.0, this device has 10\.3\.0"):
        choose_engine("tensorrt", [other], ORIN)


def test_tensorrt_without_tensorrt_installed_is_refused():
    with pytest.raises(PlanMismatchError, match="TensorRT"):
        choose_engine("tensorrt", [PLAN_ORIN], H100_NO_TRT)


def test_a_named_kind_the_bundle_lacks_is_refused_listing_what_it_has():
    with pytest.raises(EngineError, match="carries onnxruntime"):
        choose_engine("torch", [ORT], ORIN)


def test_probing_a_machine_without_nvidia_devices_leaves_torch_unimported():
    if any(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this machine has an NVIDIA device")
    import subprocess
    import sys

    code = (
        "import sys; from appliance.engine.select import probe_device; c = probe_device(); "
        "print('torch' in sys.modules, c.cuda)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    assert probe_device().cuda is False


TARGET = {"compute_capability": "8.7", "tensorrt": "10.3.0"}


def test_a_plan_built_on_the_device_is_cached_encrypted_and_reused(tmp_path):
    key = X25519PrivateKey.generate()
    plan = b"TRT-PLAN" + os.urandom(4096)
    builds = []

    def build() -> bytes:
        builds.append(1)
        return plan

    cache = PlanCache(tmp_path, key)
    assert cache.get_or_build("ab" * 16, TARGET, build) == plan
    assert PlanCache(tmp_path, key).get_or_build("ab" * 16, TARGET, build) == plan  # a later start
    assert len(builds) == 1
    stored = cache.path("ab" * 16, TARGET)
    assert stored.stat().st_mode & 0o077 == 0
    assert plan[:64] not in stored.read_bytes() and b"TRT-PLAN" not in stored.read_bytes()


def test_a_cached_plan_is_useless_to_another_device_and_is_dropped(tmp_path, caplog):
    PlanCache(tmp_path, X25519PrivateKey.generate()).put("ab" * 16, TARGET, b"plan")
    other = PlanCache(tmp_path, X25519PrivateKey.generate())
    with caplog.at_level(logging.WARNING):
        assert other.get("ab" * 16, TARGET) is None
    assert "fails authentication" in caplog.text
    assert not other.path("ab" * 16, TARGET).exists()


def test_a_cached_plan_renamed_to_another_target_fails_authentication(tmp_path):
    key = X25519PrivateKey.generate()
    cache = PlanCache(tmp_path, key)
    cache.put("ab" * 16, TARGET, b"plan")
    other = {"compute_capability": "8.9", "tensorrt": "10.3.0"}
    cache.path("ab" * 16, TARGET).rename(cache.path("ab" * 16, other))
    assert cache.get("ab" * 16, other) is None
