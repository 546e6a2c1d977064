"""Content policy ``encrypted``: prompts and outputs sealed for the export recipient only.

Each daemon run draws a fresh 256-bit content key, stores it only wrapped for the recipient's
X25519 key (``audit_content_keys``), and keeps the plain key in memory for its own lifetime. Sealed
values are ``nonce (12) || AES-256-GCM(key, text, aad = magic || seq || field)``, so a value cannot
be moved to another row or field. Only the holder of the recipient's private key can open them.
"""

from __future__ import annotations

import json
import os
import struct
import time

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.orm import Session

from appliance.audit.schema import ContentKey
from provisioning import keywrap
from provisioning.keys import fingerprint, public_bytes, wipe

MAGIC = b"edge-appliance/audit/v1"


def key_context(key_id: int) -> bytes:
    return MAGIC + b"/content-key/" + struct.pack(">Q", key_id)


def _aad(seq: int, name: str) -> bytes:
    return MAGIC + struct.pack(">Q", seq) + name.encode()


class ContentSealer:
    def __init__(self, key_id: int, key: bytes):
        self.key_id = key_id
        self._aead = AESGCM(key)

    @classmethod
    def start(cls, engine, recipient: X25519PublicKey) -> ContentSealer:
        key = bytearray(AESGCM.generate_key(256))
        try:
            with Session(engine) as s, s.begin():
                row = ContentKey(created=time.time(), recipient=fingerprint(public_bytes(recipient)), wrapped="")
                s.add(row)
                s.flush()
                row.wrapped = json.dumps(keywrap.wrap(bytes(key), recipient, key_context(row.id)))
                key_id = row.id
            return cls(key_id, bytes(key))
        finally:
            wipe(key)

    def seal(self, seq: int, prompt: str | None, output: str | None) -> dict:
        def one(text: str | None, name: str) -> bytes | None:
            if text is None:
                return None
            nonce = os.urandom(12)
            return nonce + self._aead.encrypt(nonce, text.encode("utf-8"), _aad(seq, name))

        return {
            "content_key_id": self.key_id,
            "prompt_sealed": one(prompt, "prompt"),
            "output_sealed": one(output, "output"),
        }


def open_sealed(sealed: bytes, key: bytes, seq: int, name: str) -> str:
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], _aad(seq, name)).decode("utf-8")


def unwrap_content_key(wrapped_json: str, key_id: int, private: X25519PrivateKey) -> bytearray:
    return keywrap.unwrap([json.loads(wrapped_json)], private, key_context(key_id), f"audit content key {key_id}")
