"""Offline training text: the docstrings of the Python standard library every machine carries.

The corpus is deterministic for a given Python installation: files are read in sorted order and
documents are split into train/held-out by a hash of their text, so a document never appears in
both halves and the split does not depend on the order files were found.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Directories that are test suites, vendored code or generated tables rather than prose.
_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__", "encodings", "turtledemo"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    heldout: list[str]

    def stats(self) -> dict[str, int]:
        return {
            "train_docs": len(self.train),
            "heldout_docs": len(self.heldout),
            "train_chars": sum(map(len, self.train)),
            "heldout_chars": sum(map(len, self.heldout)),
        }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_docstrings(root: Path) -> Iterator[str]:
    """Yield cleaned module, class and function docstrings from every source file under ``root``."""
    for path in sorted(root.rglob("*.py")):
        if _SKIP_PARTS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    yield clean_text(doc)


def clean_text(text: str) -> str:
    """Dedent, drop control characters and collapse runs of blank lines."""
    text = _CONTROL.sub("", inspect.cleandoc(text))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def is_heldout(doc: str, heldout_percent: int) -> bool:
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < heldout_percent


def build_corpus(root: Path | None = None, min_chars: int = 40, heldout_percent: int = 5) -> Corpus:
    """Collect unique docstrings of at least ``min_chars`` characters and split them by hash."""
    seen: set[str] = set()
    train: list[str] = []
    heldout: list[str] = []
    for doc in iter_docstrings(root or stdlib_root()):
        if len(doc) < min_chars or doc in seen:
            continue
        seen.add(doc)
        (heldout if is_heldout(doc, heldout_percent) else train).append(doc)
    return Corpus(train=train, heldout=heldout)
