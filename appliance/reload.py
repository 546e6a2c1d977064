"""``systemctl reload`` that reports the outcome: signal the daemon, wait for its answer.

The daemon writes the result of every reload to ``STATUS_FILE`` in its state directory (atomically,
with its pid and a generation counter). ``edge-appliance reload`` (the unit's ``ExecReload=``) sends
SIGHUP, waits for a newer generation from that pid, and exits non-zero when the new bundle did not
load, so ``systemctl reload`` fails instead of reporting success while the old model keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError

STATUS_FILE = ".reload-status.json"


class ReloadError(ApplianceError):
    """The reload could not be requested or did not complete."""


@dataclass(frozen=True)
class ReloadStatus:
    pid: int
    generation: int
    ok: bool
    message: str


def publish(state_dir: Path, status: ReloadStatus) -> None:
    """Daemon side: replace the status file in one rename, so a reader never sees half of it."""
    path = Path(state_dir) / STATUS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status.__dict__))
    os.replace(tmp, path)


def read(state_dir: Path) -> ReloadStatus | None:
    try:
        return ReloadStatus(**json.loads((Path(state_dir) / STATUS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def request(state_dir: Path, pid: int, timeout_s: float, poll_s: float = 0.05) -> ReloadStatus:
    """Send SIGHUP to ``pid`` and return the status of the reload it triggered."""
    before = read(state_dir)
    seen = before.generation if before is not None and before.pid == pid else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ReloadError(f"no daemon with pid {pid}; is edge-appliance running?") from None
    except PermissionError:
        raise ReloadError(f"not allowed to signal pid {pid}; run as root or as the service user") from None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = read(state_dir)
        if status is not None and status.pid == pid and status.generation > seen:
            return status
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise ReloadError(f"the daemon (pid {pid}) exited during the reload; see its log") from None
        time.sleep(poll_s)  # the daemon answers through a file: poll it, bounded by the deadline
    raise ReloadError(f"no answer from the daemon within {timeout_s:.0f}s; see journalctl -u edge-appliance")
