"""Schema versions of the audit database and the in-place upgrades between them.

The version lives in ``audit_meta.schema_version``. Each step runs in one transaction, so a
failed upgrade leaves the database at the previous version with every row intact. Rows keep the
hashes they were written with (the chain encoding only adds fields that are set).
"""

from __future__ import annotations

import logging

from sqlalchemy import inspect, text

from appliance.audit.schema import SCHEMA_VERSION, AuditError, Base

log = logging.getLogger("appliance.audit")


def _v1_to_v2(conn) -> None:
    """Sealed content columns, indexes for list filters; new tables are created by ``create_all``."""
    for column, kind in (("content_key_id", "INTEGER"), ("prompt_sealed", "BLOB"), ("output_sealed", "BLOB")):
        conn.execute(text(f"ALTER TABLE audit_log ADD COLUMN {column} {kind}"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_audit_log_client ON audit_log (client)"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_audit_log_model_version ON audit_log (model_version)"))


def _v2_to_v3(conn) -> None:
    """Response-cache hits are marked (NULL on every earlier row, so their hashes are unchanged)."""
    conn.execute(text("ALTER TABLE audit_log ADD COLUMN cache_hit INTEGER"))


def _v3_to_v4(conn) -> None:
    """Checkpoints are chained: each signs the previous one's hash. Earlier checkpoints keep their
    unchained signatures (NULL link); the first new checkpoint links to the last of them. A prune
    anchor from schema 3 cannot be signed here (no key, and signing it would launder a forged one):
    ``verify`` reports it as unsigned until the next ``prune``."""
    # A schema-1 database gets the checkpoint table from ``create_all`` at step 1 -> 2, already with the column.
    if "prev_checkpoint" not in {c["name"] for c in inspect(conn).get_columns("audit_checkpoints")}:
        conn.execute(text("ALTER TABLE audit_checkpoints ADD COLUMN prev_checkpoint VARCHAR(64)"))


def _v4_to_v5(conn) -> None:
    """Aggregated events carry their count (NULL on every earlier row: one event each, hashes unchanged)."""
    if "occurrences" not in {c["name"] for c in inspect(conn).get_columns("audit_log")}:
        conn.execute(text("ALTER TABLE audit_log ADD COLUMN occurrences INTEGER"))


def _v5_to_v6(conn) -> None:
    """Output constraints are recorded (NULL on every earlier row: none, hashes unchanged)."""
    present = {c["name"] for c in inspect(conn).get_columns("audit_log")}
    for column, kind in (("constraint_kind", "VARCHAR(16)"), ("constraint_sha256", "VARCHAR(64)")):
        if column not in present:
            conn.execute(text(f"ALTER TABLE audit_log ADD COLUMN {column} {kind}"))


def _v6_to_v7(conn) -> None:
    """Speculative decoding is recorded (NULL on every earlier row: not used, hashes unchanged)."""
    if "speculative" not in {c["name"] for c in inspect(conn).get_columns("audit_log")}:
        conn.execute(text("ALTER TABLE audit_log ADD COLUMN speculative VARCHAR(16)"))


STEPS = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4, 4: _v4_to_v5, 5: _v5_to_v6, 6: _v6_to_v7}


def upgrade(engine) -> None:
    """Create a new database at the current version, or upgrade an existing one step by step."""
    with engine.begin() as conn:
        tables = set(inspect(conn).get_table_names())
        if "audit_log" not in tables:
            Base.metadata.create_all(conn)
            conn.execute(
                text("INSERT INTO audit_meta (key, value) VALUES ('schema_version', :v)"), {"v": str(SCHEMA_VERSION)}
            )
            return
        row = conn.execute(text("SELECT value FROM audit_meta WHERE key = 'schema_version'")).first()
        version = int(row[0]) if row else 1
    if version > SCHEMA_VERSION:
        raise AuditError(
            f"audit database schema {version} is newer than this software understands "
            f"({SCHEMA_VERSION}); upgrade the appliance software"
        )
    while version < SCHEMA_VERSION:
        with engine.begin() as conn:
            STEPS[version](conn)
            Base.metadata.create_all(conn)
            conn.execute(text("UPDATE audit_meta SET value = :v WHERE key = 'schema_version'"), {"v": str(version + 1)})
        log.info("audit database upgraded from schema %d to %d", version, version + 1)
        version += 1
