"""Install verified bundles into A/B slots of a device state directory, with atomic switch and rollback.

Layout under the state directory::

    slots/a/, slots/b/      still-encrypted bundle copies (manifest, signature, payload)
    current -> slots/X      the slot the daemon loads
    previous -> slots/Y     the slot ``rollback`` returns to

Every change is prepared beside its target and made visible by one ``rename`` (atomic on POSIX),
so a crash at any point leaves ``current`` pointing at a complete, loadable slot.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .bundle import Bundle, open_bundle
from .errors import InstallError
from .keys import wipe

SLOTS = ("a", "b")


@dataclass(frozen=True)
class InstallResult:
    slot: str
    model_id: str
    version: int
    changed: bool


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


def verify_fully(bundle: Bundle, device_key: X25519PrivateKey | None) -> None:
    """Ciphertext hashes, and with the device key also the recipient entry and every chunk's tag."""
    bundle.check_ciphertext()
    if device_key is not None:
        data_key = bundle.unwrap_key(device_key)
        try:
            bundle.verify_chunks(data_key)
        finally:
            wipe(data_key)


def install(
    source: Path,
    state: Path,
    trusted: dict[str, Ed25519PublicKey],
    device_key: X25519PrivateKey,
    allow_downgrade: bool = False,
) -> InstallResult:
    """Verify ``source`` completely, copy it into the inactive slot, then switch ``current`` to it."""
    state = Path(state)
    bundle = open_bundle(source, trusted)
    verify_fully(bundle, device_key)
    installed = current_bundle(state, trusted)
    if installed is not None:
        if installed.manifest["bundle_id"] == bundle.manifest["bundle_id"]:
            return InstallResult(installed.root.name, bundle.model_id, bundle.version, changed=False)
        if bundle.version <= installed.version and not allow_downgrade:
            raise InstallError(
                f"bundle version {bundle.version} is not newer than installed version "
                f"{installed.version}; pass --allow-downgrade to install it anyway"
            )
    active = installed.root.name if installed else None
    slot = next(s for s in SLOTS if s != active)
    slots = state / "slots"
    slots.mkdir(parents=True, exist_ok=True)
    slots.chmod(0o700)
    _own(slots, state)
    staging = slots / f".{slot}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(bundle.root, staging, ignore=shutil.ignore_patterns(".*"))
    _hand_over(staging, state)
    for path in staging.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    shutil.rmtree(slots / slot, ignore_errors=True)
    os.replace(staging, slots / slot)
    fsync_path(slots)
    if active:
        _point(state, "previous", active)
    _point(state, "current", slot)
    return InstallResult(slot, bundle.model_id, bundle.version, changed=True)


def rollback(state: Path) -> str:
    """Swap ``current`` and ``previous``; returns the slot now current."""
    state = Path(state)
    cur, prev = _link_target(state, "current"), _link_target(state, "previous")
    if prev is None or not prev.is_dir():
        raise InstallError(f"{state}: no previous slot to roll back to")
    _point(state, "previous", cur.name)
    _point(state, "current", prev.name)
    return prev.name
