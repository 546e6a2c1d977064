"""Structured logging: one JSON object per line (journald/ELK friendly) or readable text.

Under systemd every record reaches journald with its syslog priority, so ``journalctl -p err``
shows the daemon's errors: through systemd-python's ``JournalHandler`` when it is installed (extra
``systemd``), else as a ``<N>`` prefix on each stderr line, which journald strips and uses as the
priority (``SyslogLevelPrefix=``, on by default). Off journald (a terminal) lines carry no prefix.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

try:  # systemd-python, when installed; the <N> prefix below gives journald the same priorities
    from systemd.journal import JournalHandler  # type: ignore[import-not-found]
except ImportError:
    JournalHandler = None

# logging level -> syslog priority (journald's PRIORITY=)
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def syslog_priority(levelno: int) -> int:
    return next((p for lvl, p in sorted(PRIORITIES.items(), reverse=True) if levelno >= lvl), 7)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class PriorityPrefix(logging.Formatter):
    """Prefix every line of a record with ``<N>`` so journald files a traceback's lines at its priority."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def stderr_is_journal() -> bool:
    """systemd sets ``JOURNAL_STREAM=dev:ino`` when stderr is connected to journald."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def error_prefix() -> str:
    """For a CLI's one-line error on stderr: journald files it at priority err."""
    return "<3>" if stderr_is_journal() else ""


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
    on_journal = stderr_is_journal()
    if on_journal and JournalHandler is not None:
        handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="edge-appliance")
    else:
        handler = logging.StreamHandler(sys.stderr)
        if on_journal:
            formatter = PriorityPrefix(formatter)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
