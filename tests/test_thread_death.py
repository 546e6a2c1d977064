"""A daemon whose audit writer or engine thread dies exits non-zero with one line, so systemd restarts it; before,
its loop kept pinging the watchdog while every request waited forever for an audit commit that never came."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from appliance.transport.client import Client, ClientError
from tests.conftest import provision_device

# The fault is injected from outside the product: a wrapper that breaks one method, then runs the real CLI.
WRAPPER = """
import sys
from appliance.audit import writer
from appliance.serving import scheduler

def broken(*args, **kwargs):
    raise RuntimeError("injected fault")

if sys.argv[1] == "writer":
    writer.AuditWriter._commit = broken
else:
    scheduler.Scheduler.schedule = broken  # outside the runner's per-step fault handling: the thread ends
from appliance.cli import main
sys.exit(main(["--config", sys.argv[2], "serve"]))
"""


@pytest.mark.parametrize(("which", "name"), [("writer", "audit writer"), ("engine", "engine")])
def test_a_dead_worker_thread_stops_the_daemon_with_one_line(tiny_build, tmp_path, which, name):
    device = provision_device(tiny_build, tmp_path / "site")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, which, str(device.config)],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, NOTIFY_SOCKET=""),
    )
    try:
        with Client(device.endpoint, timeout_s=5, retries=1) as client, pytest.raises(ClientError):
            client.complete("Return the", max_tokens=4)  # never completes: the thread it needs is gone
        assert proc.wait(timeout=60) == 1
        err = proc.stderr.read()
        assert f"edge-appliance: error: the {name} thread stopped unexpectedly" in err, err[-3000:]
        assert "injected fault" in err  # the thread's own traceback is in the log above the line
    finally:
        proc.kill()
