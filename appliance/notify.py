"""systemd notification: READY=1, WATCHDOG=1, STATUS=, STOPPING=1.

Uses systemd-python when installed, else speaks the ``NOTIFY_SOCKET`` datagram protocol itself
(a unix datagram per message; a leading ``@`` means the abstract namespace).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("appliance.notify")


try:  # systemd-python, when installed (extra "systemd"); the fallback below speaks the same protocol
    from systemd.daemon import notify as _sd_notify  # type: ignore[import-not-found]
except ImportError:
    _sd_notify = None


class Notifier:
    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET")
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        owned = pid is None or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec and usec.isdigit() and owned else None
        self._last_ping = 0.0

    def send(self, message: str) -> None:
        if not self.address:
            return
        if _sd_notify is not None:
            _sd_notify(message)
            return
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        # Never block the serving loop on a slow or absent reader: a dropped ping is retried next interval.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            try:
                sock.sendto(message.encode(), addr)
            except (BlockingIOError, ConnectionRefusedError, FileNotFoundError) as exc:
                log.debug("sd_notify %r not delivered: %s", message.split("\n")[0], exc)

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self, now: float | None = None) -> None:
        """Ping the watchdog at half its interval; called from the serving loop."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_ping >= self.watchdog_interval:
            self.send("WATCHDOG=1")
            self._last_ping = now
