"""Greedy decoding through transformers and through a runtime engine, for token-exact parity checks."""

from __future__ import annotations

from appliance.engine.greedy import engine_greedy

__all__ = ["engine_greedy", "hf_greedy"]


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
