"""The audit database's tables: the schema's single source of truth (see docs/AUDIT.md).

``SCHEMA_VERSION`` is the version a new database is created at; ``migrations.upgrade`` brings an
older one up to it step by step. ``CHAINED_FIELDS`` and ``OPTIONAL_CHAINED`` are the columns the
hash chain covers (``chain.canonical``); ``ROW_FIELDS`` is a whole row as verified and exported.
"""

from __future__ import annotations

from sqlalchemy import Float, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from appliance.errors import ApplianceError

SCHEMA_VERSION = 7
POLICIES = ("hash", "encrypted", "none")


class AuditError(ApplianceError):
    """The audit store cannot be written or read; the daemon refuses service until it can."""


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "audit_meta"
    key: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class AuditRecord(Base):
    __tablename__ = "audit_log"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    client: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    op: Mapped[str] = mapped_column(String(16))
    model_id: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[int | None] = mapped_column(Integer, index=True)
    prompt_sha256: Mapped[str | None] = mapped_column(String(64))
    output_sha256: Mapped[str | None] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    queue_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), index=True)
    error_code: Mapped[str | None] = mapped_column(String(32))
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    # schema 2: sealed content (policy "encrypted") and the key it is sealed under
    content_key_id: Mapped[int | None] = mapped_column(Integer)
    prompt_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    output_sealed: Mapped[bytes | None] = mapped_column(LargeBinary)
    # schema 3: 1 when the reply came from the response cache (NULL otherwise)
    cache_hit: Mapped[int | None] = mapped_column(Integer)
    # schema 5: how many identical events this row stands for (NULL = 1; see audit/aggregate.py)
    occurrences: Mapped[int | None] = mapped_column(Integer)
    # schema 6: the output constraint a generate request carried (kind, sha256 of kind and source); NULL: none
    constraint_kind: Mapped[str | None] = mapped_column(String(16))
    constraint_sha256: Mapped[str | None] = mapped_column(String(64))
    # schema 7: what drafted for the request (ngram, draft, grammar, ngram+grammar…); NULL: it was not speculative
    speculative: Mapped[str | None] = mapped_column(String(16))
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64), unique=True)


class ContentKey(Base):
    """Per-run content keys, stored only wrapped for the export recipient."""

    __tablename__ = "audit_content_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created: Mapped[float] = mapped_column(Float)
    recipient: Mapped[str] = mapped_column(String(64))
    wrapped: Mapped[str] = mapped_column(String(512))


class Checkpoint(Base):
    __tablename__ = "audit_checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    upto_seq: Mapped[int] = mapped_column(Integer, index=True)
    head_hash: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)
    signature: Mapped[str] = mapped_column(String(128))
    # schema 4: checkpoint_hash of the previous checkpoint (NULL on checkpoints written before)
    prev_checkpoint: Mapped[str | None] = mapped_column(String(64))


class Export(Base):
    __tablename__ = "audit_exports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    from_seq: Mapped[int] = mapped_column(Integer)
    to_seq: Mapped[int] = mapped_column(Integer)
    head_hash: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)
    name: Mapped[str] = mapped_column(String(128))


# Schema-1 fields are always part of the canonical encoding; schema-2 fields only when set, so
# rows written before a migration keep the hashes they were written with.
CHAINED_FIELDS = (
    "seq",
    "ts",
    "request_id",
    "client",
    "role",
    "op",
    "model_id",
    "model_version",
    "prompt_sha256",
    "output_sha256",
    "prompt_tokens",
    "completion_tokens",
    "queue_ms",
    "ttft_ms",
    "total_ms",
    "status",
    "error_code",
    "finish_reason",
)
OPTIONAL_CHAINED = (
    "content_key_id",
    "prompt_sealed",
    "output_sealed",
    "cache_hit",
    "occurrences",
    "constraint_kind",
    "constraint_sha256",
    "speculative",
)
ROW_FIELDS = CHAINED_FIELDS + OPTIONAL_CHAINED + ("prev_hash", "row_hash")
