"""The hash chain: canonical row encoding, row hashes and verification. Pure: no database session.

Rows are hash-chained (``row_hash = SHA-256(prev_hash || canonical JSON)``), and every
``checkpoint_every`` rows the device's Ed25519 key signs the chain head and links to the
checkpoint before it (``checkpoints``), so editing, deleting, inserting, reordering or truncating
rows, and deleting checkpoints, is detected and located. ``verify_rows`` checks rows from the
database (``store.AuditLog.verify``) or from an export (``export.verify_export``) alike.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.audit.checkpoints import verify_checkpoints
from appliance.audit.schema import CHAINED_FIELDS, OPTIONAL_CHAINED

if TYPE_CHECKING:
    from appliance.audit.schema import Checkpoint


def sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical(fields: dict) -> bytes:
    data = {k: fields.get(k) for k in CHAINED_FIELDS}
    for k in OPTIONAL_CHAINED:
        value = fields.get(k)
        if value is not None:
            data[k] = hashlib.sha256(value).hexdigest() if isinstance(value, bytes) else value
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def row_hash(prev_hash: str, fields: dict) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical(fields)).hexdigest()


@dataclass
class VerifyResult:
    ok: bool
    message: str
    rows: int = 0
    checkpoints: int = 0
    signed_upto: int = 0  # the last row a valid signed checkpoint (or the signed prune anchor) covers
    unsigned: int = 0  # rows after it, protected by the hash chain only until the next checkpoint


def checkpoint_dict(c: Checkpoint) -> dict:
    return {
        "upto_seq": c.upto_seq,
        "head_hash": c.head_hash,
        "ts": c.ts,
        "prev_checkpoint": c.prev_checkpoint,
        "signature": c.signature,
    }


def verify_rows(
    rows: list[dict],
    start: tuple[int, str],
    *,
    checkpoints: list[dict],
    device_key: Ed25519PublicKey | None,
    expected_end: tuple[int, str] | None = None,
    start_checkpoint: str | None = None,
) -> VerifyResult:
    """Check a sequence of rows (from the database or an export) and name the first problem.

    ``start_checkpoint`` is the checkpoint hash the first chained checkpoint must link to (None:
    not known). The result says up to which row signatures vouch for the rows and how many follow.

    ``rows`` are in storage order (SQLite rowid order, or line order of an export), which is how a
    swap of two rows shows up as reordering rather than as two edits.
    """
    expected_seq, prev = start[0] + 1, start[1]
    hashes = {start[0]: start[1]}
    seq_of_hash = {r["row_hash"]: r["seq"] for r in rows}
    for row in rows:
        seq = row["seq"]
        if seq < expected_seq:
            why = "reordered" if seq in hashes else "inserted"
            return VerifyResult(False, f"row {seq}: appears after row {expected_seq - 1}: {why}", len(hashes) - 1)
        if seq > expected_seq:
            missing = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}..{seq - 1}"
            later = any(r["seq"] == expected_seq for r in rows)
            what = "reordered" if later else "deleted"
            return VerifyResult(False, f"row {missing} missing before row {seq}: {what}", len(hashes) - 1)
        if row["prev_hash"] != prev:
            other = seq_of_hash.get(row["prev_hash"])
            why = f"reordered (it follows row {other})" if other is not None else "a row was inserted or replaced"
            return VerifyResult(False, f"row {seq}: prev_hash does not match row {seq - 1}: {why}", len(hashes) - 1)
        if row["row_hash"] != row_hash(prev, row):
            return VerifyResult(False, f"row {seq}: contents do not match its hash: edited", len(hashes) - 1)
        prev = row["row_hash"]
        hashes[seq] = prev
        expected_seq += 1
    last_seq = expected_seq - 1
    if expected_end is not None and (last_seq, prev) != expected_end:
        return VerifyResult(
            False, f"rows end at {last_seq}, manifest says {expected_end[0]}: truncated", len(hashes) - 1
        )
    count = last_seq - start[0]
    problem, good, signed_upto = verify_checkpoints(
        checkpoints, hashes, start[0], last_seq, start_checkpoint, device_key
    )
    if problem:
        return VerifyResult(False, problem, count, good, signed_upto, last_seq - signed_upto)
    unsigned = last_seq - signed_upto
    checked = "" if device_key is not None else " (signatures not checked)"
    return VerifyResult(
        True,
        f"{count} rows (seq {start[0] + 1}..{last_seq}), chain intact, {good} signed checkpoint(s) valid{checked}; "
        f"signed up to row {signed_upto}, {unsigned} row(s) after it unsigned; head {prev[:16]}",
        count,
        good,
        signed_upto,
        unsigned,
    )
