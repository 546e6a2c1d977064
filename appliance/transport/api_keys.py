"""API keys for the HTTP gateway: minted here, stored only as SHA-256 digests, checked in constant time.

The key file is TOML, one entry per key (``edge-appliance http-keygen`` prints one)::

    [[key]]
    name = "ehr-plugin"
    sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    role = "infer"          # infer | admin

A key is 32 random bytes (256 bits), so a plain SHA-256 digest cannot be reversed or guessed and a
slow password hash (scrypt) would add latency to every request without adding safety. The audit
subject of a key is ``name:fingerprint`` (the first 16 hex digits of its digest), the same shape as
a CurveZMQ client's, so rotating a key is visible in the audit log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import ApplianceError
from appliance.transport.protocol import DELEGABLE_ROLES

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

KEY_PREFIX = "ea-"
MAX_NAME_LEN = 40  # name:fingerprint must fit the protocol's 64-character identity


class ApiKeyError(ApplianceError):
    """The API key file cannot be read or has a malformed entry."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str  # hex digest of the key
    role: str

    @property
    def identity(self) -> str:
        return f"{self.name}:{self.sha256[:16]}"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def fingerprint(key: str) -> str:
    """How a refused key is named in the audit log: enough to correlate attempts, useless to an attacker."""
    return digest(key)[:16]


def mint(name: str, role: str = "infer") -> tuple[str, ApiKey]:
    """A new key and its file entry; the key itself is shown once and never stored."""
    if role not in DELEGABLE_ROLES:
        raise ApiKeyError(f"role must be one of {', '.join(DELEGABLE_ROLES)}, got {role!r}")
    if not 0 < len(name) <= MAX_NAME_LEN or '"' in name or "\\" in name:
        raise ApiKeyError(f"key name must be 1..{MAX_NAME_LEN} characters without quotes or backslashes")
    key = KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return key, ApiKey(name, digest(key), role)


def entry_toml(entry: ApiKey) -> str:
    return f'[[key]]\nname = "{entry.name}"\nsha256 = "{entry.sha256}"\nrole = "{entry.role}"\n'


def load_keys(path: Path) -> list[ApiKey]:
    """Parse the key file; a malformed entry is an error, never silently skipped."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ApiKeyError(f"cannot read API key file {path}: {exc}") from None
    keys = []
    for n, item in enumerate(data.get("key", []), 1):
        name, sha, role = item.get("name"), item.get("sha256"), item.get("role", "infer")
        valid_sha = isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)
        valid_name = isinstance(name, str) and 0 < len(name) <= MAX_NAME_LEN
        if not valid_name or not valid_sha or role not in DELEGABLE_ROLES:
            raise ApiKeyError(
                f"{path}: key #{n} needs name (1..{MAX_NAME_LEN} characters), sha256 (64 lowercase hex digits) "
                f"and role ({'|'.join(DELEGABLE_ROLES)}); `edge-appliance http-keygen` prints a valid entry"
            )
        keys.append(ApiKey(name, sha, role))
    return keys


def verify(keys: list[ApiKey], presented: str) -> ApiKey | None:
    """The entry ``presented`` belongs to, or None. Every entry is compared, in constant time, so the
    time taken says nothing about which digest (or how much of one) matched."""
    candidate = digest(presented).encode()
    found = None
    for entry in keys:
        if hmac.compare_digest(candidate, entry.sha256.encode()):
            found = entry
    return found
