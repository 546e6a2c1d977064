"""The engine core: runs one scheduler plan on the engine and owns the engine-side state of a step.

Prefill chunks (a request's first chunk restores its conversation's cache into its slot), batched decode (with
the constraint-masks helper thread that prepares several guides' masks while the engine runs), and speculative
decoding: the drafter proposes tokens (a constrained row: the tokens its grammar forces next), the engine verifies
them in one pass and the cache is rewound to what the request kept. Every row of logits goes to the output processor
(``Output``: ``serving/output.py``, wired by ``runner.EngineRunner``); this module never imports it.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from appliance.loader import LoadedModel
from appliance.serving.constraints import Guide
from appliance.serving.scheduler import Row, Scheduler, Sequence, StepPlan
from appliance.serving.speculative import Speculator

FORCED_MAX = 16  # most grammar-forced tokens verified in one step

if TYPE_CHECKING:
    from appliance.serving.output import Job


class Output(Protocol):
    """Where the engine core hands its logits (``output.OutputProcessor``)."""

    jobs: dict[str, Job]

    def tokens(self, seqs: list[Sequence], logits) -> None:
        """One token per row of ``logits``."""

    def verified(self, seq: Sequence, draft: list[int], logits, now: float) -> tuple[int, int]:
        """A verify row's tokens; returns (positions used, drafted tokens accepted)."""


class EngineCore:
    def __init__(self, model: LoadedModel, scheduler: Scheduler, output: Output, speculator: Speculator | None = None):
        self.model = model
        self.scheduler = scheduler
        self.output = output
        self.speculator = speculator
        self._masker = ThreadPoolExecutor(1, thread_name_prefix="constraint-masks")

    def close(self) -> None:
        self._masker.shutdown(wait=False)  # its thread ends with this core's runner (a reload makes another)

    def step(self, plan: StepPlan) -> None:
        """Run the plan's prefill chunks and decode rows (the plan's finished requests are the runner's)."""
        engine = self.model.engine
        jobs = self.output.jobs
        if plan.prefill:
            for row in plan.prefill:
                if row.first:
                    self._begin(row)
            logits = engine.prefill([(row.slot, list(row.tokens)) for row in plan.prefill])
            done = [i for i, row in enumerate(plan.prefill) if row.last]  # the rest wait for more chunks
            if done:
                self.output.tokens([jobs[plan.prefill[i].key].seq for i in done], logits[done])
        if plan.decode:
            seqs = [jobs[row.key].seq for row in plan.decode]
            drafts = self._drafts(seqs)
            plain = [(s, r) for s, r, d in zip(seqs, plan.decode, drafts, strict=True) if not d]
            if plain:
                self._decode(plain)
            checked = [(s, r, d) for s, r, d in zip(seqs, plan.decode, drafts, strict=True) if d]
            if checked:
                self._verify(checked)

    def _begin(self, row: Row) -> None:
        """First chunk of a request: restore its conversation's cache into the slot."""
        job = self.output.jobs[row.key]
        if job.restore is not None:
            self.model.engine.load(row.slot, job.restore.cache)

    def _decode(self, rows: list[tuple[Sequence, Row]]) -> None:
        # Several constrained rows: their masks are computed on the helper thread while the engine runs the
        # step. One is computed inline after it (tens of µs; a thread hand-off and a third busy thread on a
        # small device cost the step more than that).
        jobs = self.output.jobs
        guides = [g for s, _ in rows if (g := jobs[s.key].guide) is not None and g.constrains_next]
        ahead = self._masker.submit(_prepare, guides) if len(guides) > 1 else None
        try:
            logits = self.model.engine.decode([(row.slot, row.tokens[0]) for _, row in rows])
        finally:
            if ahead is not None:
                ahead.result()  # joined even when the step failed: no guide is ever used by two threads
        self.output.tokens([s for s, _ in rows], logits)

    def _drafts(self, seqs: list[Sequence]) -> list[list[int]]:
        """Each decoding row's drafted tokens (empty: it decodes normally): a constrained row drafts the tokens its
        grammar forces next, the others ask the speculator; requests that opted out never draft, and a draft never
        runs past the request's max_tokens or the context."""
        if self.speculator is None or len(seqs) > self.speculator.config.max_rows:
            return [[] for _ in seqs]  # a batch this large is served better by one batched decode step
        out: list[list[int]] = [[] for _ in seqs]
        rows, where = [], []
        for i, seq in enumerate(seqs):
            job = self.output.jobs[seq.key]
            if not job.request.speculative or seq.finish is not None:
                continue
            room = min(seq.max_tokens - len(seq.output_ids), self.scheduler.max_seq_len - seq.context_len)
            if job.guide is not None:
                out[i] = job.guide.forced(min(FORCED_MAX, room - 1))
            else:
                rows.append((seq.key, seq.slot, job.history + seq.feed_ids + seq.output_ids, room))
                where.append(i)
        if rows:
            for i, draft in zip(where, self.speculator.plan(rows), strict=True):
                out[i] = draft
        return out

    def _verify(self, rows: list[tuple[Sequence, Row, list[int]]]) -> None:
        """Run each row's last token and its draft through the target at once; the output processor keeps the
        drafted tokens the target picks itself, then its own token at the first disagreement, and the cache is
        rewound to what was kept."""
        engine = self.model.engine
        base = [engine.length(row.slot) for _, row, _ in rows]
        logits = engine.verify([(row.slot, [*row.tokens, *draft]) for _, row, draft in rows])
        now = time.monotonic()
        for (seq, row, draft), at, out in zip(rows, base, logits, strict=True):
            grammar = self.output.jobs[seq.key].guide is not None  # a constrained row drafts its forced tokens
            used, accepted = self.output.verified(seq, draft, out, now)
            self.speculator.record(seq.key, len(draft), accepted, grammar)
            engine.rewind(row.slot, at + used)


def _prepare(guides: list[Guide]) -> None:
    for guide in guides:
        guide.prepare()
