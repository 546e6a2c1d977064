"""Device and vendor key material: generation, 0600 storage, and loading (systemd credentials first).

A device has three key pairs: X25519 (receives bundle data keys), Ed25519 (signs audit exports)
and a CurveZMQ pair (the server's transport identity). A vendor has an Ed25519 signing key.
Private keys are raw 32-byte files created 0600 with O_EXCL; a key file readable by group or
others is refused rather than used.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .errors import KeyMaterialError
from .stick import public_key_problem

DEVICE_X25519 = "device-x25519.key"
DEVICE_ED25519 = "device-ed25519.key"
DEVICE_CURVE = "device-curve.key"
IDENTITY_FILE = "device-identity.json"
VENDOR_SIGNING = "vendor-ed25519.key"
VENDOR_PUBLIC = "vendor-ed25519.pub"

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw


def public_bytes(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(_RAW, _RAW_PUB)


def fingerprint(public: bytes) -> str:
    """Short stable identifier of a public key: hex of the first 16 bytes of its SHA-256."""
    return hashlib.sha256(public).hexdigest()[:32]


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600; refuse to overwrite an existing key."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyMaterialError(
            f"{path} already exists; refusing to overwrite a private key (move it away first)"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


CREDSTORE = Path("/etc/credstore.encrypted")  # where `enroll --credstore` seals keys and the unit loads them


def credstore_dir() -> Path:
    """The sealed-credential store root tools read: ``$EDGE_APPLIANCE_CREDSTORE``, else the systemd default."""
    return Path(os.environ.get("EDGE_APPLIANCE_CREDSTORE") or CREDSTORE)


def read_private(name: str, fallback_dir: Path | None) -> bytearray:
    """Read a private key: ``$CREDENTIALS_DIRECTORY/name`` (systemd) first, then ``fallback_dir/name``,
    then the credential sealed by ``enroll --credstore`` (decrypted by ``systemd-creds`` into memory).

    Returns a bytearray so the caller can wipe it once the key object is built.
    """
    candidates = []
    if os.environ.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(os.environ["CREDENTIALS_DIRECTORY"]) / name)
    if fallback_dir is not None:
        candidates.append(Path(fallback_dir) / name)
    for path in candidates:
        if not path.exists():
            continue
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyMaterialError(
                f"{path} is accessible by group/others (mode {oct(mode & 0o777)}); run: chmod 600 {path}"
            )
        data = bytearray(path.read_bytes())
        return data
    sealed = credstore_dir() / name
    if sealed.exists():
        return unseal_credential(sealed, name)
    where = " or ".join(str(p) for p in [*candidates, sealed])
    raise KeyMaterialError(f"private key {name!r} not found in {where}; enroll the device with 'edge-provision enroll'")


def unseal_credential(path: Path, name: str) -> bytearray:
    """Decrypt a ``systemd-creds``-sealed key straight into memory (never to a file)."""
    try:
        proc = subprocess.run(
            ["systemd-creds", "decrypt", f"--name={name}", str(path), "-"], capture_output=True, timeout=60
        )
    except FileNotFoundError:
        raise KeyMaterialError(f"{path} is sealed but systemd-creds is not installed; install systemd") from None
    if proc.returncode != 0:
        why = (proc.stderr.decode(errors="replace").strip().splitlines() or ["(no output)"])[-1]
        hint = "run this command as root" if os.geteuid() != 0 else "was it sealed on this machine?"
        raise KeyMaterialError(f"cannot unseal {path} with systemd-creds ({why}); {hint}")
    return bytearray(proc.stdout)


def wipe(buf: bytearray | bytes) -> None:
    """Overwrite secret bytes in place (memset, fast for multi-GB model buffers).

    A ``bytes`` object is overwritten through its buffer address: only for a copy we made
    ourselves, that no one else still reads (libraries such as ONNX Runtime accept only
    ``bytes``). Best effort: copies made inside OpenSSL, ONNX Runtime or by Python itself are
    out of reach.
    """
    if isinstance(buf, bytearray):
        if len(buf):
            ctypes.memset((ctypes.c_char * len(buf)).from_buffer(buf), 0, len(buf))
    elif len(buf) > 1:  # CPython shares the empty and one-byte objects: never write into those
        ctypes.memset(ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value, 0, len(buf))


PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4


def make_undumpable() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)``: no core dump of this process, and no other process of the same
    user may ptrace it or read its ``/proc/PID/mem`` — it holds decrypted weights and keys.

    Linux only (returns False elsewhere); returns whether the kernel now reports it not dumpable.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0


def load_x25519(name: str, key_dir: Path | None) -> X25519PrivateKey:
    raw = read_private(name, key_dir)
    try:
        return X25519PrivateKey.from_private_bytes(bytes(raw))
    except ValueError as exc:
        raise KeyMaterialError(f"{name}: not a 32-byte X25519 private key ({exc})") from None
    finally:
        wipe(raw)


def load_ed25519(name: str, key_dir: Path | None) -> Ed25519PrivateKey:
    raw = read_private(name, key_dir)
    try:
        return Ed25519PrivateKey.from_private_bytes(bytes(raw))
    except ValueError as exc:
        raise KeyMaterialError(f"{name}: not a 32-byte Ed25519 private key ({exc})") from None
    finally:
        wipe(raw)


@dataclass(frozen=True)
class DeviceIdentity:
    """The public half of a device, carried out on USB to the vendor (``device-identity.json``)."""

    device_id: str
    x25519: bytes
    ed25519: bytes
    curve_public: str  # Z85, as ZeroMQ uses it

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.x25519)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": 1,
                "device_id": self.device_id,
                "fingerprint": self.fingerprint,
                "x25519": base64.b64encode(self.x25519).decode(),
                "ed25519": base64.b64encode(self.ed25519).decode(),
                "curve_public": self.curve_public,
            },
            indent=2,
        )

    @classmethod
    def load(cls, path: Path) -> DeviceIdentity:
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                device_id=data["device_id"],
                x25519=base64.b64decode(data["x25519"]),
                ed25519=base64.b64decode(data["ed25519"]),
                curve_public=data["curve_public"],
            )
        except (OSError, ValueError, KeyError) as exc:
            raise KeyMaterialError(
                f"{path}: not a device identity file ({exc}); re-export it with 'edge-provision enroll'"
            ) from None


def seal_credential(credstore: Path, name: str, data: bytes) -> None:
    """Encrypt ``data`` with ``systemd-creds`` (TPM2 and/or host key) straight from memory to
    ``credstore/name``; the plaintext never touches the disk. The unit's ``LoadCredentialEncrypted=``
    hands it to the daemon in ``$CREDENTIALS_DIRECTORY``."""
    credstore.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = credstore / name
    if target.exists():
        raise KeyMaterialError(f"{target} already exists; refusing to overwrite a sealed credential")
    try:
        proc = subprocess.run(
            ["systemd-creds", "encrypt", f"--name={name}", "-", str(target)],
            input=data,
            capture_output=True,
            timeout=60,
        )
    except FileNotFoundError:
        raise KeyMaterialError("systemd-creds is not installed; enroll with --keys DIR (0600 files) instead") from None
    if proc.returncode != 0:
        raise KeyMaterialError(
            f"systemd-creds encrypt failed for {name}: {proc.stderr.decode(errors='replace').strip().splitlines()[-1:]}"
        )


def enroll(key_dir: Path, device_id: str, credstore: Path | None = None) -> DeviceIdentity:
    """Create the device's three key pairs and write its public identity into ``key_dir``.

    Private keys go to ``credstore`` as systemd credentials when given, else to ``key_dir`` (0600).
    """
    import zmq

    x = X25519PrivateKey.generate()
    e = Ed25519PrivateKey.generate()
    curve_public, curve_secret = zmq.curve_keypair()
    secrets_ = {
        DEVICE_X25519: x.private_bytes(_RAW, _RAW_PRIV, serialization.NoEncryption()),
        DEVICE_ED25519: e.private_bytes(_RAW, _RAW_PRIV, serialization.NoEncryption()),
        DEVICE_CURVE: curve_secret,
    }
    for name, data in secrets_.items():
        if credstore is not None:
            seal_credential(credstore, name, data)
        else:
            write_private(key_dir / name, data)
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = DeviceIdentity(
        device_id=device_id,
        x25519=public_bytes(x.public_key()),
        ed25519=public_bytes(e.public_key()),
        curve_public=curve_public.decode(),
    )
    (key_dir / IDENTITY_FILE).write_text(identity.to_json())
    return identity


def load_public_x25519(path: Path) -> X25519PublicKey:
    """A recipient's X25519 public key: a device identity file, or 32 raw bytes."""
    raw = Path(path).read_bytes()
    if len(raw) != 32:
        raw = DeviceIdentity.load(path).x25519
    return X25519PublicKey.from_public_bytes(raw)


def load_public_ed25519(path: Path) -> Ed25519PublicKey:
    """A device's Ed25519 public key (audit signatures): its identity file, or 32 raw bytes."""
    raw = Path(path).read_bytes()
    if len(raw) != 32:
        raw = DeviceIdentity.load(path).ed25519
    return Ed25519PublicKey.from_public_bytes(raw)


def vendor_keygen(out_dir: Path) -> str:
    """Create a vendor signing key pair; returns the public key's fingerprint."""
    key = Ed25519PrivateKey.generate()
    write_private(out_dir / VENDOR_SIGNING, key.private_bytes(_RAW, _RAW_PRIV, serialization.NoEncryption()))
    pub = public_bytes(key.public_key())
    (out_dir / VENDOR_PUBLIC).write_bytes(pub)
    return fingerprint(pub)


def load_trusted_vendors(trust_dir: Path) -> dict[str, Ed25519PublicKey]:
    """Every ``*.pub`` (raw 32-byte Ed25519) in the trust store, keyed by fingerprint."""
    keys = {}
    for path in sorted(Path(trust_dir).glob("*.pub")):
        raw = path.read_bytes()
        if problem := public_key_problem(raw):
            raise KeyMaterialError(f"{path}: a trusted vendor key {problem}; replace it with the vendor's real key")
        keys[fingerprint(raw)] = Ed25519PublicKey.from_public_bytes(raw)
    if not keys:
        raise KeyMaterialError(f"no trusted vendor keys (*.pub) in {trust_dir}; copy the vendor's public key there")
    return keys
