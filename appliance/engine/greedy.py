"""Greedy decoding through an engine, argmax only: the token-exact reference the parity checks compare
(ONNX Runtime vs transformers in ``edge_models.parity``, TensorRT vs ONNX Runtime in ``trt_selftest``)."""

from __future__ import annotations

import numpy as np


def engine_greedy(engine, prompts: list[list[int]], new_tokens: int, eos_id: int) -> list[list[int]]:
    """The appliance engine, prompts batched in slots 0..n-1, argmax each step with EOS suppressed
    (as ``min_new_tokens`` does in transformers)."""

    def pick(logits: np.ndarray) -> np.ndarray:
        logits = logits.copy()
        logits[:, eos_id] = -np.inf
        return np.argmax(logits, axis=-1)

    slots = list(range(len(prompts)))
    outputs = [[int(t)] for t in pick(engine.prefill(list(zip(slots, prompts, strict=False))))]
    for _ in range(new_tokens - 1):
        logits = engine.decode([(s, out[-1]) for s, out in zip(slots, outputs, strict=False)])
        for out, tok in zip(outputs, pick(logits), strict=False):
            out.append(int(tok))
    for s in slots:
        engine.release(s)
    return outputs
