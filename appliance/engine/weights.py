"""Decrypted external weights that ONNX Runtime borrows in place, and the parts of them it no longer reads.

A model past the 2 GB protobuf limit keeps its weights in ``model.onnx.data``. The loader decrypts that file into a
``WeightBuffer`` (page-aligned anonymous memory, never a file) and ONNX Runtime uses the tensors where they lie
(``session.use_external_initializer_file_buffers_directly``): no second copy while the session is built. ONNX
Runtime then *prepacks* the weights of ``MatMulNBits`` and ``MatMul`` into its own layout and stops reading the
originals; ``release_prepacked`` hands those pages back to the kernel, wiped. What stays is what the graph still
reads from the buffer (the quantized embedding, norms, rotary tables), which ONNX Runtime would otherwise hold as its
own copy.

Whether ONNX Runtime really prepacked a tensor depends on the CPU (e.g. MLAS has no int8 ``MatMulNBits`` kernels
for every instruction set), so release is checked: logits of a short probe before and after must be bit-identical,
else ``WeightsStillReadError`` and the loader builds the session again from a copy (``docs/ARCHITECTURE.md``).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from collections.abc import Callable

import numpy as np

from .base import EngineError

PAGE = mmap.PAGESIZE
# Inputs that ONNX Runtime's CPU kernels prepack from constant initializers (and then drop): input index per op.
# QMoE: the expert weights only. Its scales may be read at run time for the routed experts alone, which a short
# probe would not route to them all.
PREPACKED_INPUTS = {"MatMulNBits": {1, 2, 3}, "MatMul": {1}, "Gemm": {1}, "QMoE": {2, 5}}
# Rotary tables ``[max_positions, d]``, read at the positions of the tokens only: rows past the engine's
# ``max_seq_len`` are never read (131072-row tables of the DeepSeek-R1 distills: 67 MB at 1.5B).
ROTARY_TABLES = {"GroupQueryAttention": {7, 8}, "RotaryEmbedding": {2, 3}}


class WeightsStillReadError(EngineError):
    """The session still read weights whose pages were released: it must be rebuilt from a copy."""


class WeightBuffer:
    """Page-aligned anonymous memory for one decrypted external-data file (kept out of core dumps)."""

    def __init__(self, size: int):
        self.size = size
        self._map = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_DONTDUMP"):
            self._map.madvise(mmap.MADV_DONTDUMP)
        self.released = 0  # bytes handed back to the kernel
        self._filled, self._error, self._thread = size, None, None  # filled synchronously unless fill_async
        self._cond = threading.Condition()
        self._gone = np.zeros(-(-max(size, 1) // PAGE), bool)  # pages already handed back

    def __len__(self) -> int:
        return self.size

    def fill_async(self, fill: Callable[[Callable[[int], None]], object]) -> None:
        """Run ``fill(progress)`` (e.g. a decryption reporting the bytes done) on a thread, so sessions can be built
        over the part already filled (``wait``) while the rest is decrypted."""
        self._filled = 0

        def run() -> None:
            try:
                fill(self._progress)
            except BaseException as exc:  # handed to whoever waits or joins
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
            else:
                self._progress(self.size)

        self._thread = threading.Thread(target=run, name="weights-fill", daemon=True)
        self._thread.start()

    def _progress(self, done: int) -> None:
        with self._cond:
            self._filled = done
            self._cond.notify_all()

    def wait(self, upto: int) -> None:
        """Block until the first ``upto`` bytes are filled; raise the filling's error if it failed."""
        if upto > self.size:
            raise EngineError(f"the graph reads {upto} bytes of external data, the file has {self.size}; re-export it")
        with self._cond:
            self._cond.wait_for(lambda: self._filled >= upto or self._error is not None)
            if self._error is not None:
                raise self._error

    def join(self, quiet: bool = False) -> None:
        """Wait for the filling to end; raise its error if it failed (unless ``quiet``)."""
        if self._thread is not None:
            self._thread.join()
        if not quiet:
            self.wait(self.size)

    def view(self) -> memoryview:
        return memoryview(self._map)[: self.size]

    def array(self) -> np.ndarray:
        return np.frombuffer(self._map, np.uint8, count=self.size)

    def address(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def release(self, start: int, stop: int) -> int:
        """Wipe the whole pages inside ``[start, stop)`` not yet released and return them to the kernel (they read
        as zeros from then on); returns the bytes newly released."""
        lo, hi = -(-start // PAGE), stop // PAGE
        if hi <= lo:
            return 0
        todo = ~self._gone[lo:hi]
        edges = np.flatnonzero(np.diff(np.concatenate(([0], todo.astype(np.int8), [0])))) + lo
        total = 0
        for first, last in zip(edges[::2] * PAGE, np.minimum(edges[1::2] * PAGE, self.size), strict=True):
            ctypes.memset(self.address() + int(first), 0, int(last - first))
            self._map.madvise(mmap.MADV_DONTNEED, int(first), int(last - first))
            total += int(last - first)
        self._gone[lo:hi] = True
        self.released += total
        return total

    def __del__(self) -> None:  # the last session that borrowed it is gone
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn down ctypes already
            self.wipe()

    def wipe(self) -> None:
        """Overwrite everything, return the pages and unmap (only once nothing reads it any more)."""
        self.join(quiet=True)  # a filling thread writes into the mapping until it ends
        if self._map.closed:
            return
        self.release(0, self._gone.size * PAGE)  # pages not released yet (touching released ones would refault them)
        self._map.madvise(mmap.MADV_DONTNEED)
        with contextlib.suppress(BufferError):  # a view is still alive: unmapped when the last one goes
            self._map.close()


class ExternalRangeError(EngineError):
    """An initializer's external-data range is impossible (negative, past the file, overlapping another)."""


def check_external_ranges(model: bytes, sizes: dict[str, int]) -> None:
    """Refuse, naming the tensor, a graph whose external-data ranges a loader could misread: a file the bundle
    lacks, a negative offset or length, a range past the end of its file, a length that is not the tensor's size,
    or two tensors sharing bytes (pages released after one piece is built would be zeroes for another; the copy
    fallback and the borrowed path must never read different weights). Vendor-signed bundles, so a vendor's
    mistake — caught at load, before any session is built."""
    import onnx

    spans: dict[str, list[tuple[int, int, str]]] = {name: [] for name in sizes}
    for tensor in onnx.ModelProto.FromString(model).graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in tensor.external_data}
        location = where.get("location", "")
        if location not in sizes:
            raise ExternalRangeError(f"tensor {tensor.name!r} refers to external file {location!r}, not in the bundle")
        try:
            start, length = int(where.get("offset", "0")), int(where.get("length", "-1"))
        except ValueError:
            raise ExternalRangeError(f"tensor {tensor.name!r} has a non-numeric external-data range") from None
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        expected = int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
        if start < 0 or length < 0 or start + length > sizes[location]:
            raise ExternalRangeError(
                f"tensor {tensor.name!r}: bytes {start}..{start + length} of {location} lie outside its "
                f"{sizes[location]} bytes"
            )
        if length != expected:
            raise ExternalRangeError(
                f"tensor {tensor.name!r}: {length} bytes in {location}, its shape needs {expected}"
            )
        spans[location].append((start, start + length, tensor.name))
    for location, ranges in spans.items():
        ranges.sort()
        for (_, end, first), (start, _, second) in zip(ranges, ranges[1:], strict=False):
            if start < end:
                raise ExternalRangeError(f"tensors {first!r} and {second!r} share bytes of {location}")


def extent(model: bytes, name: str) -> int:
    """End of the last byte of external file ``name`` the graph refers to (what must be filled to build it)."""
    import onnx

    end = 0
    for tensor in onnx.ModelProto.FromString(model).graph.initializer:
        where = {e.key: e.value for e in tensor.external_data}
        if where.get("location") == name:
            end = max(end, int(where.get("offset", 0)) + int(where["length"]))
    return end


def initializer_ranges(model: bytes, files: dict[str, WeightBuffer], positions: int | None = None) -> tuple[dict, dict]:
    """Per external file, ``(name, start, stop)`` of the initializers only prepacked kernels read, and of the rows
    of rotary tables past ``positions`` (``drop``), and of all the rest (``keep``), from the serialized graph."""
    import onnx

    graph = onnx.ModelProto.FromString(model).graph
    readers: dict[str, set[tuple[str, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, i))
    outputs = {o.name for o in graph.output}
    drop: dict[str, list[tuple[str, int, int]]] = {f: [] for f in files}
    keep: dict[str, list[tuple[str, int, int]]] = {f: [] for f in files}
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in tensor.external_data}
        if where.get("location") not in files:
            continue
        start = int(where.get("offset", 0))
        span = (tensor.name, start, start + int(where["length"]))
        uses = readers.get(tensor.name, set())
        packed = uses and tensor.name not in outputs and all(i in PREPACKED_INPUTS.get(op, ()) for op, i in uses)
        rotary = uses and tensor.name not in outputs and all(i in ROTARY_TABLES.get(op, ()) for op, i in uses)
        if rotary and positions is not None and len(tensor.dims) == 2 and tensor.dims[0] > positions:
            tail = start + (span[2] - start) // tensor.dims[0] * positions
            keep[where["location"]].append((tensor.name, start, tail))
            drop[where["location"]].append((tensor.name, tail, span[2]))
        else:
            (drop if packed else keep)[where["location"]].append(span)
    return drop, keep


def release_prepacked(
    ranges: tuple[dict, dict],
    files: dict[str, WeightBuffer],
    probe: Callable[[], np.ndarray],
    names: set[str] | None = None,
) -> int:
    """Release the pages of every ``drop`` range of ``ranges`` (``initializer_ranges``; of the tensors in ``names``,
    if given) that no ``keep`` range shares; returns the bytes. ``probe`` runs the session on a fixed input
    (positions 0..3); its outputs before and after must be identical."""
    drop, keep = ranges
    # a tensor on both lists is a rotary table whose tail nothing ever reads: released whichever piece is built
    tables = {name for spans in keep.values() for name, *_ in spans}
    drop = {f: [r for r in spans if names is None or r[0] in names or r[0] in tables] for f, spans in drop.items()}
    if not any(drop.values()):
        return 0
    before = probe()
    released = 0
    for name, buf in files.items():
        pages = np.zeros(-(-buf.size // PAGE), np.int8)  # 1: only dropped tensors on the page, 2: a kept one too
        for _, start, stop in drop[name]:
            buf.wait(stop)  # a rotary tail may lie past what the decryption thread has written so far
            pages[-(-start // PAGE) : stop // PAGE] = 1  # whole pages inside the tensor
        for _, start, stop in keep[name]:
            pages[start // PAGE : -(-stop // PAGE)] = 2
        edges = np.flatnonzero(np.diff(np.concatenate(([0], (pages == 1).astype(np.int8), [0]))))
        for first, last in zip(edges[::2], edges[1::2], strict=True):
            released += buf.release(int(first) * PAGE, min(int(last) * PAGE, buf.size))
    after = probe()
    if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after, strict=True)):
        raise WeightsStillReadError(
            "ONNX Runtime still reads weights it was expected to have prepacked (this CPU has no packed kernel "
            "for them)"
        )
    return released
