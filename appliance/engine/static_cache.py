"""The static KV cache (gpt-fast style) for fused graphs: a slot is a row, written in place.

Each cache tensor is one preallocated ``[num_slots, kv_heads, max_seq_len + 1, head_dim]`` array.
The graph's ``GroupQueryAttention`` reads and writes it where it lies (past and present bound to
the same memory), at each row's own length (``seqlens_k``), so:

- **decode** binds the contiguous rows from the lowest to the highest decoding slot; a slot in that
  range that is not decoding gets a pad token written one position past its end (the spare
  ``+ 1`` position when full), which its next real step overwrites. Nothing is gathered when a
  request joins or leaves, and a steady step copies no cache bytes on the host.
- **prefill** runs one row at a time (ONNX Runtime's GroupQueryAttention takes a batch of new
  multi-token rows only when none has a past) and appends: a whole prompt, a chunk of one, or
  the next turn of a restored session.
- **save / load** copy one row's first ``length`` positions out or in (``[1, H, L, D]`` per tensor,
  the same format as the padded engine's, so sessions do not care which cache made them; a graph
  whose value is its key, ``value_is_key``, has one buffer per layer and saves it once).
"""

from __future__ import annotations

import numpy as np

from .base import EngineError, EngineStats, check_rewind
from .ort_engine import trim_heap
from .ort_session import BuiltSession, build_session, ort_errors
from .spec import DecoderSpec, output_names, static_input_names
from .weights import WeightBuffer


class StaticCacheEngine:
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
        pieces: int = 1,
    ):
        """``pieces``: sessions a graph with borrowed external weights is built as (``pipeline``): each piece's
        prepacked weights are handed back before the next is packed, so loading peaks lower; each piece costs
        one more ``run`` per step (bench/results/scale.json ``load_memory``)."""
        self.spec = spec
        self.num_slots = num_slots
        self.max_seq_len = min(max_seq_len, spec.max_positions)
        self.stats = EngineStats()
        self.built: BuiltSession = build_session(
            model,
            spec,
            threads=threads,
            external=external,
            spin=spin,
            affinity=affinity,
            pieces=pieces,
            positions=self.max_seq_len + 2,
        )
        self.threads, self.released_bytes = self.built.threads, self.built.released_bytes
        self._inputs = static_input_names(spec.num_layers)
        got = [i.name for i in self.session.get_inputs()]
        if got != self._inputs:
            raise EngineError(f"model inputs {got[:4]}... do not match a static-cache decoder.json")
        self._outputs = output_names(spec.num_layers)
        self.cache = self._allocate(num_slots, self.max_seq_len + 1)
        self._lengths = [0] * num_slots
        self._logits = np.zeros((num_slots, 1, spec.vocab_size), np.float32)
        self._bound = None  # the last decode step's I/O binding, reused while its rows stay the same

    @property
    def session(self):
        """The ONNX Runtime session (a ``PipelineSession`` when built in pieces); held only by ``built``, with the
        borrowed weights it reads."""
        return self.built.session

    def cache_bytes(self) -> int:
        """KV cache memory held in the preallocated buffers (read by the metrics scrape)."""
        return sum(int(t.nbytes) for t in self._stored(self.cache))

    # -- the Engine interface --------------------------------------------------------------------
    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def release(self, slot: int) -> None:
        self._lengths[slot] = 0

    def save(self, slot: int) -> list[np.ndarray]:
        """A compact copy of the slot's cache (one ``[1,H,L,D]`` array per tensor), e.g. for a session."""
        length = self._lengths[slot]
        if length == 0:
            raise EngineError("save of a slot that holds nothing")
        out = [t[slot : slot + 1, :, :length].copy() for t in self._stored(self.cache)]
        self.stats.copied_bytes += sum(a.nbytes for a in out)
        return out

    def load(self, slot: int, cache: list[np.ndarray]) -> None:
        """Restore a cache made by ``save`` into an empty slot (copied: the saved one stays valid)."""
        if self._lengths[slot]:
            raise EngineError("load into a slot that is in use")
        length = int(cache[0].shape[2])
        if length > self.max_seq_len:
            raise EngineError(f"saved cache of {length} tokens exceeds max_seq_len {self.max_seq_len}")
        for t, saved in zip(self._stored(self.cache), cache, strict=True):
            t[slot, :, :length] = saved[0]
        self.stats.copied_bytes += sum(int(a.nbytes) for a in cache)
        self._lengths[slot] = length

    def prefill(self, batch: list[tuple[int, list[int]]]) -> np.ndarray:
        """Append each row's tokens to its slot (a whole prompt or the next chunk of one); returns the
        logits after each row's last new token ``[len(batch), vocab]``."""
        rows = self._append(batch, verify=False)
        trim_heap()  # a prefill's activations (all-position logits) are the largest buffers a step frees
        return np.stack([logits[-1] for logits in rows])

    def verify(self, batch: list[tuple[int, list[int]]]) -> list[np.ndarray]:
        """Append each row's tokens; the logits at every new position, ``[len(ids), vocab]`` per row."""
        return self._append(batch, verify=True)

    def rewind(self, slot: int, length: int) -> None:
        """Keep the first ``length`` positions: the graph attends only below a row's length and the next append
        writes its keys and values over the rest, so nothing is copied or cleared."""
        check_rewind(self._lengths[slot], length)
        self._lengths[slot] = length

    def _append(self, batch: list[tuple[int, list[int]]], verify: bool) -> list[np.ndarray]:
        for slot, tokens in batch:
            if not tokens:
                raise EngineError("prefill of an empty token list")
            if self._lengths[slot] + len(tokens) > self.max_seq_len:
                raise EngineError(
                    f"sequence of {self._lengths[slot] + len(tokens)} tokens exceeds max_seq_len {self.max_seq_len}"
                )
        rows = []
        for slot, tokens in batch:
            total = self._lengths[slot] + len(tokens)
            logits = self._run(slot, np.array([tokens], np.int64), np.array([total - 1], np.int32), total)
            self._lengths[slot] = total
            rows.append(logits[0])
        self.stats.appended([len(tokens) for _, tokens in batch], verify)
        return rows

    def decode(self, batch: list[tuple[int, int]]) -> np.ndarray:
        """Append one ``(slot, token)`` per row; returns next-token logits ``[len(batch), vocab]``."""
        slots = [slot for slot, _ in batch]
        if min(self._lengths[s] for s in slots) == 0:
            raise EngineError("decode on a slot that was never prefilled")
        if max(self._lengths[s] for s in slots) + 1 > self.max_seq_len:
            raise EngineError(f"sequence would exceed max_seq_len {self.max_seq_len}")
        lo, hi = min(slots), max(slots) + 1
        io, ids, seqlens, total = self._decode_binding(lo, hi - lo)
        ids[:] = self.spec.pad_token_id
        for slot, token in batch:
            ids[slot - lo, 0] = token
        # Every row in the range writes at its own length: the real token for decoding slots, a pad
        # token past the end (overwritten later, never attended) for the others.
        seqlens[:] = self._lengths[lo:hi]
        total[...] = seqlens.max() + 1
        with ort_errors("failed to run a step"):
            self.session.run_with_iobinding(io)
        logits = self._logits[: hi - lo]
        for slot in slots:
            self._lengths[slot] += 1
        self.stats.decode_steps += 1
        self.stats.resident_steps += 1
        return logits[np.array(slots) - lo, 0]

    def score(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position of ``tokens`` ``[S, vocab]`` (for perplexity), in a private cache."""
        n = len(tokens)
        if self.released_bytes and n > self.max_seq_len:  # rotary rows past max_seq_len were released
            raise EngineError(f"score of {n} tokens exceeds max_seq_len {self.max_seq_len}")
        scratch = self._allocate(1, n)
        return self._run(0, np.array([tokens], np.int64), np.array([n - 1], np.int32), n, cache=scratch)[0]

    # -- execution -------------------------------------------------------------------------------
    def _allocate(self, rows: int, positions: int) -> list[np.ndarray]:
        """One buffer per graph cache input (key, value per layer); with ``value_is_key`` a layer's value is
        the same array as its key, so the graph writes the identical bytes to one buffer."""
        spec = self.spec
        keys = [
            np.zeros((rows, spec.key_shape[0], positions, spec.key_shape[1]), np.float32)
            for _ in range(spec.num_layers)
        ]
        if spec.value_is_key:
            return [t for key in keys for t in (key, key)]
        h, d = spec.value_shape
        return [t for key in keys for t in (key, np.zeros((rows, h, positions, d), np.float32))]

    def _stored(self, cache: list[np.ndarray]) -> list[np.ndarray]:
        """The distinct buffers of ``cache``: what a saved session holds (keys only when the value is the key)."""
        return cache[::2] if self.spec.value_is_key else cache

    def _decode_binding(self, row: int, n: int):
        """The I/O binding of a decode step over rows ``row .. row + n``, made once per row range and
        reused while the batch stays the same: the step then only writes its token ids and lengths
        into the bound input arrays (ONNX Runtime reads numpy memory in place)."""
        if self._bound is not None and self._bound[0] == (row, n):
            return self._bound[1]
        import onnxruntime as ort

        ids, seqlens, total = np.zeros((n, 1), np.int64), np.zeros(n, np.int32), np.zeros((), np.int32)
        io = self._bind(row, n, self.cache, self._logits[:n])
        for name, array in (("input_ids", ids), ("seqlens_k", seqlens), ("total_sequence_length", total)):
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        self._bound = ((row, n), (io, ids, seqlens, total))
        return self._bound[1]

    def _bind(self, row: int, n: int, cache: list[np.ndarray], out: np.ndarray | None):
        io = self.session.io_binding()
        if out is None:
            io.bind_output("logits", "cpu")
        else:
            io.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        for past, present, t in zip(self._inputs[3:], self._outputs[1:], cache, strict=True):
            view = t[row : row + n]  # rows are contiguous: a pointer and a shape, no copy
            shape, ptr = list(view.shape), view.ctypes.data
            io.bind_input(past, "cpu", 0, np.float32, shape, ptr)
            io.bind_output(present, "cpu", 0, np.float32, shape, ptr)
        return io

    def _run(self, row: int, ids: np.ndarray, seqlens: np.ndarray, total: int, cache=None) -> np.ndarray:
        """Run rows ``row .. row + len(ids)`` of ``cache`` (the engine's) in place; returns logits ``[rows, S, V]``."""
        io = self._bind(row, ids.shape[0], cache or self.cache, None)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("seqlens_k", seqlens)
        io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        with ort_errors("failed to run a step"):
            self.session.run_with_iobinding(io)
        return io.get_outputs()[0].numpy()
