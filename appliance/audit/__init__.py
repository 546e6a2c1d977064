"""The tamper-evident audit trail: hash chain and signed checkpoints (``chain``), sealed content,
the group-commit writer, schema migrations, offline export and the ``audit`` CLI."""

from appliance.audit.chain import GENESIS, AuditError, AuditLog, Entry, Filters, row_hash

__all__ = ["GENESIS", "AuditError", "AuditLog", "Entry", "Filters", "row_hash"]
