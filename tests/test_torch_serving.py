"""The torch engine behind the real daemon: a sealed bundle carrying the student's safetensors
checkpoint beside its float32 ONNX export, served with ``[engine] kind = "torch"`` on CPU, and
``edge-appliance selftest`` comparing both engines on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from provisioning.bundle import open_bundle
from provisioning.keys import DEVICE_X25519, load_trusted_vendors, load_x25519

from .conftest import Daemon, provision_device, run_cli

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def torch_site(tiny_build, tmp_path_factory):
    return provision_device(
        tiny_build, tmp_path_factory.mktemp("torch-site"), onnx="student/onnx", torch=True, kind="torch"
    )


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_bundle_lists_onnx_and_the_torch_checkpoint(torch_site):
    bundle = open_bundle(torch_site.state / "current", load_trusted_vendors(torch_site.trust))
    assert {(e.kind, e.dtype) for e in bundle.engines()} == {("onnxruntime", "float32"), ("torch", "float32")}


def test_the_daemon_answers_ask_on_the_torch_engine(torch_site, tmp_path):
    daemon = Daemon(torch_site, tmp_path)
    try:
        daemon.wait_for("READY=1", timeout=120)
        proc = run_cli("edge-appliance", "ask", "How do I reset the conveyor?", "--endpoint", daemon.endpoint, "--json")
        reply = json.loads(proc.stdout)
        assert reply["type"] == "done" and reply["usage"]["completion_tokens"] > 0
        assert "engine torch" in daemon.output()
        assert "libtorch" in mapped_libraries(daemon.proc.pid)
    finally:
        daemon.stop()


def test_serving_onnx_on_a_cpu_box_never_loads_torch(daemon):
    """The default daemon (kind auto, ONNX-only bundle) must stay torch-free."""
    assert "libtorch" not in mapped_libraries(daemon.proc.pid)


def test_selftest_runs_both_engines_with_identical_greedy_tokens(torch_site):
    proc = run_cli("edge-appliance", "--config", str(torch_site.config), "selftest", "--tokens", "12", "--json")
    rows = {r["kind"]: r for r in json.loads(proc.stdout)}
    assert set(rows) == {"onnxruntime", "torch"}
    assert rows["torch"]["verdict"] == "identical" and rows["torch"]["agree"] == 12
    assert rows["torch"]["device"] == "cpu" and rows["torch"]["precision"] == "float32"
    assert rows["torch"]["tokens_per_s"] > 0 and rows["torch"]["bandwidth_gb_s"] > 0
    table = run_cli("edge-appliance", "--config", str(torch_site.config), "selftest", "--tokens", "6").stdout
    assert "parity vs onnxruntime" in table and "identical (6/6)" in table


def test_no_plaintext_checkpoint_lies_under_the_state_directory(torch_site, tiny_build):
    plain = (tiny_build / "student" / "student" / "model.safetensors").read_bytes()
    probes = [plain[:64], plain[len(plain) // 2 : len(plain) // 2 + 64]]
    bundle = open_bundle(torch_site.state / "current", load_trusted_vendors(torch_site.trust))
    assert bundle.unwrap_key(load_x25519(DEVICE_X25519, torch_site.keys))  # the device can read it; disk cannot
    for path in (p for p in Path(torch_site.state).rglob("*") if p.is_file()):
        blob = path.read_bytes()
        assert not any(probe in blob for probe in probes), f"checkpoint bytes in plaintext in {path}"
