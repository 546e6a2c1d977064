"""SIGHUP reload: a newly installed bundle replaces the served model; in-flight requests finish."""

from __future__ import annotations

import threading
import time

from appliance.transport.client import Client
from tests.conftest import Daemon, provision_device, run_cli


def wait_for_version(endpoint: str, version: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    with Client(endpoint, timeout_s=5) as client:
        while time.monotonic() < deadline:
            info = client.info()
            if info["version"] == version:
                return info
            time.sleep(0.1)
    raise AssertionError(f"daemon never reported version {version}")


def test_sighup_swaps_model_without_dropping_in_flight_requests(tiny_build, tmp_path):
    device = provision_device(tiny_build, tmp_path / "site", version=1)
    daemon = Daemon(device, tmp_path)
    try:
        daemon.wait_for("READY=1")
        v2 = tmp_path / "bundle-v2"
        run_cli(
            "edge-provision",
            "seal",
            "--model",
            str(tiny_build / "onnx"),
            "--model-id",
            "tiny",
            "--version",
            "2",
            "--signing-key",
            str(device.vendor / "vendor-ed25519.key"),
            "--recipient",
            str(device.identity),
            "--out",
            str(v2),
        )
        run_cli(
            "edge-provision",
            "install",
            str(v2),
            "--state",
            str(device.state),
            "--trust",
            str(device.trust),
            "--keys",
            str(device.keys),
        )
        result: dict = {}

        def long_request() -> None:
            with Client(device.endpoint, timeout_s=60) as client:
                result["final"] = client.complete("Return the", max_tokens=200, ignore_eos=True)

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(0.2)  # the request is running on v1
        daemon.clear()
        # What the unit's ExecReload= runs: SIGHUP, then wait for the daemon's answer.
        reloaded = run_cli("edge-appliance", "--config", str(device.config), "reload", "--pid", str(daemon.proc.pid))
        assert "now serving tiny v2" in reloaded.stdout
        assert wait_for_version(device.endpoint, 2)["model_id"] == "tiny"
        daemon.wait_for(f"READY=1\nSTATUS=serving tiny v2 on {device.endpoint}")
        worker.join(timeout=120)
        assert result["final"]["type"] == "done" and result["final"]["usage"]["completion_tokens"] == 200
        with Client(device.endpoint) as client:
            assert client.complete("Return the", max_tokens=4)["type"] == "done"
    finally:
        daemon.stop()


def test_failed_reload_keeps_serving_the_old_model(tiny_build, tmp_path):
    device = provision_device(tiny_build, tmp_path / "site", version=1)
    daemon = Daemon(device, tmp_path)
    try:
        daemon.wait_for("READY=1")
        for pub in device.trust.glob("*.pub"):
            pub.unlink()  # the new load cannot verify anything now
        failed = run_cli(
            "edge-appliance", "--config", str(device.config), "reload", "--pid", str(daemon.proc.pid), check=False
        )
        assert failed.returncode == 1 and "reload failed, still serving v1" in failed.stderr
        daemon.wait_for(f"STATUS=reload failed; serving tiny v1 on {device.endpoint}")
        with Client(device.endpoint) as client:
            assert client.info()["version"] == 1
            assert client.complete("Return the", max_tokens=4)["type"] == "done"
        assert "reload failed" in daemon.output()
    finally:
        daemon.stop()


def test_reloads_free_the_previous_model(tiny_build, tmp_path):
    """The daemon reports a previous model as retiring until its memory is freed (engine collected, heap
    trimmed): after each of three reloads of the same bundle it must reach 0, the first model included (the
    start-up frame once kept it for the daemon's lifetime, +1x the model per process). The RSS side of the same
    property is measured at the 1.5B shape by `bench/scale.py --reload-probe 3`."""
    device = provision_device(tiny_build, tmp_path / "site", version=1)
    daemon = Daemon(device, tmp_path)
    try:
        daemon.wait_for("READY=1")
        with Client(device.endpoint, timeout_s=60) as client:
            for _ in range(3):
                run_cli("edge-appliance", "--config", str(device.config), "reload", "--pid", str(daemon.proc.pid))
                assert client.complete("Return the", max_tokens=4)["type"] == "done"  # served by the new model
                deadline = time.monotonic() + 20
                while client.health()["models_retiring"] and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert client.health()["models_retiring"] == 0, "the previous model is still held"
    finally:
        daemon.stop()
