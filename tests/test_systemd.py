"""The unit file passes `systemd-analyze verify` with no output at all; notify speaks the real protocol."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.notify import Notifier

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "edge-appliance.service"
HTTP_UNIT = UNIT.with_name("edge-appliance-http.service")


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (.ci/run installs it)"
)
def test_unit_files_verify_without_any_output(tmp_path):
    # ExecStart must exist for verify to pass: point it at this venv's console script. Both units are
    # verified together, so the gateway's After=/BindsTo= name a unit that exists.
    exe = Path(sys.executable).parent / "edge-appliance"
    paths = []
    for source in (UNIT, HTTP_UNIT):
        unit = tmp_path / source.name
        unit.write_text(source.read_text().replace("/opt/edge-appliance/venv/bin/edge-appliance", str(exe)))
        paths.append(str(unit))
    proc = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_http_unit_declares_notify_watchdog_and_its_own_credential():
    text = HTTP_UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "BindsTo=edge-appliance.service", " http ", "gateway-curve.key"):
        assert line in text, line
    active = [line for line in text.splitlines() if not line.startswith("#")]
    assert not [line for line in active if "device-" in line and ".key" in line]  # never the device's keys


def test_unit_declares_notify_watchdog_and_hardening():
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "StateDirectory=edge-appliance",
        "LoadCredentialEncrypted=device-x25519.key",
    ):
        assert line in text, line


def test_notifier_sends_datagrams_to_notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier()
    assert n.watchdog_interval == 0.5
    n.ready("up")
    n.watchdog(now=100.0)
    n.watchdog(now=100.1)  # too soon: not sent
    n.watchdog(now=100.6)
    assert [sock.recv(100).decode() for _ in range(3)] == ["READY=1\nSTATUS=up", "WATCHDOG=1", "WATCHDOG=1"]
    sock.close()


def test_notifier_ignores_watchdog_meant_for_another_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Notifier().watchdog_interval is None


def test_notifier_never_blocks_when_nobody_reads(tmp_path, monkeypatch):
    """A full datagram queue must not stall the serving loop (pings are dropped, not waited on)."""
    import time

    path = tmp_path / "unread.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    n = Notifier()
    start = time.monotonic()
    for _ in range(500):
        n.send("WATCHDOG=1")
    assert time.monotonic() - start < 5
    sock.close()


def test_no_unit_needs_kill_and_the_gateway_follows_the_daemon():
    for unit in (UNIT, HTTP_UNIT):
        active = [line for line in unit.read_text().splitlines() if not line.startswith("#")]
        assert not [line for line in active if "/bin/kill" in line], unit.name  # minbase has no procps
    install = HTTP_UNIT.read_text().split("[Install]", 1)[1]
    assert "edge-appliance.service" in install  # enabled: started with every start of the daemon


def test_http_reload_signals_the_gateway_without_kill(tmp_path):
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, pathlib; signal.signal(signal.SIGHUP, lambda *_: sys.exit(7)); "
            f"pathlib.Path({str(ready)!r}).touch(); signal.pause()",
        ]
    )
    try:
        while child.poll() is None and not ready.exists():
            time.sleep(0.01)
        exe = Path(sys.executable).parent / "edge-appliance"
        proc = subprocess.run([str(exe), "http-reload", "--pid", str(child.pid)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert child.wait(timeout=10) == 7  # it got SIGHUP
    finally:
        child.kill()
