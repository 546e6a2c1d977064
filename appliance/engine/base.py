"""The engine interface: batched prefill and decode over a fixed set of sequence slots.

The scheduler decides which slots run; the engine executes and returns logits. A backend owns
the KV cache of every slot, so callers pass only token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from appliance.errors import ApplianceError

from .spec import DecoderSpec


class EngineError(ApplianceError):
    """The engine cannot be created or cannot run a step."""


@dataclass
class EngineStats:
    """What an engine did since it was built (the ``health`` reply's engine counters)."""

    decode_steps: int = 0
    resident_steps: int = 0  # decode steps that reused the previous step's output in place
    regathers: int = 0  # decode steps that had to gather the batch (it changed)
    copied_bytes: int = 0  # cache bytes copied on the host (gathers, chunk assembly, session save/load)
    prefill_tokens: int = 0
    verify_steps: int = 0  # speculative decoding: rows checked with their drafted tokens
    verified_tokens: int = 0  # tokens those steps appended (the last token and the drafts)

    def appended(self, sizes: list[int], verify: bool) -> None:
        if verify:
            self.verify_steps += len(sizes)
            self.verified_tokens += sum(sizes)
        else:
            self.prefill_tokens += sum(sizes)


def check_rewind(length: int, keep: int) -> None:
    """``rewind(slot, keep)`` may only drop tokens, and must keep at least one (an empty slot is ``release``)."""
    if not 0 < keep <= length:
        raise EngineError(f"rewind to {keep} tokens of a slot holding {length}; it must keep 1..{length}")


@runtime_checkable
class Engine(Protocol):
    """Every backend declares this (``tests/test_engine_protocol.py`` checks each structurally)."""

    kind: str
    spec: DecoderSpec
    num_slots: int
    max_seq_len: int
    stats: EngineStats

    def prefill(self, batch: list[tuple[int, list[int]]]) -> np.ndarray:
        """Append each ``(slot, ids)`` to its slot (a whole prompt, or the next chunk of one); returns the logits
        after each row's last new token ``[len(batch), vocab]``."""
        ...

    def decode(self, batch: list[tuple[int, int]]) -> np.ndarray:
        """Append one ``(slot, token_id)`` per row; returns next-token logits ``[len(batch), vocab]``."""
        ...

    def verify(self, batch: list[tuple[int, list[int]]]) -> list[np.ndarray]:
        """Append each ``(slot, ids)`` like ``prefill`` but return the logits at *every* new position, one
        ``[len(ids), vocab]`` array per row: row ``i`` predicts the token after ``ids[: i + 1]``. Speculative
        decoding feeds the last token and the drafted ones, then ``rewind``s what the target rejects."""
        ...

    def rewind(self, slot: int, length: int) -> None:
        """Keep only the first ``length`` cached tokens of ``slot`` (``0 < length <= self.length(slot)``); what
        follows is never read again and the next append writes over it. Costs no copy."""
        ...

    def length(self, slot: int) -> int:
        """Tokens currently cached for ``slot``."""
        ...

    def release(self, slot: int) -> None:
        """Forget the slot's cache."""
        ...

    def save(self, slot: int) -> list[Any]:
        """A compact copy of the slot's cache (one array per cached tensor), e.g. for a session."""
        ...

    def load(self, slot: int, cache: list[Any]) -> None:
        """Restore a cache made by ``save`` into an empty slot (copied: the saved one stays valid)."""
        ...

    def cache_bytes(self) -> int:
        """KV cache memory the engine holds (read by the metrics scrape)."""
        ...

    def score(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position of ``tokens`` ``[len(tokens), vocab]`` in a private cache (perplexity, probes);
        no slot is touched."""
        ...
