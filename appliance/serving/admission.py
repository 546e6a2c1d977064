"""Admission: the one place a generate request becomes a job or a refusal.

It tokenizes, applies the per-client cap and the context limit, resolves the client's conversation
and the response cache, and returns a ``Job`` ready for the engine thread, or raises
``ProtocolError`` with the code and message the client gets. Everything a client can name
(sessions, cached answers, request ids) is scoped to its identity, so one client can never see,
continue or end another's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from appliance.loader import LoadedModel
from appliance.serving.detokenize import Detokenizer
from appliance.serving.response_cache import ResponseCache, cache_key
from appliance.serving.runner import Job
from appliance.serving.scheduler import Sequence
from appliance.serving.sessions import SessionBusy, SessionStore
from appliance.transport import protocol as P


@dataclass(frozen=True)
class Peer:
    """Who sent a request: the authenticated identity (CURVE ``User-Id``, or the connection's routing
    id without CURVE) scopes all state and is the audit subject; ``route`` addresses the reply."""

    identity: str
    role: str
    route: bytes


def scoped(identity: str, name: str) -> str:
    """A client-chosen name (request id, session id) made unique per identity."""
    return f"{identity}\x1f{name}"


class Admission:
    def __init__(self, sessions: SessionStore, responses: ResponseCache | None, max_per_client: int):
        self.sessions = sessions
        self.responses = responses
        self.max_per_client = max_per_client

    def admit(self, model: LoadedModel, req: P.Request, peer: Peer, in_flight: int) -> Job:
        """A job for ``req``, or ``ProtocolError``. ``in_flight``: the peer's requests already admitted."""
        if in_flight >= self.max_per_client:
            raise P.ProtocolError(
                P.E_BUSY,
                f"this client already has {in_flight} request(s) in flight, the per-client limit; "
                "wait for one to finish",
                req.id,
            )
        spec, engine = model.spec, model.engine
        ids = [spec.bos_token_id, *model.tokenizer.encode(req.prompt).ids]
        session = scoped(peer.identity, req.session) if req.session is not None else None
        restore, history, feed = None, [], ids
        if session is not None:
            try:
                restore = self.sessions.acquire(session, str(model.version))
            except SessionBusy:
                raise P.ProtocolError(
                    P.E_SESSION_BUSY,
                    f"session {req.session!r} has a request in flight; send the next turn after its reply",
                    req.id,
                ) from None
            if restore is not None:  # a later turn: no BOS, and only what the cache lacks is prefilled
                history, feed = restore.tokens[: restore.cached], restore.tokens[restore.cached :] + ids[1:]
        context = len(history) + len(feed)
        room = engine.max_seq_len - context
        if room < 1:
            if session is not None:
                self.sessions.release(session, restore)
            what = "conversation" if restore is not None else "prompt"
            hint = "; end the session and start a new one" if restore is not None else ""
            raise P.ProtocolError(
                P.E_TOO_LARGE, f"{what} is {context} tokens; the context holds {engine.max_seq_len}{hint}", req.id
            )
        deadline = time.monotonic() + req.deadline_ms / 1000.0 if req.deadline_ms else None
        seq = Sequence(
            key=scoped(peer.identity, req.id),
            prompt_ids=ids,
            max_tokens=min(req.max_tokens, room),
            sampling=req.sampling,
            deadline=deadline,
            ignore_eos=req.ignore_eos,
            session=session,
            feed_ids=feed,
            base_len=len(history),
            owner=peer.identity,
        )
        key = cache_key(req, model.version, peer.identity) if self.responses is not None else None
        return Job(
            seq=seq,
            request=req,
            client=peer.identity,
            role=peer.role,
            detok=Detokenizer(model.tokenizer.decode, req.stop),
            restore=restore,
            history=history,
            cache_key=key,
        )

    def abandon(self, job: Job) -> None:
        """Undo ``admit`` for a job the engine did not take (its queue was full)."""
        if job.seq.session is not None:
            self.sessions.release(job.seq.session, job.restore)
