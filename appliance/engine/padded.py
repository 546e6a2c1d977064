"""Slot bookkeeping shared by backends whose graph takes the KV cache as plain input tensors.

The graph is functional: it reads ``past [B,H,P,D]`` and writes ``present [B,H,P+S,D]``. What the
host does around it decides how much is copied per token:

- **Decode keeps the batch resident.** While the same slots decode step after step, the
  ``present`` a step writes *is* the next step's ``past``: outputs are bound (I/O binding) into
  one of two preallocated arenas and the next step reads them in place, so a steady decode step
  copies nothing on the host. Only when the batch changes (a request joins or leaves) are the
  slots' caches gathered once into a new left-padded batch.
- **Prefill appends.** ``prefill`` extends whatever a slot holds (empty, an earlier chunk of the
  same prompt, or a conversation restored from a session), so long prompts run in chunks. New
  tokens are right-padded behind each row's past, keeping every row's cache one contiguous run.

A slot's cache is a view ``(tensors, row, start, end)`` into the arrays that hold it. Backends
supply array creation and execution (numpy for ONNX Runtime, CUDA tensors for TensorRT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import EngineError, EngineStats, check_rewind
from .spec import DecoderSpec


@dataclass
class _Slot:
    tensors: list[Any]  # 2 per layer, each [B, H, W, D]
    row: int
    start: int
    end: int
    in_arena: bool = False  # lives in a decode arena that a later step may overwrite

    def views(self) -> list[Any]:
        return [t[self.row, :, self.start : self.end] for t in self.tensors]


class PaddedKVEngine:
    kind = "abstract"

    def __init__(self, spec: DecoderSpec, num_slots: int, max_seq_len: int, *, keep_resident: bool = True):
        self.spec = spec
        self.num_slots = num_slots
        self.max_seq_len = min(max_seq_len, spec.max_positions)
        self.keep_resident = keep_resident  # False re-gathers every step (for measuring what residency saves)
        self.stats = EngineStats()
        self._slots: list[_Slot | None] = [None] * num_slots
        self._batch: tuple[int, ...] = ()  # slots resident in the decode arena, in row order
        self._arenas: list[list[Any]] = [[], []]  # two sets of flat buffers, one per cache tensor
        self._current = 0  # the arena holding the resident batch

    # -- backend hooks -------------------------------------------------------------------------
    def _empty(self, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def _run(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[Any], out: list[Any] | None = None
    ) -> tuple[Any, list[Any]]:
        """Execute the graph; returns logits ``[B,S,V]`` and the present tensors (written into ``out``
        when given: buffers of exactly the present shapes)."""
        raise NotImplementedError

    def _host(self, logits: Any) -> np.ndarray:
        return np.asarray(logits, dtype=np.float32)

    # -- cache layout --------------------------------------------------------------------------
    def _tensor_shapes(self) -> list[tuple[int, int]]:
        return [self.spec.key_shape, self.spec.value_shape] * self.spec.num_layers

    def empty_cache(self, batch: int) -> list[Any]:
        """Zero-length past tensors for a graph run with no history."""
        return [self._empty((batch, h, 0, d)) for h, d in self._tensor_shapes()]

    @staticmethod
    def _nbytes(tensors: list[Any]) -> int:
        return sum(int(t.nbytes) for t in tensors)

    def _arena_views(self, which: int, batch: int, width: int) -> list[Any]:
        """Views ``[batch, H, width, D]`` over arena ``which``, growing its buffers when too small."""
        views = []
        arena = self._arenas[which]
        for i, (h, d) in enumerate(self._tensor_shapes()):
            need = batch * h * width * d
            if i >= len(arena) or arena[i].shape[0] < need:
                cap = min(max(need * 2, 4096), max(need, self.num_slots * h * self.max_seq_len * d))
                buf = self._empty((cap,))
                if i >= len(arena):
                    arena.append(buf)
                else:
                    arena[i] = buf
            views.append(arena[i][:need].reshape(batch, h, width, d))
        return views

    def cache_bytes(self) -> int:
        """KV cache memory held in the decode arenas (read by the metrics scrape)."""
        return sum(self._nbytes(arena) for arena in self._arenas)

    # -- the Engine interface --------------------------------------------------------------------
    def length(self, slot: int) -> int:
        s = self._slots[slot]
        return 0 if s is None else s.end - s.start

    def release(self, slot: int) -> None:
        self._slots[slot] = None
        if slot in self._batch:
            self._batch = ()

    def save(self, slot: int) -> list[Any]:
        """A compact copy of the slot's cache (one ``[1,H,L,D]`` array per tensor), e.g. for a session."""
        s = self._slots[slot]
        if s is None:
            raise EngineError("save of a slot that holds nothing")
        out = []
        for v in s.views():
            t = self._empty((1, *v.shape))
            t[0] = v
            out.append(t)
        self.stats.copied_bytes += self._nbytes(out)
        return out

    def load(self, slot: int, cache: list[Any]) -> None:
        """Restore a cache made by ``save`` into an empty slot (copied: the saved one stays valid)."""
        if self._slots[slot] is not None:
            raise EngineError("load into a slot that is in use")
        length = int(cache[0].shape[2])
        if length > self.max_seq_len:
            raise EngineError(f"saved cache of {length} tokens exceeds max_seq_len {self.max_seq_len}")
        copies = []
        for t in cache:
            c = self._empty(tuple(t.shape))
            c[...] = t
            copies.append(c)
        self.stats.copied_bytes += self._nbytes(copies)
        self._slots[slot] = _Slot(copies, 0, 0, length)

    def prefill(self, batch: list[tuple[int, list[int]]]) -> np.ndarray:
        """Append each row's tokens to its slot (a whole prompt or the next chunk of one); returns the
        logits after each row's last new token ``[len(batch), vocab]``."""
        logits, sizes = self._append(batch, verify=False)
        rows = np.arange(len(batch))
        if isinstance(logits, np.ndarray):
            return self._host(logits[rows, np.array(sizes) - 1])
        return self._host(logits[rows, [s - 1 for s in sizes]])

    def verify(self, batch: list[tuple[int, list[int]]]) -> list[np.ndarray]:
        """Append each row's tokens; the logits at every new position, ``[len(ids), vocab]`` per row."""
        logits, sizes = self._append(batch, verify=True)
        return [self._host(logits[row, :size]) for row, size in enumerate(sizes)]

    def rewind(self, slot: int, length: int) -> None:
        """Keep the first ``length`` positions: the slot's view just ends earlier (no copy). A resident decode
        batch requires every row to end at the arena's width, so a rewound row makes the next step gather."""
        check_rewind(self.length(slot), length)
        s = self._slots[slot]
        s.end = s.start + length
        if slot in self._batch:
            self._batch = ()

    def _append(self, batch: list[tuple[int, list[int]]], verify: bool) -> tuple[Any, list[int]]:
        """Run each row's new tokens behind its cache; returns the logits ``[B, S, V]`` and each row's size."""
        lengths = [self.length(slot) for slot, _ in batch]
        sizes = [len(ids) for _, ids in batch]
        if min(sizes) == 0:
            raise EngineError("prefill of an empty token list")
        for length, size in zip(lengths, sizes, strict=True):
            if length + size > self.max_seq_len:
                raise EngineError(f"sequence of {length + size} tokens exceeds max_seq_len {self.max_seq_len}")
        n, width, new = len(batch), max(lengths), max(sizes)
        past = self._gather(
            [slot for slot, _ in batch], width, [self._empty((n, h, width, d)) for h, d in self._tensor_shapes()]
        )
        ids = np.full((n, new), self.spec.pad_token_id, np.int64)
        mask = np.zeros((n, width + new), np.int64)
        positions = np.zeros((n, new), np.int64)
        for row, ((_, tokens), length, size) in enumerate(zip(batch, lengths, sizes, strict=True)):
            ids[row, :size] = tokens
            mask[row, width - length : width + size] = 1
            positions[row] = np.minimum(np.arange(length, length + new), length + size - 1)
        logits, present = self._run(ids, mask, positions, past)
        for row, ((slot, _), length, size) in enumerate(zip(batch, lengths, sizes, strict=True)):
            self._slots[slot] = _Slot(present, row, width - length, width + size)
        if set(self._batch) & {slot for slot, _ in batch}:
            self._batch = ()
        self.stats.appended(sizes, verify)
        return logits, sizes

    def decode(self, batch: list[tuple[int, int]]) -> np.ndarray:
        """Append one ``(slot, token)`` per row; returns next-token logits ``[len(batch), vocab]``."""
        slots = tuple(slot for slot, _ in batch)
        lengths = [self.length(slot) for slot in slots]
        if min(lengths) == 0:
            raise EngineError("decode on a slot that was never prefilled")
        if max(lengths) + 1 > self.max_seq_len:
            raise EngineError(f"sequence would exceed max_seq_len {self.max_seq_len}")
        n = len(slots)
        if slots == self._batch and self.keep_resident:
            width = self._slots[slots[0]].end  # every resident row ends at the arena's width
            past = self._slots[slots[0]].tensors
            self.stats.resident_steps += 1
        else:
            width = max(lengths)
            target = 1 - self._current
            self._park_arena_slots(set(slots))
            past = self._gather(list(slots), width, self._arena_views(target, n, width))
            self._current = target
            self.stats.regathers += 1
        out = self._arena_views(1 - self._current, n, width + 1)
        mask = np.zeros((n, width + 1), np.int64)
        for row, length in enumerate(lengths):
            mask[row, width - length :] = 1
        ids = np.array([[tok] for _, tok in batch], np.int64)
        positions = np.array([[length] for length in lengths], np.int64)
        logits, present = self._run(ids, mask, positions, past, out)
        self._current = 1 - self._current
        for row, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
            self._slots[slot] = _Slot(present, row, width - length, width + 1, in_arena=True)
        self._batch = slots
        self.stats.decode_steps += 1
        return self._host(logits[:, -1])

    def score(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position of ``tokens`` ``[S, vocab]`` (for perplexity); no slot is touched."""
        ids = np.array([tokens], np.int64)
        logits, _ = self._run(ids, np.ones_like(ids), np.arange(len(tokens))[None], self.empty_cache(1))
        return self._host(logits[0])

    # -- helpers -------------------------------------------------------------------------------
    def _gather(self, slots: list[int], width: int, into: list[Any]) -> list[Any]:
        """Copy each slot's cache right-aligned into row ``i`` of ``into`` (zeros to the left)."""
        if width == 0:
            return into
        for row, slot in enumerate(slots):
            s = self._slots[slot]
            length = 0 if s is None else s.end - s.start
            for t, buf in enumerate(into):
                buf[row, :, : width - length] = 0
                if length:
                    buf[row, :, width - length :] = s.tensors[t][s.row, :, s.start : s.end]
            if s is not None:
                self.stats.copied_bytes += self._nbytes(s.views())
        return into

    def _park_arena_slots(self, keep: set[int]) -> None:
        """Slots living in the arenas but not in the coming batch get their own copy before the
        arenas are overwritten (e.g. a finished turn whose cache a session will save)."""
        for slot, s in enumerate(self._slots):
            if s is not None and slot not in keep and s.in_arena:
                self._slots[slot] = None
                self.load(slot, [v[None] for v in s.views()])
