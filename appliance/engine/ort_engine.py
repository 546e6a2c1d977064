"""ONNX Runtime backend (CPU): the always-available engine. The model arrives as decrypted bytes."""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from .base import EngineError
from .ort_session import BuiltSession, build_session
from .padded import PaddedKVEngine
from .spec import DecoderSpec, input_names, output_names
from .weights import WeightBuffer

PROBE_TOKENS = [0, 1, 2, 3]  # a fixed input whose logits show whether released weights were still read


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
        self.built: BuiltSession = build_session(
            model, spec, threads=threads, external=external, spin=spin, affinity=affinity
        )
        self.threads = self.built.threads
        self._names = input_names(spec.num_layers)
        got = [i.name for i in self.session.get_inputs()]
        if got != self._names:
            raise EngineError(f"model inputs {got[:4]}... do not match decoder.json ({self._names[:4]}...)")

        self._outputs = output_names(spec.num_layers)
        self.released_bytes = self.built.release_borrowed(model, lambda: self.score(PROBE_TOKENS))

    @property
    def session(self):
        """The ONNX Runtime session; held only by ``built``, with the borrowed weights it reads."""
        return self.built.session

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
