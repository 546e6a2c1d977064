"""The audit trail under a real daemon: disk full (fail closed, recover), SIGKILL under load, export CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from appliance.audit import AuditLog
from appliance.config import render_config
from appliance.transport import protocol as P
from appliance.transport.client import Client, ClientError
from provisioning.keys import IDENTITY_FILE, load_public_ed25519
from tests.conftest import Daemon, provision_device, run_cli


def can_mount_tmpfs(target) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], capture_output=True)
    return proc.returncode == 0


def test_disk_full_fails_closed_then_recovers_by_itself(tiny_build, tmp_path):
    mount = tmp_path / "small-disk"
    if not can_mount_tmpfs(mount):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        device = provision_device(tiny_build, tmp_path / "site")
        device.config.write_text(
            render_config("state", "trust", "credentials", str(mount / "audit.db"), device.endpoint)
        )
        daemon = Daemon(device, tmp_path)
        try:
            daemon.wait_for("READY=1")
            with Client(device.endpoint, timeout_s=30) as client:
                done = [client.complete("Return the", max_tokens=4, request_id=f"before-{i}")["id"] for i in range(3)]
                filler = mount / "filler"
                fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
                try:  # fill the disk to the last byte
                    while os.write(fd, b"\0" * 512):
                        pass
                except OSError:
                    pass
                finally:
                    os.close(fd)
                refused = None
                for i in range(200):
                    try:
                        done.append(client.complete("Return the", max_tokens=4, request_id=f"full-{i}")["id"])
                    except ClientError as exc:
                        refused = exc
                        break
                assert refused is not None and refused.code == P.E_AUDIT, "writes never failed on a full disk"
                assert client.health()["audit"] == "unavailable"
                with pytest.raises(ClientError) as again:
                    client.complete("Return the", max_tokens=2)
                assert again.value.code == P.E_AUDIT
                filler.unlink()
                deadline = time.monotonic() + 10
                while client.health()["audit"] != "ok" and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert client.health()["audit"] == "ok"
                done.append(client.complete("Return the", max_tokens=2, request_id="after")["id"])
        finally:
            daemon.stop()
        log = AuditLog(mount / "audit.db")
        assert log.verify().ok
        audited = {r.request_id for r in log.rows()}
        assert set(done) <= audited  # every request that got its final reply has its row
        log.close()
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_sigkill_under_load_loses_no_answered_request(tiny_build, tmp_path):
    device = provision_device(tiny_build, tmp_path / "site")
    daemon = Daemon(device, tmp_path / "one")
    answered: list[str] = []
    stop = threading.Event()

    def client_loop(n: int) -> None:
        with Client(device.endpoint, timeout_s=5, retries=1) as client:
            i = 0
            while not stop.is_set():
                rid = f"c{n}-{i}"
                try:
                    if client.complete("Return the", max_tokens=8, request_id=rid)["type"] == "done":
                        answered.append(rid)
                except ClientError:
                    return
                i += 1

    try:
        daemon.wait_for("READY=1")
        threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        os.kill(daemon.proc.pid, signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        daemon.stop()
    assert len(answered) > 10
    log = AuditLog(device.state / "audit.db")  # opens cleanly after the kill
    result = log.verify(load_public_ed25519(device.keys / IDENTITY_FILE))
    assert result.ok, result.message
    assert set(answered) <= {r.request_id for r in log.rows()}
    log.close()
    restarted = Daemon(device, tmp_path / "two")
    try:
        restarted.wait_for("READY=1")
        with Client(device.endpoint) as client:
            assert client.complete("Return the", max_tokens=2)["type"] == "done"
    finally:
        restarted.stop()
    assert AuditLog(device.state / "audit.db").verify().ok


def test_export_and_verify_through_the_cli(tiny_build, tmp_path):
    device = provision_device(tiny_build, tmp_path / "site")
    daemon = Daemon(device, tmp_path)
    try:
        daemon.wait_for("READY=1")
        with Client(device.endpoint) as client:
            for i in range(3):
                client.complete("Return the", max_tokens=2, request_id=f"x{i}")
    finally:
        daemon.stop()
    usb = tmp_path / "usb"
    out = run_cli("edge-appliance", "--config", str(device.config), "audit", "export", "--to", str(usb)).stdout
    assert "exported rows 1..3" in out
    ok = run_cli("edge-appliance", "audit", "verify-export", str(usb), "--device-key", str(device.identity))
    assert ok.stdout.startswith("OK: 1 export(s), 3 rows")
    rows = next(usb.iterdir()) / "rows.jsonl"
    rows.write_text(rows.read_text().replace('"x1"', '"zz"'))
    bad = run_cli(
        "edge-appliance", "audit", "verify-export", str(usb), "--device-key", str(device.identity), check=False
    )
    assert bad.returncode == 1 and "row 2: contents do not match its hash: edited" in bad.stdout
    listed = run_cli(
        "edge-appliance", "--config", str(device.config), "audit", "list", "--status", "ok", "--json"
    ).stdout
    import json

    assert [r["request_id"] for r in json.loads(listed)] == ["x0", "x1", "x2"]
