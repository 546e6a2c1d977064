"""journald priorities: `<N>` prefixes only when stderr is the journal stream, so `journalctl -p err` works."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from appliance.logs import syslog_priority

SCRIPT = (
    "import logging, sys; from appliance.logs import setup_logging; setup_logging('info', sys.argv[1]);"
    "log = logging.getLogger('t'); log.info('hello'); log.warning('careful'); log.error('broken\\nsecond line')"
)


def run(fmt: str, journal: bool, tmp_path) -> list[str]:
    err = tmp_path / f"stderr-{fmt}-{journal}"
    with open(err, "wb") as f:
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:  # what systemd sets when stderr is connected to journald: that stream's dev:ino
            st = os.fstat(f.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", SCRIPT, fmt], stderr=f, env=env, check=True, timeout=60)
    return err.read_text().splitlines()


def test_priorities_follow_syslog():
    assert [syslog_priority(lvl) for lvl in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR)] == [
        7,
        6,
        4,
        3,
    ]
    assert syslog_priority(logging.CRITICAL) == 2


def test_journal_stream_gets_a_priority_on_every_line(tmp_path):
    lines = run("json", journal=True, tmp_path=tmp_path)
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]  # json escapes the newline: one line
    text = run("text", journal=True, tmp_path=tmp_path)
    assert [line[:3] for line in text] == ["<6>", "<4>", "<3>", "<3>"]  # a multi-line record keeps its priority


def test_terminal_gets_no_prefix(tmp_path):
    lines = run("text", journal=False, tmp_path=tmp_path)
    assert lines and not any(line.startswith("<") for line in lines)
