"""Decrypted model bytes do not outlive the engine build, and the daemon cannot be dumped."""

from __future__ import annotations

import gc
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def mapping_rss(address: int) -> int:
    """Resident bytes of the mapping of this process that contains ``address`` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and not first.endswith(":"):
            lo, hi = (int(x, 16) for x in first.split("-"))
            inside = lo <= address < hi
        elif inside and first == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def external_build(tmp_path: Path, tiny_build: Path, quant: str | None = None) -> Path:
    """A small fused Qwen2 graph whose weights live in ``model.onnx.data``, provisioned as a device."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from edge_models.fused_graph import Weights, build_fused_decoder

    shape = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    config = Qwen2Config(**shape, num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    build_fused_decoder(config, Weights.from_module(model), tmp_path / "onnx", quant=quant, external_data=True)
    shutil.copy(tiny_build / "onnx" / "tokenizer.json", tmp_path / "onnx" / "tokenizer.json")
    return tmp_path / "onnx"


def reference_logits(onnx_dir: Path, tokens: list[int]) -> np.ndarray:
    """The graph's logits for ``tokens`` from a plain ONNX Runtime session over the build files."""
    import onnxruntime as ort

    from appliance.engine.spec import DecoderSpec

    spec = DecoderSpec.from_json((onnx_dir / "decoder.json").read_bytes())
    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["logits"], static_feeds(spec, tokens))[0][0, -1]


def static_feeds(spec, tokens: list[int]) -> dict:
    """Inputs of a static-cache graph for one row of ``tokens`` over an empty 8-position cache."""
    feeds = {
        "input_ids": np.array([tokens], np.int64),
        "seqlens_k": np.array([len(tokens) - 1], np.int32),
        "total_sequence_length": np.array(len(tokens), np.int32),
    }
    for i in range(spec.num_layers):
        feeds[f"past.{i}.key"] = np.zeros((1, *spec.key_shape[:1], 8, spec.key_shape[1]), np.float32)
        feeds[f"past.{i}.value"] = np.zeros((1, *spec.value_shape[:1], 8, spec.value_shape[1]), np.float32)
    return feeds


@pytest.mark.parametrize("quant", [None, "q4"])
def test_external_weights_are_borrowed_and_the_prepacked_ones_released(tiny_build, tmp_path, quant):
    """ONNX Runtime uses the decrypted ``model.onnx.data`` in place (no Python-side copy, no second plaintext
    copy), and the pages of every weight it prepacked are handed back after the session is built: the buffer's
    resident size is what the graph still reads, and the logits are those of a plain session."""
    import tracemalloc

    from tests.conftest import provision_device

    onnx_dir = external_build(tmp_path, tiny_build, quant)
    weights = (onnx_dir / "model.onnx.data").stat().st_size
    device = provision_device(tmp_path, tmp_path / "site")
    tracemalloc.start()
    try:
        loaded = load_model(load_config(device.config))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    cache = sum(t.nbytes for t in loaded.engine.cache)  # the engine's KV cache, allocated by numpy
    # a copy of the weights on the Python side would be >= 1x; the probe and graph parsing are small
    assert peak < cache + 0.25 * weights, (peak, weights, cache)
    (buffer,) = loaded.engine.built.borrowed.values()
    released = loaded.engine.released_bytes
    assert 0.5 * weights < released < weights  # the projections and LM head; the embedding stays
    assert mapping_rss(buffer.address()) <= weights - released + 4096
    tokens = [5, 6, 7]
    got = loaded.engine.prefill([(0, tokens)])[0]
    np.testing.assert_allclose(got, reference_logits(onnx_dir, tokens), rtol=1e-4, atol=1e-4)


def test_weights_a_session_still_reads_are_never_released(tmp_path):
    """The probe guard: with prepacking off, ONNX Runtime reads the MatMul weight from the buffer, so releasing it
    changes the logits — ``release_prepacked`` says so instead of serving from zeroed pages."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from appliance.engine.weights import WeightBuffer, WeightsStillReadError, initializer_ranges, release_prepacked

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 4096)).astype(np.float32)  # 1 MiB: whole pages to release
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=weight.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.data"), ("offset", "0"), ("length", str(weight.nbytes))):
        tensor.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
        [tensor],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    x = rng.standard_normal((1, 64)).astype(np.float32)
    for prepacking, released in (("1", True), ("0", False)):
        buffer = WeightBuffer(weight.nbytes)
        buffer.array()[:] = np.frombuffer(weight.tobytes(), np.uint8)
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.disable_prepacking", "0" if prepacking == "1" else "1")
        opts.add_session_config_entry("session.use_external_initializer_file_buffers_directly", "1")
        opts.add_external_initializers_from_files_in_memory(["w.data"], [buffer.array()], [buffer.size])
        session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        probe = lambda session=session: session.run(None, {"x": x})[0]  # noqa: E731
        if released:
            files = {"w.data": buffer}
            assert release_prepacked(initializer_ranges(model, files), files, probe) == weight.nbytes
            np.testing.assert_allclose(probe(), x @ weight, rtol=1e-4, atol=1e-4)
        else:
            with pytest.raises(WeightsStillReadError, match="still reads weights"):
                release_prepacked(initializer_ranges(model, {"w.data": buffer}), {"w.data": buffer}, probe)
    assert onnx.ModelProto.FromString(model).graph.initializer[0].name == "w"


def test_loader_falls_back_to_a_copy_when_released_weights_are_still_read(tiny_build, tmp_path, monkeypatch, caplog):
    """If the probe shows the session still reads what was released (here: the embedding, which no kernel
    prepacks, declared prepacked), the loader decrypts again and lets ONNX Runtime copy: same logits, a warning."""
    from appliance.engine import weights
    from tests.conftest import provision_device

    onnx_dir = external_build(tmp_path, tiny_build)
    monkeypatch.setitem(weights.PREPACKED_INPUTS, "Gather", {0})
    device = provision_device(tmp_path, tmp_path / "site")
    with caplog.at_level("WARNING", logger="appliance.loader"):
        loaded = load_model(load_config(device.config))
    assert "keeps a full copy" in caplog.text
    assert loaded.engine.released_bytes == 0 and loaded.engine.built.borrowed == {}
    tokens = [5, 6, 7]
    got = loaded.engine.prefill([(0, tokens)])[0]
    np.testing.assert_allclose(got, reference_logits(onnx_dir, tokens), rtol=1e-4, atol=1e-4)


def test_load_pieces_is_validated(tmp_path):
    from appliance.config import ConfigError, render_config

    text = render_config("state", "trust", "credentials", "audit.db", "tcp://127.0.0.1:5555", max_batch=4)
    assert load_config(_write(tmp_path / "ok.toml", text)).engine.load_pieces == 8
    bad = text.replace("load_pieces = 8 ", "load_pieces = 0 ")
    with pytest.raises(ConfigError, match=r"load_pieces must be 1\.\.64"):
        load_config(_write(tmp_path / "bad.toml", bad))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_weight_buffer_is_wiped_and_unmapped_when_the_last_holder_goes():
    """The pages of a dropped ``WeightBuffer`` leave the process (the mapping is gone from /proc/self/smaps)."""
    from appliance.engine.weights import PAGE, WeightBuffer

    buf = WeightBuffer(64 * PAGE)
    buf.array()[:] = 7
    address = buf.address()
    assert mapping_rss(address) >= 64 * PAGE
    assert buf.release(PAGE // 2, 10 * PAGE + 1) == 9 * PAGE  # whole pages only: 1..9
    assert buf.release(0, 20 * PAGE) == 11 * PAGE  # pages 0 and 10..19: released ones are not counted twice
    assert bytes(buf.view()[: 20 * PAGE]) == bytes(20 * PAGE) and buf.view()[20 * PAGE] == 7
    del buf
    gc.collect()
    with pytest.raises(AssertionError, match="no mapping"):
        mapping_rss(address)


def test_graph_is_split_at_cuts_few_tensors_cross(tmp_path, tiny_build):
    """Every node lands in exactly one piece, in order; a piece's inputs are graph inputs or an earlier piece's
    outputs; the last piece makes the logits."""
    import onnx

    from appliance.engine.pipeline import MAX_CROSSING, split_graph

    onnx_dir = external_build(tmp_path, tiny_build, "q4")
    model = (onnx_dir / "model.onnx").read_bytes()
    graph = onnx.ModelProto.FromString(model).graph
    pieces = [onnx.ModelProto.FromString(p).graph for p in split_graph(model, 4)]
    assert len(pieces) == 4
    assert [n.output[0] for p in pieces for n in p.node] == [n.output[0] for n in graph.node]
    made, inputs = set(), {i.name for i in graph.input}
    for piece in pieces:
        crossing = {i.name for i in piece.input} - inputs
        assert crossing <= made and len(crossing) <= MAX_CROSSING
        made |= {o.name for o in piece.output}
    assert "logits" in {o.name for o in pieces[-1].output}


def test_a_tampered_weights_chunk_fails_the_load_while_sessions_are_being_built(tiny_build, tmp_path):
    """``model.onnx.data`` is decrypted on a thread while the pieces are built: a chunk that fails authentication
    near its end still fails the whole load with the bundle's error, and no decryption thread is left running."""
    import threading

    from appliance.loader import EXTERNAL_DATA_FILE, installed_bundle
    from provisioning.bundle import IntegrityError
    from tests.conftest import provision_device

    external_build(tmp_path, tiny_build, "q4")
    device = provision_device(tmp_path, tmp_path / "site")
    config = load_config(device.config)
    bundle = installed_bundle(config)
    payload = bundle.root / bundle.file(EXTERNAL_DATA_FILE).path
    data = bytearray(payload.read_bytes())
    data[-100] ^= 1  # inside the last chunk: the first pieces can be built before it is reached
    payload.chmod(0o600)
    payload.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="fails authentication"):
        load_model(config)
    assert not [t for t in threading.enumerate() if t.name == "weights-fill"]


def test_pieces_return_outputs_by_name_in_any_order(tmp_path, tiny_build):
    """``PipelineSession.run`` and its binding hand back each output under its own name, whatever order the
    caller binds them in (ONNX Runtime returns a binding's outputs in the order they were first bound)."""
    import onnxruntime as ort

    from appliance.engine.pipeline import PipelineSession, split_graph
    from appliance.engine.spec import DecoderSpec

    onnx_dir = external_build(tmp_path, tiny_build, "q4")
    spec = DecoderSpec.from_json((onnx_dir / "decoder.json").read_bytes())
    whole = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    parts = []
    for k, piece in enumerate(split_graph((onnx_dir / "model.onnx").read_bytes(), 3)):
        (onnx_dir / f"piece{k}.onnx").write_bytes(piece)  # beside model.onnx.data, which it refers to
        parts.append(ort.InferenceSession(str(onnx_dir / f"piece{k}.onnx"), providers=["CPUExecutionProvider"]))
    pipeline = PipelineSession(parts, [i.name for i in whole.get_inputs()], [o.name for o in whole.get_outputs()])
    names = ["present.3.value", "logits", "present.0.key", "present.3.key"]
    feeds = static_feeds(spec, [5, 6, 7])
    for got, want in zip(pipeline.run(names, feeds), whole.run(names, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
