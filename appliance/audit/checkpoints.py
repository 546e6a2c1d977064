"""Signed checkpoints and the signed prune anchor: what makes the audit chain impossible to cut silently.

A checkpoint signs ``[upto_seq, head_hash, ts, prev_checkpoint]``: the row count (``seq`` has no
gaps), the chain head at that row, and the SHA-256 of the previous checkpoint's signed message,
so checkpoints form their own chain and deleting one in the middle breaks it. Checkpoints written
before schema 4 sign ``[upto_seq, head_hash, ts]`` (``prev_checkpoint`` NULL); they are accepted
only before the first chained one.

``prune`` leaves an anchor signed the same way: the last removed row's seq and hash, the hash of
the last removed checkpoint (the next checkpoint links to it) and how far contiguous exports
reached. Verification starts there, and only there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

GENESIS = "0" * 64
CHECKPOINT_CONTEXT_V1 = b"edge-appliance/audit-checkpoint/v1"
CHECKPOINT_CONTEXT = b"edge-appliance/audit-checkpoint/v2"
ANCHOR_CONTEXT = b"edge-appliance/audit-anchor/v1"


def _json(values: list) -> bytes:
    return json.dumps(values, separators=(",", ":")).encode()


def checkpoint_message(upto_seq: int, head_hash: str, ts: float, prev_checkpoint: str | None) -> bytes:
    if prev_checkpoint is None:  # schema <= 3: unchained
        return CHECKPOINT_CONTEXT_V1 + _json([upto_seq, head_hash, ts])
    return CHECKPOINT_CONTEXT + _json([upto_seq, head_hash, ts, prev_checkpoint])


def checkpoint_hash(cp: dict) -> str:
    """What the next checkpoint signs as ``prev_checkpoint``: SHA-256 of this one's signed message."""
    message = checkpoint_message(cp["upto_seq"], cp["head_hash"], cp["ts"], cp.get("prev_checkpoint"))
    return hashlib.sha256(message).hexdigest()


def sign_checkpoint(key: Ed25519PrivateKey, upto_seq: int, head_hash: str, ts: float, prev_checkpoint: str) -> dict:
    signature = key.sign(checkpoint_message(upto_seq, head_hash, ts, prev_checkpoint)).hex()
    return {
        "upto_seq": upto_seq,
        "head_hash": head_hash,
        "ts": ts,
        "prev_checkpoint": prev_checkpoint,
        "signature": signature,
    }


def _valid(key: Ed25519PublicKey, signature: str, message: bytes) -> bool:
    try:
        key.verify(bytes.fromhex(signature), message)
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class Anchor:
    """Where the chain starts after pruning; stored in ``audit_meta``, signed by the device."""

    seq: int
    row_hash: str
    checkpoint: str  # checkpoint_hash of the last removed checkpoint (GENESIS if none)
    exported_to: int  # contiguous exports reached this row when the prune ran
    ts: float
    signature: str | None  # None: an anchor written before schema 4, never signed

    def message(self) -> bytes:
        return ANCHOR_CONTEXT + _json([self.seq, self.row_hash, self.checkpoint, self.exported_to, self.ts])

    @classmethod
    def signed(cls, key: Ed25519PrivateKey, seq: int, row_hash: str, checkpoint: str, exported_to: int, ts: float):
        unsigned = cls(seq, row_hash, checkpoint, exported_to, ts, None)
        return cls(seq, row_hash, checkpoint, exported_to, ts, key.sign(unsigned.message()).hex())

    def problem(self, key: Ed25519PublicKey | None) -> str | None:
        """Why this anchor cannot be trusted, or None. Without the device key only its presence is checked."""
        if self.signature is None:
            return (
                f"prune anchor at row {self.seq} is not signed (forged, or pruned before schema 4): rows 1..{self.seq} "
                "can only be vouched for by the reviewer's exports"
            )
        if key is not None and not _valid(key, self.signature, self.message()):
            return f"prune anchor at row {self.seq}: bad signature: forged (rows 1..{self.seq} deleted)"
        return None


def verify_checkpoints(
    checkpoints: list[dict],
    hashes: dict[int, str],
    start_seq: int,
    last_seq: int,
    start_checkpoint: str | None,
    device_key: Ed25519PublicKey | None,
) -> tuple[str | None, int, int]:
    """Check checkpoints (sorted by ``upto_seq``) against the row hashes ``hashes`` (seq -> row_hash).

    ``start_checkpoint`` is the hash the first chained checkpoint must link to (None: unknown, as
    for an export of format 1). Returns (first problem or None, checkpoints valid, signed position).
    """
    prev_cp, chained, good, signed_upto = start_checkpoint, False, 0, start_seq
    for cp in checkpoints:
        upto = cp["upto_seq"]
        if upto <= start_seq:
            continue
        link = cp.get("prev_checkpoint")
        if link is None and chained:
            return f"checkpoint at row {upto} is unchained after chained ones: forged or replaced", good, signed_upto
        if link is not None:
            chained = True
            if prev_cp is not None and link != prev_cp:
                return (
                    f"checkpoint at row {upto} does not follow the checkpoint before it (row {signed_upto}): "
                    "checkpoints deleted or replaced",
                    good,
                    signed_upto,
                )
        if upto > last_seq:
            return (
                f"rows {last_seq + 1}..{upto} missing: a signed checkpoint covers row {upto} but the log ends "
                f"at {last_seq}: truncated",
                good,
                signed_upto,
            )
        if hashes.get(upto) != cp["head_hash"]:
            return f"checkpoint at row {upto} does not match the chain: rows rewritten", good, signed_upto
        message = checkpoint_message(upto, cp["head_hash"], cp["ts"], link)
        if device_key is not None and not _valid(device_key, cp["signature"], message):
            return f"checkpoint at row {upto}: bad signature", good, signed_upto
        prev_cp, signed_upto, good = hashlib.sha256(message).hexdigest(), upto, good + 1
    return None, good, signed_upto
