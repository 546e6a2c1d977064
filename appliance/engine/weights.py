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
from collections.abc import Callable

import numpy as np

from .base import EngineError

PAGE = mmap.PAGESIZE
# Inputs that ONNX Runtime's CPU kernels prepack from constant initializers (and then drop): input index per op.
PREPACKED_INPUTS = {"MatMulNBits": {1, 2, 3}, "MatMul": {1}, "Gemm": {1}}


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

    def __len__(self) -> int:
        return self.size

    def view(self) -> memoryview:
        return memoryview(self._map)[: self.size]

    def array(self) -> np.ndarray:
        return np.frombuffer(self._map, np.uint8, count=self.size)

    def address(self) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def release(self, start: int, stop: int) -> None:
        """Wipe the whole pages inside ``[start, stop)`` and return them to the kernel (they read as zeros)."""
        first, last = -(-start // PAGE) * PAGE, stop // PAGE * PAGE
        if last <= first:
            return
        ctypes.memset(self.address() + first, 0, last - first)
        self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
        self.released += last - first

    def wipe(self) -> None:
        """Overwrite everything, return the pages and unmap (only once nothing reads it any more)."""
        if self._map.closed:
            return
        ctypes.memset(self.address(), 0, len(self._map))
        self._map.madvise(mmap.MADV_DONTNEED)
        with contextlib.suppress(BufferError):  # a view is still alive: unmapped when the last one goes
            self._map.close()


def initializer_ranges(model: bytes, files: dict[str, WeightBuffer]) -> tuple[dict, dict]:
    """Per external file, the byte ranges of initializers only prepacked kernels read (``drop``) and of all others
    (``keep``), from the serialized graph."""
    import onnx

    graph = onnx.ModelProto.FromString(model).graph
    readers: dict[str, set[tuple[str, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, i))
    outputs = {o.name for o in graph.output}
    drop: dict[str, list[tuple[int, int]]] = {f: [] for f in files}
    keep: dict[str, list[tuple[int, int]]] = {f: [] for f in files}
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = {e.key: e.value for e in tensor.external_data}
        if where.get("location") not in files:
            continue
        start = int(where.get("offset", 0))
        span = (start, start + int(where["length"]))
        uses = readers.get(tensor.name, set())
        packed = uses and tensor.name not in outputs and all(i in PREPACKED_INPUTS.get(op, ()) for op, i in uses)
        (drop if packed else keep)[where["location"]].append(span)
    return drop, keep


def release_prepacked(model: bytes, files: dict[str, WeightBuffer], probe: Callable[[], np.ndarray]) -> int:
    """Release the pages of every tensor the session prepacked (and no kept tensor shares); returns the bytes.

    ``probe`` runs the session on a fixed input; its logits before and after must be identical."""
    drop, keep = initializer_ranges(model, files)
    if not any(drop.values()):
        return 0
    before = probe()
    for name, buf in files.items():
        pages = np.zeros(-(-buf.size // PAGE), np.int8)  # 1: only dropped tensors on the page, 2: a kept one too
        for start, stop in drop[name]:
            pages[-(-start // PAGE) : stop // PAGE] = 1  # whole pages inside the tensor
        for start, stop in keep[name]:
            pages[start // PAGE : -(-stop // PAGE)] = 2
        edges = np.flatnonzero(np.diff(np.concatenate(([0], (pages == 1).astype(np.int8), [0]))))
        for first, last in zip(edges[::2], edges[1::2], strict=True):
            buf.release(int(first) * PAGE, min(int(last) * PAGE, buf.size))
    after = probe()
    if not np.array_equal(before, after):
        raise WeightsStillReadError(
            "ONNX Runtime still reads weights it was expected to have prepacked (this CPU has no packed kernel "
            "for them); the loader keeps a full copy instead"
        )
    return sum(b.released for b in files.values())
