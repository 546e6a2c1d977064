"""The OpenAI API's request and response shapes, translated to and from the daemon's ``generate``.

Only what the engine does is accepted; every other field is refused with a 400 naming it (in
OpenAI's error shape), never silently ignored, so a client that relies on ``n=3`` or tools learns
at once that it will not get them. Spec of what is accepted: docs/HTTP.md.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from appliance.transport import protocol as P

# Accepted only at the value that means "feature off"; anything else is a 400 naming the field.
_OFF = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": (None, ""),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "functions": (None, []),  # the deprecated spelling of tools
    "function_call": (None, "none"),
}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user"}
_COMMON |= {"response_format"}
# vLLM's names: fixed output lengths for benchmarks, and its guided decoding (the daemon's regex/choice/grammar)
_GUIDED = {"guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_EXTENSIONS = {"ignore_eos", *_GUIDED}
_CHAT = _COMMON | _EXTENSIONS | {"messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls"}
_COMPLETION = _COMMON | _EXTENSIONS | {"prompt"}
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
_FINISH = {
    "eos": "stop",
    "stop": "stop",
    "grammar": "stop",
    "length": "length",
    "context": "length",
    "tool_calls": "tool_calls",
}


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        retry_after_s: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Call:
    """One translated request: what to send the daemon and how to shape the answer."""

    chat: bool
    model: str
    fields: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    # daemon field -> the OpenAI parameter it came from, so the daemon's range errors name the client's field
    names: dict[str, str] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    single_call: bool = False  # parallel_tool_calls false


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _typed(body: dict, name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
        raise _bad(name, f"'{name}' must be {what}")
    if isinstance(value, int) and not isinstance(value, bool) and not -(1 << 63) <= value < 1 << 64:
        raise _bad(name, f"'{name}' is out of range (a 64-bit integer)")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(name, f"'{name}' must be a finite number")
    return value


def _common(body: dict, allowed: set[str], model_id: str, chat: bool) -> Call:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name in _OFF:
            if not any(type(value) is type(off) and value == off for off in _OFF[name]):
                raise ApiError(400, f"'{name}' = {value!r} is not supported by this appliance", name, "unsupported")
        elif name not in allowed:
            raise ApiError(400, f"unrecognized request argument: '{name}'", name, "unsupported")
    model = body.get("model")
    if model != model_id:
        raise ApiError(
            404, f"model {model!r} is not served here; GET /v1/models lists {model_id!r}", "model", "model_not_found"
        )
    stream = _typed(body, "stream", bool, "true or false") or False
    options = _typed(body, "stream_options", dict, "an object") or {}
    if set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
        raise _bad("stream_options", "'stream_options' supports only {\"include_usage\": true|false}")
    if options and not stream:
        raise _bad("stream_options", "'stream_options' is only allowed with 'stream': true")
    call = Call(
        chat=chat,
        model=model_id,
        fields={"stream": stream},
        stream=stream,
        include_usage=options.get("include_usage", False),
    )
    token_param = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    for daemon_name, param, kind, what in (
        ("max_tokens", token_param, int, "an integer"),
        ("temperature", "temperature", (int, float), "a number"),
        ("top_p", "top_p", (int, float), "a number"),
        ("seed", "seed", int, "an integer"),
        ("ignore_eos", "ignore_eos", bool, "true or false"),
    ):
        value = _typed(body, param, kind, what)
        if value is not None:
            call.fields[daemon_name] = value
            call.names[daemon_name] = param
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop", "'stop' must be a string or a list of strings")
        call.fields["stop"] = stop
        call.names["stop"] = "stop"
    _typed(body, "user", str, "a string")
    _constraint(body, call)
    return call


def _constraint(body: dict, call: Call) -> None:
    """``response_format`` (``text``, ``json_object``, ``json_schema``) or one of vLLM's ``guided_*`` fields."""
    wanted = [name for name in ("response_format", *_GUIDED) if body.get(name) is not None]
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise _bad("response_format", "'response_format.type' must be text, json_object or json_schema")
        if fmt["type"] == "text":
            wanted.remove("response_format")
    if len(wanted) > 1:
        raise _bad(wanted[1], f"'{wanted[0]}' and '{wanted[1]}' cannot be combined: one constraint per request")
    if not wanted:
        return
    name = wanted[0]
    if name in _GUIDED:
        call.fields[_GUIDED[name]] = body[name]
        call.names[_GUIDED[name]] = name
    elif fmt["type"] == "json_object":
        call.fields["json"], call.names["json"] = True, "response_format"
    else:
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise _bad("response_format", "'response_format.json_schema' must be {name, schema: {...}, strict?}")
        if not isinstance(spec.get("name"), str) or not isinstance(spec.get("strict", False), bool | None):
            raise _bad("response_format", "'response_format.json_schema' needs a 'name' string; 'strict' is a boolean")
        call.fields["json_schema"], call.names["json_schema"] = spec["schema"], "response_format"


def parse_chat(body: dict, model_id: str, daemon_renders_chat: bool) -> Call:
    """``POST /v1/chat/completions``. The daemon applies the model's chat template when it advertises
    ``messages`` support; otherwise the messages are rendered here with the fallback in docs/HTTP.md."""
    call = _common(body, _CHAT, model_id, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    plain = []
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in CHAT_ROLES:
            raise _bad(f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
        extra = set(msg) - {"role", "content", "name", "tool_calls", "tool_call_id"}
        if extra:
            raise ApiError(400, f"messages[{i}].{sorted(extra)[0]} is not supported", f"messages[{i}]", "unsupported")
        content = msg.get("content")
        entry = {"role": role, "content": "" if content is None and msg.get("tool_calls") else _content(content, i)}
        if msg.get("tool_calls"):
            entry["tool_calls"] = _message_calls(msg["tool_calls"], i)
        if msg.get("tool_call_id") is not None:
            entry["tool_call_id"] = msg["tool_call_id"]
        plain.append(entry)
    _tools(body, call)
    if call.fields.get("tools") and not daemon_renders_chat:
        raise _bad("tools", "this model has no chat template to render tools with")
    if daemon_renders_chat:
        call.fields["messages"] = plain
        call.names["messages"] = "messages"
    else:
        call.fields["prompt"] = render_chat(plain)
        call.names["prompt"] = "messages"
    return call


def _message_calls(calls: Any, i: int) -> list[dict]:
    """An assistant message's ``tool_calls`` (OpenAI's shape) as the daemon's ``{id, name, arguments}``."""
    out = []
    for j, c in enumerate(calls if isinstance(calls, list) else [None]):
        fn = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(fn, dict) and isinstance(c.get("id"), str) and isinstance(fn.get("name"), str)):
            raise _bad(f"messages[{i}].tool_calls", f"messages[{i}].tool_calls[{j}] must be {{id, type, function}}")
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise _bad(
                f"messages[{i}].tool_calls", f"messages[{i}].tool_calls[{j}].function.arguments must be a string"
            )
        out.append({"id": c["id"], "name": fn["name"], "arguments": arguments})
    return out


def _tools(body: dict, call: Call) -> None:
    """``tools`` (function tools), ``tool_choice``, ``parallel_tool_calls`` as the daemon's fields."""
    tools = body.get("tools")
    if not tools:
        if body.get("tool_choice") not in (None, "none"):
            raise _bad("tool_choice", "'tool_choice' needs 'tools'")
        return
    if not isinstance(tools, list):
        raise _bad("tools", "'tools' must be a list of function tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"tools[{i}]", f'tools[{i}] must be {{"type": "function", "function": {{name, ...}}}}')
        out.append({k: fn[k] for k in ("name", "description", "parameters") if fn.get(k) is not None})
    call.fields["tools"], call.names["tools"] = out, "tools"
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(
                "tool_choice", "'tool_choice' must be auto, none, required or {type: function, function: {name}}"
            )
        choice = {"name": fn["name"]}
    if choice is not None:
        call.fields["tool_choice"], call.names["tool_choice"] = choice, "tool_choice"
    if _typed(body, "parallel_tool_calls", bool, "true or false") is False:
        call.single_call = True  # only the first call of an auto reply is returned


def _content(content: Any, i: int) -> str:
    """Text content: a string, or a list of ``{"type": "text", "text": ...}`` parts (images are refused)."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else None
    if parts is not None and all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
        texts = [p.get("text") for p in parts]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")


def render_chat(messages: list[dict]) -> str:
    """The fallback chat rendering: one ``Role: content`` line per message, then ``Assistant:`` to answer."""
    lines = [f"{CHAT_ROLES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def parse_completion(body: dict, model_id: str) -> Call:
    """``POST /v1/completions``: one prompt string (a list holding one string is accepted too)."""
    call = _common(body, _COMPLETION, model_id, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", "'prompt' must be a string (token-id prompts and batches are not supported)")
    call.fields["prompt"] = prompt
    call.names["prompt"] = "prompt"
    return call


def daemon_error(reply: dict, call: Call) -> ApiError:
    """The daemon's ``error`` reply as the HTTP error an OpenAI client expects."""
    code, message = reply.get("code"), reply.get("message", "")
    named = re.search(r"field '(\w+)", message)
    param = call.names.get(named.group(1), named.group(1)) if named else None
    if code == P.E_BAD_REQUEST:
        return ApiError(400, message, param, "invalid_value")
    if code == P.E_TOO_LARGE:
        return ApiError(400, message, call.names.get("prompt", "prompt"), "context_length_exceeded")
    if code == P.E_BUSY:
        retry = max(1, math.ceil(reply.get("retry_after_ms", 1000) / 1000))
        return ApiError(429, message, None, "rate_limit_exceeded", "requests", retry_after_s=retry)
    if code in (P.E_AUDIT, P.E_SHUTTING_DOWN):
        return ApiError(503, message, None, code, "server_error", retry_after_s=1)
    if code == P.E_DEADLINE:
        return ApiError(504, message, None, code, "server_error")
    return ApiError(500, f"{code}: {message}", None, code, "server_error")


def tool_calls(call: Call, done: dict) -> list[dict] | None:
    """The reply's tool calls, only the first with ``parallel_tool_calls`` false."""
    calls = done.get("tool_calls")
    return calls[:1] if calls and call.single_call else calls


def usage(done: dict) -> dict:
    u = done["usage"]
    return {**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


def _head(call: Call, rid: str, chunk: bool) -> dict:
    if call.chat:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": f"chatcmpl-{rid}", "object": obj, "created": call.created, "model": call.model}
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": call.created, "model": call.model}


def _calls(calls: list[dict] | None, streamed: bool = False) -> dict:
    """The daemon's ``tool_calls`` in OpenAI's shape; streamed: the daemon's call deltas ``{index, id?, name?,
    arguments}``, ``id``, ``type`` and ``name`` on a call's first delta only, as OpenAI streams them."""
    if not calls:
        return {}
    if not streamed:
        return {"tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in calls
        ]}  # fmt: skip
    out = []
    for c in calls:
        head = {"id": c["id"], "type": "function"} if "id" in c else {}
        name = {"name": c["name"]} if "name" in c else {}
        out.append({"index": c["index"], **head, "function": {**name, "arguments": c["arguments"]}})
    return {"tool_calls": out}


def call_deltas(call: Call, deltas: list[dict]) -> list[dict]:
    """A token reply's call deltas the client gets: only the first call's with ``parallel_tool_calls`` false."""
    return [d for d in deltas if d["index"] == 0] if call.single_call else deltas


def whole_calls(call: Call, done: dict) -> list[dict] | None:
    """A reply's calls as deltas, each whole (a reply whose calls were not streamed: a cached answer)."""
    calls = tool_calls(call, done)
    return [{**c, "index": i} for i, c in enumerate(calls)] if calls else None


def _choice(
    call: Call, text: str | None, finish: str | None, first: bool, chunk: bool, calls: list[dict] | None = None
) -> dict:
    reason = _FINISH.get(finish) if finish else None
    if not call.chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    if not chunk:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text or (None if calls else text), **_calls(calls)},
            "logprobs": None,
            "finish_reason": reason,
        }
    delta: dict = {"role": "assistant"} if first else {}
    if text is not None:
        delta["content"] = text
    delta.update(_calls(calls, streamed=True))
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}


def chunk(
    call: Call, rid: str, text: str | None, finish: str | None = None, first: bool = False, calls: list | None = None
) -> dict:
    """One server-sent event of a streamed answer."""
    out = {**_head(call, rid, True), "choices": [_choice(call, text, finish, first, True, calls)]}
    if call.include_usage:
        out["usage"] = None  # as OpenAI does: only the extra last chunk carries usage
    return out


def usage_chunk(call: Call, rid: str, done: dict) -> dict:
    return {**_head(call, rid, True), "choices": [], "usage": usage(done)}


def completion(call: Call, rid: str, done: dict) -> dict:
    """The whole answer of a request with ``stream`` false."""
    choice = _choice(call, done["text"], done["finish_reason"], True, False, tool_calls(call, done))
    return {**_head(call, rid, False), "choices": [choice], "usage": usage(done)}
