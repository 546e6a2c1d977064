"""Admission: the one place a generate request becomes a job or a refusal.

It tokenizes, applies the per-client cap and the context limit, resolves the client's conversation
and the response cache, and returns a ``Job`` ready for the engine thread, or raises
``ProtocolError`` with the code and message the client gets. Everything a client can name
(sessions, cached answers, request ids) is scoped to its identity, so one client can never see,
continue or end another's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from appliance.loader import LoadedModel
from appliance.serving.chat import THINK_CLOSE, ChatError, mask_contents, opens_reasoning
from appliance.serving.constraints import Grammars
from appliance.serving.detokenize import Detokenizer
from appliance.serving.output import Job
from appliance.serving.response_cache import ResponseCache, cache_key
from appliance.serving.scheduler import Sequence
from appliance.serving.sessions import Session, SessionBusy, SessionStore
from appliance.serving.tools import (
    HERMES,
    ToolError,
    check_template,
    markup_in,
    renders_tools,
    template_messages,
    template_tools,
    tool_constraint,
    tool_format,
    with_tools_block,
)
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
        self._grammars: dict[tuple[str, object], Grammars] = {}  # per loaded model (a reload brings a new one)

    def grammars(self, model: LoadedModel) -> Grammars:
        key = (model.bundle_id, model.version)
        if key not in self._grammars:
            tokenizer, spec = model.tokenizer, model.spec
            self._grammars = {  # the previous model's are dropped with it
                key: Grammars(tokenizer, spec.vocab_size, spec.eos_token_ids, tokenizer.token_to_id(THINK_CLOSE))
            }
        return self._grammars[key]

    def admit(self, model: LoadedModel, req: P.Request, peer: Peer, in_flight: int) -> Job:
        """A job for ``req``, or ``ProtocolError``. ``in_flight``: the peer's requests already admitted."""
        if in_flight >= self.max_per_client:
            raise P.ProtocolError(
                P.E_BUSY,
                f"this client already has {in_flight} request(s) in flight, the per-client limit; "
                "wait for one to finish",
                req.id,
            )
        engine = model.engine
        session = scoped(peer.identity, req.session) if req.session is not None else None
        restore = None
        if session is not None:
            try:
                restore = self.sessions.acquire(session, str(model.version))
            except SessionBusy:
                raise P.ProtocolError(
                    P.E_SESSION_BUSY,
                    f"session {req.session!r} has a request in flight; send the next turn after its reply",
                    req.id,
                ) from None
        try:
            text, ids, chat = prompt_tokens(model, req, restore)
        except Exception:  # a refusal, or a bug: the conversation is released either way
            if session is not None:
                self.sessions.release(session, restore)
            raise
        history, feed = [], ids
        if restore is not None:  # a later turn: only what the cache lacks is prefilled
            history, feed = restore.tokens[: restore.cached], restore.tokens[restore.cached :] + ids
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
        form = tool_format(model.chat.source) if req.tools else None  # prompt_tokens refused a template without one
        reasoning = opens_reasoning(text)
        try:  # compiled here, on the serving loop: a constraint that cannot be used never takes a slot
            if form is not None and req.constraint is None:  # a required or named call: markup and parameters
                req = replace(req, constraint=tool_constraint(req, form, model.tokenizer.token_to_id))
            guide = self.grammars(model).guide(req, reasoning)
            if reasoning and guide is not None and guide.constrains_next:
                reasoning = False  # no </think> token to wait for: the constraint holds at once, the output is answer
        except Exception:
            if session is not None:
                self.sessions.release(session, restore)
            raise
        deadline = time.monotonic() + req.deadline_ms / 1000.0 if req.deadline_ms else None
        seq = Sequence(
            key=scoped(peer.identity, req.id),
            prompt_ids=ids,
            max_tokens=req.max_tokens,  # the context may end it first: finish_reason "context"
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
            prompt_text=text,
            chat=chat,
            opens_reasoning=reasoning,
            guide=guide,
            tool_form=form if req.tool_choice != "none" else None,
        )

    def abandon(self, job: Job) -> None:
        """Undo ``admit`` for a job the engine did not take (its queue was full)."""
        if job.seq.session is not None:
            self.sessions.release(job.seq.session, job.restore)


def prompt_tokens(
    model: LoadedModel, req: P.Request, restore: Session | None
) -> tuple[str, list[int], list[dict] | None]:
    """The text this turn adds, its token ids, and the conversation so far (chat requests).

    ``prompt`` is raw text after the BOS (a new conversation's, when the model has one);
    ``messages`` go through the chat template, which writes any BOS itself. A later turn of a chat
    session renders only what its new messages add after the cached reply."""
    encode = model.tokenizer.encode
    if req.messages is None:
        if restore is not None and restore.messages is not None:
            raise P.ProtocolError(P.E_BAD_REQUEST, f"session {req.session!r} is a chat; continue it with 'messages'")
        bos = model.spec.bos_token_id
        head = [] if restore is not None or bos is None else [bos]
        return req.prompt, [*head, *encode(req.prompt, add_special_tokens=False).ids], None
    template = model.chat
    if template is None:
        raise P.ProtocolError(P.E_BAD_REQUEST, f"model {model.model_id} has no chat template; send 'prompt' instead")
    new = list(req.messages)
    if restore is not None and restore.messages is None:
        raise P.ProtocolError(P.E_BAD_REQUEST, f"session {req.session!r} was started with 'prompt'")

    literal = model.literal_content
    # Tool definitions and calls reach the template as JSON, which does not escape markup: refused, never rendered
    # (message contents are masked instead, below).
    where = markup_in(req, literal.markup) if literal is not None else None
    if where is not None:
        raise P.ProtocolError(P.E_BAD_REQUEST, f"field '{where}' holds the chat template's markup", req.id)
    # A message's tool calls are written the template's way even without ``tools`` (a result sent back without them)
    tools, form, block = None, tool_format(template.source) or HERMES, False
    if req.tools:
        try:
            form = check_template(template.source)
        except ToolError as exc:
            raise P.ProtocolError(P.E_BAD_REQUEST, f"field 'tools': {exc}", req.id) from None
        if renders_tools(template.source):
            tools = template_tools(req.tools)
        else:  # a DeepSeek template without tool definitions (R1-Distill's): the daemon writes them
            block = True

    def render(history: list[dict] | None, added: list[dict]) -> str:
        if block and history is None:
            added = with_tools_block(added, req.tools)
        elif block:
            history = with_tools_block(history, req.tools)
        added = template_messages(added, form)
        if history is None:
            return template.render(added, tools=tools)
        return template.continuation(template_messages(history, form), added, tools)

    history = None if restore is None else restore.messages
    try:
        text = render(history, new)
        literal = model.literal_content
        if literal is None:  # [engine] content_special_tokens = "parse": the tokenizer reads content as written
            return text, encode(text, add_special_tokens=False).ids, [*(history or []), *new]
        masked_new = mask_contents(new, literal.markup)
        masked_history = None if history is None else mask_contents(history, literal.markup)
        masked_text = None
        if masked_new is not None or masked_history is not None:
            masked_text = render(
                None if history is None else (masked_history or history), masked_new if masked_new else new
            )
        ids = literal.encode(text, masked_text)
    except ChatError as exc:
        raise P.ProtocolError(P.E_BAD_REQUEST, str(exc)) from None
    return text, ids, [*(history or []), *new]
