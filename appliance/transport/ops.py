"""What the daemon does with one request: parse it, decide its subject, check its role, run the op's handler.

``handle`` takes a payload the serving loop has already framed and size-checked. The subject is the sender, or the
end user a ``gateway`` names in ``on_behalf_of``; the role rules are ``serving.roles`` (op -> roles), checked for
the subject before any handler runs, so a refusal is audited as the subject. ``HANDLERS`` maps every op of the
protocol to one function: ``generate`` hands the request to the serving runner and leaves its replies to the loop's
outbox flush; ``auth_failed`` audits a credential a gateway refused; the queries (``health``, ``info``, ``cancel``,
``end_session``, ``metrics``) return a result dict that is counted, audited and answered in one place
(``_answered``). No op but ``generate`` may reuse the id of a generate in flight (its reply would land in that
stream).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from appliance import __version__
from appliance.metrics import METRICS
from appliance.serving import roles
from appliance.serving.admission import Peer, scoped
from appliance.serving.tools import tools_supported
from appliance.transport import protocol as P

if TYPE_CHECKING:
    from appliance.transport.server import Server

log = logging.getLogger("appliance.server")

Handler = Callable[["Server", list[bytes], Peer, P.Request], None]
Query = Callable[["Server", Peer, P.Request], dict]


def handle(srv: Server, envelope: list[bytes], peer: Peer, frame: bytes) -> None:
    try:
        req = P.parse_request(frame, srv.config.engine.max_new_tokens)
        peer = subject(peer, req.op, req.on_behalf_of, req.id)
        roles.check(peer.role, req)
    except P.ProtocolError as exc:
        if exc.on_behalf_of is not None and peer.role == roles.GATEWAY:  # audited as the user it names
            peer = Peer(*exc.on_behalf_of, peer.route)
        return srv.refuse(envelope, peer, exc, op=exc.op)
    HANDLERS[req.op](srv, envelope, peer, req)


def subject(peer: Peer, op: str, on_behalf_of: tuple[str, str] | None, rid: str) -> Peer:
    """The one place a request's subject (audit client and role, scope of its state) is decided:
    the sender itself, or the end user a ``gateway`` names in ``on_behalf_of``."""
    if on_behalf_of is None and op != P.OP_AUTH_FAILED:
        return peer
    if peer.role != roles.GATEWAY:
        raise P.ProtocolError(
            P.E_NOT_GATEWAY,
            f"field 'on_behalf_of' (and op {P.OP_AUTH_FAILED!r}) is accepted only from a gateway client",
            rid,
            op=op,
        )
    return peer if op == P.OP_AUTH_FAILED else Peer(*on_behalf_of, peer.route)


# -- handlers ------------------------------------------------------------------------------------
def generate(srv: Server, envelope: list[bytes], peer: Peer, req: P.Request) -> None:
    """Admit the request and submit it to the serving runner; its frames reach ``envelope`` through the route table."""
    if srv.stop_event.is_set():
        err = P.ProtocolError(P.E_SHUTTING_DOWN, "the daemon is shutting down; retry against the restarted service")
        return srv.refuse(envelope, peer, err, op=req.op, rid=req.id)
    if not srv.writer.healthy:
        err = P.ProtocolError(P.E_AUDIT, "the audit store cannot be written; requests are refused until it recovers")
        return srv.refuse(envelope, peer, err, op=req.op, rid=req.id)
    key = scoped(peer.identity, req.id)
    if key in srv.routes:
        err = P.ProtocolError(
            P.E_DUPLICATE_ID,
            f"a request with id {req.id!r} is already in flight for this client; this reply refers to the "
            "duplicate, the original goes on",
        )
        return srv.refuse(envelope, peer, err, op=req.op, rid=req.id)
    try:
        job = srv.admission.admit(srv.model, req, peer, srv.routes.in_flight(peer.identity))
    except P.ProtocolError as exc:
        return srv.refuse(envelope, peer, exc, op=req.op, rid=req.id)
    except Exception as exc:  # a bug admitting one request must cost that request, never the serving loop
        log.exception("admitting request %s failed", req.id)
        err = P.ProtocolError(P.E_INTERNAL, f"the request could not be admitted: {type(exc).__name__}")
        return srv.refuse(envelope, peer, err, op=req.op, rid=req.id)
    if not srv.runner.submit(job):
        srv.admission.abandon(job)
        err = P.ProtocolError(P.E_BUSY, "the waiting queue is full")
        return srv.refuse(envelope, peer, err, op=req.op, rid=req.id, retry_after_ms=250)
    srv.routes.opened(key, envelope, peer.identity)


def auth_failed(srv: Server, envelope: list[bytes], peer: Peer, req: P.Request) -> None:
    """A gateway refused a credential: audit it as that subject."""
    refused = Peer(req.on_behalf_of[0], "-", peer.route)
    srv.audit(refused, req.op, req.id, "rejected", error_code=P.E_UNAUTHORIZED)
    # queued for the group-commit writer; false while the store cannot write (health: audit unavailable)
    srv.reply(envelope, P.result_reply(req.id, {"audited": srv.writer.healthy}))


def health(srv: Server, peer: Peer, req: P.Request) -> dict:
    """Every field is always present (zero when its feature is off), so clients can rely on it."""
    healthy = srv.writer.healthy
    responses = srv.responses.stats() if srv.responses else dict.fromkeys(_RESPONSE_FIELDS, 0)
    return {
        "status": "ok" if healthy else "degraded",
        "audit": "ok" if healthy else "unavailable",
        "model_id": srv.model.model_id,
        "version": srv.model.version,
        "uptime_s": round(time.monotonic() - srv.started, 1),
        **srv.runner.load(),
        "clients_connected": srv.routes.connected,
        "tokens_generated": srv.runner.tokens_generated,
        "request_failures": srv.runner.request_failures,
        "audit_commits": srv.writer.commits,
        "audit_rows": srv.writer.rows,
        "audit_failures": srv.writer.failures,
        "refused": srv.frames_refused,
        "disconnect_cancels": srv.disconnect_cancels,
        "models_retiring": srv.swap.retiring(),
        **srv.sessions.stats(),
        **responses,
        **_engine_stats(srv.model.engine),
    }


def info(srv: Server, peer: Peer, req: P.Request) -> dict:
    eng, server = srv.config.engine, srv.config.server
    model = srv.model
    return {
        "protocol": P.VERSION,
        "protocol_minor": P.MINOR,
        # 'messages' only where the model has a chat template to render them with
        "features": [f for f in P.FEATURES if _offers(srv, f)],
        "software": __version__,
        "model_id": model.model_id,
        "version": model.version,
        "bundle_id": model.bundle_id,
        "architecture": model.spec.architecture,
        "chat_template": model.chat is not None,  # whether generate accepts 'messages'
        "engine": model.engine.kind,
        # the drafter speculative decoding uses (ngram, draft), or null when off
        "speculative": None if srv.runner.speculator is None else srv.runner.speculator.name,
        "limits": {
            "max_batch": model.engine.num_slots,
            "max_queued": eng.max_queued,
            "max_per_client": server.max_per_client,
            "max_seq_len": model.engine.max_seq_len,
            "max_new_tokens": eng.max_new_tokens,
            "max_message_bytes": server.max_message_bytes,
            "max_prompt_chars": P.MAX_PROMPT_CHARS,
        },
        "identity": peer.identity,  # who the daemon sees: the caller
        "role": peer.role,
    }


def cancel(srv: Server, peer: Peer, req: P.Request) -> dict:
    """Cancel in whichever runner holds it (a request may still finish on a retiring model); its final frame, sent
    through the outbox, closes its route."""
    key = scoped(req.identity or peer.identity, req.target)
    found = any(r.cancel(key) for r in srv.swap.runners())
    return {"cancelled": found, "target": req.target}


def end_session(srv: Server, peer: Peer, req: P.Request) -> dict:
    ended = srv.sessions.end(scoped(req.identity or peer.identity, req.session))
    return {"ended": ended, "session": req.session}


def metrics(srv: Server, peer: Peer, req: P.Request) -> dict:
    return {"format": "prometheus-text", "text": METRICS.render()}


# -- the table -----------------------------------------------------------------------------------
def _beside_streams(handler: Handler) -> Handler:
    """Refuse an op that reuses the id of a generate in flight for the same subject."""

    def checked(srv: Server, envelope: list[bytes], peer: Peer, req: P.Request) -> None:
        if scoped(peer.identity, req.id) in srv.routes:  # its reply would land inside that request's stream
            err = P.ProtocolError(
                P.E_DUPLICATE_ID,
                f"a generate with id {req.id!r} is in flight for this client; give this {req.op} another id",
            )
            return srv.refuse(envelope, peer, err, op=req.op, rid=req.id)
        handler(srv, envelope, peer, req)

    return checked


def _answered(query: Query) -> Handler:
    """A query: counted, audited (one row each when it changed something, else aggregated), answered at once."""

    def answer(srv: Server, envelope: list[bytes], peer: Peer, req: P.Request) -> None:
        METRICS.request(req.op, "ok")  # before the reply: a scrape after it must see it
        result = query(srv, peer, req)
        changed = result.get("cancelled") or result.get("ended")
        srv.audit(peer, req.op, req.id, "ok", aggregate=not changed)
        srv.reply(envelope, P.result_reply(req.id, result))

    return _beside_streams(answer)


HANDLERS: dict[str, Handler] = {
    P.OP_GENERATE: generate,
    P.OP_AUTH_FAILED: _beside_streams(auth_failed),
    P.OP_HEALTH: _answered(health),
    P.OP_INFO: _answered(info),
    P.OP_CANCEL: _answered(cancel),
    P.OP_END_SESSION: _answered(end_session),
    P.OP_METRICS: _answered(metrics),
}
if set(HANDLERS) != set(P.OPS):  # parse_request accepts exactly P.OPS: each needs a handler
    raise ImportError(f"ops without a handler: {sorted(set(P.OPS) - set(HANDLERS))}")


def _offers(srv: Server, feature: str) -> bool:
    """Features that depend on the model or the config are listed only where they are on."""
    if feature == "messages":
        return srv.model.chat is not None
    if feature == "response_cache":
        return srv.config.engine.response_cache > 0
    if feature == "tools":
        return srv.model.chat is not None and tools_supported(srv.model.chat.source)
    if feature == "speculative":
        return srv.runner.speculator is not None
    return True


_RESPONSE_FIELDS = ("response_cache_entries", "response_cache_hits", "response_cache_misses")


def _engine_stats(engine) -> dict:
    stats = engine.stats
    return {
        "decode_steps": stats.decode_steps,
        "resident_steps": stats.resident_steps,
        "regathers": stats.regathers,
        "cache_bytes_copied": stats.copied_bytes,
        "prefill_tokens": stats.prefill_tokens,
        "verify_steps": stats.verify_steps,
        "verified_tokens": stats.verified_tokens,
    }
