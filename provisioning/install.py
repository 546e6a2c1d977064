"""Install verified bundles into A/B slots of a device state directory, with atomic switch and rollback.

Layout under the state directory::

    slots/a/, slots/b/      still-encrypted bundle copies (manifest, signature, payload)
    current -> slots/X      the slot the daemon loads
    previous -> slots/Y     the slot ``rollback`` returns to
    versions.json           per model id: the highest version (and its bundle) ever installed
    install.log             one JSON line per install, model replacement and rollback

The source (a USB stick) is read exactly once: the manifest and its signature into memory, where
the signature is checked, then every file the signed manifest lists — and nothing else — copied
as a regular file, without following any link, into a staging directory. The staged copy is what
is verified (signature, hashes, every chunk) and what is renamed into the slot, so a stick that
changes between reads cannot get unverified bytes installed.

Every change is prepared beside its target and made visible by one ``rename`` (atomic on POSIX),
so a crash at any point leaves ``current`` pointing at a complete, loadable slot.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .bundle import MANIFEST, PAYLOAD_DIR, SIGNATURE, TAG, Bundle, open_bundle, verify_manifest
from .errors import InstallError, IntegrityError, UnsafeFileError
from .keys import wipe

SLOTS = ("a", "b")
VERSIONS, INSTALL_LOG, LOCK = "versions.json", "install.log", ".install.lock"
VERSIONS_FORMAT = 1
COPY_BLOCK = 1 << 20

Progress = Callable[[int, int], None]  # (bytes copied so far, total bytes)


@dataclass(frozen=True)
class InstallResult:
    slot: str
    model_id: str
    version: int
    changed: bool
    replaced_model: str | None = None


def _link_target(state: Path, name: str) -> Path | None:
    link = state / name
    return (state / os.readlink(link)) if link.is_symlink() else None


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _own(path: Path, state: Path) -> None:
    """Give ``path`` the state directory's owner when run as root.

    The service (systemd ``DynamicUser=``) owns its ``StateDirectory=``; a root-run install that
    left root-owned files there would make the model unreadable to it at the next reload or start.
    """
    if os.geteuid() == 0:
        owner = state.stat()
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)


def _hand_over(tree: Path, state: Path) -> None:
    """A copied slot gets the service's ownership and private modes instead of the stick's.

    The bundle is ciphertext, but it stays owner-only like everything the service writes (``UMask=0077``).
    """
    for path in [tree, *tree.rglob("*")]:
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
        _own(path, state)


def _point(state: Path, name: str, slot: str) -> None:
    """Atomically make ``state/name`` a symlink to ``slots/slot``."""
    tmp = state / f".{name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(f"slots/{slot}", tmp)
    _own(tmp, state)
    os.replace(tmp, state / name)
    fsync_path(state)


def current_bundle(state: Path, trusted: dict[str, Ed25519PublicKey]) -> Bundle | None:
    target = _link_target(Path(state), "current")
    return open_bundle(target, trusted) if target else None


def current_manifest_unverified(state: Path) -> tuple[dict | None, str | None]:
    """The installed bundle's manifest as it is on disk, signature NOT checked (for display only), and its slot."""
    target = _link_target(Path(state), "current")
    if target is None:
        return None, None
    try:
        manifest = json.loads((target / MANIFEST).read_bytes())
    except (OSError, ValueError) as exc:
        raise InstallError(f"{target / MANIFEST}: unreadable ({exc}); reinstall the bundle") from None
    if not isinstance(manifest, dict):
        raise InstallError(f"{target / MANIFEST}: not a manifest; reinstall the bundle")
    return manifest, target.name


def verify_fully(bundle: Bundle, device_key: X25519PrivateKey | None) -> None:
    """Ciphertext hashes, and with the device key also the recipient entry and every chunk's tag."""
    bundle.check_ciphertext()
    if device_key is not None:
        data_key = bundle.unwrap_key(device_key)
        try:
            bundle.verify_chunks(data_key)
        finally:
            wipe(data_key)


# -- reading the stick: regular files only, no link followed, each byte read once ------------------


def _open_regular(name: str, dir_fd: int, where: Path) -> int:
    """Open ``name`` in ``dir_fd`` for reading if, and only if, it is a regular file (not a link to one)."""
    try:
        # O_NONBLOCK: opening a FIFO planted on the stick must not hang the installer.
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise IntegrityError(f"{where / name} is missing; re-copy the bundle from the vendor") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(
                f"{where / name} is a symbolic link; a bundle holds regular files only (re-copy it from the vendor)"
            ) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafeFileError(
            f"{where / name} is not a regular file (mode {stat.filemode(mode)}); re-copy the bundle from the vendor"
        )
    os.set_blocking(fd, True)
    return fd


def _open_dir(name: str, dir_fd: int | None, where: Path) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFileError(f"{where / name} is a symbolic link or not a directory; re-copy the bundle") from None
        raise


def _read_small(name: str, dir_fd: int, where: Path, limit: int = 16 << 20) -> bytes:
    fd = _open_regular(name, dir_fd, where)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(f"{where / name} is larger than {limit} bytes; not a bundle manifest")
    return data


def _write_new(path: Path, chunks) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    written = 0
    with os.fdopen(fd, "wb") as out:
        for chunk in chunks:
            out.write(chunk)
            written += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return written


def _stage(source: Path, staging: Path, manifest_raw: bytes, sig: bytes, root_fd: int, progress: Progress | None):
    """Copy the verified manifest bytes and every payload file it lists from the stick into ``staging``."""
    manifest = json.loads(manifest_raw)
    total = sum(f["size"] + f["chunks"] * TAG for f in manifest["files"])
    staging.mkdir(mode=0o700)
    (staging / PAYLOAD_DIR).mkdir(mode=0o700)
    _write_new(staging / MANIFEST, [manifest_raw])
    _write_new(staging / SIGNATURE, [sig])
    done = 0
    if progress:
        progress(done, total)
    payload_fd = _open_dir(PAYLOAD_DIR, root_fd, source)
    try:
        for entry in manifest["files"]:
            name = entry["path"].split("/", 1)[1]  # validated: payload/NNN.enc
            fd = _open_regular(name, payload_fd, source / PAYLOAD_DIR)
            with os.fdopen(fd, "rb") as f:
                done += _write_new(staging / entry["path"], iter(lambda f=f: f.read(COPY_BLOCK), b""))
            if progress:
                progress(done, total)
    finally:
        os.close(payload_fd)
    fsync_path(staging / PAYLOAD_DIR)
    fsync_path(staging)


# -- per-model version counters and the install log -----------------------------------------------


def read_versions(state: Path, trusted: dict[str, Ed25519PublicKey]) -> dict[str, dict]:
    """model id -> {"version", "bundle_id"} of the highest version ever installed on this device.

    A state directory from before the counters existed is read from its ``current`` and
    ``previous`` slots (the migration); the file is written at the next install.
    """
    path = Path(state) / VERSIONS
    if path.exists():
        try:
            data = json.loads(path.read_text())
            if data.get("format") != VERSIONS_FORMAT:
                raise InstallError(
                    f"{path}: format {data.get('format')!r}, this software reads {VERSIONS_FORMAT}; "
                    "upgrade the appliance software"
                )
            return data["models"]
        except (ValueError, KeyError, AttributeError) as exc:
            raise InstallError(
                f"{path} is damaged ({exc}); restore it from backup — it is what refuses downgrades"
            ) from None
    models: dict[str, dict] = {}
    for name in ("previous", "current"):
        target = _link_target(Path(state), name)
        if target is not None and target.is_dir():
            _raise_counter(models, open_bundle(target, trusted).manifest)
    return models


def _raise_counter(models: dict[str, dict], manifest: dict) -> None:
    held = models.get(manifest["model_id"])
    if held is None or manifest["version"] > held["version"]:
        models[manifest["model_id"]] = {"version": manifest["version"], "bundle_id": manifest["bundle_id"]}


def _write_versions(state: Path, models: dict[str, dict]) -> None:
    tmp = state / f".{VERSIONS}.tmp"
    tmp.unlink(missing_ok=True)
    _write_new(tmp, [json.dumps({"format": VERSIONS_FORMAT, "models": models}, indent=2, sort_keys=True).encode()])
    os.replace(tmp, state / VERSIONS)
    fsync_path(state)


def _log(state: Path, record: dict) -> None:
    line = json.dumps({"ts": round(time.time(), 3), **record}, sort_keys=True) + "\n"
    fd = os.open(state / INSTALL_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_install_log(state: Path) -> list[dict]:
    path = Path(state) / INSTALL_LOG
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _check_policy(manifest: dict, installed: Bundle | None, models: dict, allow_downgrade: bool, replace: bool) -> bool:
    """Refuse another model id without ``replace`` and an older version without ``allow_downgrade``.

    Returns whether the install is a (permitted) downgrade.
    """
    model_id, version = manifest["model_id"], manifest["version"]
    if installed is not None and installed.model_id != model_id and not replace:
        raise InstallError(
            f"the bundle holds model {model_id!r} but the device serves {installed.model_id!r}; "
            "pass --replace-model to replace it (recorded in the install log)"
        )
    held = models.get(model_id)
    older = held is not None and (
        version < held["version"] or (version == held["version"] and manifest["bundle_id"] != held["bundle_id"])
    )
    if older and not allow_downgrade:
        raise InstallError(
            f"{model_id} version {version} is not newer than version {held['version']} already installed on this "
            "device; pass --allow-downgrade to install it anyway"
        )
    return older


class _StateLock:
    """One install or rollback at a time per state directory."""

    def __init__(self, state: Path):
        state.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(state / LOCK, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self):
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise InstallError("another install or rollback is running on this state directory; wait for it") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def install(
    source: Path,
    state: Path,
    trusted: dict[str, Ed25519PublicKey],
    device_key: X25519PrivateKey,
    allow_downgrade: bool = False,
    replace_model: bool = False,
    progress: Progress | None = None,
) -> InstallResult:
    """Copy ``source`` once into staging, verify that copy completely, then switch ``current`` to it.

    A refused install leaves the state directory as it was (one that did not exist is not created).
    """
    source, state = Path(source), Path(state)
    root_fd = _open_dir(str(source), None, source.parent)
    created = not state.exists()
    try:
        manifest_raw = _read_small(MANIFEST, root_fd, source)
        sig = _read_small(SIGNATURE, root_fd, source)
        manifest = verify_manifest(manifest_raw, sig, trusted, source)
        with _StateLock(state):
            return _install_locked(
                source,
                state,
                trusted,
                device_key,
                (manifest, manifest_raw, sig),
                root_fd,
                allow_downgrade,
                replace_model,
                progress,
            )
    except BaseException:
        if created:
            shutil.rmtree(state, ignore_errors=True)
        raise
    finally:
        os.close(root_fd)


def _install_locked(
    source, state, trusted, device_key, signed, root_fd, allow_downgrade, replace_model, progress
) -> InstallResult:
    manifest, manifest_raw, sig = signed
    installed = current_bundle(state, trusted)
    if installed is not None and installed.manifest["bundle_id"] == manifest["bundle_id"]:
        return InstallResult(installed.root.name, installed.model_id, installed.version, changed=False)
    models = read_versions(state, trusted)
    downgrade = _check_policy(manifest, installed, models, allow_downgrade, replace_model)
    active = installed.root.name if installed else None
    slot = next(s for s in SLOTS if s != active)
    slots = state / "slots"
    slots.mkdir(exist_ok=True, mode=0o700)
    slots.chmod(0o700)
    _own(slots, state)
    staging = slots / f".{slot}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _stage(source, staging, manifest_raw, sig, root_fd, progress)
        staged = open_bundle(staging, trusted)
        verify_fully(staged, device_key)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _hand_over(staging, state)  # readable by the service's user, whoever runs the install
    _raise_counter(models, staged.manifest)
    _write_versions(state, models)  # before the switch: a crash leaves the counter ahead, never behind
    shutil.rmtree(slots / slot, ignore_errors=True)
    os.replace(staging, slots / slot)
    fsync_path(slots)
    if active:
        _point(state, "previous", active)
    _point(state, "current", slot)
    replaced = installed.model_id if installed and installed.model_id != staged.model_id else None
    _log(
        state,
        {
            "action": "replace-model" if replaced else "install",
            "model_id": staged.model_id,
            "version": staged.version,
            "bundle_id": staged.manifest["bundle_id"],
            "slot": slot,
            "previous": {"model_id": installed.model_id, "version": installed.version} if installed else None,
            "downgrade": downgrade,
        },
    )
    return InstallResult(slot, staged.model_id, staged.version, changed=True, replaced_model=replaced)


def rollback(state: Path) -> str:
    """Swap ``current`` and ``previous``; returns the slot now current."""
    state = Path(state)
    with _StateLock(state):
        cur, prev = _link_target(state, "current"), _link_target(state, "previous")
        if prev is None or not prev.is_dir():
            raise InstallError(f"{state}: no previous slot to roll back to")
        _point(state, "previous", cur.name)
        _point(state, "current", prev.name)
        _log(state, {"action": "rollback", "slot": prev.name, "from_slot": cur.name})
    return prev.name
