"""The root of every build-side error ``edge-models`` reports to an operator as one line.

Each module raises ``EdgeModelsError`` or a subclass with a message saying what failed and what to do.
Anything else reaching the CLI is a bug: it prints the traceback and asks for a report.
"""

from __future__ import annotations


class EdgeModelsError(Exception):
    """An expected build failure: the message is the whole diagnostic."""


class ExportError(EdgeModelsError):
    """A checkpoint cannot be exported as asked, or its export does not match transformers."""
