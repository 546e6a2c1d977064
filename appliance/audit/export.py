"""Audit export for USB, verification anywhere, and retention (format in docs/AUDIT.md).

An export is a directory ``audit-<device>-<from>-<to>/`` holding ``rows.jsonl`` (one row per line,
binary fields base64), ``manifest.json`` (row range, the hash before the first row, chain head,
count, SHA-256 of rows.jsonl, the chained signed checkpoints in range and the hash of the one
before them, the content keys needed to open sealed rows) and ``manifest.sig`` (Ed25519 by the
device). It is written under a ``.partial-``
name, fsynced, then renamed: a pulled stick leaves no directory that verifies, and the next export
starts again from the last *completed* one.

Exports held by the reviewer are the external anchor: ``verify_export`` over a series reports
every gap between them, ``check_against_exports`` shows whether the device's log still contains
what was exported, and ``prune`` removes only rows that contiguous exports hold.
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

from appliance.audit.chain import VerifyResult, checkpoint_dict, verify_rows
from appliance.audit.checkpoints import GENESIS, Anchor, checkpoint_hash
from appliance.audit.content import open_sealed, unwrap_content_key
from appliance.audit.schema import ROW_FIELDS, AuditError, AuditRecord, Checkpoint, ContentKey, Export
from appliance.audit.store import AuditLog
from provisioning.install import fsync_path
from provisioning.keys import fingerprint, public_bytes, wipe

EXPORT_FORMAT = 2  # 2: checkpoints carry prev_checkpoint; manifest carries checkpoint_before
READABLE_FORMATS = (1, 2)
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
        anchor = audit.anchor(s)
        first = anchor.seq + 1 if anchor else 1
        start = since_seq if since_seq is not None else (last.to_seq + 1 if last else first)
        if anchor and start <= anchor.seq:
            raise ExportError(f"rows up to {anchor.seq} were pruned; export from {anchor.seq + 1} on")
        rows = list(s.scalars(select(AuditRecord).where(AuditRecord.seq >= start).order_by(AuditRecord.seq)))
        if not rows:
            return ExportResult(None, start, start - 1, 0)
        before = s.scalars(select(AuditRecord.row_hash).where(AuditRecord.seq == start - 1)).first()
        prev_hash = before or (anchor.row_hash if anchor and anchor.seq == start - 1 else GENESIS)
        end = rows[-1].seq
        checkpoints = [
            checkpoint_dict(c)
            for c in s.scalars(
                select(Checkpoint).where(Checkpoint.upto_seq.between(start, end)).order_by(Checkpoint.upto_seq)
            )
        ]
        earlier = s.scalars(
            select(Checkpoint).where(Checkpoint.upto_seq < start).order_by(Checkpoint.upto_seq.desc()).limit(1)
        ).first()
        checkpoint_before = (
            checkpoint_hash(checkpoint_dict(earlier)) if earlier else (anchor.checkpoint if anchor else GENESIS)
        )
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
        "checkpoint_before": checkpoint_before,
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
    if manifest.get("format") not in READABLE_FORMATS:
        raise ExportError(
            f"{path}: export format {manifest.get('format')!r}, this software reads {READABLE_FORMATS}; "
            "upgrade edge-appliance on this PC"
        )
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


def _export_dirs(path: Path) -> list[Path]:
    if (path / MANIFEST).exists():
        return [path]
    exports = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists()]
    if not exports:
        raise ExportError(f"{path}: no audit export found")
    return exports


def _range(one: Path) -> tuple[int, int]:
    try:
        manifest = json.loads((one / MANIFEST).read_bytes())
        return int(manifest["from_seq"]), int(manifest["to_seq"])
    except (OSError, ValueError, KeyError, TypeError):
        return (0, 0)  # unreadable: read_export reports it in order


def verify_export(path: Path, device_key: Ed25519PublicKey) -> VerifyResult:
    """Verify one export directory, or every export in a directory as one series.

    Every problem is reported, not only the first: each damaged export, and each gap between
    exports (rows no export in the series holds) or break in the row or checkpoint chain across them.
    """
    exports = sorted(_export_dirs(path), key=_range)
    problems: list[str] = []
    total = checkpoints = 0
    covered = 0  # rows 1..covered (or from the series' start) are held by the exports read so far
    seen: dict[int, tuple[str, str]] = {}  # seq -> (row_hash, export name): overlapping exports must agree
    last_checkpoint: str | None = None
    first_from = None
    for one in exports:
        try:
            manifest, rows = read_export(one, device_key)
        except ExportError as exc:
            problems.append(str(exc))
            continue
        start, end = manifest["from_seq"], manifest["to_seq"]
        if first_from is None:
            first_from, covered = start, start - 1
        if start > covered + 1:
            problems.append(f"rows {covered + 1}..{start - 1} missing before {one.name}: an export is missing")
        elif start - 1 in seen and seen[start - 1][0] != manifest["prev_hash"]:
            problems.append(f"{one.name}: does not continue the chain of {seen[start - 1][1]}")
        differ = next((r["seq"] for r in rows if r["seq"] in seen and seen[r["seq"]][0] != r["row_hash"]), None)
        if differ is not None:
            problems.append(
                f"row {differ} differs between {seen[differ][1]} and {one.name}: the log was rewritten, or cut "
                "and written again"
            )
        contiguous = start == covered + 1
        link = manifest.get("checkpoint_before")
        if contiguous and link is not None and last_checkpoint is not None and link != last_checkpoint:
            problems.append(f"{one.name}: its first checkpoint does not follow the last one of the export before it")
        result = verify_rows(
            rows,
            (start - 1, manifest["prev_hash"]),
            checkpoints=manifest["checkpoints"],
            device_key=device_key,
            expected_end=(end, manifest["head_hash"]),
            start_checkpoint=link,
        )
        if not result.ok:
            problems.append(f"{one.name}: {result.message}")
        total, checkpoints = total + result.rows, checkpoints + result.checkpoints
        seen.update((r["seq"], (r["row_hash"], one.name)) for r in rows)
        if end > covered:
            covered = end
            if manifest["checkpoints"]:
                last_checkpoint = checkpoint_hash(manifest["checkpoints"][-1])
            elif contiguous and link is not None:
                last_checkpoint = link
    if problems:
        return VerifyResult(False, "; ".join(problems), total, checkpoints)
    return VerifyResult(
        True,
        f"{len(exports)} export(s), {total} rows, rows {first_from}..{covered} with no gap, chain intact, "
        f"{checkpoints} signed checkpoint(s) valid",
        total,
        checkpoints,
    )


def check_against_exports(audit: AuditLog, path: Path, device_key: Ed25519PublicKey) -> list[str]:
    """What the device's log no longer holds of the exports at ``path`` (the reviewer's copies).

    The exports are signed by the device, so a log cut back, or rewritten and re-chained, after
    an export contradicts the export's ``to_seq`` and ``head_hash``.
    """
    problems = []
    with Session(audit.engine) as s:
        last = s.scalar(select(func.max(AuditRecord.seq)))
        anchor = audit.anchor(s)
        for one in _export_dirs(path):
            manifest, _ = read_export(one, device_key)
            end, head = manifest["to_seq"], manifest["head_hash"]
            held = s.scalar(select(AuditRecord.row_hash).where(AuditRecord.seq == end))
            if held is not None:
                if held != head:
                    problems.append(f"row {end} differs from export {one.name}: rows rewritten")
            elif anchor is not None and end <= anchor.seq:
                if end == anchor.seq and anchor.row_hash != head:
                    problems.append(f"prune anchor at row {end} differs from export {one.name}: rows rewritten")
            else:
                ends = f"ends at row {last}" if last else "holds no rows"
                problems.append(
                    f"the log {ends} but export {one.name}, signed by this device, reaches row {end}: "
                    f"rows {(last or 0) + 1}..{end} were cut"
                )
    return problems


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


def exported_to(s: Session, base: int) -> int:
    """The last row that completed exports hold without a gap from row ``base + 1`` on."""
    covered = base
    for start, end in s.execute(select(Export.from_seq, Export.to_seq).order_by(Export.from_seq)):
        if start > covered + 1:
            break
        covered = max(covered, end)
    return covered


@dataclass(frozen=True)
class PruneResult:
    removed: int
    anchor_seq: int
    exported_to: int  # rows after this one are not in a contiguous series of exports


def prune(audit: AuditLog, exported_before: float, signing_key: Ed25519PrivateKey) -> PruneResult:
    """Delete rows older than ``exported_before`` that contiguous completed exports hold; leave a signed anchor.

    Rows after a gap in the exports are never removed, even if a later export holds them.
    Verification then starts at the anchor, whose signature it checks.
    """
    with audit._lock, Session(audit.engine) as s, s.begin():
        old = audit.anchor(s)
        base = old.seq if old else 0
        covered = exported_to(s, base)
        last = s.scalar(
            select(func.max(AuditRecord.seq)).where(AuditRecord.seq <= covered, AuditRecord.ts < exported_before)
        )
        if not last or last <= base:
            return PruneResult(0, base, covered)
        row_hash = s.scalar(select(AuditRecord.row_hash).where(AuditRecord.seq == last))
        newest = s.scalars(
            select(Checkpoint).where(Checkpoint.upto_seq <= last).order_by(Checkpoint.upto_seq.desc()).limit(1)
        ).first()
        checkpoint = checkpoint_hash(checkpoint_dict(newest)) if newest else (old.checkpoint if old else GENESIS)
        anchor = Anchor.signed(signing_key, last, row_hash, checkpoint, covered, round(time.time(), 6))
        removed = s.execute(delete(AuditRecord).where(AuditRecord.seq <= last)).rowcount
        s.execute(delete(Checkpoint).where(Checkpoint.upto_seq <= last))
        audit.set_anchor(s, anchor)
    return PruneResult(removed, last, covered)
