"""Speculative decoding: cheap drafts of the next tokens, checked by the served model in one pass.

A decode step reads every weight of the model to produce one token; on a CPU (and a Jetson) that read, not the
arithmetic, is the cost. A *verify* step appends the last token and ``k`` drafted ones to the slot and returns the
target's logits at each of the ``k + 1`` positions for about the price of one decode step; every drafted token the
target would itself have chosen is kept, and the first position where it would not gives the target's own token. So
a step yields between 1 and ``k + 1`` tokens, each exactly the token plain decoding yields:

- **greedy**: the target's argmax at each position, compared with the draft;
- **sampling**: the token at each position is drawn from the target's distribution with the request's next uniform
  draw (inverse CDF, the same draw plain decoding would use there), and the draft is accepted when they agree. For
  a deterministic draft this *is* rejection sampling (Leviathan et al. 2023, Chen et al. 2023): the draft ``d`` is
  accepted with probability ``p(d)`` and on rejection the token comes from ``p`` without ``d``; the output keeps
  the target distribution and, because every position consumes exactly one draw, a seeded request produces the
  same tokens with speculation on or off, whatever its batch-mates do.

Drafters (``[engine] speculative``):

- ``ngram``: prompt lookup (Saxena 2023; llama.cpp's ``ngram``, vLLM's ``ngram``): the longest recent n-gram of the
  context that occurred before proposes what followed it. No model, no memory; strong when answers copy spans of
  the prompt (extraction, summaries, code edits), useless otherwise, and then it switches itself off.
- ``draft``: a second, smaller model with the same tokenizer sealed in the bundle (the compression pipeline's
  student drafting for its teacher), run greedily on its own engine and slots.

A constrained row (``json_schema``, ``regex``, tools, ...) drafts neither way: it drafts the tokens its grammar
forces next (llguidance's fast-forward tokens: a JSON object's keys, punctuation, an enum's only continuation),
verified like any draft, so only those the model itself would pick under the mask are kept and its output is
unchanged ("jump-forward" decoding without its change of tokenization).

``Speculator`` keeps each request's draft length adaptive: it grows while drafts are accepted whole, stays after a
partial accept, shrinks by one when a draft's first token is rejected, and after two such failures in a row (one,
once the request's acceptance is below 0.4) drafting pauses for a number of steps that doubles with each further
failure.
The runner speculates only while at most ``max_rows`` rows decode: a verify runs one row at a time (ONNX Runtime's
attention takes several multi-token rows only without a past), so a larger batch is better served by one batched
decode step, where the weights are already read once for many tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from appliance.engine import Engine, EngineError
from appliance.errors import ApplianceError

MAX_PAUSE = 32  # steps drafting pauses at most after repeated failures
PAUSE_AFTER = 2  # consecutive drafts whose first token is rejected before drafting pauses
LOW_ACCEPTANCE, LOW_AFTER = 0.4, 8  # below this acceptance (after that many drafted tokens) one rejection pauses


class DraftError(ApplianceError):
    """Speculation configured in a way the installed model cannot serve."""


@dataclass
class DraftState:
    """One request's speculation: its adaptive draft length and the counts reported in its reply and metrics."""

    k: int  # tokens to draft next
    pause: int = 0  # steps left before drafting again
    failures: int = 0  # consecutive steps whose first drafted token was rejected
    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # verify steps this request ran
    grammar: int = 0  # of ``drafted``: tokens its output constraint forced (drafted by the grammar, not the drafter)
    grammar_accepted: int = 0
    ngrams: NgramIndex | None = None

    def record(self, drafted: int, accepted: int, k_max: int, grammar: bool = False) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.steps += 1
        if grammar:  # forced tokens: their count does not steer the drafter's length or pauses
            self.grammar += drafted
            self.grammar_accepted += accepted
            return
        if accepted == 0:
            # one miss is a line break or a changed digit in copied text; two in a row, text that does not repeat
            # (a request whose drafts mostly fail pauses at the first miss: a draft is then rarely worth a verify)
            self.failures += 1
            own, kept = self.own()
            after = 1 if own >= LOW_AFTER and kept < LOW_ACCEPTANCE * own else PAUSE_AFTER
            if self.failures >= after:
                self.pause = min(1 << (self.failures - after), MAX_PAUSE)
            self.k = max(1, self.k - 1)
        else:
            # a partial accept keeps the length: the next draft starts where this one went wrong, and shrinking
            # to what was accepted cost 21 % more steps on the extraction bench (bench/speculative.py)
            self.failures = 0
            if accepted == drafted:
                self.k = min(k_max, self.k + 1)

    def own(self) -> tuple[int, int]:
        """``(drafted, accepted)`` of the drafter's own tokens (grammar drafts excluded)."""
        return self.drafted - self.grammar, self.accepted - self.grammar_accepted

    def by_source(self, drafter: str) -> list[tuple[str, int, int]]:
        """``(source, drafted, accepted)`` for each source that drafted: the drafter, ``grammar``."""
        return [s for s in ((drafter, *self.own()), ("grammar", self.grammar, self.grammar_accepted)) if s[1]]

    def tick(self) -> bool:
        """Whether to draft at this step (a paused request counts down instead)."""
        if self.pause:
            self.pause -= 1
            return False
        return True


@dataclass
class NgramIndex:
    """Where each n-gram of a token sequence (``n_min..n_max``) last occurred with a continuation after it,
    updated as the sequence grows (O(n) per token)."""

    n_min: int
    n_max: int
    last: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> index of the token after it
    indexed: int = 0  # n-grams ending before this index are in ``last``

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the longest matching suffix."""
        for end in range(max(self.indexed, 1), len(tokens)):  # n-grams ending at end-1 whose continuation exists
            for n in range(self.n_min, min(self.n_max, end) + 1):
                self.last[tuple(tokens[end - n : end])] = end
        self.indexed = len(tokens)
        for n in range(min(self.n_max, len(tokens)), self.n_min - 1, -1):
            at = self.last.get(tuple(tokens[-n:]))
            if at is not None:
                return tokens[at : at + k]
        return []


class NgramDrafter:
    name = "ngram"

    def __init__(self, n_min: int = 2, n_max: int = 4):
        self.n_min, self.n_max = n_min, n_max

    def draft(self, rows: list[tuple[int, list[int], int, DraftState]]) -> list[list[int]]:
        out = []
        for _, context, k, state in rows:
            if state.ngrams is None:
                state.ngrams = NgramIndex(self.n_min, self.n_max)
            out.append(state.ngrams.propose(context, k))
        return out

    def forget(self, slot: int) -> None:
        pass


class ModelDrafter:
    """Greedy drafts from a smaller model on its own engine, one slot per target slot. The draft's cache follows
    each request's context: what it holds beyond the longest prefix it shares with the context is rewound, the
    rest fed, then ``k - 1`` decode steps, batched across rows."""

    name = "draft"

    def __init__(self, engine: Engine):
        self.engine = engine
        self.fed: list[list[int]] = [[] for _ in range(engine.num_slots)]  # tokens in each draft slot's cache

    def draft(self, rows: list[tuple[int, list[int], int, DraftState]]) -> list[list[int]]:
        engine = self.engine
        feeds = []
        for slot, context, _, _ in rows:
            fed = self.fed[slot]
            keep = _common_prefix(fed, context, len(context) - 1)  # at least the last token is fed again
            if keep == 0:
                engine.release(slot)
            elif keep < len(fed):
                engine.rewind(slot, keep)
            del fed[keep:]
            if len(context) > engine.max_seq_len:
                raise EngineError(f"draft context of {len(context)} tokens exceeds its max_seq_len")
            feeds.append((slot, context[keep:]))
            fed.extend(context[keep:])
        logits = engine.prefill(feeds)
        drafts = [[int(np.argmax(row))] for row in logits]
        limits = [min(k, engine.max_seq_len - len(self.fed[slot])) for slot, _, k, _ in rows]
        while True:
            live = [i for i, d in enumerate(drafts) if len(d) < limits[i]]
            if not live:
                return drafts
            batch = [(rows[i][0], drafts[i][-1]) for i in live]
            for slot, token in batch:
                self.fed[slot].append(token)
            logits = engine.decode(batch)
            for i, row in zip(live, logits, strict=True):
                drafts[i].append(int(np.argmax(row)))

    def forget(self, slot: int) -> None:
        self.engine.release(slot)
        self.fed[slot].clear()


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n and a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(frozen=True)
class SpeculationConfig:
    mode: str = "auto"  # off | ngram | draft | auto (draft when the bundle has one, else ngram)
    draft_tokens: int = 4  # most tokens drafted per step
    max_rows: int = 1  # speculate only while at most this many rows decode
    ngram_min: int = 2
    ngram_max: int = 4


class Speculator:
    """The runner's speculation policy: which rows draft this step, how many tokens, and the bookkeeping."""

    def __init__(self, drafter: NgramDrafter | ModelDrafter, config: SpeculationConfig):
        self.drafter = drafter
        self.config = config
        self.states: dict[str, DraftState] = {}

    @property
    def name(self) -> str:
        return self.drafter.name

    def state(self, key: str) -> DraftState:
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = DraftState(k=self.config.draft_tokens)
        return st

    def plan(self, rows: list[tuple[str, int, list[int], int]]) -> list[list[int]]:
        """Drafts for ``(key, slot, context, room)`` rows (``room``: tokens the request may still take); an empty
        draft means the row decodes normally. The engine core asks only while at most ``max_rows`` rows decode."""
        asks, where = [], []
        for i, (key, slot, context, room) in enumerate(rows):
            st = self.state(key)
            k = min(st.k, room - 1)
            if k >= 1 and st.tick():
                asks.append((slot, context, k, st))
                where.append(i)
        out: list[list[int]] = [[] for _ in rows]
        if asks:
            for i, d in zip(where, self.drafter.draft(asks), strict=True):
                out[i] = d
        return out

    def record(self, key: str, drafted: int, accepted: int, grammar: bool = False) -> None:
        self.state(key).record(drafted, accepted, self.config.draft_tokens, grammar)

    def end(self, key: str, slot: int | None) -> DraftState | None:
        """A request left: its counts, and its draft slot forgotten."""
        if slot is not None:
            self.drafter.forget(slot)
        return self.states.pop(key, None)


def build_speculator(config: SpeculationConfig, draft_engine: Engine | None) -> Speculator | None:
    """The speculator ``[engine] speculative`` asks for; None when off."""
    mode = config.mode
    if mode == "auto":
        mode = "draft" if draft_engine is not None else "ngram"
    if mode == "off":
        return None
    if mode == "draft":
        if draft_engine is None:
            raise DraftError('[engine] speculative = "draft" but the installed bundle carries no draft model')
        return Speculator(ModelDrafter(draft_engine), config)
    return Speculator(NgramDrafter(config.ngram_min, config.ngram_max), config)
