"""Sampling: greedy is argmax, seeds reproduce, filters restrict the support."""

from __future__ import annotations

import numpy as np

from appliance.serving.sampling import apply_repetition_penalty, logits_to_probs, sample
from appliance.transport.protocol import Sampling

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, -1.0], np.float32)


def test_greedy_is_argmax():
    assert sample(LOGITS, Sampling(), [], None) == 1


def test_same_seed_same_tokens():
    params = Sampling(temperature=1.0, seed=7)
    rngs = [np.random.default_rng(params.seed), np.random.default_rng(params.seed)]
    draws = [[sample(LOGITS, params, [], rng) for _ in range(20)] for rng in rngs]
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_top_k_keeps_only_k_tokens():
    probs = logits_to_probs(LOGITS, Sampling(temperature=1.0, top_k=2))
    assert set(np.flatnonzero(probs)) == {1, 2}
    assert abs(probs.sum() - 1) < 1e-9


def test_top_p_keeps_the_smallest_nucleus():
    probs = logits_to_probs(LOGITS, Sampling(temperature=1.0, top_p=0.5))
    assert set(np.flatnonzero(probs)) == {1}


def test_repetition_penalty_lowers_seen_tokens():
    penalised = apply_repetition_penalty(LOGITS, [1, 4], 2.0)
    assert penalised[1] == LOGITS[1] / 2 and penalised[4] == LOGITS[4] * 2 and penalised[0] == LOGITS[0]
