"""Offline installation of the appliance software itself: a wheelhouse for the USB stick.

On a connected machine, ``edge-provision wheelhouse --out DIR`` downloads binary wheels of the
runtime dependencies for the target platform, builds the appliance's own wheel, and writes
``SHA256SUMS`` and ``install-offline.sh``. On the air-gapped device the script checks the sums
and installs with ``pip install --no-index --find-links`` — nothing is fetched. The stick also carries the systemd
unit (``edge-appliance.service``, the same bytes the wheel installs under ``share/edge-appliance``).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .errors import ProvisioningError

DIST = "edge-appliance"
UNIT = "edge-appliance.service"
INSTALL_SCRIPT = """#!/bin/sh
# Install edge-appliance from this directory, with no network access.
#   sh install-offline.sh [PREFIX]        (default PREFIX: /opt/edge-appliance/venv)
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=${1:-/opt/edge-appliance/venv}
PYTHON=${PYTHON:-python3}
cd "$HERE"
sha256sum --quiet -c SHA256SUMS || { echo "install-offline: a wheel is corrupt; re-copy the stick" >&2; exit 1; }
"$PYTHON" -m venv "$PREFIX"
"$PREFIX/bin/pip" install --quiet --no-index --find-links "$HERE" --no-cache-dir "$DIST_REQ"
echo "installed: $("$PREFIX/bin/edge-appliance" --help >/dev/null && echo "$PREFIX/bin/edge-appliance")"
echo "unit file: $PREFIX/share/edge-appliance/edge-appliance.service (install -m 0644 it into /etc/systemd/system/)"
"""


def runtime_requirements(python_version: str | None = None) -> list[str]:
    """The appliance's runtime dependencies (no extras) for the target Python.

    pip evaluates environment markers against the interpreter running it, not ``--python-version``,
    so markers are resolved here (e.g. ``tomli`` is needed on Python 3.10 only).
    """
    from packaging.requirements import Requirement

    try:
        requires = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        raise ProvisioningError(f"{DIST} is not installed in this Python; run from its virtual environment") from None
    env = {"extra": ""}
    if python_version:
        env.update(python_version=python_version, python_full_version=f"{python_version}.0")
    wanted = []
    for line in requires:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            wanted.append(str(req))
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


def build_wheelhouse(out: Path, platform: str | None, python_version: str | None) -> list[Path]:
    """Fill ``out`` with wheels for ``platform``/``python_version`` (default: this machine)."""
    out.mkdir(parents=True, exist_ok=True)
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(project_root()))
    target = []
    if platform:
        for tag in compatible_platforms(platform):
            target += ["--platform", tag]
        target += ["--only-binary=:all:", "--implementation", "cp"]
    if python_version:
        target += ["--python-version", python_version, "--only-binary=:all:"]
    _pip("download", "--quiet", "--dest", str(out), *target, *runtime_requirements(python_version))
    wheels = sorted(out.glob("*.whl"))
    shutil.copyfile(project_root() / "systemd" / UNIT, out / UNIT)
    sums = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n" for f in [*wheels, out / UNIT])
    (out / "SHA256SUMS").write_text(sums)
    script = out / "install-offline.sh"
    script.write_text(INSTALL_SCRIPT.replace('"$DIST_REQ"', DIST))
    script.chmod(0o755)
    return wheels
