"""The ONNX Runtime CPU session of a decoder graph, built from decrypted bytes: ``build_session``.

External weights reach ONNX Runtime in one of two ways, chosen by the type of their buffer:

- **borrowed** (``WeightBuffer``, ``_build_borrowing``): ONNX Runtime reads the tensors where they lie, so the
  buffers live as long as the session (``BuiltSession.borrowed``). Once a session has prepacked weights into its own
  layout, their pages are handed back (``weights.release_prepacked``): a static-cache graph is built in pieces
  (``pipeline.build_pieces``), each piece's released before the next is built; any other graph's by its engine once
  it can run a probe (``BuiltSession.release_borrowed``).
- **copied** (``bytearray``, ``_build_copying``): ONNX Runtime copies each tensor into its own buffers while
  the session is built; the caller wipes the bytearrays afterwards.

Nothing is stored on ONNX Runtime's objects: ``BuiltSession`` holds the session and what it reads. ONNX Runtime's
own untyped errors become ``EngineError`` through ``ort_errors``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .base import EngineError
from .pipeline import PipelineSession, build_pieces, split_graph
from .spec import DecoderSpec
from .weights import WeightBuffer, extent, initializer_ranges, release_prepacked

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

BYTES_PER_THREAD = 16 << 20  # weights read per token that make another intra-op thread pay off


class ort_errors:  # a class in lower case, like contextlib.suppress: used as ``with ort_errors(...)``
    """``with ort_errors("could not load the model"):`` re-raises ONNX Runtime's own untyped errors as
    ``EngineError("ONNX Runtime could not load the model: ...")``, without the original traceback chained.
    An ``EngineError`` (ours) passes through unchanged."""

    __slots__ = ("what",)

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, Exception) and not isinstance(exc, EngineError):
            raise EngineError(f"ONNX Runtime {self.what}: {exc}") from None
        return False


@dataclass(eq=False)
class BuiltSession:
    """A session and what it needs kept alive. ``session`` comes first: CPython lets go of an instance's attributes
    in the order they were set, so the borrowed buffers outlive the session that reads them."""

    session: InferenceSession | PipelineSession  # a ``PipelineSession`` when built in pieces
    threads: int  # intra-op threads it runs on (0: ONNX Runtime's default, one per physical core)
    released_bytes: int = 0  # bytes of borrowed weights handed back so far
    borrowed: dict[str, WeightBuffer] = field(default_factory=dict)  # read in place by the session

    def release_borrowed(self, model: bytes, probe: Callable[[], list]) -> int:
        """The borrowed strategy's last step for a graph built as one session, taken by its engine once it can run
        ``probe`` (a fixed input whose outputs must not change): hand back the pages of the borrowed weights the
        session prepacked (``weights.release_prepacked``). Returns the bytes (0 if nothing is borrowed), also added
        to ``released_bytes``."""
        if not self.borrowed:
            return 0
        released = release_prepacked(initializer_ranges(model, self.borrowed), self.borrowed, probe)
        self.released_bytes += released
        return released


def build_session(
    model: bytes,
    spec: DecoderSpec,
    *,
    threads: int,
    external: dict[str, WeightBuffer | bytearray] | None,
    spin: bool,
    affinity: str,
    pieces: int = 1,
    positions: int | None = None,
) -> BuiltSession:
    """A CPU session over the decrypted model bytes. ``threads``: intra-op threads (0: ``auto_threads``);
    ``external``: the graph's external-data files, borrowed (``WeightBuffer``) or copied (``bytearray``); ``spin``,
    ``affinity``: the intra-op workers' (``session_options``); ``pieces``: sessions a static-cache graph with
    borrowed weights is built as; ``positions``: the most the engine will ever use (rotary table rows past it are
    released too)."""
    borrowed = {k: v for k, v in (external or {}).items() if isinstance(v, WeightBuffer)}
    copied = {k: v for k, v in (external or {}).items() if not isinstance(v, WeightBuffer)}
    threads = threads or auto_threads(spec.weight_bytes)
    options = functools.partial(session_options, threads, spin, affinity)
    if borrowed:
        return _build_borrowing(model, spec, threads, options, borrowed, copied, pieces, positions)
    return _build_copying(model, threads, options, copied)


def _build_borrowing(
    model: bytes,
    spec: DecoderSpec,
    threads: int,
    options: Callable[..., object],
    borrowed: dict[str, WeightBuffer],
    copied: dict[str, bytearray],
    pieces: int,
    positions: int | None,
) -> BuiltSession:
    """Strategy 1: ONNX Runtime reads the ``WeightBuffer``s in place (no second copy while the session is built).
    A static-cache graph is built as ``pieces`` sessions, each piece's prepacked weights released before the next is
    built; any other graph as one session, released by its engine (``BuiltSession.release_borrowed``)."""
    pieced = spec.cache == "static"
    parts = split_graph(model, pieces) if pieced else [model]

    def create(graph: bytes):
        for name, buf in borrowed.items():  # decryption may still be running: wait for what this graph reads
            buf.wait(extent(graph, name))
        opts = options(handoff=len(parts) > 1)
        opts.add_session_config_entry("session.use_external_initializer_file_buffers_directly", "1")
        arrays = [b.array() for b in borrowed.values()]
        opts.add_external_initializers_from_files_in_memory(list(borrowed), arrays, [a.size for a in arrays])
        return _inference_session(graph, opts, copied)

    if not pieced:
        return BuiltSession(create(model), threads, borrowed=borrowed)
    ranges = initializer_ranges(model, borrowed, positions)  # the whole graph's: who reads what, parsed once
    session, released = build_pieces(model, parts, create, functools.partial(release_prepacked, ranges, borrowed))
    return BuiltSession(session, threads, released, borrowed)


def _build_copying(
    model: bytes, threads: int, options: Callable[..., object], copied: dict[str, bytearray]
) -> BuiltSession:
    """Strategy 2: ONNX Runtime copies the external tensors into its own buffers (the fallback when borrowing
    cannot be used); nothing of the caller's is read after this returns, so it wipes and frees them."""
    return BuiltSession(_inference_session(model, options(), copied), threads)


def _inference_session(graph: bytes, opts, copied: dict[str, bytearray]):
    import onnxruntime as ort

    values: list = []  # copied initializers: referenced until the session is built, then ONNX Runtime's own
    if copied:
        names, values = external_initializers(graph, copied)
        opts.add_external_initializers(names, values)
    with ort_errors("could not load the model"):
        session = ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
    del values  # nothing refers to the caller's buffers any more: it wipes and frees them
    forget_serialized_model(session)
    return session


def forget_serialized_model(session) -> None:
    """Drop the reference an ``InferenceSession`` keeps to the serialized model it was built from, so the loader's
    ``bytes`` copy of the decrypted graph is the only one and goes once wiped (docs/BUNDLE.md, "Memory hygiene";
    tests/test_memory_hygiene.py: no Python object references the model after load).

    onnxruntime's ``InferenceSession.__init__`` (capi/onnxruntime_inference_collection.py, 1.32) stores the bytes it
    is given as ``_model_bytes`` for the life of the session ("TODO: This is bad as we're holding the memory
    indefinitely"), read again only by ``set_providers`` to rebuild the session, which the appliance never calls.
    Held, it would keep the wiped buffer allocated as long as the engine: the whole model for a graph with its
    weights inline. The attribute is onnxruntime's own; an onnxruntime without it is left as it is."""
    if getattr(session, "_model_bytes", None) is not None:
        session._model_bytes = None


def session_options(threads: int, spin: bool, affinity: str, handoff: bool = False):
    """The ``SessionOptions`` every session of the engines is built with (weights are added by the strategies)."""
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
    if handoff:  # sessions run one after another (pieces): a finished one's workers must not spin
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if affinity:  # e.g. "1;2" pins the intra-op workers (threads-1 entries); see ONNX Runtime's docs
        opts.add_session_config_entry("session.intra_op_thread_affinities", affinity)
    # Prepack (MatMulNBits, MatMul weights into MLAS layouts) on the intra-op pool: 1.5B q4 session 2.1 -> 1.3 s.
    opts.add_session_config_entry("session.prepack.enable_parallel", "1")
    return opts


def auto_threads(weight_bytes: int) -> int:
    """Intra-op threads for ``threads = 0``: one per 16 MB of weights read per token; 0 (ONNX
    Runtime's default: every physical core, threads pinned) once that reaches the cores this
    process may use. Measured with bench/inference.py on 2 cores: a 105 MB-per-token model decodes
    ~1.35x faster on two threads than on one (memory bandwidth); for a 3 MB one, one thread is
    as fast as two within this machine's noise and leaves a core to the server loop and clients."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = -(-max(weight_bytes, 1) // BYTES_PER_THREAD)
    return 0 if wanted >= cores else wanted


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
