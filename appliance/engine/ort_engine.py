"""ONNX Runtime backend (CPU): the always-available engine.

The model arrives as bytes decrypted in memory. Each slot keeps its cache as per-layer numpy
arrays; a batched step left-pads the slots' caches to a common length and masks the padding, so
sequences of different lengths decode together.
"""

from __future__ import annotations

import numpy as np

from .base import EngineError
from .spec import DecoderSpec, input_names


class OrtEngine:
    kind = "onnxruntime"

    def __init__(self, model: bytes, spec: DecoderSpec, *, num_slots: int, max_seq_len: int, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise EngineError(f"ONNX Runtime could not load the model: {exc}") from None
        expected = input_names(spec.num_layers)
        got = [i.name for i in self.session.get_inputs()]
        if got != expected:
            raise EngineError(f"model inputs {got[:5]}... do not match decoder.json ({expected[:5]}...)")
        self.spec = spec
        self.num_slots = num_slots
        self.max_seq_len = min(max_seq_len, spec.max_positions)
        self._names = expected
        self._cache: list[list[np.ndarray] | None] = [None] * num_slots

    def _empty_cache(self, batch: int) -> list[np.ndarray]:
        (hk, dk), (hv, dv) = self.spec.key_shape, self.spec.value_shape
        out = []
        for _ in range(self.spec.num_layers):
            out += [np.zeros((batch, hk, 0, dk), np.float32), np.zeros((batch, hv, 0, dv), np.float32)]
        return out

    def length(self, slot: int) -> int:
        cache = self._cache[slot]
        return 0 if cache is None else cache[0].shape[2]

    def release(self, slot: int) -> None:
        self._cache[slot] = None

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray]):
        feeds = dict(zip(self._names, [ids, mask, positions, *past], strict=True))
        logits, *present = self.session.run(None, feeds)
        return logits, present

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
            self._cache[slot] = [np.ascontiguousarray(t[row: row + 1, :, pad:]) for t in present]
        return logits[:, -1, :]

    def decode(self, batch: list[tuple[int, int]]) -> np.ndarray:
        lengths = [self.length(slot) for slot, _ in batch]
        if min(lengths) == 0:
            raise EngineError("decode on a slot that was never prefilled")
        width = max(lengths)
        if width + 1 > self.max_seq_len:
            raise EngineError(f"sequence would exceed max_seq_len {self.max_seq_len}")
        n = len(batch)
        mask = np.zeros((n, width + 1), np.int64)
        past = []
        for t, template in enumerate(self._cache[batch[0][0]]):
            buf = np.zeros((n, template.shape[1], width, template.shape[3]), np.float32)
            for row, (slot, _) in enumerate(batch):
                buf[row, :, width - lengths[row]:] = self._cache[slot][t][0]
            past.append(buf)
        for row, length in enumerate(lengths):
            mask[row, width - length:] = 1
        ids = np.array([[tok] for _, tok in batch], np.int64)
        positions = np.array([[length] for length in lengths], np.int64)
        logits, present = self._run(ids, mask, positions, past)
        for row, (slot, _) in enumerate(batch):
            start = width - lengths[row]
            self._cache[slot] = [np.ascontiguousarray(t[row: row + 1, :, start:]) for t in present]
        return logits[:, -1, :]
