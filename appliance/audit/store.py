"""The audit store: the SQLAlchemy writer, query and verification entry point over the schema.

SQLAlchemy 2 over SQLite in WAL mode with ``synchronous=FULL``: a row is on disk before the
request's final reply is sent. Each row is chained (``chain.row_hash``) and every
``checkpoint_every`` rows the chain head is signed (``checkpoints``) in the same transaction.
Prompts and outputs are stored per the content policy: ``hash`` (digests only, default),
``encrypted`` (AES-256-GCM under a per-run audit key wrapped for the export recipient; the device
keeps no key that opens them) or ``none`` (nothing about content).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from sqlalchemy import create_engine, event, insert, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from appliance.audit.chain import VerifyResult, checkpoint_dict, row_hash, sha256_text, verify_rows
from appliance.audit.checkpoints import GENESIS, Anchor, checkpoint_hash, sign_checkpoint
from appliance.audit.content import ContentSealer
from appliance.audit.migrations import upgrade
from appliance.audit.schema import (
    OPTIONAL_CHAINED,
    POLICIES,
    ROW_FIELDS,
    AuditError,
    AuditRecord,
    Checkpoint,
    Meta,
)

log = logging.getLogger("appliance.audit")


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
    queue_s: float | None = None  # seconds (the database columns hold milliseconds)
    ttft_s: float | None = None
    total_s: float | None = None
    error_code: str | None = None
    finish_reason: str | None = None
    cache_hit: bool = False  # answered from the response cache, no model run
    occurrences: int = 1  # identical events this row stands for (aggregated refusals)
    constraint_kind: str | None = None  # json_schema, json, regex, grammar or choice
    constraint_sha256: str | None = None  # the constraint's digest (protocol.Constraint.digest)
    speculative: str | None = None  # the drafter, when speculative decoding drafted for the request


@dataclass
class Filters:
    since: float | None = None
    until: float | None = None
    client: str | None = None
    status: str | None = None
    model_version: int | None = None
    limit: int | None = None


class AuditLog:
    """Append-only writer and reader of the audit database. Thread-safe (one writer lock)."""

    def __init__(
        self,
        path: Path,
        *,
        content: str = "hash",
        recipient: X25519PublicKey | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        checkpoint_every: int = 100,
    ):
        if content not in POLICIES:
            raise AuditError(f"audit content policy {content!r} unknown; use one of {', '.join(POLICIES)}")
        if content == "encrypted" and recipient is None:
            raise AuditError("audit content policy 'encrypted' needs [audit] recipient (the reviewer's X25519 key)")
        self.path = Path(path)
        self.content = content
        self.signing_key = signing_key
        self.checkpoint_every = checkpoint_every
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{self.path}", connect_args={"check_same_thread": False})
        event.listen(self.engine, "connect", _sqlite_pragmas)
        self._lock = threading.Lock()
        try:
            upgrade(self.engine)
            self._head = self._load_head()
            self._last_checkpoint = self._load_last_checkpoint()
            self._sealer = ContentSealer.start(self.engine, recipient) if content == "encrypted" else None
        except SQLAlchemyError as exc:
            raise AuditError(f"cannot open audit database {self.path}: {exc.orig or exc}") from None

    def _load_head(self) -> tuple[int, str]:
        with Session(self.engine) as s:
            last = s.scalars(select(AuditRecord).order_by(AuditRecord.seq.desc()).limit(1)).first()
            if last:
                return last.seq, last.row_hash
            anchor = self.anchor(s)
            return (anchor.seq, anchor.row_hash) if anchor else (0, GENESIS)

    def _load_last_checkpoint(self) -> str:
        with Session(self.engine) as s:
            last = s.scalars(select(Checkpoint).order_by(Checkpoint.upto_seq.desc()).limit(1)).first()
            if last:
                return checkpoint_hash(checkpoint_dict(last))
            anchor = self.anchor(s)
            return anchor.checkpoint if anchor else GENESIS

    @staticmethod
    def anchor(s: Session) -> Anchor | None:
        """After pruning: the signed position where verification starts (see ``checkpoints.Anchor``)."""
        meta = {m.key: m.value for m in s.scalars(select(Meta).where(Meta.key.startswith("anchor_")))}
        if "anchor_seq" not in meta:
            return None
        return Anchor(
            seq=int(meta["anchor_seq"]),
            row_hash=meta.get("anchor_hash", ""),
            checkpoint=meta.get("anchor_checkpoint", GENESIS),
            exported_to=int(meta.get("anchor_exported_to", meta["anchor_seq"])),
            ts=float(meta.get("anchor_ts", 0)),
            signature=meta.get("anchor_signature"),
        )

    @staticmethod
    def set_anchor(s: Session, anchor: Anchor) -> None:
        for key, value in (
            ("seq", anchor.seq),
            ("hash", anchor.row_hash),
            ("checkpoint", anchor.checkpoint),
            ("exported_to", anchor.exported_to),
            ("ts", anchor.ts),
            ("signature", anchor.signature),
        ):
            s.merge(Meta(key=f"anchor_{key}", value=str(value)))

    # -- writing -------------------------------------------------------------------------------
    def _fields(self, entry: Entry) -> dict:
        fields = {
            "ts": round(time.time(), 6),
            "request_id": entry.request_id,
            "client": entry.client,
            "role": entry.role,
            "op": entry.op,
            "model_id": entry.model_id,
            "model_version": entry.model_version,
            "prompt_tokens": entry.prompt_tokens,
            "completion_tokens": entry.completion_tokens,
            "queue_ms": _ms(entry.queue_s),
            "ttft_ms": _ms(entry.ttft_s),
            "total_ms": _ms(entry.total_s),
            "status": entry.status,
            "error_code": entry.error_code,
            "finish_reason": entry.finish_reason,
            "prompt_sha256": None,
            "output_sha256": None,
        }
        if entry.cache_hit:
            fields["cache_hit"] = 1
        if entry.occurrences != 1:
            fields["occurrences"] = entry.occurrences
        if entry.constraint_kind is not None:
            fields["constraint_kind"], fields["constraint_sha256"] = entry.constraint_kind, entry.constraint_sha256
        if entry.speculative is not None:
            fields["speculative"] = entry.speculative
        if self.content != "none":
            fields["prompt_sha256"], fields["output_sha256"] = sha256_text(entry.prompt), sha256_text(entry.output)
        return fields

    def record(self, entry: Entry) -> dict:
        return self.record_many([entry])[0]

    def record_many(self, entries: list[Entry]) -> list[dict]:
        """Append chained rows in one transaction (group commit) and make them durable before returning."""
        with self._lock:
            seq, prev = self._head
            rows = []
            for entry in entries:
                fields = self._fields(entry)
                seq += 1
                fields["seq"] = seq
                if self._sealer is not None:
                    fields.update(self._sealer.seal(seq, entry.prompt, entry.output))
                digest = row_hash(prev, fields)
                rows.append({**dict.fromkeys(OPTIONAL_CHAINED), **fields, "prev_hash": prev, "row_hash": digest})
                prev = digest
            checkpoint = None
            if self.signing_key is not None and seq // self.checkpoint_every > self._head[0] // self.checkpoint_every:
                checkpoint = self._checkpoint(seq, prev)
            try:
                with Session(self.engine) as s, s.begin():
                    s.execute(insert(AuditRecord), rows)  # Core bulk insert: no ORM unit of work per row
                    if checkpoint is not None:
                        s.add(Checkpoint(**checkpoint))
            except SQLAlchemyError as exc:
                raise AuditError(f"audit write failed ({exc.orig or exc})") from None
            self._head = (seq, prev)
            if checkpoint is not None:
                self._last_checkpoint = checkpoint_hash(checkpoint)
        return rows

    def _checkpoint(self, seq: int, head: str) -> dict:
        return sign_checkpoint(self.signing_key, seq, head, round(time.time(), 6), self._last_checkpoint)

    def checkpoint_now(self) -> None:
        """Sign the current head (at shutdown, before export) unless it is already signed."""
        if self.signing_key is None:
            return
        with self._lock:
            seq, head = self._head
            with Session(self.engine) as s, s.begin():
                last = s.scalars(select(Checkpoint).order_by(Checkpoint.upto_seq.desc()).limit(1)).first()
                if not seq or (last is not None and last.upto_seq >= seq):
                    return
                checkpoint = self._checkpoint(seq, head)
                s.add(Checkpoint(**checkpoint))
            self._last_checkpoint = checkpoint_hash(checkpoint)

    def probe(self) -> bool:
        """Can the store write right now? (Used to leave the fail-closed state by itself.)"""
        try:
            with self._lock, Session(self.engine) as s, s.begin():
                s.merge(Meta(key="last_probe", value=str(time.time())))
            return True
        except SQLAlchemyError:
            return False

    # -- reading -------------------------------------------------------------------------------
    def rows(self, filters: Filters | None = None) -> list[AuditRecord]:
        f = filters or Filters()
        query = select(AuditRecord)
        for column, value, op in (
            (AuditRecord.ts, f.since, ">="),
            (AuditRecord.ts, f.until, "<"),
            (AuditRecord.client, f.client, "=="),
            (AuditRecord.status, f.status, "=="),
            (AuditRecord.model_version, f.model_version, "=="),
        ):
            if value is not None:
                query = query.where(column >= value if op == ">=" else column < value if op == "<" else column == value)
        query = query.order_by(AuditRecord.seq.desc() if f.limit else AuditRecord.seq)
        if f.limit:
            query = query.limit(f.limit)
        with Session(self.engine) as s:
            rows = list(s.scalars(query))
        return sorted(rows, key=lambda r: r.seq)

    def verify(self, device_key: Ed25519PublicKey | None = None) -> VerifyResult:
        """Walk the chain from genesis (or the signed prune anchor); check the chained, signed checkpoints."""
        with Session(self.engine) as s:
            anchor = self.anchor(s)
            checkpoints = list(s.scalars(select(Checkpoint).order_by(Checkpoint.upto_seq)))
            rows = [
                {k: getattr(r, k) for k in ROW_FIELDS} for r in s.scalars(select(AuditRecord).order_by(AuditRecord.seq))
            ]
        if anchor is not None and (problem := anchor.problem(device_key)):
            return VerifyResult(False, problem)
        return verify_rows(
            rows,
            (anchor.seq, anchor.row_hash) if anchor else (0, GENESIS),
            checkpoints=[checkpoint_dict(c) for c in checkpoints],
            device_key=device_key,
            start_checkpoint=anchor.checkpoint if anchor else GENESIS,
        )

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
