"""Slot bookkeeping shared by backends whose graph takes the KV cache as plain input tensors.

Each slot keeps its cache as per-layer tensors ``[1, H, length, D]``. A batched step left-pads the
slots' caches to a common length and masks the padding, so sequences of different lengths run
together; the new cache of each row is cut back out of the graph's ``present`` outputs.
Backends supply array creation and execution (numpy for ONNX Runtime, CUDA tensors for TensorRT).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import EngineError
from .spec import DecoderSpec


class PaddedKVEngine:
    kind = "abstract"

    def __init__(self, spec: DecoderSpec, num_slots: int, max_seq_len: int):
        self.spec = spec
        self.num_slots = num_slots
        self.max_seq_len = min(max_seq_len, spec.max_positions)
        self._cache: list[list[Any] | None] = [None] * num_slots

    # -- backend hooks -------------------------------------------------------------------------
    def _zeros(self, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def _keep(self, tensor: Any) -> Any:
        """A compact copy of a slice of a graph output that outlives the step."""
        raise NotImplementedError

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[Any]) -> tuple[np.ndarray,
                                                                                                    list[Any]]:
        """Execute the graph; returns last-position logits on the host ``[B, V]`` and the present tensors."""
        raise NotImplementedError

    # -- the Engine interface --------------------------------------------------------------------
    def _empty_cache(self, batch: int) -> list[Any]:
        (hk, dk), (hv, dv) = self.spec.key_shape, self.spec.value_shape
        out = []
        for _ in range(self.spec.num_layers):
            out += [self._zeros((batch, hk, 0, dk)), self._zeros((batch, hv, 0, dv))]
        return out

    def length(self, slot: int) -> int:
        cache = self._cache[slot]
        return 0 if cache is None else int(cache[0].shape[2])

    def release(self, slot: int) -> None:
        self._cache[slot] = None

    def prefill(self, batch: list[tuple[int, list[int]]]) -> np.ndarray:
        width = max(len(ids) for _, ids in batch)
        if width > self.max_seq_len:
            raise EngineError(f"prompt of {width} tokens exceeds max_seq_len {self.max_seq_len}")
        ids = np.full((len(batch), width), self.spec.pad_token_id, np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for row, (_, tokens) in enumerate(batch):
            ids[row, width - len(tokens):] = tokens
            mask[row, width - len(tokens):] = 1
        positions = np.clip(mask.cumsum(-1) - 1, 0, None)
        logits, present = self._run(ids, mask, positions, self._empty_cache(len(batch)))
        for row, (slot, tokens) in enumerate(batch):
            pad = width - len(tokens)
            self._cache[slot] = [self._keep(t[row: row + 1, :, pad:]) for t in present]
        return logits

    def decode(self, batch: list[tuple[int, int]]) -> np.ndarray:
        lengths = [self.length(slot) for slot, _ in batch]
        if min(lengths) == 0:
            raise EngineError("decode on a slot that was never prefilled")
        width = max(lengths)
        if width + 1 > self.max_seq_len:
            raise EngineError(f"sequence would exceed max_seq_len {self.max_seq_len}")
        n = len(batch)
        past = []
        for t, template in enumerate(self._cache[batch[0][0]]):
            buf = self._zeros((n, template.shape[1], width, template.shape[3]))
            for row, (slot, _) in enumerate(batch):
                buf[row, :, width - lengths[row]:] = self._cache[slot][t][0]
            past.append(buf)
        mask = np.zeros((n, width + 1), np.int64)
        for row, length in enumerate(lengths):
            mask[row, width - length:] = 1
        ids = np.array([[tok] for _, tok in batch], np.int64)
        positions = np.array([[length] for length in lengths], np.int64)
        logits, present = self._run(ids, mask, positions, past)
        for row, (slot, _) in enumerate(batch):
            start = width - lengths[row]
            self._cache[slot] = [self._keep(t[row: row + 1, :, start:]) for t in present]
        return logits
