"""A Debian bookworm machine booted under its own systemd with systemd-nspawn, for the acceptance boot.

The root is built once with debootstrap and cached under ``build/acceptance/``; each run boots a
fresh copy of it with ``--private-network`` (loopback only: nothing can be fetched inside). The
host's PID 1 need not be systemd (``--register=no --keep-unit``); commands run inside through
``nsenter`` into the container's PID 1, as root, with a clean environment.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "acceptance"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What the stick's installer and the unit need on a minimal device: python3 -m venv, systemd (PID 1,
# systemd-creds, journald), dbus (systemd-analyze security asks the manager over the bus).
PACKAGES = ("systemd", "dbus", "python3", "python3-venv")
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def missing_tools() -> list[str]:
    return [t for t in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(t) is None]


def cached_root() -> Path:
    """The debootstrapped root, built on first use; the stamp names the package set it was built with."""
    root = CACHE / SUITE
    stamp = CACHE / f"{SUITE}.packages"
    wanted = " ".join(PACKAGES)
    if root.is_dir() and stamp.is_file() and stamp.read_text() == wanted:
        return root
    tmp = CACHE / f"{SUITE}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tmp), MIRROR],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"debootstrap failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    os.replace(tmp, root)
    stamp.write_text(wanted)
    return root


class Machine:
    """One booted container; ``root`` is its filesystem as seen from the host."""

    def __init__(self, root: Path, log: Path):
        self.root = root
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.nspawn = subprocess.Popen(
            [
                "systemd-nspawn",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--console=read-only",
                "-D",
                str(root),
                "--boot",
            ],
            env=dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1"),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.leader = self._find_leader(timeout=60)
        self.wait_until(
            lambda: self.sh("systemctl is-system-running", check=False).stdout.strip() in ("running", "degraded"),
            120,
            "the container's systemd never finished booting",
        )

    def _find_leader(self, timeout: float) -> int:
        """The container's PID 1 is systemd-nspawn's child process (as the host numbers it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.boot_log()}")
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            try:
                pids = children.read_text().split()
            except OSError:
                pids = []
            for pid in pids:
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        return int(pid)
                except OSError:
                    continue
            time.sleep(0.05)
        raise RuntimeError(f"no container init under systemd-nspawn within {timeout}s:\n{self.boot_log()}")

    def boot_log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def sh(self, command: str, *, check: bool = True, timeout: float = 300, input: str | None = None):
        """Run ``command`` with ``sh -c`` inside the container as root."""
        proc = subprocess.run(
            [
                "nsenter",
                "-t",
                str(self.leader),
                "-a",
                "env",
                "-i",
                *(f"{k}={v}" for k, v in ENV.items()),
                "sh",
                "-c",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in the container: {command!r} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def unit(self, name: str) -> dict[str, str]:
        """``systemctl show`` properties the test synchronises on."""
        out = self.sh(f"systemctl show {name} -p ActiveState,SubState,StatusText,MainPID,NRestarts,Result").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_unit(self, name: str, predicate, timeout: float, what: str) -> dict[str, str]:
        """Poll the unit's state until ``predicate(props)`` holds; fail with the journal if it never does."""
        last: dict[str, str] = {}

        def check() -> bool:
            nonlocal last
            last = self.unit(name)
            return predicate(last)

        try:
            self.wait_until(check, timeout, what)
        except AssertionError:
            journal = self.sh(f"journalctl -u {name} --no-pager -n 60", check=False).stdout
            raise AssertionError(f"{what}: last state {last}\n{journal}") from None
        return last

    @staticmethod
    def wait_until(condition, timeout: float, what: str, poll: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(poll)  # polling systemd's state with a deadline: the event is the state change
        raise AssertionError(f"{what} (waited {timeout:.0f}s)")

    def stop(self) -> None:
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()
        self._log.close()
