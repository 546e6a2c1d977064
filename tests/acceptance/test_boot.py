"""Acceptance: the README's USB flow on a booted Debian bookworm with no network, the shipped unit byte for byte.

Host = the connected machine and the vendor's build host (wheelhouse, tiny model, vendor key, seal);
container = the device (offline install from the stick, ``enroll --credstore``, install, the unit
under its own systemd). The tests run in order and share one booted machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.acceptance.machine import REPO, Machine, cached_root, missing_tools
from tests.conftest import BIN, run_cli

pytestmark = pytest.mark.acceptance

UNIT = "edge-appliance.service"
VENV = "/opt/edge-appliance/venv"
KEYS = "/etc/edge-appliance/keys"
TRUST = "/etc/edge-appliance/trusted-vendors"
STATE = "/var/lib/edge-appliance"
CONFIG = "/etc/edge-appliance/appliance.toml"
ENDPOINT = "tcp://127.0.0.1:5555"
USB = "/media/usb"
# CURVE on: every client call carries the operator's key and the device's public identity.
CURVE = f"--server-key {USB}/press-04-identity.json --client-key /root/operator/client.key"
EA = f"{VENV}/bin/edge-appliance"
EP = f"{VENV}/bin/edge-provision"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the acceptance boot needs root (systemd-nspawn); .ci/run runs as root"
    if missing_tools():
        return f"{', '.join(missing_tools())} not installed (.ci/run installs debootstrap and systemd-container)"
    return None


if _skip_reason():
    pytest.skip(_skip_reason(), allow_module_level=True)


def serving(version: int):
    status = f"serving tiny v{version} on {ENDPOINT}"
    return lambda p: p["ActiveState"] == "active" and p["SubState"] == "running" and p["StatusText"] == status


@pytest.fixture(scope="module")
def site(tiny_build, tmp_path_factory):
    """Boot the device and run the README's steps 1-5 on it; yields (machine, host paths)."""
    work = tmp_path_factory.mktemp("acceptance")
    root = work / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(cached_root()), str(root)], check=True, timeout=600)
    usb = root / USB.lstrip("/")
    # 1. Software stick, on the connected machine.
    # The vendor's key stays on the build host; the device gets only the public half.
    vendor = work / "vendor"
    run_cli("edge-provision", "keygen", "--vendor", str(vendor))
    run_cli("edge-provision", "wheelhouse", "--out", str(usb / "wheelhouse"), "--signing-key", str(vendor))
    shutil.copy(vendor / "vendor-ed25519.pub", usb / "vendor-ed25519.pub")
    machine = Machine(root, work / "boot.log")
    try:
        # 2. Install the software with no network at all (the container has loopback only).
        assert machine.sh("ls /sys/class/net").stdout.split() == ["lo"]
        # First trust: the vendor's public key, delivered with the device (docs/BUNDLE.md), before any code runs.
        machine.sh(f"mkdir -p {TRUST} && cp {USB}/vendor-ed25519.pub {TRUST}/")
        machine.sh(f"sh {USB}/wheelhouse/install-offline.sh {VENV} --trust {TRUST}", timeout=600)
        # 3. Enroll, private keys sealed with systemd-creds; trust the vendor.
        machine.sh(
            f"{EP} enroll --keys {KEYS} --out {USB}/press-04-identity.json --device-id press-04 "
            "--credstore /etc/credstore.encrypted"
        )
        # 4. Seal for that device, on the vendor's build host.
        seal(tiny_build, vendor, usb, 1)
        # 5. Install: a root tool reading credstore-sealed keys (no private key file exists anywhere).
        assert machine.sh(f"ls {KEYS}").stdout.split() == ["device-identity.json"]
        verified = machine.sh(f"{EP} verify {USB}/tiny-v1 --trust {TRUST} --keys {KEYS}").stdout
        assert "every chunk" in verified
        machine.sh(f"{EP} install {USB}/tiny-v1 --state {STATE} --trust {TRUST} --keys {KEYS}")
        machine.sh(
            f"{EA} init --out {CONFIG} --state-dir {STATE} --trust-dir {TRUST} --key-dir {KEYS} "
            f"--audit-db {STATE}/audit.db --endpoint {ENDPOINT}"
        )
        # CURVE on, with one allow-listed operator key.
        machine.sh(f"{EA} client-keygen --out /root/operator --name operator")
        key = machine.sh("cat /root/operator/client.pub").stdout.strip()
        (root / "etc/edge-appliance/clients.toml").write_text(
            f'[[client]]\nname = "operator"\nkey = "{key}"\nrole = "admin"\n'
        )
        config = root / CONFIG.lstrip("/")
        text = config.read_text()
        config.write_text(
            text.replace("curve = false", "curve = true").replace(
                '# clients = "clients.toml"', 'clients = "clients.toml"'
            )
        )
        # The unit: the file the wheel installed, which must be the repository's byte for byte.
        shipped = (root / VENV.lstrip("/") / "share/edge-appliance" / UNIT).read_bytes()
        assert shipped == (REPO / "systemd" / UNIT).read_bytes()
        machine.sh(f"install -m 0644 {VENV}/share/edge-appliance/{UNIT} /etc/systemd/system/{UNIT}")
        machine.sh("systemctl daemon-reload")
        yield machine, work, vendor, usb
    finally:
        machine.stop()
        shutil.rmtree(root, ignore_errors=True)


def seal(tiny_build, vendor, usb, version: int) -> None:
    run_cli(
        "edge-provision",
        "seal",
        "--model",
        str(tiny_build / "onnx"),
        "--model-id",
        "tiny",
        "--version",
        str(version),
        "--signing-key",
        str(vendor / "vendor-ed25519.key"),
        "--recipient",
        str(usb / "press-04-identity.json"),
        "--out",
        str(usb / f"tiny-v{version}"),
    )


def test_enable_now_reaches_ready_with_status(site):
    machine, *_ = site
    machine.sh(f"systemctl enable --now {UNIT}", timeout=300)  # Type=notify: returns after READY=1
    props = machine.wait_unit(UNIT, serving(1), 60, "the unit never reported serving v1")
    assert props["NRestarts"] == "0"
    journal = machine.sh(f"journalctl -u {UNIT} --no-pager -o cat").stdout
    assert "CURVE on: server key" in journal
    assert "degraded performance" not in journal  # /proc/cpuinfo is visible (no ProcSubset=pid)


def test_ask_answers_over_curve_and_refuses_without_a_key(site):
    machine, *_ = site
    answer = machine.sh(f'{EA} ask "Return the" --max-tokens 8 --json {CURVE}').stdout
    assert json.loads(answer)["type"] == "done"
    refused = machine.sh(f'{EA} ask "Return the" --timeout 2 --retries 1', check=False)
    assert refused.returncode != 0


def test_metrics_op_answers_the_admin_over_curve(site):
    from prometheus_client.parser import text_string_to_metric_families

    machine, *_ = site
    text = machine.sh(f"{EA} metrics {CURVE}").stdout
    families = text_string_to_metric_families(text)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    assert samples[("edge_appliance_requests_total", (("op", "generate"), ("status", "ok")))] >= 1
    assert samples[("edge_appliance_model_version", ())] == 1
    assert samples[("edge_appliance_audit_available", ())] == 1


def test_reload_to_a_new_version_keeps_the_main_pid(site, tiny_build):
    machine, _, vendor, usb = site
    pid = machine.unit(UNIT)["MainPID"]
    seal(tiny_build, vendor, usb, 2)
    # A root install while the service runs: the slot must stay readable by the service's dynamic user.
    machine.sh(f"{EP} install {USB}/tiny-v2 --state {STATE} --trust {TRUST} --keys {KEYS}")
    machine.sh(f"systemctl reload {UNIT}", timeout=300)
    props = machine.wait_unit(UNIT, serving(2), 60, "the reload never reported serving v2")
    assert props["MainPID"] == pid
    info = json.loads(machine.sh(f"{EA} info {CURVE}").stdout)
    assert info["version"] == 2


def test_failed_reload_fails_systemctl_reload_and_keeps_serving(site):
    machine, *_ = site
    pid = machine.unit(UNIT)["MainPID"]
    machine.sh(f"mv {TRUST}/vendor-ed25519.pub /root/")  # the bundle can no longer be verified
    try:
        failed = machine.sh(f"systemctl reload {UNIT}", check=False, timeout=300)
    finally:
        machine.sh(f"mv /root/vendor-ed25519.pub {TRUST}/")
    assert failed.returncode != 0
    props = machine.unit(UNIT)
    assert props["MainPID"] == pid and props["ActiveState"] == "active"
    assert props["StatusText"] == f"reload failed; serving tiny v2 on {ENDPOINT}"
    # journald got it at priority err; info lines stay out of `-p err`.
    errors = machine.sh(f"journalctl -u {UNIT} -p err --no-pager -o cat").stdout
    assert "reload failed, still serving tiny v2" in errors
    assert "ready: listening" not in errors


def test_stopped_daemon_is_killed_by_the_watchdog_and_restarted(site):
    machine, *_ = site
    before = machine.unit(UNIT)
    machine.sh(f"kill -STOP {before['MainPID']}")
    # WatchdogSec=30s as shipped: the kill comes at most 30 s after the last ping, then RestartSec=5s.
    props = machine.wait_unit(
        UNIT,
        lambda p: serving(2)(p) and p["MainPID"] != before["MainPID"],
        150,
        "no watchdog restart after SIGSTOP",
    )
    assert int(props["NRestarts"]) == int(before["NRestarts"]) + 1
    assert "Watchdog timeout" in machine.sh(f"journalctl -u {UNIT} --no-pager").stdout
    assert json.loads(machine.sh(f'{EA} ask "Return the" --max-tokens 4 --json {CURVE}').stdout)["type"] == "done"


def test_restart_loop_recovers_once_the_cause_is_fixed(site):
    machine, *_ = site
    cursor = machine.sh("journalctl -n 0 --show-cursor --no-pager").stdout.split("cursor: ")[-1].strip()
    machine.sh(f"mv {TRUST}/vendor-ed25519.pub /root/ && systemctl restart --no-block {UNIT}")

    def restarts() -> int:
        out = machine.sh(f"journalctl -u {UNIT} --after-cursor='{cursor}' --no-pager -o cat").stdout
        return out.count("Scheduled restart job")

    try:
        machine.wait_until(lambda: restarts() >= 2, 120, "the broken unit is not crash-looping")
    finally:
        machine.sh(f"mv /root/vendor-ed25519.pub {TRUST}/")
    # StartLimitIntervalSec=0: it never gives up, so fixing the cause is enough.
    machine.wait_unit(UNIT, serving(2), 120, "the unit did not come back after the fix")
    errors = machine.sh(f"journalctl -u {UNIT} -p err --no-pager -o cat").stdout
    assert "no trusted vendor keys" in errors


def test_audit_chain_verifies_after_restarts_and_exports(site, tmp_path):
    machine, work, _, usb = site
    for _ in range(3):
        machine.sh(f'{EA} ask "Return the" --max-tokens 4 --json {CURVE}')
    verified = machine.sh(f"{EA} audit verify").stdout  # root tool, key_dir holds the device identity
    assert verified.startswith("OK: ") and "not checked" not in verified
    # The Ed25519 key is read from the credstore by a root tool.
    exported = machine.sh(f"{EA} audit export --to {USB}/audit").stdout
    assert exported.startswith("exported rows 1..")
    # The reviewer verifies the stick on another machine (here: the host), without the daemon.
    check = subprocess.run(
        [
            str(BIN / "edge-appliance"),
            "audit",
            "verify-export",
            str(usb / "audit"),
            "--device-key",
            str(usb / "press-04-identity.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0 and check.stdout.startswith("OK: "), check.stdout + check.stderr


def test_hardening_holds_and_is_scored(site):
    machine, *_ = site
    props = machine.sh(
        f"systemctl show {UNIT} -p IPAddressDeny,IPAddressAllow,MemorySwapMax,TasksMax,PrivateUsers,"
        "RestrictAddressFamilies,LimitCORE"
    ).stdout
    assert "PrivateUsers=yes" in props and "LimitCORE=0" in props
    # Everything the service wrote and every installed slot is owner-only and owned by the service.
    owners = machine.sh("find /var/lib/private/edge-appliance/slots -printf '%u %m\\n' | sort -u").stdout.split("\n")
    assert {line.split()[1] for line in owners if line} <= {"700", "600"}
    assert "root" not in {line.split()[0] for line in owners if line}
    score = machine.sh(f"systemd-analyze security {UNIT} --no-pager", check=False).stdout
    level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", score).group(1))
    print(f"systemd-analyze security {UNIT}: {level}")
    assert level <= 1.2  # 1.5 before AF_NETLINK, PrivateUsers, ~@privileged, IPAddressDeny, MemorySwapMax


def _daemon_rss_mb(machine) -> int:
    pid = machine.unit(UNIT)["MainPID"]
    status = machine.sh(f"cat /proc/{pid}/status").stdout
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) // 1024


def test_a_model_with_external_weights_loads_from_the_stick_and_reloads_do_not_grow(site, tiny_build, external_build):
    """A model laid out as a real-size one (weights in model.onnx.data: borrowed buffers, loading in pieces), served
    by the device installed from the stick alone, then reloaded three times: each previous model is freed (the
    daemon's own `models_retiring` back to 0) and RSS stays within 10 % of the first load's."""
    machine, _, vendor, usb = site
    run_cli(
        "edge-provision", "seal", "--model", str(external_build), "--model-id", "tiny", "--version", "3",
        "--signing-key", str(vendor / "vendor-ed25519.key"), "--recipient", str(usb / "press-04-identity.json"),
        "--out", str(usb / "tiny-v3"),
    )  # fmt: skip
    machine.sh(f"{EP} install {USB}/tiny-v3 --state {STATE} --trust {TRUST} --keys {KEYS}")
    machine.sh(f"systemctl reload {UNIT}", timeout=300)
    machine.wait_unit(UNIT, serving(3), 60, "the reload never reported serving v3")
    manifest = json.loads((machine.root / STATE.lstrip("/") / "current" / "manifest.json").read_text())
    assert "model.onnx.data" in json.dumps(manifest["files"])  # the external-data layout, sealed and installed

    def served_and_freed() -> int:
        assert json.loads(machine.sh(f'{EA} ask "Return the" --max-tokens 4 --json {CURVE}').stdout)["type"] == "done"
        machine.wait_until(
            lambda: json.loads(machine.sh(f"{EA} health {CURVE}").stdout)["models_retiring"] == 0,
            30,
            "a previous model is still held after the reload",
        )
        return _daemon_rss_mb(machine)

    first = served_and_freed()
    sizes = [first]
    for _ in range(3):
        machine.sh(f"systemctl reload {UNIT}", timeout=300)
        sizes.append(served_and_freed())
    print(f"daemon RSS after the v3 load and after each of three reloads: {sizes} MB")
    assert max(sizes) <= 1.10 * first, sizes


HTTP_UNIT = "edge-appliance-http.service"
OPENAI_CHAT = """
import sys
import openai
client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=sys.argv[1], max_retries=0, timeout=60)
try:
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Return the"}], max_tokens=4,
        extra_body={"ignore_eos": True},
    )
except openai.AuthenticationError:
    print("401")
else:
    print(reply.choices[0].finish_reason)
"""


def _openai_in_the_device(machine, key: str) -> str:
    """The official openai client (the host's), run in the device's network namespace: only its loopback."""
    proc = subprocess.run(
        ["nsenter", "-t", str(machine.leader), "-n", "--", str(BIN / "python"), "-c", OPENAI_CHAT, key],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


def _mint(machine, name: str) -> tuple[str, str]:
    out = machine.sh(f"{EA} http-keygen --name {name}")
    key = next(line.strip() for line in out.stderr.splitlines() if line.strip().startswith("ea-"))
    return key, out.stdout.split("\n", 1)[1]  # the key, and its entry without the comment line


def test_the_gateway_unit_from_the_wheel_serves_revokes_and_comes_back_with_the_daemon(site):
    """docs/HTTP.md's set-up, verbatim where it runs on a device: the gateway's CURVE key allow-listed with role
    gateway and sealed with systemd-creds, API keys, the daemon's public identity where the gateway can read it,
    the unit installed from the wheel. Then a request with the official openai client, a key revoked with
    `systemctl reload` (refused right after, the other key still served), and the gateway back after the daemon
    restarts."""
    machine, *_ = site
    entry = machine.sh(f"{EA} client-keygen --out /root/gateway --name http-gateway --role gateway").stdout
    clients = machine.root / "etc/edge-appliance/clients.toml"
    clients.write_text(clients.read_text() + "\n" + entry[entry.index("[[client]]") :])
    machine.sh(
        "systemd-creds encrypt --name=gateway-curve.key /root/gateway/client.key "
        "/etc/credstore.encrypted/gateway-curve.key"
    )
    kept, kept_entry = _mint(machine, "ehr-plugin")
    revoked, revoked_entry = _mint(machine, "old-integration")
    keys = machine.root / "etc/edge-appliance/http-keys.toml"
    keys.write_text(kept_entry + revoked_entry)
    machine.sh(f"install -m 0644 {KEYS}/device-identity.json /etc/edge-appliance/device-identity.json")
    config = machine.root / CONFIG.lstrip("/")
    config.write_text(
        config.read_text()
        .replace('# keys = "http-keys.toml"', 'keys = "http-keys.toml"')
        .replace('# client_key = "credentials/gateway.key"', 'client_key = "gateway-curve.key"')
        .replace('# server_key = "device-identity.json"', 'server_key = "device-identity.json"')
    )
    shipped = machine.root / VENV.lstrip("/") / "share/edge-appliance" / HTTP_UNIT
    assert shipped.read_bytes() == (REPO / "systemd" / HTTP_UNIT).read_bytes()
    machine.sh(f"install -m 0644 {VENV}/share/edge-appliance/{HTTP_UNIT} /etc/systemd/system/{HTTP_UNIT}")
    machine.sh("systemctl daemon-reload")
    machine.sh(f"systemctl restart {UNIT}", timeout=300)  # the allow-list is read at start
    machine.wait_unit(UNIT, serving(3), 120, "the daemon did not come back with the gateway allow-listed")
    machine.sh(f"systemctl enable --now {HTTP_UNIT}", timeout=300)  # Type=notify: after the daemon accepted it
    props = machine.sh(f"systemctl show {HTTP_UNIT} -p PrivateUsers,TasksMax,MemoryMax,PrivateMounts").stdout
    assert "PrivateUsers=yes" in props and "TasksMax=256" in props and "PrivateMounts=yes" in props, props
    score = machine.sh(f"systemd-analyze security {HTTP_UNIT} --no-pager", check=False).stdout
    level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", score).group(1))
    print(f"systemd-analyze security {HTTP_UNIT}: {level}")
    assert level <= 1.2  # 1.7 before PrivateUsers, ~@privileged, PrivateMounts, TasksMax, MemoryMax
    assert _openai_in_the_device(machine, kept) == "length"
    assert _openai_in_the_device(machine, revoked) == "length"

    keys.write_text(kept_entry)  # revoke old-integration
    cursor = machine.sh("journalctl -n 0 --show-cursor --no-pager").stdout.split("cursor: ")[-1].strip()
    machine.sh(f"systemctl reload {HTTP_UNIT}")  # ExecReload= through edge-appliance http-reload: no kill(1) here
    machine.wait_until(
        lambda: (
            "reloaded 1 API key(s)"
            in machine.sh(f"journalctl -u {HTTP_UNIT} --after-cursor='{cursor}' --no-pager -o cat").stdout
        ),
        30,
        "the gateway did not re-read its key file",
    )
    assert _openai_in_the_device(machine, revoked) == "401"
    assert _openai_in_the_device(machine, kept) == "length"

    before = machine.unit(HTTP_UNIT)["MainPID"]
    machine.sh(f"systemctl restart {UNIT}", timeout=300)  # BindsTo= stops the gateway; WantedBy= starts it again
    machine.wait_unit(
        HTTP_UNIT,
        lambda p: p["ActiveState"] == "active" and p["SubState"] == "running" and p["MainPID"] != before,
        120,
        "the gateway did not come back after the daemon restarted",
    )
    assert _openai_in_the_device(machine, kept) == "length"
