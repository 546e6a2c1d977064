"""Incremental detokenization: the text each new token adds, never a broken character.

As in vLLM: each step decodes only a short window of recent tokens, twice (with and without the
newest ones), and emits the difference. The window start moves only at a completed character, so a
character spread over several tokens (byte-level BPE, ``<0xNN>`` byte fallback) is emitted whole
once its last byte arrives, and decoders that treat the first token specially (SentencePiece's
leading-space strip) see the same first token in both decodes. Special tokens are skipped, as
``Tokenizer.decode`` does by default: ``<|im_end|>`` never reaches a client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class Detokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.prefix_offset = 0
        self.read_offset = 0

    def step(self, ids: Sequence[int], finished: bool = False) -> str | None:
        """New text for ``ids`` (all output tokens so far); None while the newest tokens end inside
        a character (unless ``finished``: then whatever decodes is final)."""
        prefix = self._decode(ids[self.prefix_offset : self.read_offset])
        window = self._decode(ids[self.prefix_offset :])
        if (window.endswith("\ufffd") or len(window) <= len(prefix)) and not finished:
            return None
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return window[len(prefix) :]
