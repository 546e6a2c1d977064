"""Wrapping a symmetric key for one X25519 recipient: ephemeral X25519 → HKDF-SHA256 → AES-256-GCM.

Used for bundle data keys (context = bundle magic + bundle id) and for audit content keys
(context = audit magic + key id). The context is the AES-GCM associated data, so an entry cannot
be moved from one use to another.
"""

from __future__ import annotations

import base64
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import RecipientError
from .keys import fingerprint, public_bytes

WRAP_INFO = b"edge-appliance/bundle/v1/key-wrap"


def _kek(shared: bytes, ephemeral_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral_pub + recipient_pub, info=WRAP_INFO).derive(shared)


def wrap(key: bytes, recipient: X25519PublicKey, context: bytes) -> dict:
    """An entry ``{fingerprint, ephemeral, nonce, wrapped_key}`` (base64 fields) for ``recipient``."""
    eph = X25519PrivateKey.generate()
    eph_pub, rcpt_pub = public_bytes(eph.public_key()), public_bytes(recipient)
    nonce = secrets.token_bytes(12)
    wrapped = AESGCM(_kek(eph.exchange(recipient), eph_pub, rcpt_pub)).encrypt(nonce, key, context)
    return {
        "fingerprint": fingerprint(rcpt_pub),
        "ephemeral": base64.b64encode(eph_pub).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "wrapped_key": base64.b64encode(wrapped).decode(),
    }


def unwrap(entries: list[dict], private: X25519PrivateKey, context: bytes, what: str) -> bytearray:
    """Find this key's entry (constant-time fingerprint match) and unwrap it; the caller wipes the result."""
    own_pub = public_bytes(private.public_key())
    fp = fingerprint(own_pub)
    for entry in entries:
        if not secrets.compare_digest(str(entry.get("fingerprint", "")), fp):
            continue
        try:
            eph_pub = base64.b64decode(entry["ephemeral"], validate=True)
            kek = _kek(private.exchange(X25519PublicKey.from_public_bytes(eph_pub)), eph_pub, own_pub)
            return bytearray(
                AESGCM(kek).decrypt(
                    base64.b64decode(entry["nonce"], validate=True),
                    base64.b64decode(entry["wrapped_key"], validate=True),
                    context,
                )
            )
        except (InvalidTag, ValueError, KeyError, TypeError):
            raise RecipientError(
                f"{what}: the key entry for {fp} does not unwrap; it was altered or sealed for a different key"
            ) from None
    raise RecipientError(
        f"{what} is not addressed to this device (fingerprint {fp}); ask the vendor to seal it "
        "with this device's identity file"
    )
