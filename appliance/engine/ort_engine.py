"""ONNX Runtime backend (CPU): the always-available engine. The model arrives as decrypted bytes."""

from __future__ import annotations

import numpy as np

from .base import EngineError
from .padded import PaddedKVEngine
from .spec import DecoderSpec, input_names


class OrtEngine(PaddedKVEngine):
    kind = "onnxruntime"

    def __init__(self, model: bytes, spec: DecoderSpec, *, num_slots: int, max_seq_len: int, threads: int = 0,
                 external: dict[str, bytearray] | None = None):
        import onnxruntime as ort

        super().__init__(spec, num_slots, max_seq_len)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        if external:
            # ONNX Runtime copies what it needs while the session is created; the caller wipes after.
            names = list(external)
            opts.add_external_initializers_from_files_in_memory(
                names, [external[n] for n in names], [len(external[n]) for n in names])
        try:
            self.session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise EngineError(f"ONNX Runtime could not load the model: {exc}") from None
        self._names = input_names(spec.num_layers)
        got = [i.name for i in self.session.get_inputs()]
        if got != self._names:
            raise EngineError(f"model inputs {got[:4]}... do not match decoder.json ({self._names[:4]}...)")

    def _zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def _keep(self, tensor: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(tensor)

    def _run(self, ids, mask, positions, past):
        feeds = dict(zip(self._names, [ids, mask, positions, *past], strict=True))
        logits, *present = self.session.run(None, feeds)
        return logits[:, -1, :], present
