"""Helpers shared by the benchmarks: start a daemon on a free port from a device's config."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.config import load_config  # noqa: E402
from appliance.transport.client import Client  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def daemon(config_path: Path, name: str = "bench", audit_store: str | None = None, response_cache: int = 0):
    """Run `edge-appliance serve` from a copy of ``config_path`` on a free port.

    ``audit_store="none"`` turns the audit store off in the copy (benchmark baseline only). The
    response cache is off unless asked for: benchmarks repeat identical requests, which must run.
    """
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    original = load_config(config_path).server.endpoints[0]
    text = config_path.read_text().replace(original, endpoint)
    if audit_store:
        line = f'store = "{audit_store}"\n'
        text = text.replace("[audit]\n", "[audit]\n" + line, 1) if "[audit]\n" in text else text + "\n[audit]\n" + line
    text = re.sub(r"(?m)^response_cache\s*=.*\n", "", text)
    text = (
        text.replace("[engine]\n", f"[engine]\nresponse_cache = {response_cache}\n", 1)
        if "[engine]\n" in text
        else text + f"\n[engine]\nresponse_cache = {response_cache}\n"
    )
    cfg = config_path.with_name(f"{name}-appliance.toml")
    cfg.write_text(text)
    exe = Path(sys.executable).parent / "edge-appliance"
    proc = subprocess.Popen([str(exe), "--config", str(cfg), "serve"], stderr=subprocess.DEVNULL)
    try:
        with Client(endpoint, timeout_s=2, retries=60) as c:
            c.health()
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        cfg.unlink()


def genai_generate(model, ids: list[int], new: int) -> tuple[float, float]:
    """One greedy onnxruntime-genai generation of ``new`` tokens after ``ids``: (time to first token s,
    decode tokens/s after it). ``model`` is an ``onnxruntime_genai.Model`` (threads set in its config)."""
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.array(ids, np.int32))
    gen.generate_next_token()
    t1 = time.perf_counter()
    for _ in range(new - 1):
        gen.generate_next_token()
    return t1 - t0, (new - 1) / max(time.perf_counter() - t1, 1e-9)


def genai_build(hf: Path, target: Path, precision: str, threads: int, cache: Path) -> Path:
    """onnxruntime-genai's own builder on the Hugging Face checkpoint ``hf`` (once), with our thread count overlaid
    in its ``genai_config.json``."""
    if not (target / "genai_config.json").exists():
        builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(target)]
        subprocess.run(builder + ["-p", precision, "-e", "cpu", "-c", str(cache)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    config_path = target / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    config_path.write_text(json.dumps(config, indent=4))
    return target
