"""Greedy decoding through transformers and through a runtime engine, for token-exact parity checks."""

from __future__ import annotations

import numpy as np


def hf_greedy(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """transformers ``generate`` (greedy, exactly ``new_tokens`` per row) on a left-padded batch."""
    import torch

    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return [row[width:].tolist() for row in out]


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
