"""Decrypted model bytes do not outlive the engine build, and the daemon cannot be dumped."""

from __future__ import annotations

import gc
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.loader import load_model
from tests.conftest import Daemon


def reachable_copies(length: int, prefix: bytes) -> list[str]:
    """Types of the objects that reference a bytes/bytearray of ``length`` starting with ``prefix``.

    bytes and bytearray are not tracked by the garbage collector, so they are found as the
    referents of every object that is (dicts, instances' __dict__, lists, frames, closures ...).
    """
    holders = []
    for obj in gc.get_objects():
        for ref in gc.get_referents(obj):
            # type(), not isinstance(): some lazy module attributes warn when their class is asked for
            if type(ref) in (bytes, bytearray) and len(ref) == length and ref[: len(prefix)] == prefix:
                holders.append(type(obj).__name__)
    return holders


def test_no_python_object_references_the_decrypted_model_after_load(device, tiny_build):
    plain = (tiny_build / "onnx" / "model.onnx").read_bytes()
    length, prefix = len(plain), plain[:256]
    del plain  # the test's own copy: not part of what is checked
    model = load_model(load_config(device.config))
    try:
        assert getattr(model.engine.session, "_model_bytes", None) is None
        gc.collect()
        assert reachable_copies(length, prefix) == []
        assert model.engine.prefill([(0, [model.spec.bos_token_id] * 4)]) is not None  # the engine still works
    finally:
        model.engine.release(0)


def allow_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")


@pytest.mark.skipif(
    not CORE_PATTERN.exists() or not CORE_PATTERN.read_text().startswith("core"),
    reason="needs core_pattern 'core…' (a core file in the crashing process's directory)",
)
def test_running_daemon_is_not_dumpable(device, tmp_path):
    """SIGABRT with RLIMIT_CORE unlimited: an ordinary process leaves a core file, the daemon none."""
    control = tmp_path / "control"
    control.mkdir()
    subprocess.run([sys.executable, "-c", "import os; os.abort()"], cwd=control, preexec_fn=allow_core_dumps)
    cores = list(control.glob("core*"))
    assert cores, "the kernel writes core files here: the check below means something"
    for core in cores:
        core.unlink()
    daemon = Daemon(device, tmp_path / "daemon", preexec_fn=allow_core_dumps)
    try:
        daemon.wait_for("READY=1")
        assert "process not dumpable" in daemon.output()
        os.kill(daemon.proc.pid, signal.SIGABRT)
        assert daemon.proc.wait(timeout=60) == -signal.SIGABRT
    finally:
        daemon.stop()
        leaked = list((tmp_path / "daemon").glob("core*"))
        for core in leaked:
            core.unlink()
    assert leaked == []


def test_loading_holds_one_plaintext_copy_of_the_weights(tiny_build, tmp_path):
    """A graph with external data loads through one decrypted buffer: no whole ciphertext, no second
    plaintext copy on the Python side (ONNX Runtime's own copy is in C++ memory, which tracemalloc
    does not see; numpy and bytearray allocations it does)."""
    import shutil
    import tracemalloc

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from edge_models.fused_graph import Weights, build_fused_decoder
    from tests.conftest import provision_device

    shape = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    config = Qwen2Config(**shape, num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    build_fused_decoder(config, Weights.from_module(model), tmp_path / "onnx", external_data=True)
    shutil.copy(tiny_build / "onnx" / "tokenizer.json", tmp_path / "onnx" / "tokenizer.json")
    weights = (tmp_path / "onnx" / "model.onnx.data").stat().st_size
    device = provision_device(tmp_path, tmp_path / "site")
    tracemalloc.start()
    try:
        loaded = load_model(load_config(device.config))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    cache = sum(t.nbytes for t in loaded.engine.cache)  # the engine's KV cache, allocated by numpy
    assert weights + cache <= peak < 1.05 * weights + cache, (peak, weights, cache)
    assert loaded.engine.prefill([(0, [5, 6, 7])]).shape == (1, 32000)  # served from ONNX Runtime's own copy
