"""The audit log: one row per request in SQLite (WAL) through SQLAlchemy 2. Schema: docs/AUDIT.md.

Rows are hash-chained: ``row_hash = SHA-256(prev_hash || canonical JSON of the row's fields)``,
so editing, deleting, inserting or reordering rows breaks the chain at that row. Prompts and
outputs are stored only as SHA-256 digests. A row is committed (fsync'd, ``synchronous=FULL``)
before the request's final reply is sent.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Float, Integer, String, create_engine, event, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

SCHEMA_VERSION = 1
GENESIS = "0" * 64


class AuditError(Exception):
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
    client: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    op: Mapped[str] = mapped_column(String(16))
    model_id: Mapped[str | None] = mapped_column(String(128))
    model_version: Mapped[int | None] = mapped_column(Integer)
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
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64), unique=True)


CHAINED_FIELDS = ("seq", "ts", "request_id", "client", "role", "op", "model_id", "model_version", "prompt_sha256",
                  "output_sha256", "prompt_tokens", "completion_tokens", "queue_ms", "ttft_ms", "total_ms", "status",
                  "error_code", "finish_reason")


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def row_hash(prev_hash: str, fields: dict) -> str:
    canonical = json.dumps({k: fields.get(k) for k in CHAINED_FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical.encode()).hexdigest()


@dataclass
class Entry:
    """What the daemon knows about a request when it is audited (digests computed here)."""

    request_id: str
    op: str
    status: str
    client: str = "anonymous"
    role: str = "infer"
    model_id: str | None = None
    model_version: int | None = None
    prompt: str | None = None
    output: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    error_code: str | None = None
    finish_reason: str | None = None


class AuditLog:
    """Append-only writer and reader of the audit database. Thread-safe (one writer lock)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{self.path}", connect_args={"check_same_thread": False})
        event.listen(self.engine, "connect", _sqlite_pragmas)
        self._lock = threading.Lock()
        try:
            Base.metadata.create_all(self.engine)
            with Session(self.engine) as s, s.begin():
                if s.get(Meta, "schema_version") is None:
                    s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            self._head = self._load_head()
        except SQLAlchemyError as exc:
            raise AuditError(f"cannot open audit database {self.path}: {exc.orig or exc}") from None

    def _load_head(self) -> tuple[int, str]:
        with Session(self.engine) as s:
            last = s.scalars(select(AuditRecord).order_by(AuditRecord.seq.desc()).limit(1)).first()
            return (last.seq, last.row_hash) if last else (0, GENESIS)

    def record(self, entry: Entry) -> AuditRecord:
        """Append one chained row and commit it durably before returning."""
        fields = {
            "ts": round(time.time(), 6), "request_id": entry.request_id, "client": entry.client, "role": entry.role,
            "op": entry.op, "model_id": entry.model_id, "model_version": entry.model_version,
            "prompt_sha256": sha256_text(entry.prompt), "output_sha256": sha256_text(entry.output),
            "prompt_tokens": entry.prompt_tokens, "completion_tokens": entry.completion_tokens,
            "queue_ms": _ms(entry.queue_ms), "ttft_ms": _ms(entry.ttft_ms), "total_ms": _ms(entry.total_ms),
            "status": entry.status, "error_code": entry.error_code, "finish_reason": entry.finish_reason,
        }
        with self._lock:
            seq, prev = self._head
            fields["seq"] = seq + 1
            row = AuditRecord(**fields, prev_hash=prev, row_hash=row_hash(prev, fields))
            try:
                with Session(self.engine, expire_on_commit=False) as s, s.begin():
                    s.add(row)
            except SQLAlchemyError as exc:
                raise AuditError(f"audit write failed ({exc.orig or exc})") from None
            self._head = (row.seq, row.row_hash)
        return row

    def rows(self, limit: int | None = None, status: str | None = None) -> list[AuditRecord]:
        with Session(self.engine) as s:
            query = select(AuditRecord).order_by(AuditRecord.seq)
            if status:
                query = query.where(AuditRecord.status == status)
            if limit:
                query = query.order_by(None).order_by(AuditRecord.seq.desc()).limit(limit)
            rows = list(s.scalars(query))
        return sorted(rows, key=lambda r: r.seq)

    def verify(self) -> tuple[bool, str]:
        """Walk the chain from the first row; returns (ok, message naming the first bad row)."""
        prev, expected_seq = GENESIS, 1
        for row in self.rows():
            fields = {k: getattr(row, k) for k in CHAINED_FIELDS}
            if row.seq != expected_seq:
                return False, f"row {expected_seq} is missing (next present row is {row.seq}): deleted"
            if row.prev_hash != prev:
                return False, f"row {row.seq}: prev_hash does not match row {row.seq - 1}: inserted or reordered"
            if row.row_hash != row_hash(prev, fields):
                return False, f"row {row.seq}: contents do not match its hash: edited"
            prev, expected_seq = row.row_hash, expected_seq + 1
        return True, f"{expected_seq - 1} rows, chain intact, head {prev[:16]}"

    def close(self) -> None:
        self.engine.dispose()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()
