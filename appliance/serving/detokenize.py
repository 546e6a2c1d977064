"""Incremental detokenization and stop strings: pure functions of the token ids, no engine.

As in vLLM, each step decodes only the tokens after ``prefix_offset``; the offsets advance only at a
completed character, so each window starts on a clean boundary and the work per token is constant.
Text is streamed only once it can no longer change: a partial UTF-8 character (byte-level BPE,
``<0xNN>`` byte fallback) and any tail that could still become a stop string are held back, so
nothing streamed is ever retracted. Special tokens are skipped, as ``Tokenizer.decode`` does by
default: ``<|im_end|>`` never reaches a client.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


class Detokenizer:
    """Turns a growing list of output token ids into streamable text, cutting at stop strings."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()):
        self._decode = decode
        self.stops = stops
        self.text = ""  # output so far, stop strings already cut
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False  # a stop string matched: the request must end
        self._prefix_offset = 0
        self._read_offset = 0

    def step(self, ids: list[int], finished: bool) -> str:
        """Feed every output id so far; returns the newly final text ('' when nothing is final yet).

        ``finished``: the sequence has ended, so everything left is flushed.
        """
        prefix = self._decode(ids[self._prefix_offset : self._read_offset])
        window = self._decode(ids[self._prefix_offset :])
        if (window.endswith(REPLACEMENT) or len(window) <= len(prefix)) and not finished:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        text, cut = cut_at_stop(self.text, window[len(prefix) :], self.stops)
        if cut:
            self.stopped = finished = True
        self.text = text
        upto = len(text) if finished else len(text) - stop_prefix_len(text, self.stops)
        fresh = text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return fresh


def cut_at_stop(done: str, new: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``done + new`` cut before the earliest stop string reaching into ``new``; True when one matched.

    Only matches that reach into ``new`` are searched: ``done`` was already checked.
    """
    text = done + new
    hits = [at for stop in stops if (at := text.find(stop, max(0, len(done) - len(stop) + 1))) >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
