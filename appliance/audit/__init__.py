"""The tamper-evident audit trail: the tables (``schema``), hash chain and verification (``chain``),
signed checkpoints (``checkpoints``), the SQLAlchemy store (``store``), sealed content, the
group-commit writer, schema migrations, offline export and the ``audit`` CLI."""

from appliance.audit.chain import row_hash
from appliance.audit.checkpoints import GENESIS
from appliance.audit.schema import AuditError
from appliance.audit.store import AuditLog, Entry, Filters

__all__ = ["GENESIS", "AuditError", "AuditLog", "Entry", "Filters", "row_hash"]
