"""Next-token selection in numpy: greedy, temperature, top-k, top-p, repetition penalty, seeded."""

from __future__ import annotations

import numpy as np

from appliance.transport.protocol import Sampling


def apply_repetition_penalty(logits: np.ndarray, seen: list[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty: divide positive and multiply negative logits of tokens already produced."""
    if penalty == 1.0 or not seen:
        return logits
    logits = logits.copy()
    idx = np.unique(np.asarray(seen, np.int64))
    vals = logits[idx]
    logits[idx] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def logits_to_probs(logits: np.ndarray, params: Sampling) -> np.ndarray:
    """Temperature, then top-k, then top-p (nucleus) filtering; returns a probability vector."""
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = cumulative - probs[order] < params.top_p  # always keeps the most likely token
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


def sample(logits: np.ndarray, params: Sampling, seen: list[int], rng: np.random.Generator | None) -> int:
    """Pick the next token for one sequence from its logits ``[vocab]``."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    probs = logits_to_probs(logits, params)
    generator = rng if rng is not None else np.random.default_rng()
    # Inverse CDF with exactly one uniform draw per token: the position's token depends only on its logits and the
    # request's n-th draw, so speculative decoding (which checks drafts with the same draws) yields the same tokens.
    cdf = np.cumsum(probs)
    if not (np.isfinite(cdf[-1]) and cdf[-1] > 0):
        raise ValueError("sampling produced no valid probabilities (non-finite logits or temperature)")
    return min(int(np.searchsorted(cdf, generator.random() * cdf[-1], side="right")), probs.shape[-1] - 1)
