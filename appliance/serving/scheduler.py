"""Iteration-level scheduler: decides which sequences prefill and decode at each step.

Pure Python, no tensors: it emits a plain ``StepPlan`` — immutable rows of ``(key, slot, tokens, start, end)``, a
snapshot the engine core runs without reading the live sequences — then is told each new token (``on_token``).
Requests join between steps when a slot is free and leave as soon as they finish, so no request waits for another
to complete.

Prefill is chunked: each step feeds at most ``prefill_chunk`` prompt tokens in total (oldest
request first), so a long prompt is spread over several steps and the running decodes advance at
every one of them instead of stalling behind it.
"""

from __future__ import annotations

import enum
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from appliance.transport.protocol import Sampling


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Finish(str, enum.Enum):
    EOS = "eos"
    LENGTH = "length"  # max_tokens reached
    CONTEXT = "context"  # max_seq_len reached
    STOP = "stop"  # a stop sequence appeared
    GRAMMAR = "grammar"  # the output constraint is complete: nothing else may follow
    DEADLINE = "deadline"
    CANCELLED = "cancelled"
    ERROR = "error"  # this request's own sampling or detokenization failed


@dataclass(eq=False)
class Sequence:
    """One generate request as the scheduler tracks it."""

    key: str  # unique inside the daemon
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    deadline: float | None = None  # monotonic seconds
    ignore_eos: bool = False
    arrival: float = field(default_factory=time.monotonic)
    state: State = State.WAITING
    slot: int | None = None
    output_ids: list[int] = field(default_factory=list)
    finish: Finish | None = None
    first_token_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    rng: np.random.Generator | None = None
    session: str | None = None  # conversation whose cache this request continues
    feed_ids: list[int] = field(default_factory=list)  # tokens to prefill (default: the prompt)
    base_len: int = 0  # tokens already in the slot's cache before the first chunk (a restored session)
    prefilled: int = 0  # tokens of ``feed_ids`` planned so far
    owner: str = ""  # the client identity, for fair admission across clients

    def __post_init__(self) -> None:
        if self.sampling.seed is not None:
            self.rng = np.random.default_rng(self.sampling.seed)
        if not self.feed_ids:
            self.feed_ids = list(self.prompt_ids)

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= len(self.feed_ids)

    @property
    def context_len(self) -> int:
        return self.base_len + len(self.feed_ids) + len(self.output_ids)


@dataclass(frozen=True)
class Row:
    """One slot's work in a step: append ``tokens`` at context positions ``start .. end``. A prefill row is a chunk
    of what the request feeds (``first``: its first chunk, when a restored conversation's cache is loaded;
    ``last``: the prompt is complete, so its logits give the first token); a decode row is the last token."""

    key: str
    slot: int
    tokens: tuple[int, ...]
    start: int
    end: int
    first: bool = False
    last: bool = True


@dataclass
class StepPlan:
    prefill: list[Row] = field(default_factory=list)
    decode: list[Row] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # ended without running (deadline, cancel)

    @property
    def keys(self) -> list[str]:
        return [row.key for row in self.prefill + self.decode]


class Scheduler:
    def __init__(
        self,
        num_slots: int,
        max_queued: int,
        max_seq_len: int,
        eos_token_ids: tuple[int, ...],
        prefill_chunk: int = 256,
    ):
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.prefill_chunk = prefill_chunk
        self.max_queued = max_queued
        self.max_seq_len = max_seq_len
        self.eos_token_ids = frozenset(eos_token_ids)  # any of them ends a sequence
        self.free_slots = list(range(num_slots))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._pending_finish: list[Sequence] = []

    def add(self, seq: Sequence) -> bool:
        """Queue a request; False when the waiting queue is full (the caller answers ``busy``). Requests that free
        slots will take at the next ``schedule`` do not count as waiting: a burst that arrives in one loop turn
        fills the idle slots first, and only what exceeds them is held against ``max_queued``."""
        if len(self.waiting) >= self.max_queued + len(self.free_slots):
            return False
        self.waiting.append(seq)
        return True

    def cancel(self, key: str) -> Sequence | None:
        """Mark a waiting or running sequence cancelled; it leaves at the next ``schedule``."""
        for seq in [*self.waiting, *self.running]:
            if seq.key == key and seq.state is not State.FINISHED:
                self._finish(seq, Finish.CANCELLED)
                return seq
        return None

    def _finish(self, seq: Sequence, reason: Finish) -> None:
        # Idempotent: a cancel from the serving loop can race the engine thread's own finish (EOS,
        # length, stop); finishing twice would free the slot twice and answer the request twice.
        if seq.state is State.FINISHED:
            return
        seq.state, seq.finish, seq.finished_at = State.FINISHED, reason, time.monotonic()
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            self.free_slots.sort()
        self._pending_finish.append(seq)

    def schedule(self, now: float | None = None) -> StepPlan:
        """Expire deadlines, admit waiting requests into free slots (fairly across clients), list running
        ones to decode."""
        now = time.monotonic() if now is None else now
        for seq in [*self.waiting, *self.running]:
            if seq.deadline is not None and now >= seq.deadline:
                self._finish(seq, Finish.DEADLINE)
        plan = StepPlan(decode=[_decode_row(s) for s in self.running if s.output_ids])
        budget = self.prefill_chunk
        for seq in self.running:  # prompts part-way through prefill go first, oldest first
            if budget and not seq.prefill_done:
                budget -= self._plan_chunk(seq, budget, plan)
        while self.waiting and self.free_slots and budget:
            seq = self._next_waiting()
            seq.slot, seq.state, seq.started_at = self.free_slots.pop(0), State.RUNNING, now
            self.running.append(seq)
            budget -= self._plan_chunk(seq, budget, plan)
        plan.finished, self._pending_finish = self._pending_finish, []
        return plan

    def _next_waiting(self) -> Sequence:
        """The oldest waiting request of the client with the fewest running ones, so one client's
        burst cannot hold every slot while others wait."""
        running = Counter(s.owner for s in self.running)
        seq = min(self.waiting, key=lambda s: running[s.owner])  # min keeps the first (oldest) of ties
        self.waiting.remove(seq)
        return seq

    @staticmethod
    def _plan_chunk(seq: Sequence, budget: int, plan: StepPlan) -> int:
        start = seq.prefilled
        end = min(len(seq.feed_ids), start + budget)
        seq.prefilled = end
        tokens = tuple(seq.feed_ids[start:end])
        at = seq.base_len + start
        plan.prefill.append(Row(seq.key, seq.slot, tokens, at, at + len(tokens), start == 0, end == len(seq.feed_ids)))
        return end - start

    def on_token(self, seq: Sequence, token: int, now: float | None = None) -> bool:
        """Record a sampled token; returns True when the sequence has just finished."""
        now = time.monotonic() if now is None else now
        if seq.state is State.FINISHED:  # cancelled while its step ran: the token is discarded
            return True
        if seq.first_token_at is None:
            seq.first_token_at = now
        if token in self.eos_token_ids and not seq.ignore_eos:
            self._finish(seq, Finish.EOS)
            return True
        seq.output_ids.append(token)
        if len(seq.output_ids) >= seq.max_tokens:
            self._finish(seq, Finish.LENGTH)
        elif seq.context_len >= self.max_seq_len:
            self._finish(seq, Finish.CONTEXT)
        return seq.state is State.FINISHED

    def finish_now(self, seq: Sequence, reason: Finish) -> None:
        """End a request that never needs the engine (a response-cache hit); it leaves at ``schedule``."""
        self._finish(seq, reason)

    def stop_string(self, seq: Sequence) -> None:
        """End a running sequence because its text hit a stop sequence."""
        if seq.state is not State.FINISHED:
            self._finish(seq, Finish.STOP)

    def complete(self, seq: Sequence) -> None:
        """End a running sequence whose output constraint is complete (nothing else may follow)."""
        if seq.state is not State.FINISHED:
            self._finish(seq, Finish.GRAMMAR)

    def fail(self, seq: Sequence) -> None:
        """End a sequence whose own processing raised; its batch-mates carry on."""
        if seq.state is not State.FINISHED:
            self._finish(seq, Finish.ERROR)

    def take_finished(self) -> list[Sequence]:
        done, self._pending_finish = self._pending_finish, []
        return done

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self._pending_finish)


def _decode_row(seq: Sequence) -> Row:
    """The decode row of a running request: its last token, at the end of its context."""
    end = seq.context_len
    return Row(seq.key, seq.slot, (seq.output_ids[-1],), end - 1, end)
