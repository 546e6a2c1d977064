"""TensorRT plans built on the device, cached encrypted under the device key (never plaintext).

A plan is the model's weights in another form, so it gets the bundle's protection: AES-256-GCM with
a key derived (HKDF-SHA256) from the device's X25519 private key, which only this device holds.
The associated data binds each file to its bundle and target, so a plan cannot be replayed for
another bundle, GPU or TensorRT version; a file that fails authentication is deleted and rebuilt.

File: ``<dir>/<bundle_id>-sm<cc>-trt<version>.plan.enc`` = nonce (12) || ciphertext || tag (16).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = logging.getLogger("appliance.engine.plan_cache")
INFO = b"edge-appliance/plan-cache/v1"


class PlanCache:
    def __init__(self, directory: Path, device_key: X25519PrivateKey):
        self.directory = Path(directory)
        secret = device_key.private_bytes_raw()
        self._aead = AESGCM(HKDF(hashes.SHA256(), 32, salt=None, info=INFO).derive(secret))

    def path(self, bundle_id: str, target: dict) -> Path:
        return self.directory / f"{bundle_id}-sm{target['compute_capability']}-trt{target['tensorrt']}.plan.enc"

    def get(self, bundle_id: str, target: dict) -> bytes | None:
        """The cached plan, or None when absent or failing authentication (then removed)."""
        path = self.path(bundle_id, target)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return self._aead.decrypt(blob[:12], blob[12:], _aad(bundle_id, target))
        except (InvalidTag, ValueError):
            log.warning("%s fails authentication (altered, or from another device); removing it", path)
            path.unlink(missing_ok=True)
            return None

    def put(self, bundle_id: str, target: dict, plan: bytes) -> Path:
        """Encrypt and store ``plan`` atomically (0600, fsynced, renamed into place)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.path(bundle_id, target)
        nonce = secrets.token_bytes(12)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(nonce + self._aead.encrypt(nonce, plan, _aad(bundle_id, target)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def get_or_build(self, bundle_id: str, target: dict, build: Callable[[], bytes]) -> bytes:
        """The cached plan for this target, building (minutes) and caching it the first time."""
        plan = self.get(bundle_id, target)
        if plan is None:
            log.info(
                "building a TensorRT plan for sm %s / TensorRT %s", target["compute_capability"], target["tensorrt"]
            )
            plan = build()
            log.info("plan cached encrypted at %s", self.put(bundle_id, target, plan))
        return plan


def _aad(bundle_id: str, target: dict) -> bytes:
    return INFO + json.dumps({"bundle_id": bundle_id, "target": target}, sort_keys=True).encode()
