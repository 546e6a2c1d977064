"""The sealed model bundle format (single source of truth; specified in docs/BUNDLE.md).

A bundle is a directory::

    manifest.json   what is inside, who may open it; the exact bytes are signed
    manifest.sig    64-byte Ed25519 signature over manifest.json by a vendor key
    payload/NNN.enc each payload file, AES-256-GCM in fixed chunks (STREAM construction)

Chunk ``i`` of file ``f`` is sealed with nonce ``prefix_f (7 B) || i (u32 BE) || last (u8)`` and
AAD ``MAGIC || bundle_id || len(file_id) (u16 BE) || file_id || i (u32 BE) || last (u8)``, so
truncation, reordering and splicing chunks across files or bundles all fail authentication.
The 32-byte data key is wrapped per recipient: ephemeral X25519 → HKDF-SHA256 → AES-256-GCM.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import keywrap
from .errors import BundleFormatError, IntegrityError, RecipientError, SignatureError
from .keys import fingerprint, public_bytes, wipe

FORMAT_VERSION = 2  # 2: engine entries carry their files, dtype and target (torch, TensorRT plans)
READABLE_FORMATS = (1, 2)
ENGINE_KINDS = ("onnxruntime", "torch", "tensorrt")
MAGIC = b"edge-appliance/bundle/v1"
DEFAULT_CHUNK = 1 << 20
TAG = 16
MANIFEST, SIGNATURE, PAYLOAD_DIR = "manifest.json", "manifest.sig", "payload"
FORMAT1_ONNX_FILES = ("model.onnx", "model.onnx.data")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chunk_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, int(last))


def chunk_aad(bundle_id: bytes, file_id: str, index: int, last: bool) -> bytes:
    fid = file_id.encode()
    return MAGIC + bundle_id + struct.pack(">H", len(fid)) + fid + struct.pack(">IB", index, int(last))


def wrap_key(data_key: bytes, recipient: X25519PublicKey, bundle_id: bytes) -> dict:
    """Wrap ``data_key`` for one device: its manifest entry."""
    return keywrap.wrap(data_key, recipient, MAGIC + bundle_id)


@dataclass(frozen=True)
class EngineEntry:
    """One way to run the model: the payload files an engine kind loads, their dtype, and for a
    TensorRT plan the target it was built for (``compute_capability`` like ``"8.7"``, ``tensorrt``
    like ``"10.3.0"``): a plan runs only on that GPU model and TensorRT version."""

    kind: str
    files: tuple[str, ...]
    dtype: str
    target: dict

    def to_dict(self) -> dict:
        return {"kind": self.kind, "files": list(self.files), "dtype": self.dtype, "target": dict(self.target)}

    @classmethod
    def from_dict(cls, d: dict) -> EngineEntry:
        return cls(kind=d["kind"], files=tuple(d["files"]), dtype=d["dtype"], target=dict(d.get("target", {})))


@dataclass(frozen=True)
class FileEntry:
    id: str
    path: str
    size: int
    chunk_size: int
    chunks: int
    nonce_prefix: bytes
    ciphertext_sha256: str

    @classmethod
    def from_dict(cls, d: dict) -> FileEntry:
        return cls(
            id=d["id"],
            path=d["path"],
            size=int(d["size"]),
            chunk_size=int(d["chunk_size"]),
            chunks=int(d["chunks"]),
            nonce_prefix=bytes.fromhex(d["nonce_prefix"]),
            ciphertext_sha256=d["ciphertext_sha256"],
        )


TORCH_FILES = ("model.safetensors", "config.json")  # a transformers checkpoint, for the torch engine


def infer_engines(files: dict[str, Path]) -> list[EngineEntry]:
    """Engine entries for the payload files that need no target: ONNX (float32, or the weight-only
    ``MatMulNBits`` quantization edge_models applies) and a safetensors checkpoint (stored dtype,
    cast at load: bf16 on CUDA, float32 on CPU)."""
    entries = []
    onnx = [f for f in FORMAT1_ONNX_FILES if f in files]
    if "model.onnx" in files:
        graph = Path(files["model.onnx"]).read_bytes()
        entries.append(
            EngineEntry("onnxruntime", tuple(onnx), "matmulnbits" if b"MatMulNBits" in graph else "float32", {})
        )
    if all(f in files for f in TORCH_FILES):
        config = json.loads(Path(files["config.json"]).read_text())
        entries.append(EngineEntry("torch", TORCH_FILES, str(config.get("dtype") or config.get("torch_dtype")), {}))
    return entries


def _chunk_count(size: int, chunk_size: int) -> int:
    return max(1, -(-size // chunk_size))  # an empty file still has one (empty, final) chunk


def _seal_file(src: Path, dst: Path, key: AESGCM, bundle_id: bytes, file_id: str, chunk_size: int) -> dict:
    size = src.stat().st_size
    chunks = _chunk_count(size, chunk_size)
    prefix = secrets.token_bytes(7)
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for i in range(chunks):
            last = i == chunks - 1
            aad = chunk_aad(bundle_id, file_id, i, last)
            sealed = key.encrypt(chunk_nonce(prefix, i, last), fin.read(chunk_size), aad)
            digest.update(sealed)
            fout.write(sealed)
        fout.flush()
        os.fsync(fout.fileno())
    return {
        "id": file_id,
        "path": f"{PAYLOAD_DIR}/{dst.name}",
        "size": size,
        "chunk_size": chunk_size,
        "chunks": chunks,
        "nonce_prefix": prefix.hex(),
        "ciphertext_sha256": digest.hexdigest(),
    }


def seal(
    files: dict[str, Path],
    out_dir: Path,
    *,
    model_id: str,
    version: int,
    architecture: str,
    engines: list[EngineEntry] | None,
    signing_key: Ed25519PrivateKey,
    recipients: Iterable[X25519PublicKey],
    chunk_size: int = DEFAULT_CHUNK,
    extra: dict | None = None,
    bundle_id: bytes | None = None,
    data_key: bytes | None = None,
) -> dict:
    """Encrypt ``files`` (file id → plaintext path) into a new bundle directory; returns the manifest.

    ``engines`` lists the engine kinds the payload carries; empty or None infers them from the file
    ids (``infer_engines``).
    ``bundle_id`` and ``data_key`` are fresh random values unless given (re-sealing the same
    payload for another set of devices); per-file nonce prefixes are always fresh.
    """
    recipients = list(recipients)
    if not MODEL_ID.fullmatch(model_id):
        raise BundleFormatError(
            f"model id {model_id!r}: use 1-128 letters, digits, '.', '_', '+' or '-', starting with a letter or digit"
        )
    if not recipients:
        raise RecipientError("a bundle needs at least one recipient device (--recipient device-identity.json)")
    if not 1 << 16 <= chunk_size <= 1 << 26:
        raise BundleFormatError(f"chunk size {chunk_size} outside 64 KiB..64 MiB")
    out_dir = Path(out_dir)
    (out_dir / PAYLOAD_DIR).mkdir(parents=True, exist_ok=False)
    bundle_id = bundle_id or secrets.token_bytes(16)
    data_key = bytearray(data_key or AESGCM.generate_key(256))
    try:
        aead = AESGCM(bytes(data_key))
        entries = [
            _seal_file(Path(src), out_dir / PAYLOAD_DIR / f"{n:03d}.enc", aead, bundle_id, fid, chunk_size)
            for n, (fid, src) in enumerate(sorted(files.items()))
        ]
        wrapped = [wrap_key(bytes(data_key), r, bundle_id) for r in recipients]
    finally:
        wipe(data_key)
    manifest = {
        "format": FORMAT_VERSION,
        "bundle_id": bundle_id.hex(),
        "model_id": model_id,
        "version": int(version),
        "architecture": architecture,
        "engines": [e.to_dict() for e in (engines or infer_engines(files))],
        "created": int(time.time()),
        "vendor_key": fingerprint(public_bytes(signing_key.public_key())),
        "files": entries,
        "recipients": wrapped,
        **(extra or {}),
    }
    raw = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (out_dir / MANIFEST).write_bytes(raw)
    (out_dir / SIGNATURE).write_bytes(signing_key.sign(raw))
    return manifest


@dataclass(frozen=True)
class Bundle:
    """A bundle whose manifest signature has been verified against a trusted vendor key."""

    root: Path
    manifest: dict

    @property
    def bundle_id(self) -> bytes:
        return bytes.fromhex(self.manifest["bundle_id"])

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    def files(self) -> list[FileEntry]:
        return [FileEntry.from_dict(f) for f in self.manifest["files"]]

    def engines(self) -> list[EngineEntry]:
        """The engine kinds this bundle carries. A format-1 bundle carries ONNX only (its engines
        list was informational), read as one float32 ``onnxruntime`` entry over its ONNX files."""
        if self.manifest["format"] == 1:
            ids = [f.id for f in self.files()]
            return [EngineEntry("onnxruntime", tuple(f for f in FORMAT1_ONNX_FILES if f in ids), "float32", {})]
        return [EngineEntry.from_dict(e) for e in self.manifest["engines"]]

    def file(self, file_id: str) -> FileEntry:
        for entry in self.files():
            if entry.id == file_id:
                return entry
        raise BundleFormatError(f"bundle {self.root} has no file {file_id!r}; it holds {[f.id for f in self.files()]}")

    def unwrap_key(self, device_key: X25519PrivateKey) -> bytearray:
        """Find this device's recipient entry and unwrap the data key (caller wipes it)."""
        return keywrap.unwrap(self.manifest["recipients"], device_key, MAGIC + self.bundle_id, f"bundle {self.root}")

    def decrypt_into(
        self,
        file_id: str,
        data_key: bytes | bytearray,
        out: bytearray | memoryview | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> bytearray | memoryview:
        """Authenticate and decrypt one payload file into a preallocated buffer (never to disk); ``progress`` is
        told the bytes decrypted (and authenticated) so far after every chunk."""
        entry = self.file(file_id)
        buf = out if out is not None else bytearray(entry.size)
        if len(buf) != entry.size:
            raise ValueError(f"buffer of {len(buf)} bytes for {file_id} of {entry.size} bytes")
        self._decrypt_chunks(entry, AESGCM(bytes(data_key)), memoryview(buf), scratch=False, progress=progress)
        return buf

    def verify_chunks(self, data_key: bytes | bytearray) -> None:
        """Authenticate every chunk of every file through one chunk-sized scratch buffer (nothing kept)."""
        aead = AESGCM(bytes(data_key))
        for entry in self.files():
            scratch = bytearray(min(entry.chunk_size, entry.size))
            self._decrypt_chunks(entry, aead, memoryview(scratch), scratch=True)
            wipe(scratch)

    def _decrypt_chunks(
        self, entry: FileEntry, aead: AESGCM, view: memoryview, scratch: bool, progress: Callable | None = None
    ) -> None:
        path = self.root / entry.path
        if not path.is_file():
            raise IntegrityError(f"{path}: payload file {entry.id!r} is missing; re-copy the bundle")
        inbuf = memoryview(bytearray(min(entry.chunk_size, entry.size) + TAG))  # reused: no per-chunk allocation
        with open(path, "rb", buffering=0) as f:
            for i in range(entry.chunks):
                last = i == entry.chunks - 1
                start = i * entry.chunk_size
                plain_len = min(entry.chunk_size, entry.size - start)
                sealed = inbuf[: f.readinto(inbuf[: plain_len + TAG])]
                target = view[:plain_len] if scratch else view[start : start + plain_len]
                try:
                    aead.decrypt_into(
                        chunk_nonce(entry.nonce_prefix, i, last),
                        sealed,
                        chunk_aad(self.bundle_id, entry.id, i, last),
                        target,
                    )
                except (InvalidTag, ValueError):
                    raise IntegrityError(
                        f"{path}: chunk {i} of {entry.chunks} fails authentication (tampered, "
                        "truncated or from another bundle); re-copy the bundle from the vendor "
                        "media"
                    ) from None
                if progress is not None:
                    progress(start + plain_len)
            if f.read(1):
                raise IntegrityError(f"{path}: trailing data after the last chunk; re-copy the bundle")

    def check_ciphertext(self) -> None:
        """Check every payload file's size and SHA-256 against the signed manifest (no key needed)."""
        for entry in self.files():
            path = self.root / entry.path
            if not path.is_file():
                raise IntegrityError(f"{path}: payload file {entry.id!r} is missing; re-copy the bundle")
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
            if not secrets.compare_digest(digest.hexdigest(), entry.ciphertext_sha256):
                raise IntegrityError(
                    f"{path}: SHA-256 differs from the signed manifest (file {entry.id!r} "
                    "altered or truncated); re-copy the bundle"
                )


def open_bundle(root: Path, trusted: dict[str, Ed25519PublicKey]) -> Bundle:
    """Read and verify ``root/manifest.json`` against the trusted vendor keys; nothing else is trusted before."""
    root = Path(root)
    try:
        raw = (root / MANIFEST).read_bytes()
        sig = (root / SIGNATURE).read_bytes()
    except OSError as exc:
        raise BundleFormatError(f"{root}: not a bundle ({exc.strerror}: {exc.filename})") from None
    return Bundle(root=root, manifest=verify_manifest(raw, sig, trusted, root))


def verify_manifest(raw: bytes, sig: bytes, trusted: dict[str, Ed25519PublicKey], root: Path) -> dict:
    """The manifest ``raw`` once its signature verifies and its schema is valid (``root`` only names it)."""
    if not any(_verifies(key, sig, raw) for key in trusted.values()):
        raise SignatureError(
            f"{root}/{SIGNATURE}: signature does not verify with any trusted vendor key "
            f"({', '.join(trusted)}); the manifest was altered or signed by an unknown vendor"
        )
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise BundleFormatError(f"{root}/{MANIFEST}: not JSON ({exc})") from None
    validate_manifest(manifest, root)
    return manifest


_PAYLOAD_PATH = re.compile(r"payload/[0-9]{3,6}\.enc")  # fullmatch: "$" would let a trailing newline through
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")  # printed in logs, health and audit rows: no escapes
_HEX = re.compile(r"[0-9a-f]*")


def validate_manifest(manifest: object, root: Path) -> None:
    """Strict schema check of a signed manifest, so no later step meets an unexpected type or path.

    Even a vendor-signed manifest is not allowed to point outside the bundle (``../``), to declare
    impossible sizes, or to omit fields.
    """

    def bad(why: str) -> BundleFormatError:
        return BundleFormatError(f"{root}/{MANIFEST}: {why}; the bundle is malformed, ask the vendor to re-seal it")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    if manifest.get("format") not in READABLE_FORMATS or isinstance(manifest.get("format"), bool):
        raise BundleFormatError(
            f"{root}: bundle format {manifest.get('format')!r}, this software reads "
            f"{', '.join(map(str, READABLE_FORMATS))}; upgrade the appliance software first"
        )
    for name, kind in (
        ("bundle_id", str),
        ("model_id", str),
        ("version", int),
        ("architecture", str),
        ("engines", list),
        ("files", list),
        ("recipients", list),
        ("created", int),
    ):
        if not isinstance(manifest.get(name), kind) or isinstance(manifest.get(name), bool):
            raise bad(f"field {name!r} missing or not {kind.__name__}")
    if not _is_hex(manifest["bundle_id"], 16):
        raise bad("bundle_id must be 32 hex digits")
    if not MODEL_ID.fullmatch(manifest["model_id"]):
        raise bad("model_id must be 1-128 letters, digits, '.', '_', '+' or '-', starting with a letter or digit")
    if not manifest["architecture"].isprintable() or len(manifest["architecture"]) > 128:
        raise bad("architecture must be at most 128 printable characters")
    if manifest["version"] < 0:
        raise bad("version must be >= 0")
    seen_ids, seen_paths = set(), set()
    for entry in manifest["files"]:
        if not isinstance(entry, dict):
            raise bad("a files[] entry is not an object")
        ints = [entry.get(k) for k in ("size", "chunk_size", "chunks")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise bad(f"file {entry.get('id')!r}: size, chunk_size and chunks must be non-negative integers")
        size, chunk_size, chunks = ints
        if not isinstance(entry.get("id"), str) or not entry["id"] or entry["id"] in seen_ids:
            raise bad("file ids must be unique non-empty strings")
        if (
            not isinstance(entry.get("path"), str)
            or not _PAYLOAD_PATH.fullmatch(entry["path"])
            or entry["path"] in seen_paths
        ):
            raise bad(f"file {entry['id']!r}: path {entry.get('path')!r} is not a unique payload/NNN.enc")
        if not (1 << 16 <= chunk_size <= 1 << 26) or chunks != _chunk_count(size, chunk_size):
            raise bad(f"file {entry['id']!r}: chunk_size/chunks inconsistent with size")
        if not _is_hex(entry.get("nonce_prefix"), 7) or not _is_hex(entry.get("ciphertext_sha256"), 32):
            raise bad(f"file {entry['id']!r}: nonce_prefix or ciphertext_sha256 malformed")
        seen_ids.add(entry["id"])
        seen_paths.add(entry["path"])
    if manifest["format"] >= 2:
        _validate_engines(manifest["engines"], seen_ids, bad)
    for entry in manifest["recipients"]:
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in ("fingerprint", "ephemeral", "nonce", "wrapped_key")
        ):
            raise bad("a recipients[] entry lacks fingerprint/ephemeral/nonce/wrapped_key strings")


_CAPABILITY = re.compile(r"[0-9]{1,2}\.[0-9]{1,2}")
_VERSION = re.compile(r"[0-9]+(\.[0-9]+){0,3}")


def _validate_engines(engines: list, file_ids: set[str], bad) -> None:
    """Format 2: every engine entry names a known kind, files the bundle holds, a dtype, and (a
    TensorRT plan) the GPU compute capability and TensorRT version it was built for. An empty list
    is well-formed; the loader then refuses to serve, naming what is missing."""
    for entry in engines:
        if not isinstance(entry, dict) or entry.get("kind") not in ENGINE_KINDS:
            raise bad(f"engine entry {entry!r} has no kind among {ENGINE_KINDS}")
        files, target = entry.get("files"), entry.get("target", {})
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f in file_ids for f in files):
            raise bad(f"{entry['kind']} engine names files {files!r} that the bundle does not hold")
        if not isinstance(entry.get("dtype"), str) or not isinstance(target, dict):
            raise bad(f"{entry['kind']} engine lacks a dtype string or its target is not an object")
        if entry["kind"] == "tensorrt" and not (
            isinstance(target.get("compute_capability"), str)
            and _CAPABILITY.fullmatch(target["compute_capability"])
            and isinstance(target.get("tensorrt"), str)
            and _VERSION.fullmatch(target["tensorrt"])
        ):
            raise bad('a tensorrt engine needs target {"compute_capability": "8.7", "tensorrt": "10.3.0"}')


def _is_hex(value: object, nbytes: int) -> bool:
    return isinstance(value, str) and len(value) == 2 * nbytes and bool(_HEX.fullmatch(value))


def _verifies(key: Ed25519PublicKey, sig: bytes, data: bytes) -> bool:
    try:
        key.verify(sig, data)
        return True
    except InvalidSignature:
        return False
