"""The output processor: what happens to a row of logits once the engine has produced it.

It chooses the token (constraint mask, repetition penalty, sampling), records it (the scheduler's end
conditions, the constraint, detokenization, stop strings, the streamed frame with reasoning split off) and
ends requests: the conversation kept in the session store, a deterministic answer kept in the response cache,
the engine slot freed, one audit commit for the step, then the final replies queued in the outbox the ZeroMQ
loop reads. It runs on the engine thread (``runner.EngineRunner``), which hands it the engine core's logits.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
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
from appliance.serving.tools import ToolStream, parse_calls
from appliance.transport import protocol as P

log = logging.getLogger("appliance.runner")  # one logger for the engine thread, whichever module logs

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
    tool_form: str | None = None  # the template's tool-call family when the reply may call tools
    tools: ToolStream | None = None  # a streamed reply that may call tools: its calls parsed as they are written
    drafts: DraftState | None = None  # its speculative decoding counts, once it ended


@dataclass(frozen=True)
class Outgoing:
    key: str
    frame: bytes
    final: bool


class OutputProcessor:
    """Tokens, text, endings and replies of the jobs in flight. ``lock`` is the engine runner's: it guards the
    scheduler (which the serving loop also touches) and the count of replies awaiting their audit commit."""

    def __init__(
        self,
        model: LoadedModel,
        scheduler: Scheduler,
        writer: AuditWriter,
        wake: Callable[[], None],
        lock: threading.Lock,
        sessions: SessionStore | None = None,
        responses: ResponseCache | None = None,
        speculator: Speculator | None = None,
    ):
        self.model = model
        self.scheduler = scheduler
        self.writer = writer
        self.sessions = sessions
        self.responses = responses
        self.speculator = speculator
        self.jobs: dict[str, Job] = {}
        self.outbox: queue.SimpleQueue[Outgoing] = queue.SimpleQueue()
        self._wake = wake
        self._lock = lock
        self._unpublished = 0  # final replies waiting for their audit commit
        self.tokens_generated = 0
        self.request_failures = 0  # requests ended by a fault in their own sampling/detokenization
        # R1-style reasoning is split only for models that can produce it (a <think> token or template);
        # for the rest the splitter would hold back leading whitespace for nothing.
        chat = model.chat
        self.reasons = model.tokenizer.token_to_id(THINK_OPEN) is not None or (
            chat is not None and THINK_OPEN in chat.source
        )

    # -- before a job is queued (serving loop) -------------------------------------------------
    def prepare(self, job: Job) -> CachedResponse | None:
        """Give the job its reasoning splitter; its cached answer when the response cache holds one."""
        hit = self.responses.get(job.cache_key) if self.responses is not None and job.cache_key else None
        if job.request.reasoning != "inline" and self.reasons:
            job.splitter = ReasoningSplitter(job.opens_reasoning)
        if job.tool_form is not None and job.request.stream:
            job.tools = ToolStream(job.request.tools, job.tool_form)
        return hit

    @staticmethod
    def answer_from_cache(job: Job, hit: CachedResponse) -> None:
        """Fill a job with a cached answer: it finishes at once, audited like any other request."""
        job.seq.output_ids, job.detok.text, job.cache_hit = list(hit.output_ids), hit.text, True
        job.seq.first_token_at = job.seq.started_at = job.seq.arrival

    def idle(self) -> bool:
        """No job in flight and no final reply awaiting its audit commit or the serving loop (under ``lock``)."""
        return not self.jobs and not self._unpublished and self.outbox.empty()

    # -- logits from the engine core (engine thread) -------------------------------------------
    def tokens(self, seqs: list[Sequence], logits) -> None:
        """One token per row: ``logits[row]`` is ``seqs[row]``'s next-token distribution."""
        now = time.monotonic()
        for row, seq in enumerate(seqs):
            if seq.finish is not None:  # cancelled while the step ran
                continue
            try:
                self._emit(seq, self._choose(seq, logits[row]), now)
            except Exception as exc:  # this request's fault ends this request only, never its batch-mates
                self._failed(seq, exc)

    def verified(self, seq: Sequence, draft: list[int], logits, now: float) -> tuple[int, int]:
        """A verify row: ``logits[i]`` follows the last token and ``draft[:i]``. Keep the drafted tokens this
        request picks itself, then its own token at the first disagreement. Returns (positions used, so the
        engine core rewinds the cache to them; drafted tokens accepted)."""
        used, accepted = 1, 0
        try:
            for i in range(len(draft) + 1):
                if seq.finish is not None:  # ended (or cancelled) at the previous token: the rest is dropped
                    break
                used = i + 1
                token = self._choose(seq, logits[i])
                self._emit(seq, token, now)
                if i == len(draft) or token != draft[i]:
                    break
                accepted += 1
        except Exception as exc:  # this request's fault ends this request only, never its batch-mates
            self._failed(seq, exc)
        return used, accepted

    def _failed(self, seq: Sequence, exc: Exception) -> None:
        log.error("request %s failed while sampling or detokenizing", seq.key, exc_info=exc)
        self.request_failures += 1
        self.jobs[seq.key].error = (P.E_INTERNAL, f"generation failed: {type(exc).__name__}")
        with self._lock:
            self.scheduler.fail(seq)

    def _choose(self, seq: Sequence, logits) -> int:
        """The request's next token from its logits (its constraint's mask applied)."""
        # Only the repetition penalty needs the history; skip the per-token copy when it is off.
        seen = seq.prompt_ids + seq.output_ids if seq.sampling.repetition_penalty != 1.0 else []
        guide = self.jobs[seq.key].guide
        if guide is not None:
            logits = guide.mask(logits)
        return sample(logits, seq.sampling, seen, seq.rng)

    def _emit(self, seq: Sequence, token: int, now: float) -> None:
        """Record a chosen token: end conditions, the constraint, detokenization, the streamed frame."""
        job = self.jobs[seq.key]
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
                self.scheduler.stop_string(seq)
        if (fresh or seq.finish is not None) and job.request.stream:
            self._stream(job, fresh, seq.output_ids[-1] if seq.output_ids else -1, seq.finish is not None)

    def _stream(self, job: Job, delta: str, token_id: int, final: bool) -> None:
        """Queue a token frame for ``delta``, its reasoning split off (or dropped, for ``hide``) and, in a reply that
        may call tools, its call markup turned into call deltas."""
        reasoning = None
        if job.splitter is not None:
            reasoning, delta = job.splitter.feed(delta)
            if final:
                held_reasoning, held_answer = job.splitter.flush()
                reasoning, delta = reasoning + held_reasoning, delta + held_answer
            if job.request.reasoning == "hide":
                reasoning = None
        calls = None
        if job.tools is not None:
            delta, calls = job.tools.feed(delta, final)
        if not delta and not reasoning and not calls:
            return
        frame = P.token_reply(job.request.id, job.index, delta, token_id, reasoning or None, calls or None)
        self.outbox.put(Outgoing(job.seq.key, frame, False))
        job.index += 1

    # -- ending requests (engine thread) -------------------------------------------------------
    def end(self, seqs: list[Sequence], error: tuple[str, str] | None = None) -> None:
        """Requests that ended: keep their conversation, remember deterministic answers, free the engine slot
        (before it can be handed out again), then audit them in one commit and queue their final replies.
        ``error``: (code, message) for all of them (the engine step they were in failed)."""
        if not seqs:
            return
        ended, seen = [], set()
        for seq in seqs:
            job = self.jobs.get(seq.key)
            if job is None or seq.key in seen:  # ended twice (e.g. cancelled as it finished, even in one batch)
                log.warning("request %s ended twice; ignoring the second", seq.key)
                continue
            seen.add(seq.key)
            ended.append(seq)
            if self.speculator is not None:
                self._count_drafts(seq, job)
            completed = error is None and seq.finish in _COMPLETED and seq.prefill_done
            if seq.session is not None and self.sessions is not None:
                self.sessions.release(seq.session, self._save_session(seq, job) if completed else job.restore)
            if completed and job.cache_key and not job.cache_hit and self.responses is not None:
                self._cache_response(seq, job)
            if job.cache_hit and job.request.stream and job.detok.text:
                self._stream(job, job.detok.text, seq.output_ids[-1], final=True)
            if seq.slot is not None and not job.cache_hit:
                self.model.engine.release(seq.slot)
        self._audit_then_reply(ended, error)

    def _count_drafts(self, seq: Sequence, job: Job) -> None:
        """End the request's speculation (its draft slot too) and count what it drafted."""
        job.drafts = self.speculator.end(seq.key, seq.slot if not job.cache_hit else None)
        if job.drafts is not None:
            for source, drafted, accepted in job.drafts.by_source(self.speculator.name):
                METRICS.speculated(source, drafted, accepted)

    def _save_session(self, seq: Sequence, job: Job) -> Session | None:
        """The conversation after this turn, its cache copied out of the slot (the restored state when the slot
        holds nothing)."""
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

    def _cache_response(self, seq: Sequence, job: Job) -> None:
        self.responses.put(
            job.cache_key,
            CachedResponse(job.detok.text, tuple(seq.output_ids), seq.finish.value, len(seq.prompt_ids)),
        )

    def _audit_then_reply(self, seqs: list[Sequence], error: tuple[str, str] | None) -> None:
        """Audit every sequence that ended this step in one commit, then queue their final replies."""
        if not seqs:
            return
        replies, entries = [], []
        for seq in seqs:
            job = self.jobs[seq.key]
            failure = self._failure(seq, job, error)
            end = seq.finished_at or time.monotonic()
            entry, frame = self._audit_entry(seq, job, failure, end), self._final_frame(seq, job, failure, end)
            self.jobs.pop(seq.key)
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

    @staticmethod
    def _failure(seq: Sequence, job: Job, error: tuple[str, str] | None) -> tuple[str, str] | None:
        """Why the request failed, if it did: its step's error, its own fault, or how it was ended."""
        if error is None and job.error is not None:
            error = job.error
        if error is None and seq.finish in _FINISH_ERRORS:
            error = (_FINISH_ERRORS[seq.finish], f"request {seq.finish.value}")
        return error

    def _drafter(self, job: Job) -> str | None:
        """What drafted for the request (``ngram``, ``draft``, ``grammar``, or two joined by ``+``); None: nothing."""
        if job.drafts is None:
            return None
        return "+".join(source for source, _, _ in job.drafts.by_source(self.speculator.name)) or None

    def _audit_entry(self, seq: Sequence, job: Job, error: tuple[str, str] | None, end: float) -> Entry:
        """The audit entry of a sequence that ended at ``end`` (monotonic seconds)."""
        constraint = job.request.constraint
        return Entry(
            request_id=job.request.id,
            op=P.OP_GENERATE,
            client=job.client,
            role=job.role,
            status="ok" if error is None else "error",
            model_id=self.model.model_id,
            model_version=self.model.version,
            prompt=job.prompt_text,
            output=job.detok.text,
            prompt_tokens=_prompt_tokens(seq),
            completion_tokens=len(seq.output_ids),
            queue_s=(seq.started_at or end) - seq.arrival,
            ttft_s=(seq.first_token_at - seq.arrival) if seq.first_token_at else None,
            total_s=end - seq.arrival,
            error_code=error[0] if error else None,
            finish_reason=seq.finish.value if seq.finish else None,
            cache_hit=job.cache_hit,
            constraint_kind=constraint.kind if constraint else None,
            constraint_sha256=constraint.digest if constraint else None,
            speculative=self._drafter(job),
        )

    def _final_frame(self, seq: Sequence, job: Job, error: tuple[str, str] | None, end: float) -> bytes:
        """The final reply of a sequence that ended at ``end``: its error, or the whole answer with its usage and
        timings (tool calls parsed out of it when the reply may call tools)."""
        if error is not None:
            return P.error_reply(job.request.id, error[0], error[1])
        queued = (seq.started_at or end) - seq.arrival
        ttft = (seq.first_token_at - seq.arrival) if seq.first_token_at else None
        n_out = len(seq.output_ids)
        timings = {
            "queue_ms": _ms(queued),
            # a cache hit's whole answer is its first token: ttft is the time to answer it (docs/PROTOCOL.md)
            "ttft_ms": _ms(end - seq.arrival) if job.cache_hit else _ms(ttft) if ttft is not None else None,
            "total_ms": _ms(end - seq.arrival),
        }
        if seq.first_token_at and n_out > 1 and not job.cache_hit:
            timings["tokens_per_s"] = round((n_out - 1) / max(end - seq.first_token_at, 1e-9), 2)
        usage = {"prompt_tokens": _prompt_tokens(seq), "completion_tokens": n_out, "cached_tokens": seq.base_len}
        reasoning, answer = None, job.detok.text
        if job.splitter is not None:
            reasoning, answer = split_reasoning(job.detok.text, job.opens_reasoning)
        if job.request.reasoning == "hide":
            reasoning = None
        extra: dict = {"cache_hit": job.cache_hit}
        drafter = self._drafter(job)
        if drafter is not None:
            d = job.drafts
            extra["speculative"] = {"drafter": drafter, "drafted": d.drafted, "accepted": d.accepted}
        finish = seq.finish.value
        if job.tool_form is not None:  # the reply may call tools: parsed as it streamed, or now
            if job.tools is not None:
                if not job.tools.ended:
                    job.tools.feed("", final=True)
                answer, calls = job.tools.result()
            else:
                answer, calls = parse_calls(answer, job.request.tools, job.tool_form)
            if calls:
                extra["tool_calls"], finish = calls, "tool_calls"
        return P.done_reply(job.request.id, answer, finish, usage, timings, reasoning, **extra)


def _prompt_tokens(seq: Sequence) -> int:
    return seq.base_len + len(seq.feed_ids)  # the whole context, a restored conversation included


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
