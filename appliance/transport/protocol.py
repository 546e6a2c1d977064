"""Wire protocol v1: the single source of truth (specified for third parties in docs/PROTOCOL.md).

Transport: a ZeroMQ ROUTER socket on the daemon. A client sends one multipart message whose last
frame is a msgpack map (the request); a DEALER client sends just that frame, a REQ client also
has its empty delimiter. Every reply carries the same envelope back, and its last frame is a
msgpack map with ``v``, ``id`` and ``type`` (``token``, ``done``, ``result`` or ``error``).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

VERSION = 1

# Ops a client may send.
OP_GENERATE, OP_HEALTH, OP_INFO, OP_CANCEL = "generate", "health", "info", "cancel"
OP_END_SESSION = "end_session"
OP_METRICS = "metrics"  # Prometheus text exposition; role "admin" only
OP_AUTH_FAILED = "auth_failed"  # a gateway reports a refused credential, so the daemon audits it
OPS = (OP_GENERATE, OP_HEALTH, OP_INFO, OP_CANCEL, OP_END_SESSION, OP_METRICS, OP_AUTH_FAILED)
# Minor revision of v1: raised whenever a backward-compatible feature is added (listed in ``info``).
MINOR = 5
# Output constraints a generate request may carry (at most one); each is listed in ``info.features``.
CONSTRAINT_KINDS = ("json_schema", "json", "regex", "grammar", "choice")
FEATURES = (
    "stream",
    "cancel",
    "deadline",
    "sessions",
    "response_cache",
    "roles",
    "duplicate_id",
    "cached_tokens",
    "metrics",
    "gateway",
    "messages",
    "reasoning",
    *CONSTRAINT_KINDS,
    "max_reasoning_tokens",
    "tools",
    "unknown_fields_refused",
    "speculative",
)

# Roles an end user acting through a gateway may have (a gateway cannot delegate its own role).
DELEGABLE_ROLES = ("infer", "admin")

# Reply types.
T_TOKEN, T_DONE, T_RESULT, T_ERROR = "token", "done", "result", "error"

# Error codes: stable strings clients branch on.
E_MALFORMED = "malformed"  # frame is not a msgpack map
E_VERSION = "unsupported_version"
E_UNKNOWN_OP = "unknown_op"
E_BAD_REQUEST = "bad_request"  # a field is missing, of the wrong type or out of range
E_TOO_LARGE = "too_large"  # prompt longer than the model's context allows
E_BUSY = "busy"  # waiting queue full; retry after ``retry_after_ms``
E_UNAUTHORIZED = "unauthorized"
E_AUDIT = "audit_unavailable"  # the audit store cannot write; the daemon fails closed
E_DEADLINE = "deadline_exceeded"
E_CANCELLED = "cancelled"
E_SHUTTING_DOWN = "shutting_down"
E_INTERNAL = "internal"
E_SESSION_BUSY = "session_busy"  # another request of the same session is in flight
E_FORBIDDEN = "forbidden"  # the client's role may not do this
E_DUPLICATE_ID = "duplicate_id"  # this client already has a request in flight with the same id
E_NOT_GATEWAY = "not_gateway"  # 'on_behalf_of' or 'auth_failed' from a client whose role is not 'gateway'
ERROR_CODES = (
    E_FORBIDDEN,
    E_DUPLICATE_ID,
    E_MALFORMED,
    E_VERSION,
    E_UNKNOWN_OP,
    E_BAD_REQUEST,
    E_TOO_LARGE,
    E_BUSY,
    E_UNAUTHORIZED,
    E_AUDIT,
    E_DEADLINE,
    E_CANCELLED,
    E_SHUTTING_DOWN,
    E_INTERNAL,
    E_SESSION_BUSY,
    E_NOT_GATEWAY,
)

# Limits enforced on every request, independent of the model.
MAX_ID_LEN = 64
MAX_SESSION_LEN = 64
MAX_IDENTITY_LEN = 64
MAX_PROMPT_CHARS = 32_768  # of ``prompt``, or of all ``messages`` contents together
MAX_MESSAGES = 256
MAX_ROLE_CHARS = 32
# What a reply does with R1-style ``<think>…</think>`` reasoning: stream and return it apart from the
# answer (``reasoning`` fields), drop it, or leave it in the text as the model wrote it.
REASONING_MODES = ("separate", "hide", "inline")
MAX_CONSTRAINT_CHARS = 65_536  # a schema (as compact JSON), regex, grammar, or the choices together
MAX_SCHEMA_DEPTH = 32  # nesting of maps and lists inside a json_schema
MAX_CHOICES, MAX_CHOICE_CHARS = 256, 1_024
MAX_TOOLS, MAX_TOOL_DESCRIPTION = 32, 1_024
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_CHOICES = ("auto", "none", "required")  # or {"name": <one of the tools>}
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
DEFAULT_MAX_TOKENS = 128
MIN_TEMPERATURE = 0.01  # below this, logits / temperature overflows float64: use 0 (greedy) instead
MAX_TOP_K = 1 << 20
# msgpack decoding limits: a request is one small map, so anything bigger is refused before it costs
# time or memory (a 1 MiB frame of a million empty arrays otherwise takes ~0.7 s to decode).
MAX_MAP_LEN = 32
MAX_ARRAY_LEN = 256


class ProtocolError(Exception):
    """A request the daemon refuses; ``code`` is one of ``ERROR_CODES``."""

    def __init__(self, code: str, message: str, request_id: str | None = None, op: str = "?"):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.op = op  # the op the request named, once it is known (for the audit row)
        self.on_behalf_of: tuple[str, str] | None = None  # so a refused gateway request is audited as its user


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Constraint:
    """What the output must match: ``kind`` is one of ``CONSTRAINT_KINDS``; ``source`` its canonical text (a schema
    as compact JSON in the order sent — llguidance emits properties in schema order —, the regex, the Lark grammar,
    the choices as a JSON list; ``{}`` for json)."""

    kind: str
    source: str
    field: str = ""  # how error messages name the request field it came from (default: ``kind``); not in the digest

    @property
    def named(self) -> str:
        return self.field or repr(self.kind)

    @property
    def digest(self) -> str:
        """sha256 of kind and source: the compile cache's key and the audit row's record of the constraint."""
        return hashlib.sha256(f"{self.kind}\n{self.source}".encode()).hexdigest()


@dataclass(frozen=True)
class Request:
    op: str
    id: str
    prompt: str = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    stream: bool = True
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks)
    deadline_ms: int | None = None
    target: str | None = None  # the id a ``cancel`` refers to
    session: str | None = None  # conversation to continue (generate) or forget (end_session)
    identity: str | None = None  # admin only: the client whose request/session ``cancel``/``end_session`` names
    # (identity, role) of the end user a gateway acts for; for ``auth_failed``, the refused subject
    on_behalf_of: tuple[str, str] | None = None
    messages: tuple[dict, ...] | None = None  # [{role, content}] rendered with the model's chat template
    reasoning: str = "separate"  # one of REASONING_MODES
    constraint: Constraint | None = None  # the output must match it (generate)
    max_reasoning_tokens: int | None = None  # R1-style reasoning ends (</think> forced) after this many tokens
    tools: tuple[dict, ...] | None = None  # [{name, description?, parameters?}] the model may call (chat only)
    tool_choice: str | None = None  # auto, none, required, or "function" (then ``tool_name``)
    tool_name: str | None = None
    speculative: bool = True  # False: this request never uses speculative decoding (its tokens are the same)


def _get(msg: dict, name: str, kind: type | tuple[type, ...], default: Any, rid: str | None) -> Any:
    value = msg.get(name, default)
    # bool is an int in Python; a JSON-ish client sending true for a count is a bug worth reporting.
    if value is not default and (not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind))):
        raise ProtocolError(E_BAD_REQUEST, f"field {name!r} must be {_names(kind)}, got {type(value).__name__}", rid)
    return value


def _tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _tuple(kind))


def _check(ok: bool, message: str, rid: str | None) -> None:
    if not ok:
        raise ProtocolError(E_BAD_REQUEST, message, rid)


def parse_request(frame: bytes, max_tokens_limit: int) -> Request:
    """Decode and validate one request frame; raises ``ProtocolError`` with a specific code."""
    try:
        msg = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_map_len=MAX_MAP_LEN,
            max_array_len=MAX_ARRAY_LEN,
            max_bin_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(E_MALFORMED, f"frame is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(msg, dict):
        raise ProtocolError(E_MALFORMED, f"request must be a msgpack map, got {type(msg).__name__}")
    rid = msg.get("id")
    if "id" not in msg:
        rid = uuid.uuid4().hex
    elif not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_LEN:  # nil included: absent is not nil
        raise ProtocolError(E_BAD_REQUEST, f"field 'id' must be a string of 1..{MAX_ID_LEN} characters")
    if "v" not in msg:
        raise ProtocolError(E_BAD_REQUEST, f"field 'v' is required (the integer {VERSION})", rid)
    version = msg["v"]
    if type(version) is not int:  # 1.0 and true are not the integer 1
        raise ProtocolError(
            E_BAD_REQUEST, f"field 'v' must be the integer {VERSION}, got {type(version).__name__}", rid
        )
    if version != VERSION:
        raise ProtocolError(
            E_VERSION, f"protocol version {version!r} not supported; field 'v' must be the integer {VERSION}", rid
        )
    if "op" not in msg:
        raise ProtocolError(E_BAD_REQUEST, f"field 'op' is required (one of {', '.join(OPS)})", rid)
    op = msg["op"]
    if op not in OPS:
        raise ProtocolError(E_UNKNOWN_OP, f"unknown op {op!r}; known ops: {', '.join(OPS)}", rid)
    behalf = _on_behalf_of(msg, rid, required=op == OP_AUTH_FAILED)
    try:
        return _parse_op(msg, op, rid, behalf, max_tokens_limit)
    except ProtocolError as exc:
        exc.op, exc.on_behalf_of = op, behalf
        raise


def _parse_op(msg: dict, op: str, rid: str, behalf: tuple[str, str] | None, max_tokens_limit: int) -> Request:
    if op == OP_CANCEL:
        target = _get(msg, "target", str, None, rid)
        _check(target is not None, "cancel needs field 'target' (the id of the request to cancel)", rid)
        return Request(op=op, id=rid, target=target, identity=_identity(msg, rid), on_behalf_of=behalf)
    if op == OP_END_SESSION:
        session = _session(msg, rid, required=True)
        return Request(op=op, id=rid, session=session, identity=_identity(msg, rid), on_behalf_of=behalf)
    if op != OP_GENERATE:
        return Request(op=op, id=rid, on_behalf_of=behalf)
    return replace(_parse_generate(msg, rid, max_tokens_limit), on_behalf_of=behalf)


def _on_behalf_of(msg: dict, rid: str, required: bool) -> tuple[str, str] | None:
    """``{"identity": str, "role": str}``: who a gateway forwards for (the daemon checks the sender is one)."""
    behalf = _get(msg, "on_behalf_of", dict, None, rid)
    if behalf is None:
        _check(not required, f"{msg.get('op')} needs field 'on_behalf_of' (the refused subject)", rid)
        return None
    identity, role = behalf.get("identity"), behalf.get("role")
    _check(
        isinstance(identity, str) and 0 < len(identity) <= MAX_IDENTITY_LEN,
        f"field 'on_behalf_of.identity' must be a string of 1..{MAX_IDENTITY_LEN} characters",
        rid,
    )
    allowed = ("-", *DELEGABLE_ROLES) if required else DELEGABLE_ROLES
    _check(role in allowed, f"field 'on_behalf_of.role' must be one of {', '.join(allowed)}", rid)
    return identity, role


def _identity(msg: dict, rid: str) -> str | None:
    identity = _get(msg, "identity", str, None, rid)
    _check(identity is None or 0 < len(identity) <= 128, "field 'identity' must be a string of 1..128 characters", rid)
    return identity


def _session(msg: dict, rid: str, required: bool = False) -> str | None:
    session = _get(msg, "session", str, None, rid)
    _check(session is not None or not required, "end_session needs field 'session' (the conversation id)", rid)
    _check(
        session is None or 0 < len(session) <= MAX_SESSION_LEN,
        f"field 'session' must be a string of 1..{MAX_SESSION_LEN} characters",
        rid,
    )
    return session


GENERATE_FIELDS = frozenset(
    {"v", "id", "op", "on_behalf_of", "prompt", "messages", "reasoning", "max_tokens", "temperature", "top_k"}
    | {"top_p", "repetition_penalty", "seed", "stop", "stream", "ignore_eos", "deadline_ms", "session"}
    | {*CONSTRAINT_KINDS, "max_reasoning_tokens", "tools", "tool_choice", "speculative"}
)


def _parse_generate(msg: dict, rid: str, max_tokens_limit: int) -> Request:
    # A field this daemon does not know is refused, never ignored: a client asking for a constraint from an older
    # daemon must not get unconstrained text believing it constrained.
    unknown = sorted(str(k) for k in msg if k not in GENERATE_FIELDS)
    _check(
        not unknown,
        f"unknown field(s) {', '.join(repr(k) for k in unknown)} in generate (protocol {VERSION}.{MINOR}; "
        "info.features lists what this daemon supports)",
        rid,
    )
    prompt = _get(msg, "prompt", str, None, rid)
    messages = _messages(msg, rid)
    _check(
        (prompt is None) != (messages is None),
        "generate needs exactly one of 'prompt' (a string) and 'messages' (a list of {role, content} maps)",
        rid,
    )
    if prompt is not None:
        _check(len(prompt) > 0, "field 'prompt' must not be empty", rid)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ProtocolError(
                E_TOO_LARGE, f"prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}", rid
            )
    reasoning = _get(msg, "reasoning", str, "separate", rid)
    _check(reasoning in REASONING_MODES, f"field 'reasoning' must be one of {', '.join(REASONING_MODES)}", rid)
    max_tokens = _get(msg, "max_tokens", int, DEFAULT_MAX_TOKENS, rid)
    _check(1 <= max_tokens <= max_tokens_limit, f"field 'max_tokens' must be 1..{max_tokens_limit}", rid)
    temperature = float(_get(msg, "temperature", (int, float), 0.0, rid))
    _check(
        temperature == 0.0 or MIN_TEMPERATURE <= temperature <= 5.0,
        f"field 'temperature' must be 0 (greedy) or {MIN_TEMPERATURE}..5",
        rid,
    )
    top_k = _get(msg, "top_k", int, 0, rid)
    _check(0 <= top_k <= MAX_TOP_K, f"field 'top_k' must be 0..{MAX_TOP_K} (0 = no cut)", rid)
    top_p = float(_get(msg, "top_p", (int, float), 1.0, rid))
    _check(1e-6 <= top_p <= 1.0, "field 'top_p' must be 1e-6..1", rid)
    penalty = float(_get(msg, "repetition_penalty", (int, float), 1.0, rid))
    _check(0.5 <= penalty <= 2.0, "field 'repetition_penalty' must be 0.5..2", rid)
    seed = _get(msg, "seed", int, None, rid)
    _check(seed is None or 0 <= seed < 2**63, "field 'seed' must be 0..2^63-1", rid)
    stop = _get(msg, "stop", list, [], rid)
    _check(
        len(stop) <= MAX_STOP_SEQUENCES and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop),
        f"field 'stop' must be a list of at most {MAX_STOP_SEQUENCES} non-empty strings of <= {MAX_STOP_CHARS} "
        "characters",
        rid,
    )
    stream = _get(msg, "stream", bool, True, rid)
    ignore_eos = _get(msg, "ignore_eos", bool, False, rid)
    speculative = _get(msg, "speculative", bool, True, rid)
    deadline = _get(msg, "deadline_ms", int, None, rid)
    _check(deadline is None or deadline > 0, "field 'deadline_ms' must be > 0", rid)
    tools = _tools(msg, rid)
    _check(tools is None or messages is not None, "'tools' needs 'messages' (the chat template renders them)", rid)
    choice, tool_name = _tool_choice(msg, rid, tools)
    constraint = _constraint(msg, rid)
    _check(
        constraint is None or choice in (None, "none"),
        "a constraint and tools cannot be combined (set tool_choice 'none', or constrain the call through 'tools')",
        rid,
    )
    max_reasoning = _get(msg, "max_reasoning_tokens", int, None, rid)
    _check(max_reasoning is None or max_reasoning >= 0, "field 'max_reasoning_tokens' must be >= 0", rid)
    return Request(
        op=OP_GENERATE,
        id=rid,
        prompt=prompt or "",
        messages=messages,
        reasoning=reasoning,
        max_tokens=max_tokens,
        sampling=Sampling(temperature, top_k, top_p, penalty, seed),
        stop=tuple(stop),
        stream=stream,
        ignore_eos=ignore_eos,
        deadline_ms=deadline,
        session=_session(msg, rid),
        constraint=constraint,
        max_reasoning_tokens=max_reasoning,
        tools=tools,
        tool_choice=choice,
        tool_name=tool_name,
        speculative=speculative,
    )


def _tools(msg: dict, rid: str) -> tuple[dict, ...] | None:
    tools = _get(msg, "tools", list, None, rid)
    if tools is None:
        return None
    _check(0 < len(tools) <= MAX_TOOLS, f"field 'tools' must hold 1..{MAX_TOOLS} tools", rid)
    for n, tool in enumerate(tools):
        _check(
            isinstance(tool, dict)
            and set(tool) <= {"name", "description", "parameters"}
            and isinstance(tool.get("name"), str)
            and TOOL_NAME.fullmatch(tool["name"]) is not None
            and isinstance(tool.get("description", ""), str)
            and len(tool.get("description", "")) <= MAX_TOOL_DESCRIPTION
            and isinstance(tool.get("parameters", {}), dict),
            f"tools[{n}] must be a map of 'name' (1-64 characters of A-Z a-z 0-9 _ -), an optional 'description' "
            f"(<= {MAX_TOOL_DESCRIPTION} characters) and optional 'parameters' (a JSON schema map)",
            rid,
        )
        _check(_depth(tool.get("parameters", {})) < MAX_SCHEMA_DEPTH, f"tools[{n}].parameters nests too deep", rid)
    names = [t["name"] for t in tools]
    _check(len(set(names)) == len(names), "field 'tools' names a function twice", rid)
    size = len(json.dumps(tools))
    _check(
        size <= MAX_CONSTRAINT_CHARS, f"field 'tools' is {size} characters; the limit is {MAX_CONSTRAINT_CHARS}", rid
    )
    return tuple({k: tool[k] for k in ("name", "description", "parameters") if k in tool} for tool in tools)


def _tool_choice(msg: dict, rid: str, tools: tuple[dict, ...] | None) -> tuple[str | None, str | None]:
    choice = msg.get("tool_choice")
    if choice is None:
        return ("auto" if tools else None), None
    _check(tools is not None, "'tool_choice' needs 'tools'", rid)
    if isinstance(choice, str):
        _check(choice in TOOL_CHOICES, f"field 'tool_choice' must be one of {', '.join(TOOL_CHOICES)} or {{name}}", rid)
        return choice, None
    names = [t["name"] for t in tools]
    _check(
        isinstance(choice, dict) and set(choice) == {"name"} and choice["name"] in names,
        f"field 'tool_choice' as a map must be {{\"name\": one of {names}}}",
        rid,
    )
    return "function", choice["name"]


def _constraint(msg: dict, rid: str) -> Constraint | None:
    """At most one of ``CONSTRAINT_KINDS``, its shape and size checked here; whether it compiles is the engine's."""
    present = [k for k in CONSTRAINT_KINDS if k in msg]
    if not present:
        return None
    _check(len(present) == 1, f"generate takes at most one of {', '.join(CONSTRAINT_KINDS)}; got {present}", rid)
    kind, value = present[0], msg[present[0]]
    if kind == "json_schema":
        _check(isinstance(value, dict), "field 'json_schema' must be a map (a JSON schema)", rid)
        _check(_depth(value) <= MAX_SCHEMA_DEPTH, f"field 'json_schema' nests deeper than {MAX_SCHEMA_DEPTH}", rid)
        try:
            source = json.dumps(value, separators=(",", ":"), allow_nan=False)  # key order kept: it is output order
        except ValueError:
            raise ProtocolError(E_BAD_REQUEST, "field 'json_schema' holds a non-finite number", rid) from None
    elif kind == "json":
        _check(value is True, "field 'json' must be true (the output is one JSON object)", rid)
        source = "{}"
    elif kind == "choice":
        _check(
            isinstance(value, list)
            and 0 < len(value) <= MAX_CHOICES
            and all(isinstance(c, str) and 0 < len(c) <= MAX_CHOICE_CHARS for c in value),
            f"field 'choice' must be a list of 1..{MAX_CHOICES} non-empty strings of <= {MAX_CHOICE_CHARS} characters",
            rid,
        )
        source = json.dumps(value, ensure_ascii=False)
    else:  # regex, grammar
        _check(isinstance(value, str) and len(value) > 0, f"field {kind!r} must be a non-empty string", rid)
        source = value
    if len(source) > MAX_CONSTRAINT_CHARS:
        raise ProtocolError(
            E_BAD_REQUEST, f"field {kind!r} is {len(source)} characters; the limit is {MAX_CONSTRAINT_CHARS}", rid
        )
    return Constraint(kind, source)


def _depth(value: Any, level: int = 1) -> int:
    """Nesting of maps and lists (iterative: a hostile schema cannot exhaust the stack)."""
    deepest, stack = 0, [(value, level)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, at)
            if deepest > MAX_SCHEMA_DEPTH:
                return deepest
            stack.extend((v, at + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _messages(msg: dict, rid: str) -> tuple[dict, ...] | None:
    """``messages``: 1..MAX_MESSAGES maps of ``role`` and ``content`` strings; an assistant's may carry
    ``tool_calls`` ([{id, name, arguments (a JSON string)}]) and a ``tool`` message ``tool_call_id``."""
    messages = _get(msg, "messages", list, None, rid)
    if messages is None:
        return None
    _check(0 < len(messages) <= MAX_MESSAGES, f"field 'messages' must hold 1..{MAX_MESSAGES} messages", rid)
    for n, m in enumerate(messages):
        _check(
            isinstance(m, dict)
            and {"role", "content"} <= set(m) <= {"role", "content", "tool_calls", "tool_call_id"}
            and isinstance(m["role"], str)
            and 0 < len(m["role"]) <= MAX_ROLE_CHARS
            and isinstance(m["content"], str),
            f"messages[{n}] must be a map of 'role' (a string of 1..{MAX_ROLE_CHARS} characters) and "
            "'content' (a string), with 'tool_calls' (assistant) or 'tool_call_id' (tool)",
            rid,
        )
        if "tool_calls" in m:
            calls = m["tool_calls"]
            for c in calls if isinstance(calls, list) else ():
                arguments = c.get("arguments") if isinstance(c, dict) else None
                try:
                    parsed = json.loads(arguments) if isinstance(arguments, str) else None
                except (ValueError, RecursionError):
                    parsed = None
                _check(
                    isinstance(parsed, dict) and _depth(parsed) <= MAX_SCHEMA_DEPTH,
                    f"messages[{n}].tool_calls: 'arguments' must be a JSON object (as a string) nested at most "
                    f"{MAX_SCHEMA_DEPTH} deep",
                    rid,
                )
            _check(
                m["role"] == "assistant"
                and isinstance(calls, list)
                and 0 < len(calls) <= MAX_TOOLS
                and all(
                    isinstance(c, dict)
                    and set(c) == {"id", "name", "arguments"}
                    and all(isinstance(c[k], str) for k in c)
                    and 0 < len(c["id"]) <= MAX_ID_LEN
                    and TOOL_NAME.fullmatch(c["name"]) is not None
                    for c in calls
                ),
                f"messages[{n}].tool_calls: an assistant's list of {{id, name, arguments (a JSON string)}}",
                rid,
            )
        if "tool_call_id" in m:
            _check(
                m["role"] == "tool" and isinstance(m["tool_call_id"], str) and 0 < len(m["tool_call_id"]) <= MAX_ID_LEN,
                f"messages[{n}].tool_call_id: a tool message's string of 1..{MAX_ID_LEN} characters",
                rid,
            )
    chars = sum(len(m["content"]) + sum(len(c["arguments"]) for c in m.get("tool_calls", ())) for m in messages)
    if chars > MAX_PROMPT_CHARS:
        raise ProtocolError(E_TOO_LARGE, f"messages hold {chars} characters; the limit is {MAX_PROMPT_CHARS}", rid)
    return tuple({k: m[k] for k in ("role", "content", "tool_calls", "tool_call_id") if k in m} for m in messages)


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def token_reply(
    rid: str, index: int, text: str, token_id: int, reasoning: str | None = None, tool_calls: list[dict] | None = None
) -> bytes:
    """A streamed piece: answer ``text``, with ``reasoning: separate`` the ``reasoning`` it adds, and in a reply that
    may call tools the ``tool_calls`` deltas it adds (``{index, id?, name?, arguments}``)."""
    reply = {"v": VERSION, "id": rid, "type": T_TOKEN, "index": index, "text": text, "token": token_id}
    if reasoning is not None:
        reply["reasoning"] = reasoning
    if tool_calls:
        reply["tool_calls"] = tool_calls
    return _pack(reply)


def done_reply(
    rid: str, text: str, finish_reason: str, usage: dict, timings: dict, reasoning: str | None = None, **extra: Any
) -> bytes:
    reply = {
        **extra,
        "v": VERSION,
        "id": rid,
        "type": T_DONE,
        "text": text,
        "finish_reason": finish_reason,
        "usage": usage,
        "timings": timings,
    }
    if reasoning is not None:
        reply["reasoning"] = reasoning
    return _pack(reply)


def result_reply(rid: str, result: dict) -> bytes:
    return _pack({"v": VERSION, "id": rid, "type": T_RESULT, "result": result})


def error_reply(rid: str | None, code: str, message: str, **extra: Any) -> bytes:
    return _pack({"v": VERSION, "id": rid, "type": T_ERROR, "code": code, "message": message, **extra})


def request(op: str, rid: str | None = None, **fields: Any) -> bytes:
    """Encode a request (used by the client library; any msgpack implementation can do the same)."""
    msg = {"v": VERSION, "op": op, "id": rid or uuid.uuid4().hex}
    msg.update({k: v for k, v in fields.items() if v is not None})
    return _pack(msg)


def decode_reply(frame: bytes) -> dict:
    msg = msgpack.unpackb(frame, raw=False)
    if not isinstance(msg, dict) or msg.get("v") != VERSION or "type" not in msg:
        raise ProtocolError(E_MALFORMED, f"not a v{VERSION} reply: {msg!r:.200}")
    return msg
