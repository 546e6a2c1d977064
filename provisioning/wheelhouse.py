"""Offline installation of the appliance software itself: a signed wheelhouse for the USB stick.

On a connected machine, ``edge-provision wheelhouse --out DIR --signing-key KEY`` downloads the binary
wheels the runtime lock (``provisioning/locks/runtime.txt``: exact versions, sha256 of every wheel) names for
the target platform and Python, each checked against its locked hash, builds the appliance's own wheel, and
writes the lock of exactly those wheels signed by the vendor key (format and installer:
``provisioning/stick.py``), the installer itself and ``install-offline.sh``. On the air-gapped
device the installer verifies the lock against the device's trusted vendor keys and installs
with ``pip install --no-index --require-hashes`` — nothing is fetched, nothing unlisted runs.
The systemd unit travels inside the appliance's own wheel (``share/edge-appliance``), so it is
covered by the signed lock like everything else on the stick.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import stick
from .errors import ProvisioningError
from .keys import fingerprint, public_bytes

DIST = stick.DIST
INSTALLER = "install-offline.py"
INSTALL_SCRIPT = """#!/bin/sh
# Install edge-appliance from this stick with no network access: verifies the vendor-signed
# wheels.lock, then installs exactly the locked wheels. Options: sh install-offline.sh --help
HERE=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python3}" -I -S "$HERE/install-offline.py" --stick "$HERE" "$@"
"""


RUNTIME_LOCK = Path(__file__).resolve().parent / "locks" / "runtime.txt"


def target_environment(python_version: str | None = None, platform: str | None = None) -> dict[str, str]:
    """PEP 508 marker values for the target device: this interpreter's, with the Python and machine overridden."""
    from packaging.markers import default_environment

    env = dict(default_environment())
    if python_version:
        env.update(python_version=python_version, python_full_version=f"{python_version}.0")
    if platform:
        env.update(platform_machine=re.sub(r"^(manylinux|musllinux)\w*?_(?=x86_64|aarch64|i686)", "", platform))
    return env


def runtime_requirements(python_version: str | None = None, platform: str | None = None) -> list[str]:
    """The locked runtime requirements for the target, one per line with its hashes (``name==version --hash=...``).

    pip evaluates environment markers against the interpreter running it, not ``--python-version`` or
    ``--platform``, so the lock's markers are resolved here (e.g. ``tomli`` is needed on Python 3.10 only, and
    onnxruntime's newest release for 3.10 is older than for 3.11).
    """
    from packaging.requirements import Requirement

    try:
        text = RUNTIME_LOCK.read_text()
    except OSError as exc:
        raise ProvisioningError(
            f"cannot read the runtime lock {RUNTIME_LOCK} ({exc.strerror}); build the wheelhouse from a checkout"
        ) from None
    env = target_environment(python_version, platform)
    wanted = []
    for entry in text.replace("\\\n", " ").splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        spec, *hashes = entry.split(" --hash=")
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate(env):
            wanted.append(f"{req.name}{req.specifier} " + " ".join(f"--hash={h.strip()}" for h in hashes))
    return wanted


def compatible_platforms(platform: str) -> list[str]:
    """pip matches ``--platform`` tags exactly; a glibc 2.N device also runs every older manylinux wheel."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform) or re.fullmatch(r"manylinux(2014)_(\w+)", platform)
    if not m:
        return [platform]
    newest = 17 if m.group(1) == "2014" else int(m.group(1))
    arch = m.group(2)
    return [f"manylinux_2_{v}_{arch}" for v in range(newest, 16, -1)] + [f"manylinux2014_{arch}"]


def project_root() -> Path:
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ProvisioningError(f"no source tree at {root}: build the wheelhouse from a checkout of {DIST}")
    return root


def _pip(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ProvisioningError(f"pip {args[0]} failed: {last}")


def build_wheelhouse(
    out: Path, platform: str | None, python_version: str | None, signing_key: Ed25519PrivateKey
) -> list[Path]:
    """Fill ``out`` with wheels for ``platform``/``python_version`` (default: this machine) and their signed lock."""
    out.mkdir(parents=True, exist_ok=True)
    _pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(project_root()))
    target = []
    if platform:
        for tag in compatible_platforms(platform):
            target += ["--platform", tag]
        target += ["--only-binary=:all:", "--implementation", "cp"]
    if python_version:
        target += ["--python-version", python_version, "--only-binary=:all:"]
    machine = platform or sysconfig.get_platform().replace("linux-", "manylinux_")
    locked = out / ".runtime-requirements.txt"
    locked.write_text("\n".join(runtime_requirements(python_version, machine)) + "\n")
    try:  # every wheel checked against the lock's sha256 before it is kept; nothing unlisted (--no-deps)
        _pip("download", "--quiet", "--require-hashes", "--no-deps", "--dest", str(out), *target, "-r", str(locked))
    finally:
        locked.unlink()
    wheels = sorted(out.glob("*.whl"))
    public = public_bytes(signing_key.public_key())
    lock = stick.lock_bytes(wheels, fingerprint(public))
    (out / stick.LOCK).write_bytes(lock)
    (out / stick.LOCK_SIG).write_bytes(signing_key.sign(lock))
    (out / stick.VENDOR_PUB).write_bytes(public)  # trusted only via --first-trust FINGERPRINT, never by itself
    shutil.copyfile(stick.__file__, out / INSTALLER)
    script = out / "install-offline.sh"
    script.write_text(INSTALL_SCRIPT)
    script.chmod(0o755)
    return wheels
