"""The packages depend one way only: edge_models -> appliance -> provisioning (docs/ARCHITECTURE.md). Every import
is read from the source, function-level ones included, so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# package -> the project packages it may import
ALLOWED = {"provisioning": set(), "appliance": {"provisioning"}, "edge_models": {"appliance", "provisioning"}}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_one_direction(package):
    wrong = {
        str(path.relative_to(REPO)): sorted(imported_packages(path) - ALLOWED[package] - {package})
        for path in sorted((REPO / package).rglob("*.py"))
    }
    wrong = {k: v for k, v in wrong.items() if v}
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"
