"""Audit export for USB, verification anywhere, and retention (format in docs/AUDIT.md).

An export is a directory ``audit-<device>-<from>-<to>/`` holding ``rows.jsonl`` (one row per line,
binary fields base64), ``manifest.json`` (row range, the hash before the first row, chain head,
count, SHA-256 of rows.jsonl, the signed checkpoints in range, the content keys needed to open
sealed rows) and ``manifest.sig`` (Ed25519 by the device). It is written under a ``.partial-``
name, fsynced, then renamed: a pulled stick leaves no directory that verifies, and the next export
starts again from the last *completed* one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from appliance.audit.chain import (
    GENESIS,
    ROW_FIELDS,
    AuditError,
    AuditLog,
    AuditRecord,
    Checkpoint,
    ContentKey,
    Export,
    Meta,
    VerifyResult,
    verify_rows,
)
from appliance.audit.content import open_sealed, unwrap_content_key
from provisioning.install import fsync_path
from provisioning.keys import fingerprint, public_bytes, wipe

EXPORT_FORMAT = 1
ROWS, MANIFEST, SIGNATURE = "rows.jsonl", "manifest.json", "manifest.sig"
BINARY = ("prompt_sealed", "output_sealed")


class ExportError(AuditError):
    pass


def _encode(row: AuditRecord) -> dict:
    out = {k: getattr(row, k) for k in ROW_FIELDS}
    for k in BINARY:
        out[k] = base64.b64encode(out[k]).decode() if out[k] is not None else None
    return out


def _decode(line: dict) -> dict:
    row = dict(line)
    for k in BINARY:
        row[k] = base64.b64decode(row[k]) if row.get(k) is not None else None
    return row


@dataclass(frozen=True)
class ExportResult:
    path: Path | None
    from_seq: int
    to_seq: int
    count: int


def export(
    audit: AuditLog, to: Path, signing_key: Ed25519PrivateKey, device_id: str, since_seq: int | None = None
) -> ExportResult:
    """Write the rows after the last completed export (or from ``since_seq``) as a signed export."""
    audit.checkpoint_now()
    with Session(audit.engine) as s:
        last = s.scalars(select(Export).order_by(Export.to_seq.desc()).limit(1)).first()
        start = since_seq if since_seq is not None else (last.to_seq + 1 if last else 1)
        anchor = audit.anchor(s)
        if anchor and start <= anchor[0]:
            raise ExportError(f"rows up to {anchor[0]} were pruned; export from {anchor[0] + 1} on")
        rows = list(s.scalars(select(AuditRecord).where(AuditRecord.seq >= start).order_by(AuditRecord.seq)))
        if not rows:
            return ExportResult(None, start, start - 1, 0)
        before = s.scalars(select(AuditRecord.row_hash).where(AuditRecord.seq == start - 1)).first()
        prev_hash = before or (anchor[1] if anchor and anchor[0] == start - 1 else GENESIS)
        end = rows[-1].seq
        checkpoints = [
            {"upto_seq": c.upto_seq, "head_hash": c.head_hash, "ts": c.ts, "signature": c.signature}
            for c in s.scalars(
                select(Checkpoint).where(Checkpoint.upto_seq.between(start, end)).order_by(Checkpoint.upto_seq)
            )
        ]
        key_ids = {r.content_key_id for r in rows if r.content_key_id is not None}
        keys = {
            str(k.id): json.loads(k.wrapped) for k in s.scalars(select(ContentKey).where(ContentKey.id.in_(key_ids)))
        }
    name = f"audit-{device_id}-{start:09d}-{end:09d}"
    to.mkdir(parents=True, exist_ok=True)
    partial = to / f".partial-{name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    body = "".join(json.dumps(_encode(r), sort_keys=True, separators=(",", ":")) + "\n" for r in rows).encode()
    (partial / ROWS).write_bytes(body)
    manifest = {
        "format": EXPORT_FORMAT,
        "device_id": device_id,
        "device_key": fingerprint(public_bytes(signing_key.public_key())),
        "from_seq": start,
        "to_seq": end,
        "count": len(rows),
        "prev_hash": prev_hash,
        "head_hash": rows[-1].row_hash,
        "rows_sha256": hashlib.sha256(body).hexdigest(),
        "exported_at": round(time.time(), 3),
        "checkpoints": checkpoints,
        "content_keys": keys,
    }
    raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (partial / MANIFEST).write_bytes(raw)
    (partial / SIGNATURE).write_bytes(signing_key.sign(raw))
    for f in (ROWS, MANIFEST, SIGNATURE):
        fsync_path(partial / f)
    final = to / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    fsync_path(to)
    with Session(audit.engine) as s, s.begin():
        s.add(Export(from_seq=start, to_seq=end, head_hash=rows[-1].row_hash, ts=time.time(), name=name))
    return ExportResult(final, start, end, len(rows))


def read_export(path: Path, device_key: Ed25519PublicKey) -> tuple[dict, list[dict]]:
    """Signature and body hash checked; returns the manifest and decoded rows (not yet chain-checked)."""
    try:
        raw, sig, body = ((path / n).read_bytes() for n in (MANIFEST, SIGNATURE, ROWS))
    except OSError as exc:
        raise ExportError(f"{path}: incomplete export ({exc.strerror}: {exc.filename}); export again") from None
    try:
        device_key.verify(sig, raw)
    except InvalidSignature:
        raise ExportError(f"{path}/{SIGNATURE}: bad signature (manifest altered, or not this device's key)") from None
    manifest = json.loads(raw)
    if hashlib.sha256(body).hexdigest() != manifest["rows_sha256"]:
        rows = _parse_lines(body)
        result = verify_rows(
            rows,
            (manifest["from_seq"] - 1, manifest["prev_hash"]),
            checkpoints=[],
            device_key=None,
            expected_end=(manifest["to_seq"], manifest["head_hash"]),
        )
        where = result.message if not result.ok else "rows.jsonl differs from the signed digest"
        raise ExportError(f"{path}/{ROWS}: {where}")
    return manifest, _parse_lines(body)


def _parse_lines(body: bytes) -> list[dict]:
    rows = []
    for n, line in enumerate(body.splitlines(), 1):
        try:
            rows.append(_decode(json.loads(line)))
        except (ValueError, TypeError) as exc:
            raise ExportError(f"rows.jsonl line {n}: not a JSON row ({exc}): edited or truncated") from None
    return rows


def verify_export(path: Path, device_key: Ed25519PublicKey) -> VerifyResult:
    """Verify one export directory, or every export in a directory and the chain across them."""
    exports = (
        sorted(p for p in path.iterdir() if p.is_dir() and (p / MANIFEST).exists())
        if not (path / MANIFEST).exists()
        else [path]
    )
    if not exports:
        raise ExportError(f"{path}: no audit export found")
    total, checkpoints, head = 0, 0, None
    for one in exports:
        try:
            manifest, rows = read_export(one, device_key)
        except ExportError as exc:
            return VerifyResult(False, str(exc), total, checkpoints)
        if head is not None and manifest["prev_hash"] != head[1] and manifest["from_seq"] == head[0] + 1:
            return VerifyResult(False, f"{one.name}: does not continue the chain of the previous export", total)
        result = verify_rows(
            rows,
            (manifest["from_seq"] - 1, manifest["prev_hash"]),
            checkpoints=manifest["checkpoints"],
            device_key=device_key,
            expected_end=(manifest["to_seq"], manifest["head_hash"]),
        )
        if not result.ok:
            return VerifyResult(False, f"{one.name}: {result.message}", total + result.rows, checkpoints)
        total, checkpoints, head = (
            total + result.rows,
            checkpoints + result.checkpoints,
            (manifest["to_seq"], manifest["head_hash"]),
        )
    return VerifyResult(
        True,
        f"{len(exports)} export(s), {total} rows, chain intact, {checkpoints} signed checkpoint(s) valid",
        total,
        checkpoints,
    )


def reveal(path: Path, device_key: Ed25519PublicKey, reviewer: X25519PrivateKey) -> list[dict]:
    """Rows of a verified export with sealed prompts/outputs opened by the reviewer's key."""
    manifest, rows = read_export(path, device_key)
    keys: dict[int, bytearray] = {}
    try:
        for row in rows:
            kid = row.get("content_key_id")
            if kid is None:
                continue
            if kid not in keys:
                keys[kid] = unwrap_content_key(json.dumps(manifest["content_keys"][str(kid)]), kid, reviewer)
            for name in ("prompt", "output"):
                sealed = row.pop(f"{name}_sealed")
                row[name] = open_sealed(sealed, bytes(keys[kid]), row["seq"], name) if sealed else None
    finally:
        for key in keys.values():
            wipe(key)
    return rows


def prune(audit: AuditLog, exported_before: float) -> tuple[int, int]:
    """Delete rows older than ``exported_before`` that a completed export holds; keep an anchor row hash.

    Returns (rows removed, new anchor seq). Verification then starts at the anchor.
    """
    with audit._lock, Session(audit.engine) as s, s.begin():
        exported = s.scalar(select(func.max(Export.to_seq))) or 0
        last = s.scalar(
            select(func.max(AuditRecord.seq)).where(AuditRecord.seq <= exported, AuditRecord.ts < exported_before)
        )
        if not last:
            return 0, (audit.anchor(s) or (0, GENESIS))[0]
        anchor_hash = s.scalar(select(AuditRecord.row_hash).where(AuditRecord.seq == last))
        removed = s.execute(delete(AuditRecord).where(AuditRecord.seq <= last)).rowcount
        s.execute(delete(Checkpoint).where(Checkpoint.upto_seq <= last))
        s.merge(Meta(key="anchor_seq", value=str(last)))
        s.merge(Meta(key="anchor_hash", value=anchor_hash))
    return removed, last
