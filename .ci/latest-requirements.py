"""Print pyproject.toml's runtime, build and dev requirements with their upper bounds removed, one per line, for
`make check-latest`: a throwaway venv with the newest release of every dependency. torch stays the pinned CPU
wheel (any other release is a multi-GB CUDA download on these machines)."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from packaging.requirements import Requirement

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
for text in [*project["dependencies"], *(r for x in ("build", "dev") for r in project["optional-dependencies"][x])]:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate():
        continue
    if req.name == "torch":
        print("torch==2.13.0")
        continue
    lower = [str(s) for s in req.specifier if s.operator in (">=", ">", "!=")]
    print(req.name + ",".join(lower))
print("setuptools")  # the build backend, for the editable install without build isolation
sys.stdout.flush()
