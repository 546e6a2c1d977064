"""The engine thread: runs scheduler plans on the engine, samples, detokenizes, audits, and hands
encoded replies back to the ZeroMQ loop (which never waits on the engine)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from appliance.audit import Entry
from appliance.audit.writer import AuditWriter
from appliance.loader import LoadedModel
from appliance.metrics import METRICS
from appliance.serving.chat import THINK_OPEN, ReasoningSplitter, split_reasoning
from appliance.serving.constraints import Guide
from appliance.serving.detokenize import Detokenizer
from appliance.serving.response_cache import CachedResponse, ResponseCache
from appliance.serving.sampling import sample
from appliance.serving.scheduler import Finish, Scheduler, Sequence
from appliance.serving.sessions import Session, SessionStore
from appliance.serving.speculative import DraftState, Speculator
from appliance.serving.tools import parse_calls
from appliance.transport import protocol as P

log = logging.getLogger("appliance.runner")

_FINISH_ERRORS = {Finish.DEADLINE: P.E_DEADLINE, Finish.CANCELLED: P.E_CANCELLED, Finish.ERROR: P.E_INTERNAL}
_COMPLETED = (Finish.EOS, Finish.LENGTH, Finish.STOP, Finish.CONTEXT, Finish.GRAMMAR)


@dataclass(eq=False)
class Job:
    """A generate request in flight: the scheduler's sequence plus what the reply needs."""

    seq: Sequence
    request: P.Request
    client: str  # the identity that sent it (audit subject, scope of its state)
    role: str
    detok: Detokenizer
    index: int = field(default=0)  # token replies sent so far
    restore: Session | None = None  # the session state this turn continues (its cache is loaded at admission)
    history: list[int] = field(default_factory=list)  # conversation tokens already in the restored cache
    cache_key: str | None = None  # response-cache key when the request is deterministic
    cache_hit: bool = False
    error: tuple[str, str] | None = None  # (code, message) when this request alone failed
    prompt_text: str = ""  # what this turn added as text (the rendered chat for ``messages``), for the audit
    chat: list[dict] | None = None  # the conversation including this turn's messages (chat requests)
    opens_reasoning: bool = False  # the prompt ended with <think>: the output starts inside reasoning
    splitter: ReasoningSplitter | None = None  # streams reasoning apart from the answer (not ``inline``)
    guide: Guide | None = None  # the output constraint (and reasoning budget), applied to this row's logits
    tool_form: str | None = None  # the template's tool-call family when the reply may call tools (parsed whole)
    drafts: DraftState | None = None  # its speculative decoding counts, once it ended


@dataclass(frozen=True)
class Outgoing:
    key: str
    frame: bytes
    final: bool


class EngineRunner(threading.Thread):
    def __init__(
        self,
        model: LoadedModel,
        scheduler: Scheduler,
        writer: AuditWriter,
        wake: Callable[[], None],
        sessions: SessionStore | None = None,
        responses: ResponseCache | None = None,
        speculator: Speculator | None = None,
    ):
        super().__init__(name="engine", daemon=True)
        self.model = model
        self.sessions = sessions
        self.responses = responses
        self.speculator = speculator
        self.scheduler = scheduler
        self.writer = writer
        self._unpublished = 0
        self.outbox: queue.SimpleQueue[Outgoing] = queue.SimpleQueue()
        self._wake = wake
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        self._stopping = False
        self._masker = ThreadPoolExecutor(1, thread_name_prefix="constraint-masks")
        self.tokens_generated = 0
        self.request_failures = 0  # requests ended by a fault in their own sampling/detokenization
        # R1-style reasoning is split only for models that can produce it (a <think> token or template);
        # for the rest the splitter would hold back leading whitespace for nothing.
        chat = model.chat
        self.reasons = model.tokenizer.token_to_id(THINK_OPEN) is not None or (
            chat is not None and THINK_OPEN in chat.source
        )

    # -- called from the server thread ---------------------------------------------------------
    def submit(self, job: Job) -> bool:
        """Queue a job; False when the waiting queue is full."""
        hit = self.responses.get(job.cache_key) if self.responses is not None and job.cache_key else None
        if job.request.reasoning != "inline" and self.reasons:
            job.splitter = ReasoningSplitter(job.opens_reasoning)
        with self._work:
            if hit is not None:  # answered from memory: finished at once, audited like any other request
                job.seq.output_ids, job.detok.text, job.cache_hit = list(hit.output_ids), hit.text, True
                job.seq.first_token_at = job.seq.started_at = job.seq.arrival
                self.scheduler.finish_now(job.seq, Finish(hit.finish))
            elif not self.scheduler.add(job.seq):
                return False
            self._jobs[job.seq.key] = job
            self._work.notify()
            return True

    def cancel(self, key: str) -> bool:
        with self._work:
            found = self.scheduler.cancel(key) is not None
            self._work.notify()
            return found

    def load(self) -> dict[str, int]:
        with self._lock:
            return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running)}

    def idle(self) -> bool:
        """No request waiting, running or awaiting its final reply."""
        with self._lock:
            return not self._jobs and not self._unpublished and self.scheduler.idle and self.outbox.empty()

    def stop(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify()

    # -- engine thread -------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            with self._work:
                while self.scheduler.idle and not self._stopping:
                    self._work.wait(timeout=1.0)
                if self._stopping:
                    self._masker.shutdown(wait=False)  # its thread ends with this runner's (a reload makes another)
                    return
                plan = self.scheduler.schedule()
            try:
                self._step(plan)
            except Exception as exc:  # an engine fault must not kill the daemon: fail the requests in the step
                log.exception("engine step failed")
                with self._work:
                    for seq in plan.prefill + plan.decode:
                        self.scheduler.cancel(seq.key)
                    failed = self.scheduler.take_finished()
                self._retire(failed, (P.E_INTERNAL, f"engine step failed: {exc}"))
            if self.outbox.qsize():
                self._wake()

    def _step(self, plan) -> None:
        self._retire(plan.finished)
        engine = self.model.engine
        if plan.prefill:
            for seq in plan.prefill:
                if seq.chunk[0] == 0:
                    self._begin(seq)
            logits = engine.prefill([(s.slot, s.feed_ids[s.chunk[0] : s.chunk[1]]) for s in plan.prefill])
            done = [row for row, s in enumerate(plan.prefill) if s.prefill_done]  # the rest wait for more chunks
            if done:
                self._advance([plan.prefill[row] for row in done], logits[done])
        if plan.decode:
            drafts = self._drafts(plan.decode)
            plain = [s for s, d in zip(plan.decode, drafts, strict=True) if not d]
            if plain:
                self._decode(plain)
            checked = [(s, d) for s, d in zip(plan.decode, drafts, strict=True) if d]
            if checked:
                self._verify(checked)
        with self._lock:
            finished = self.scheduler.take_finished()
        self._retire(finished)

    def _decode(self, seqs: list[Sequence]) -> None:
        # Several constrained rows: their masks are computed on the helper thread while the engine runs the
        # step. One is computed inline after it (tens of µs; a thread hand-off and a third busy thread on a
        # small device cost the step more than that).
        guides = [g for s in seqs if (g := self._jobs[s.key].guide) is not None and g.constrains_next]
        ahead = self._masker.submit(_prepare, guides) if len(guides) > 1 else None
        try:
            logits = self.model.engine.decode([(s.slot, s.output_ids[-1]) for s in seqs])
        finally:
            if ahead is not None:
                ahead.result()  # joined even when the step failed: no guide is ever used by two threads
        self._advance(seqs, logits)

    def _drafts(self, seqs: list[Sequence]) -> list[list[int]]:
        """Each decoding row's drafted tokens (empty: it decodes normally). Constrained rows and requests that
        opted out never draft; a draft never runs past the request's max_tokens or the context."""
        if self.speculator is None:
            return [[] for _ in seqs]
        rows, where = [], []
        for i, seq in enumerate(seqs):
            job = self._jobs[seq.key]
            if job.guide is None and job.request.speculative and seq.finish is None:
                room = min(seq.max_tokens - len(seq.output_ids), self.scheduler.max_seq_len - seq.context_len)
                rows.append((seq.key, seq.slot, job.history + seq.feed_ids + seq.output_ids, room))
                where.append(i)
        out: list[list[int]] = [[] for _ in seqs]
        if rows and len(seqs) <= self.speculator.config.max_rows:
            for i, draft in zip(where, self.speculator.plan(rows), strict=True):
                out[i] = draft
        return out

    def _verify(self, rows: list[tuple[Sequence, list[int]]]) -> None:
        """Run each row's last token and its draft through the target at once; keep the drafted tokens the target
        picks itself, then its own token at the first disagreement, and rewind the cache to what was kept."""
        engine = self.model.engine
        base = [engine.length(seq.slot) for seq, _ in rows]
        logits = engine.verify([(seq.slot, [seq.output_ids[-1], *draft]) for seq, draft in rows])
        now = time.monotonic()
        for (seq, draft), at, row in zip(rows, base, logits, strict=True):
            used, accepted = 1, 0
            try:
                for i in range(len(draft) + 1):
                    if seq.finish is not None:  # ended (or cancelled) at the previous token: the rest is dropped
                        break
                    used = i + 1
                    token = self._choose(seq, row[i])
                    self._emit(seq, token, now)
                    if i == len(draft) or token != draft[i]:
                        break
                    accepted += 1
            except Exception as exc:  # this request's fault ends this request only, never its batch-mates
                self._failed(seq, exc)
            self.speculator.record(seq.key, len(draft), accepted)
            engine.rewind(seq.slot, at + used)

    def _begin(self, seq: Sequence) -> None:
        """First chunk of a request: restore its conversation's cache into the slot."""
        job = self._jobs[seq.key]
        if job.restore is not None:
            self.model.engine.load(seq.slot, job.restore.cache)

    def _retire(self, seqs: list[Sequence], error: tuple[str, str] | None = None) -> None:
        """Sequences that ended: keep their conversation, remember deterministic answers, free the
        engine slot (before it can be handed out again), then audit and reply."""
        if not seqs:
            return
        engine = self.model.engine
        live, seen = [], set()
        for seq in seqs:
            job = self._jobs.get(seq.key)
            if job is None or seq.key in seen:  # ended twice (e.g. cancelled as it finished, even in one batch)
                log.warning("request %s retired twice; ignoring the second", seq.key)
                continue
            seen.add(seq.key)
            live.append(seq)
            if self.speculator is not None:
                job.drafts = self.speculator.end(seq.key, seq.slot if not job.cache_hit else None)
                if job.drafts is not None and job.drafts.drafted:
                    METRICS.speculated(self.speculator.name, job.drafts.drafted, job.drafts.accepted)
            completed = error is None and seq.finish in _COMPLETED and seq.prefill_done
            if seq.session is not None and self.sessions is not None:
                self.sessions.release(seq.session, self._saved_session(seq, job) if completed else job.restore)
            if completed and job.cache_key and not job.cache_hit and self.responses is not None:
                self.responses.put(
                    job.cache_key,
                    CachedResponse(job.detok.text, tuple(seq.output_ids), seq.finish.value, len(seq.prompt_ids)),
                )
            if job.cache_hit and job.request.stream and job.detok.text and job.tool_form is None:
                self._stream(job, job.detok.text, seq.output_ids[-1], final=True)
            if seq.slot is not None and not job.cache_hit:
                engine.release(seq.slot)
        self._finalize([(seq, error) for seq in live])

    def _saved_session(self, seq: Sequence, job: Job) -> Session | None:
        engine = self.model.engine
        if engine.length(seq.slot) == 0:
            return job.restore
        cache = engine.save(seq.slot)
        return Session(
            tokens=job.history + seq.feed_ids + seq.output_ids,
            cache=cache,
            cached=engine.length(seq.slot),
            nbytes=sum(int(t.nbytes) for t in cache),
            model_version=str(self.model.version),
            messages=None if job.chat is None else [*job.chat, {"role": "assistant", "content": job.detok.text}],
        )

    def _advance(self, seqs: list[Sequence], logits) -> None:
        now = time.monotonic()
        for row, seq in enumerate(seqs):
            if seq.finish is not None:  # cancelled while the step ran
                continue
            try:
                self._emit(seq, self._choose(seq, logits[row]), now)
            except Exception as exc:  # this request's fault ends this request only, never its batch-mates
                self._failed(seq, exc)

    def _failed(self, seq: Sequence, exc: Exception) -> None:
        log.error("request %s failed while sampling or detokenizing", seq.key, exc_info=exc)
        self.request_failures += 1
        self._jobs[seq.key].error = (P.E_INTERNAL, f"generation failed: {type(exc).__name__}")
        with self._lock:
            self.scheduler.fail(seq)

    def _choose(self, seq: Sequence, logits) -> int:
        """The request's next token from its logits (its constraint's mask applied)."""
        # Only the repetition penalty needs the history; skip the per-token copy when it is off.
        seen = seq.prompt_ids + seq.output_ids if seq.sampling.repetition_penalty != 1.0 else []
        guide = self._jobs[seq.key].guide
        if guide is not None:
            logits = guide.mask(logits)
        return sample(logits, seq.sampling, seen, seq.rng)

    def _emit(self, seq: Sequence, token: int, now: float) -> None:
        """Record a chosen token: end conditions, the constraint, detokenization, the streamed frame."""
        job = self._jobs[seq.key]
        guide = job.guide
        with self._lock:
            if seq.finish is not None:  # cancelled by the serving loop since the step began
                return
            ended = self.scheduler.on_token(seq, token, now)
            if guide is not None and not ended and guide.advance(token):
                self.scheduler.complete(seq)
        self.tokens_generated += 1
        fresh = job.detok.step(seq.output_ids, seq.finish is not None)
        if job.detok.stopped:
            with self._lock:
                self.scheduler.stop(seq)
        if (fresh or seq.finish is not None) and job.request.stream and job.tool_form is None:
            self._stream(job, fresh, seq.output_ids[-1] if seq.output_ids else -1, seq.finish is not None)

    def _stream(self, job: Job, delta: str, token_id: int, final: bool) -> None:
        """Queue a token frame for ``delta``, its reasoning split off (or dropped, for ``hide``)."""
        reasoning = None
        if job.splitter is not None:
            reasoning, delta = job.splitter.feed(delta)
            if final:
                held_reasoning, held_answer = job.splitter.flush()
                reasoning, delta = reasoning + held_reasoning, delta + held_answer
            if job.request.reasoning == "hide":
                reasoning = None
        if not delta and not reasoning:
            return
        frame = P.token_reply(job.request.id, job.index, delta, token_id, reasoning or None)
        self.outbox.put(Outgoing(job.seq.key, frame, False))
        job.index += 1

    def _finalize(self, items: list[tuple[Sequence, tuple[str, str] | None]]) -> None:
        """Audit every sequence that ended this step in one commit, then queue their final replies."""
        if not items:
            return
        replies, entries = [], []
        for seq, error in items:
            entry, frame = self._final(seq, error)
            self._jobs.pop(seq.key)
            withheld = P.error_reply(
                entry.request_id, P.E_AUDIT, "the audit record could not be written; the result is withheld"
            )
            replies.append((seq.key, frame, withheld))
            entries.append(entry)

        def publish(audited: bool) -> None:
            for entry in entries:  # before the replies: a scrape after them must see these
                if audited:
                    METRICS.generated(entry)
                else:
                    METRICS.request(entry.op, "error", P.E_AUDIT)
            for key, frame, withheld in replies:
                self.outbox.put(Outgoing(key, frame if audited else withheld, True))
            with self._lock:
                self._unpublished -= len(replies)
            self._wake()

        with self._lock:
            self._unpublished += len(replies)
        self.writer.submit(entries, publish)  # the engine goes on; the reply leaves once the row is durable

    def _final(self, seq: Sequence, error: tuple[str, str] | None) -> tuple[Entry, bytes]:
        """The audit entry and the final reply of a sequence that ended."""
        job = self._jobs[seq.key]
        if error is None and job.error is not None:
            error = job.error
        if error is None and seq.finish in _FINISH_ERRORS:
            error = (_FINISH_ERRORS[seq.finish], f"request {seq.finish.value}")
        end = seq.finished_at or time.monotonic()
        queued = (seq.started_at or end) - seq.arrival
        ttft = (seq.first_token_at - seq.arrival) if seq.first_token_at else None
        n_out = len(seq.output_ids)
        prompt_tokens = seq.base_len + len(seq.feed_ids)  # the whole context, a restored conversation included
        entry = Entry(
            request_id=job.request.id,
            op=P.OP_GENERATE,
            client=job.client,
            role=job.role,
            status="ok" if error is None else "error",
            model_id=self.model.model_id,
            model_version=self.model.version,
            prompt=job.prompt_text,
            output=job.detok.text,
            prompt_tokens=prompt_tokens,
            completion_tokens=n_out,
            queue_ms=queued,
            ttft_ms=ttft,
            total_ms=end - seq.arrival,
            error_code=error[0] if error else None,
            finish_reason=seq.finish.value if seq.finish else None,
            cache_hit=job.cache_hit,
            constraint_kind=job.request.constraint.kind if job.request.constraint else None,
            constraint_sha256=job.request.constraint.digest if job.request.constraint else None,
            speculative=self.speculator.name if job.drafts is not None and job.drafts.drafted else None,
        )
        if error is not None:
            return entry, P.error_reply(job.request.id, error[0], error[1])
        timings = {
            "queue_ms": _ms(queued),
            # a cache hit's whole answer is its first token: ttft is the time to answer it (docs/PROTOCOL.md)
            "ttft_ms": _ms(end - seq.arrival) if job.cache_hit else _ms(ttft) if ttft is not None else None,
            "total_ms": _ms(end - seq.arrival),
        }
        if seq.first_token_at and n_out > 1 and not job.cache_hit:
            timings["tokens_per_s"] = round((n_out - 1) / max(end - seq.first_token_at, 1e-9), 2)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_out, "cached_tokens": seq.base_len}
        reasoning, answer = None, job.detok.text
        if job.splitter is not None:
            reasoning, answer = split_reasoning(job.detok.text, job.opens_reasoning)
        if job.request.reasoning == "hide":
            reasoning = None
        extra: dict = {"cache_hit": job.cache_hit}
        if entry.speculative is not None:
            d = job.drafts
            extra["speculative"] = {"drafter": entry.speculative, "drafted": d.drafted, "accepted": d.accepted}
        finish = seq.finish.value
        if job.tool_form is not None:  # the reply may call tools: it was held back to be parsed whole
            answer, calls = parse_calls(answer, job.request.tools, job.tool_form)
            if calls:
                extra["tool_calls"], finish = calls, "tool_calls"
        frame = P.done_reply(job.request.id, answer, finish, usage, timings, reasoning, **extra)
        return entry, frame


def _prepare(guides: list[Guide]) -> None:
    for guide in guides:
        guide.prepare()


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
