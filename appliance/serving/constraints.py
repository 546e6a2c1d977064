"""Constrained generation: the output of a request matches a JSON schema, any JSON object, a regex, a Lark
grammar or one of a list of strings, enforced token by token with llguidance (ARCHITECTURE.md: why llguidance).

``Grammars`` (one per loaded model) compiles a request's ``Constraint`` at admission, on the serving loop, never on
the engine thread: the grammar is built and validated against the model's vocabulary once per distinct constraint
(cached by digest) within llguidance's resource limits, and a constraint that does not compile is that request's
``bad_request`` naming the field. ``Guide`` (one per constrained request) masks the logits of its own row before
sampling and advances with every sampled token; EOS is allowed only where the grammar may end, and the request
finishes ``grammar`` once nothing else may follow. With R1-style reasoning the constraint starts after
``</think>``, which ``max_reasoning_tokens`` can force.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict

import llguidance
import llguidance.numpy as lgn
import numpy as np
from tokenizers import Tokenizer

from appliance.metrics import METRICS
from appliance.transport import protocol as P

CACHED_GRAMMARS = 256  # validated grammars kept per model, by constraint digest
# llguidance's limits (its defaults are 2,000 / 1,000,000 / 200,000 / 50,000 / 250,000 / 500,000), tightened where a
# hostile grammar could cost the serving loop seconds at compile time or the engine thread at every token.
LIMITS = dict(
    max_items_in_row=2_000,
    initial_lexer_fuel=1_000_000,  # ~20 ms of regex analysis when the grammar is built
    step_lexer_fuel=200_000,  # ~15 ms per token mask at most
    step_max_items=50_000,
    max_lexer_states=100_000,
    max_grammar_size=200_000,
)


# Compact JSON: with llguidance's default (any whitespace between tokens) a weak model can emit whitespace until
# max_tokens. A schema may still ask for whitespace with its own "x-guidance" options.
JSON_OPTIONS = {"whitespace_flexible": False}


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS)


def grammar_of(constraint: P.Constraint) -> str:
    """llguidance's grammar for ``constraint`` (not yet validated)."""
    if constraint.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(constraint.source, defaults=JSON_OPTIONS)
    if constraint.kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if constraint.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.source)
    if constraint.kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(constraint.source)
    choices = json.loads(constraint.source)  # as JSON strings, each a valid Lark literal
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


class Grammars:
    """Constraint compilation for one model: llguidance's view of the tokenizer, built on first use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...], think_close: int | None):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's: padding rows)
        self._eos = list(eos_token_ids)
        self.think_close = think_close  # the id of </think> where the model reasons R1-style
        self._ll: llguidance.LLTokenizer | None = None
        self._valid: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                source = self._tokenizer.to_str()
                self._ll = llguidance.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=self._eos)
            return self._ll

    def guide(self, req: P.Request, opens_reasoning: bool) -> Guide | None:
        """The guide for ``req`` (None without a constraint); ``ProtocolError`` when its constraint cannot be used."""
        constraint = req.constraint
        if constraint is None:
            if req.max_reasoning_tokens is not None and opens_reasoning and self.think_close is not None:
                return Guide(None, self.vocab_size, self.think_close, req.max_reasoning_tokens)
            return None
        start = time.perf_counter()
        grammar = self._validated(constraint, req.id)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=_limits())
        if matcher.is_error():
            raise P.ProtocolError(P.E_BAD_REQUEST, f"field {constraint.named}: {_line(matcher.get_error())}", req.id)
        METRICS.constraint_compiled(constraint.kind, time.perf_counter() - start)
        deferred = self.think_close if opens_reasoning else None
        return Guide(matcher, self.vocab_size, deferred, req.max_reasoning_tokens)

    def _validated(self, constraint: P.Constraint, rid: str) -> str:
        digest = constraint.digest
        with self._lock:
            if digest in self._valid:
                self._valid.move_to_end(digest)
                return self._valid[digest]
        try:
            grammar = grammar_of(constraint)
        except (ValueError, TypeError) as exc:
            raise P.ProtocolError(P.E_BAD_REQUEST, f"field {constraint.named}: {_line(str(exc))}", rid) from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer, limits=_limits())
        if error:
            raise P.ProtocolError(P.E_BAD_REQUEST, f"field {constraint.named} does not compile: {_line(error)}", rid)
        with self._lock:
            self._valid[digest] = grammar
            while len(self._valid) > CACHED_GRAMMARS:
                self._valid.popitem(last=False)
        return grammar


def _line(message: str, limit: int = 300) -> str:
    """llguidance's multi-line diagnostics as one line."""
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Guide:
    """One request's constraint, in the engine thread: masks its row's logits, advances with each token."""

    def __init__(self, matcher, vocab_size: int, think_close: int | None, max_reasoning: int | None):
        self.matcher = matcher  # None: only a reasoning budget, no constraint on the answer
        self.vocab_size = vocab_size
        self.think_close = think_close  # while set, the model is reasoning and the constraint waits
        self.max_reasoning = max_reasoning
        self.reasoning_tokens = 0
        self._bits = lgn.allocate_token_bitmask(1, vocab_size) if matcher is not None else None
        self._prepared = False  # _bits holds the mask for the next token
        self._mask_s = 0.0

    @property
    def reasoning(self) -> bool:
        return self.think_close is not None

    @property
    def constrains_next(self) -> bool:
        """Whether the next token's mask comes from the matcher (not reasoning, not a bare reasoning budget)."""
        return self.matcher is not None and not self.reasoning

    def forced(self, limit: int) -> list[int]:
        """The tokens the grammar forces next (llguidance's fast-forward tokens: the canonical tokenization of the
        bytes nothing else may follow with), at most ``limit``. The engine core drafts them for speculative
        verification, so a token is kept only where the model's own (masked) choice agrees: the output is the
        same as decoding them one by one."""
        if not self.constrains_next or limit < 1:
            return []
        return self.matcher.compute_ff_tokens()[:limit]

    def prepare(self) -> None:
        """Compute the next token's mask now: the runner calls this on its helper thread while the engine runs
        the step whose logits it will mask (llguidance releases the GIL while it computes)."""
        start = time.perf_counter()
        lgn.fill_next_token_bitmask(self.matcher, self._bits, 0)
        self._prepared = True
        self._mask_s = time.perf_counter() - start

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` with every token the constraint forbids at -inf."""
        if self.reasoning:
            if self.max_reasoning is None or self.reasoning_tokens < self.max_reasoning:
                return logits
            forced = np.full_like(logits, -np.inf)  # the reasoning budget is spent: close it
            forced[self.think_close] = 0.0
            return forced
        if self.matcher is None:
            return logits
        if not self._prepared:
            self.prepare()
        start = time.perf_counter()
        self._prepared = False
        allowed = np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")
        out = np.array(logits, dtype=logits.dtype, copy=True)
        width = min(len(out), self.vocab_size)
        out[:width][allowed[:width] == 0] = -np.inf
        out[width:] = -np.inf  # padding rows past the tokenizer's vocabulary
        METRICS.constraint_masked(self._mask_s + time.perf_counter() - start)
        return out

    def advance(self, token: int) -> bool:
        """Record the sampled ``token``; True when the constraint is complete (nothing else may follow)."""
        if self.reasoning:
            if token == self.think_close:
                self.think_close = None
            else:
                self.reasoning_tokens += 1
            return False
        if self.matcher is None:
            return False
        self._prepared = False
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the constraint refused token {token}: {_line(self.matcher.get_error())}")
        return self.matcher.is_stopped()
