"""The signed software stick: lock file format and the offline installer (Python standard library only).

This file is copied verbatim onto the stick as ``install-offline.py`` and runs with the device's
system Python (``python3 -I``: no environment variables, no user site, not even the stick's own
directory on ``sys.path``, so nothing on the stick can shadow a standard module). Format in
docs/BUNDLE.md ("Offline software install"):

    wheels.lock       JSON: every wheel's file name, distribution name, version and SHA-256
    wheels.lock.sig   64 bytes: Ed25519 signature over wheels.lock by the vendor key
    *.whl             exactly the wheels the lock lists, nothing else

The installer verifies the signature against a vendor key already trusted on the device, refuses
any wheel on the stick the lock does not list, copies each locked wheel once into a private
staging directory while hashing it, and installs exactly that set with
``pip install --no-index --require-hashes`` from the staging copy.

Ed25519 verification is not in the standard library; ``ed25519_verify`` is the RFC 8032 (section
6) reference verification. It handles only public data (key, message, signature), so it need not
run in constant time.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

LOCK, LOCK_SIG, VENDOR_PUB = "wheels.lock", "wheels.lock.sig", "vendor-ed25519.pub"
LOCK_FORMAT = 1
DEFAULT_TRUST = "/etc/edge-appliance/trusted-vendors"
DEFAULT_PREFIX = "/opt/edge-appliance/venv"
DIST = "edge-appliance"
INSTALLABLE = (".whl", ".tar.gz", ".tar.bz2", ".zip")  # what pip would install from a find-links directory

# -- Ed25519 verification (RFC 8032, section 6) -----------------------------------------------------

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _add(a: tuple, b: tuple) -> tuple:
    x = (a[1] - a[0]) * (b[1] - b[0]) % _P
    y = (a[1] + a[0]) * (b[1] + b[0]) % _P
    c, d = 2 * a[3] * b[3] * _D % _P, 2 * a[2] * b[2] % _P
    e, f, g, h = y - x, d - c, d + c, y + x
    return (e * f, g * h, f * g, e * h)


def _mul(s: int, point: tuple) -> tuple:
    acc = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            acc = _add(acc, point)
        point = _add(point, point)
        s >>= 1
    return acc


def _equal(a: tuple, b: tuple) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % _P == 0 and (a[1] * b[2] - b[1] * a[2]) % _P == 0


def _decompress(raw: bytes) -> tuple | None:
    y = int.from_bytes(raw, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 % _P == 0:
        return None if sign else (0, y, 1, 0)
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


_G = _decompress((4 * pow(5, _P - 2, _P) % _P).to_bytes(32, "little"))


def public_key_problem(public: bytes) -> str | None:
    """Why ``public`` cannot be a trusted Ed25519 key, or None. A small-order point verifies signatures forged
    without any secret (with s = 0, R the identity: any message); an encoding off the curve or with y >= p is not
    canonical. Both are refused on entry to a trust store."""
    if len(public) != 32:
        return f"must be 32 raw bytes, found {len(public)}"
    point = _decompress(public)
    if point is None:
        return "is not a canonical encoding of a curve point"
    if _equal(_mul(8, point), (0, 1, 1, 0)):
        return "is a small-order point (it would verify forged signatures)"
    return None


def ed25519_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``message`` under the 32-byte ``public``."""
    if len(signature) != 64 or public_key_problem(public) is not None:
        return False
    a, r = _decompress(public), _decompress(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % _L
    return _equal(_mul(s, _G), _add(r, _mul(h, a)))


def fingerprint(public: bytes) -> str:
    """Same as ``provisioning.keys.fingerprint``: hex of the first 16 bytes of SHA-256."""
    return hashlib.sha256(public).hexdigest()[:32]


# -- the lock -----------------------------------------------------------------------------------------


class StickError(Exception):
    """The stick cannot be installed; the message says why and what to do."""


def wheel_entry(path: Path) -> dict:
    """Lock entry of one wheel: ``name-version(-build)?-py-abi-platform.whl``."""
    name, version = path.name.split("-")[:2]
    return {"file": path.name, "name": name, "version": version, "sha256": _sha256(path)}


def lock_bytes(wheels: list[Path], vendor_key: str) -> bytes:
    entries = sorted((wheel_entry(w) for w in wheels), key=lambda e: e["file"])
    lock = {"format": LOCK_FORMAT, "requirement": DIST, "vendor_key": vendor_key, "wheels": entries}
    return json.dumps(lock, indent=2, sort_keys=True).encode()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_regular(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise StickError(f"{path} is missing; the stick is incomplete, re-copy it") from None
    except OSError as exc:
        raise StickError(f"{path}: {exc.strerror} (a symbolic link or unreadable); re-copy the stick") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise StickError(f"{path} is not a regular file; re-copy the stick")
        return f.read()


def trusted_keys(trust: Path, stick: Path, first_trust: str | None) -> list[bytes]:
    """The vendor keys in the device's trust store; on first install, the stick's key if its
    fingerprint matches the one the operator got from the vendor over another channel."""
    keys = []
    for path in sorted(trust.glob("*.pub")) if trust.is_dir() else []:
        keys.append(path.read_bytes())
        if problem := public_key_problem(keys[-1]):
            raise StickError(f"{path}: a trusted vendor key {problem}; replace it with the vendor's real key")
    if keys:
        return keys
    if not first_trust:
        raise StickError(
            f"no trusted vendor key (*.pub) in {trust}; put the vendor's public key there from the device image, "
            "or pass --first-trust FINGERPRINT as read to you by the vendor"
        )
    candidate = _read_regular(stick / VENDOR_PUB)
    if problem := public_key_problem(candidate):
        raise StickError(f"{stick / VENDOR_PUB}: the stick's vendor key {problem}; do not install from this stick")
    if not hmac.compare_digest(fingerprint(candidate), first_trust.strip().lower()):
        raise StickError(
            f"{stick / VENDOR_PUB} has fingerprint {fingerprint(candidate)}, not {first_trust}: "
            "not the vendor's key; do not install from this stick"
        )
    trust.mkdir(parents=True, exist_ok=True)
    (trust / "vendor.pub").write_bytes(candidate)
    return [candidate]


def verified_lock(stick: Path, keys: list[bytes]) -> tuple[dict, bytes]:
    raw, sig = _read_regular(stick / LOCK), _read_regular(stick / LOCK_SIG)
    if not any(ed25519_verify(k, raw, sig) for k in keys):
        raise StickError(
            f"{stick / LOCK_SIG}: signature does not verify with any trusted vendor key "
            f"({', '.join(fingerprint(k) for k in keys)}); the lock was altered or signed by an unknown vendor"
        )
    lock = json.loads(raw)
    if not isinstance(lock, dict) or lock.get("format") != LOCK_FORMAT:
        raise StickError(f"{stick / LOCK}: format {lock.get('format')!r}, this installer reads {LOCK_FORMAT}")
    check_entries(stick / LOCK, lock)
    return lock, raw


# What a lock entry may contain. Signed by the vendor, but a vendor's mistake must not become a path outside the
# stick or staging directory (a file name is joined to both) or an extra requirements line (a name or version is
# written into one): file names are plain wheel names, names and versions carry no separator or whitespace.
_WHEEL_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+!-]*\.whl")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+!-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_entries(where: Path, lock: dict) -> None:
    """Refuse a lock whose entries could name anything but a wheel beside it, in one line naming the entry."""
    wheels = lock.get("wheels")
    if not isinstance(wheels, list) or not wheels:
        raise StickError(f"{where}: no wheels listed; rebuild the stick with edge-provision wheelhouse")
    for n, wheel in enumerate(wheels, 1):
        fields = {k: wheel.get(k) if isinstance(wheel, dict) else None for k in ("file", "name", "version", "sha256")}
        bad = [
            k
            for k, pattern in (("file", _WHEEL_FILE), ("name", _NAME), ("version", _VERSION), ("sha256", _SHA256))
            if not isinstance(fields[k], str) or not pattern.fullmatch(fields[k])
        ]
        if not bad and not fields["file"].startswith(f"{fields['name']}-{fields['version']}-"):
            bad = ["file (does not match name and version)"]
        if bad:
            raise StickError(
                f"{where}: wheel #{n} has an invalid {', '.join(bad)} ({json.dumps(fields)[:200]}); "
                "refusing the stick: rebuild it with edge-provision wheelhouse"
            )


def check_contents(stick: Path, lock: dict) -> None:
    """Refuse a stick holding anything pip could install that the signed lock does not list."""
    locked = {w["file"] for w in lock["wheels"]}
    extra = sorted(p.name for p in stick.iterdir() if p.name.endswith(INSTALLABLE) and p.name not in locked)
    if extra:
        raise StickError(
            f"{stick / extra[0]} is not in the signed lock ({len(extra)} unlisted package file(s)); the stick is not "
            "as the vendor built it, refusing to install anything from it"
        )


def stage(stick: Path, lock: dict, staging: Path) -> Path:
    """Copy each locked wheel once into ``staging`` and check its hash; returns the requirements file."""
    lines = []
    for wheel in lock["wheels"]:
        data = _read_regular(stick / wheel["file"])
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), wheel["sha256"]):
            raise StickError(
                f"{stick / wheel['file']}: SHA-256 differs from the signed lock (corrupt or altered); re-copy the stick"
            )
        (staging / wheel["file"]).write_bytes(data)
        lines.append(f"{wheel['name']}=={wheel['version']} --hash=sha256:{wheel['sha256']}\n")
    requirements = staging / "requirements.txt"
    requirements.write_text("".join(lines))
    return requirements


def install(stick: Path, prefix: Path, trust: Path, first_trust: str | None = None) -> Path:
    """Verify the stick and install exactly its locked wheels into a virtual environment at ``prefix``."""
    lock, _ = verified_lock(stick, trusted_keys(trust, stick, first_trust))
    check_contents(stick, lock)
    staging = Path(tempfile.mkdtemp(prefix="edge-appliance-stick-"))  # 0700, off the stick
    try:
        requirements = stage(stick, lock, staging)
        if not (prefix / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(prefix)], check=True)
        pip = [str(prefix / "bin" / "python"), "-m", "pip", "install", "--isolated", "--quiet", "--no-cache-dir"]
        pip += ["--no-index", "--find-links", str(staging), "--only-binary=:all:", "--require-hashes"]
        proc = subprocess.run([*pip, "-r", str(requirements)], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise StickError(f"pip refused the locked set: {last}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    exe = prefix / "bin" / "edge-appliance"
    if subprocess.run([str(exe), "--help"], capture_output=True).returncode != 0:
        raise StickError(f"{exe} does not start after the install; report this to the vendor")
    return exe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="install-offline",
        description="Install edge-appliance from a signed software stick, with no network access.",
    )
    parser.add_argument(
        "prefix", nargs="?", default=DEFAULT_PREFIX, help=f"virtual environment (default {DEFAULT_PREFIX})"
    )
    parser.add_argument(
        "--stick", default=str(Path(__file__).resolve().parent), help="the stick's wheelhouse directory"
    )
    parser.add_argument("--trust", default=DEFAULT_TRUST, help=f"trusted vendor keys, *.pub (default {DEFAULT_TRUST})")
    parser.add_argument(
        "--first-trust",
        metavar="FINGERPRINT",
        help="first install only, with an empty trust store: trust the stick's vendor key if it has this fingerprint",
    )
    args = parser.parse_args(argv)
    try:
        exe = install(Path(args.stick), Path(args.prefix), Path(args.trust), args.first_trust)
    except StickError as exc:
        print(f"install-offline: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"install-offline: error: {exc}", file=sys.stderr)
        return 1
    print(f"installed: {exe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
