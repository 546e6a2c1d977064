"""ONNX Runtime backend (CPU): the always-available engine. The model arrives as decrypted bytes."""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

from .base import EngineError
from .padded import PaddedKVEngine
from .pipeline import build_pieces, split_graph
from .spec import DecoderSpec, input_names, output_names
from .weights import WeightBuffer, extent, initializer_ranges, release_prepacked

BYTES_PER_THREAD = 16 << 20  # weights read per token that make another intra-op thread pay off
PROBE_TOKENS = [0, 1, 2, 3]  # a fixed input whose logits show whether released weights were still read


def auto_threads(weight_bytes: int) -> int:
    """Intra-op threads for ``threads = 0``: one per 16 MB of weights read per token; 0 (ONNX
    Runtime's default: every physical core, threads pinned) once that reaches the cores this
    process may use. Measured with bench/inference.py on 2 cores: a 105 MB-per-token model decodes
    ~1.35x faster on two threads than on one (memory bandwidth); for a 3 MB one, one thread is
    as fast as two within this machine's noise and leaves a core to the server loop and clients."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = -(-max(weight_bytes, 1) // BYTES_PER_THREAD)
    return 0 if wanted >= cores else wanted


def ort_session(
    model: bytes,
    spec: DecoderSpec,
    threads: int,
    external: dict[str, WeightBuffer | bytearray] | None,
    spin: bool,
    affinity: str,
    pieces: int = 1,
    positions: int | None = None,
):
    """A CPU session over the decrypted model bytes; returns it, the intra-op thread count and the bytes of
    borrowed weights already released.

    External data in ``WeightBuffer``s is borrowed in place (the session keeps the buffers alive); in bytearrays it
    is copied, and the caller wipes them once the session is built. A static-cache graph with borrowed weights is
    built as ``pieces`` sessions (``pipeline``), each piece's prepacked weights released before the next is built;
    any other graph's are released by its engine (``release_borrowed``) once it can run a probe. ``positions``: the
    most the engine will ever use (rotary table rows past it are released too)."""
    borrowed = {k: v for k, v in (external or {}).items() if isinstance(v, WeightBuffer)}
    copied = {k: v for k, v in (external or {}).items() if not isinstance(v, WeightBuffer)}
    threads = threads or auto_threads(spec.weight_bytes)

    pieced = bool(borrowed) and spec.cache == "static"
    parts = split_graph(model, pieces) if pieced else [model]

    def create(graph: bytes):
        for name, buf in borrowed.items():  # decryption may still be running: wait for what this graph reads
            buf.wait(extent(graph, name))
        session = _session(graph, threads, borrowed, copied, spin, affinity, handoff=len(parts) > 1)
        session._borrowed_weights = borrowed  # live as long as the session reads them
        return session

    if not pieced:
        return create(model), threads, 0
    ranges = initializer_ranges(model, borrowed, positions)  # the whole graph's: who reads what, parsed once
    session, released = build_pieces(
        model, parts, create, lambda names, probe: release_prepacked(ranges, borrowed, probe, names)
    )
    session._borrowed_weights = borrowed
    return session, threads, released


def _session(
    model: bytes, threads: int, borrowed: dict, copied: dict, spin: bool, affinity: str, handoff: bool = False
):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No CPU arena: it keeps the high-water mark of every run's activations for the life of the process (a
    # 256-token prefill's logits alone are 155 MB at 1.5B); freed buffers go back to malloc, and the engine trims
    # the heap after prefills (``trim_heap``). Decode speed unchanged within noise (1.5B q4, 2 threads).
    opts.enable_cpu_mem_arena = False
    if threads:  # 0: ONNX Runtime's own default, one pinned thread per physical core
        opts.intra_op_num_threads = threads
    # One graph runs at a time (the engine thread); parallelism is inside operators.
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning workers cut per-op wake-up latency (decode runs many small ops) at the cost of busy
    # cores between steps; turn it off on machines shared with other work (bench/inference.py's thread sweep).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if handoff:  # pieces run one after another, each with its own pool: a finished piece's workers must not spin
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if affinity:  # e.g. "1;2" pins the intra-op workers (threads-1 entries); see ONNX Runtime's docs
        opts.add_session_config_entry("session.intra_op_thread_affinities", affinity)
    # Prepack (MatMulNBits, MatMul weights into MLAS layouts) on the intra-op pool: 1.5B q4 session 2.1 -> 1.3 s.
    opts.add_session_config_entry("session.prepack.enable_parallel", "1")
    if borrowed:
        opts.add_session_config_entry("session.use_external_initializer_file_buffers_directly", "1")
        arrays = [b.array() for b in borrowed.values()]
        opts.add_external_initializers_from_files_in_memory(list(borrowed), arrays, [a.size for a in arrays])
    if copied:
        names, values = external_initializers(model, copied)
        opts.add_external_initializers(names, values)
    try:
        session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise EngineError(f"ONNX Runtime could not load the model: {exc}") from None
    # Copied initializers are ONNX Runtime's own once the session is built: once ``values`` goes out of scope
    # nothing refers to the caller's buffers, which it wipes and frees. The session keeps the serialized model
    # only to rebuild itself in set_providers(), which we never call; drop the reference so it can be wiped.
    session._model_bytes = None
    return session


def trim_heap() -> None:
    """Return the C heap's free memory to the kernel (glibc ``malloc_trim``; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_allocations() -> bool:
    """Serve every C allocation of 1 MiB or more (ONNX Runtime's prepacked weights, activations) with its own
    mapping, which ``free`` hands straight back to the kernel. glibc's default threshold rises after each large
    free (up to 32 MiB), after which such buffers come from the heap, where a second model loaded beside the first
    (a reload) interleaves with it and the freed first one cannot be given back: the daemon grew by about the
    model's size per reload (1.5B q4: 1.49 GB after start, 2.9-3.4 GB after reloads). Fixed at 1 MiB (which also
    stops the adjustment), an in-process load/drop cycle returns to within 3 MB of the first load. Returns whether
    it took effect (glibc only)."""
    libc = _libc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def release_borrowed(session, model: bytes, probe) -> int:
    """Hand back the borrowed weights the session prepacked (``weights.release_prepacked``); 0 if none."""
    borrowed = getattr(session, "_borrowed_weights", None)
    return release_prepacked(initializer_ranges(model, borrowed), borrowed, probe) if borrowed else 0


def external_initializers(model: bytes, external: dict[str, bytearray]) -> tuple[list[str], list]:
    """``OrtValue`` views into decrypted external-data buffers, one per tensor the graph stores there (ONNX Runtime
    copies them): the fallback when borrowing ``WeightBuffer``s in place cannot be used."""
    import onnx
    import onnxruntime as ort

    names, values = [], []
    for tensor in onnx.ModelProto.FromString(model).graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in tensor.external_data}
        if where.get("location") not in external:
            raise EngineError(f"initializer {tensor.name} lives in {where.get('location')!r}, which the bundle lacks")
        buf = np.frombuffer(external[where["location"]], np.uint8)
        start, length = int(where.get("offset", 0)), int(where["length"])
        if start + length > buf.size:
            raise EngineError(
                f"initializer {tensor.name} runs past the end of {where['location']}; re-export the model"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        names.append(tensor.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(buf[start : start + length].view(dtype).reshape(tensor.dims)))
    return names, values


class OrtEngine(PaddedKVEngine):
    """Traced graphs (``cache: "concat"``); fused static-cache graphs run in ``StaticCacheEngine``."""

    kind = "onnxruntime"

    def __init__(
        self,
        model: bytes,
        spec: DecoderSpec,
        *,
        num_slots: int,
        max_seq_len: int,
        threads: int = 0,
        external: dict[str, WeightBuffer | bytearray] | None = None,
        spin: bool = True,
        affinity: str = "",
        keep_resident: bool = True,
    ):
        super().__init__(spec, num_slots, max_seq_len, keep_resident=keep_resident)
        self.session, self.threads, _ = ort_session(model, spec, threads, external, spin, affinity)
        self._names = input_names(spec.num_layers)
        got = [i.name for i in self.session.get_inputs()]
        if got != self._names:
            raise EngineError(f"model inputs {got[:4]}... do not match decoder.json ({self._names[:4]}...)")

        self._outputs = output_names(spec.num_layers)
        self.released_bytes = release_borrowed(self.session, model, lambda: self.score(PROBE_TOKENS))

    def _empty(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def _run(self, ids, mask, positions, past, out=None):
        if out is None:
            feeds = dict(zip(self._names, [ids, mask, positions, *past], strict=True))
            logits, *present = self.session.run(None, feeds)
            return logits, present
        # I/O binding: inputs are read where they lie and the present tensors are written straight
        # into ``out`` (the other decode arena); nothing is allocated or copied per step.
        io = self.session.io_binding()
        for name, array in zip(self._names, [ids, mask, positions, *past], strict=True):
            io.bind_cpu_input(name, array)
        io.bind_output("logits", "cpu")
        for name, buf in zip(self._outputs[1:], out, strict=True):
            io.bind_output(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy(), out
