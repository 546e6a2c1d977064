"""The root of every error the appliance reports to an operator.

Each subsystem raises its own subclass with a one-line message saying what failed and what to do;
``edge-appliance`` prints that line and exits non-zero, so no startup error shows a traceback.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """An operator-facing failure: the message is the whole diagnostic."""
