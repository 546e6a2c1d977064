"""Tool calls: tools rendered through the checkpoint's own chat template, the call constrained to the function's JSON
schema, and the reply's tool-call markup parsed back into ``tool_calls``.

The markup is the template's. Two families are supported, told apart by the template's source:
- **Hermes** (Qwen2.5, Qwen3, Hermes, most tool-tuned checkpoints): the template renders the ``tools`` variable and
  calls are ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks; arguments reach it as objects.
- **DeepSeek** (R1 and its distills, V3): calls are ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>
  NAME\n```json\nARGS\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>`` (the markers are added, non-special tokens, so
  they survive detokenization); arguments reach the template as JSON strings and an assistant turn that only calls
  has ``content`` none, as its template expects. A template that renders no tool definitions (R1-Distill's) gets
  them from the daemon, appended to the system prompt in the block ``deepseek_tools_block`` writes (the wording of
  DeepSeek-V3.1's own template).
Any other template is refused with one line. With ``tool_choice`` ``required`` or a named function the output is
constrained (llguidance's Lark with ``%json``) to exactly one call whose arguments are valid against that function's
``parameters``; with ``auto`` the model decides and complete calls in its output are parsed.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from appliance.transport import protocol as P

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
DS_CALLS, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
HERMES, DEEPSEEK = "hermes", "deepseek"


class ToolError(ValueError):
    """The request's tools cannot be used with this model (one line, the request's ``bad_request``)."""


@functools.lru_cache(maxsize=8)  # a property of the loaded model's template: decided once, not per request
def tool_format(source: str) -> str | None:
    """``HERMES``, ``DEEPSEEK`` or None (the template cannot carry tool calls)."""
    if DS_CALLS in source:
        return DEEPSEEK
    if CALL_OPEN in source and renders_tools(source):
        return HERMES
    return None


@functools.lru_cache(maxsize=8)
def renders_tools(source: str) -> bool:
    return re.search(r"\btools\b", source) is not None


def tools_supported(source: str) -> bool:
    return tool_format(source) is not None


def check_template(source: str) -> str:
    """The template's tool format; ``ToolError`` for a template that cannot carry tool calls."""
    form = tool_format(source)
    if form is None:
        raise ToolError(
            "this model's chat template has no tool support (it writes neither <tool_call> blocks with a 'tools' "
            "variable nor DeepSeek's tool-call markers); send the request without 'tools'"
        )
    return form


def template_tools(tools: tuple[dict, ...]) -> list[dict]:
    """The ``tools`` variable chat templates expect (transformers' convention: OpenAI's function objects)."""
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                **({"description": t["description"]} if "description" in t else {}),
                "parameters": t.get("parameters", {"type": "object", "properties": {}}),
            },
        }
        for t in tools
    ]


def template_messages(messages: list[dict], form: str = HERMES) -> list[dict]:
    """Messages as templates read them: an assistant's ``tool_calls`` as function objects, arguments parsed (Hermes)
    or as the JSON string (DeepSeek, whose template also wants ``content`` none on a turn that only calls)."""
    out = []
    for m in messages:
        if "tool_calls" in m:
            calls = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {
                        "name": c["name"],
                        "arguments": c["arguments"] if form == DEEPSEEK else _args(c["arguments"]),
                    },
                }
                for c in m["tool_calls"]
            ]
            m = {**m, "tool_calls": calls}
            if form == DEEPSEEK and not m["content"]:
                m["content"] = None
        out.append(m)
    return out


def deepseek_tools_block(tools: tuple[dict, ...]) -> str:
    """Tool definitions for a DeepSeek template that renders none (R1-Distill's), in DeepSeek-V3.1's wording."""
    parts = ["## Tools\nYou have access to the following tools:\n"]
    for t in tools:
        parts.append(f"\n### {t['name']}\nDescription: {t.get('description', '')}\n\n")
        parts.append(f"Parameters: {json.dumps(t.get('parameters', {}), ensure_ascii=False)}\n")
    parts.append(
        "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n"
        f"{DS_CALLS}{DS_CALL}function{DS_SEP}tool_call_name\n```json\ntool_call_arguments\n```{DS_CALL_END}"
        f"{DS_CALLS_END}\n\nWhere:\n- `tool_call_name` must be an exact match to one of the available tools\n"
        "- `tool_call_arguments` must be valid JSON strictly following the tool's Parameters specification\n"
    )
    return "".join(parts)


def with_tools_block(messages: list[dict], tools: tuple[dict, ...]) -> list[dict]:
    """``messages`` with the tool definitions appended to the system message (one is added if there is none)."""
    block = deepseek_tools_block(tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def _args(text: str):
    parsed = _loads(text)
    return text if parsed is None else parsed


def call_grammar(
    tools: tuple[dict, ...], name: str | None, form: str = HERMES, token_id: Callable[[str], int | None] | None = None
) -> str:
    """A Lark grammar (llguidance's dialect) for exactly one call block: of function ``name``, or of any tool. A marker
    the tokenizer holds as one token (``token_id``) is written as that token (``<[id]>``): llguidance treats added
    tokens as special, so their text would not match them."""

    def lit(text: str) -> str:
        found = token_id(text) if token_id is not None else None
        return f"<[{found}]>" if found is not None else json.dumps(text, ensure_ascii=False)

    chosen = [t for t in tools if name is None or t["name"] == name]
    rules, heads = [], []
    for n, t in enumerate(chosen):
        schema = {**(t.get("parameters") or {"type": "object"}), "x-guidance": {"whitespace_flexible": False}}
        heads.append(f"c{n}")
        if form == DEEPSEEK:
            rules.append(f"c{n}: {json.dumps(t['name'] + chr(10) + '```json' + chr(10), ensure_ascii=False)} a{n}")
        else:
            head = "{" + json.dumps("name") + ":" + json.dumps(t["name"]) + "," + json.dumps("arguments") + ":"
            rules.append(f'c{n}: {json.dumps(head)} a{n} "}}"')
        rules.append(f"a{n}: %json {json.dumps(schema)}")
    if form == DEEPSEEK:
        opening = f'{lit(DS_CALLS)} {lit(DS_CALL)} "function" {lit(DS_SEP)}'
        closing = f'"\\n```" {lit(DS_CALL_END)} {lit(DS_CALLS_END)}'
    else:
        opening, closing = f'{lit(CALL_OPEN)} "\\n"', f'"\\n" {lit(CALL_CLOSE)}'
    return f"start: {opening} call {closing}\ncall: {' | '.join(heads)}\n" + "\n".join(rules) + "\n"


def tool_constraint(
    req: P.Request, form: str = HERMES, token_id: Callable[[str], int | None] | None = None
) -> P.Constraint | None:
    """The constraint that ``tool_choice`` ``required`` or a named function puts on the reply (None for auto/none)."""
    if not req.tools or req.tool_choice not in ("required", "function"):
        return None
    grammar = call_grammar(req.tools, req.tool_name, form, token_id)
    return P.Constraint("grammar", grammar, field="'tools' (a function's parameters)")


def _loads(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _hermes_call(inner: str) -> tuple[str, str] | None:
    """A complete ``<tool_call>`` block's inside as (name, arguments as a JSON string); None: not a call."""
    call = _loads(inner.strip())
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    return call["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _deepseek_call(inner: str) -> tuple[str, str] | None:
    """``function<｜tool▁sep｜>NAME\n```json\nARGS\n```\n`` (the inside of one DeepSeek call) as (name, args), the
    arguments a JSON object."""
    head, sep, body = inner.partition(DS_SEP)
    if not sep or head.strip() not in ("", "function"):
        return None
    name, _, body = body.partition("\n")
    body = body.strip()
    for fence in ("```json", "```"):
        if body.startswith(fence) and body.endswith("```") and len(body) >= len(fence) + 3:
            args = body[len(fence) : -3].strip()
            return (name.strip(), args) if isinstance(_loads(args), dict) else None
    return None


@dataclass(frozen=True)
class _Markup:
    """How a template family writes calls: a section opens (``section``), holds one call (Hermes) or several each
    opened by ``call`` (DeepSeek), each call ends with ``call_end``, the section with ``section_end``. ``head``
    matches a call's start up to its arguments (group 1 the name); ``whole`` parses a complete call's inside."""

    section: str
    call: str | None
    call_end: str
    section_end: str | None
    head: re.Pattern
    whole: Callable[[str], tuple[str, str] | None]


_MARKUP = {
    HERMES: _Markup(
        CALL_OPEN, None, CALL_CLOSE, None,
        re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*'), _hermes_call,
    ),
    DEEPSEEK: _Markup(
        DS_CALLS, DS_CALL, DS_CALL_END, DS_CALLS_END,
        re.compile(r"\s*(?:function)?" + re.escape(DS_SEP) + r"([A-Za-z0-9_-]{1,64})[ \t]*\n```(?:json)?[ \t]*\n?\s*"),
        _deepseek_call,
    ),
}  # fmt: skip
HEAD_WINDOW = 512  # a call whose arguments have not begun within this many characters is parsed whole at its end


def _partial(text: str, *markers: str) -> int:
    """The length of the longest end of ``text`` that begins one of ``markers`` (it may complete with more text)."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return best


class ToolStream:
    """A reply that may call tools, parsed as it is generated: text outside the call markup streams as it comes
    (the start of a marker held back until it is known), and each call as OpenAI streams one — its ``id`` and
    ``name`` once the name is written, then its ``arguments`` piece by piece, ended by the JSON value closing. A
    call whose head is not in the usual form (``name`` before ``arguments``, the arguments an object) is parsed
    whole at its end. What is not a call (an unknown function, a block that is not JSON) is given back as text:
    a Hermes block at its end, a DeepSeek section that held no call at the section's end. Linear in the reply."""

    def __init__(self, tools: tuple[dict, ...], form: str = HERMES):
        self._names = {t["name"] for t in tools}
        self._m = _MARKUP[form]
        self._state = "text"  # text | section | call | args | tail
        self._buf = ""  # received, not yet consumed
        self._raw = ""  # the open section's markup so far: text again if it holds no call
        self._section_calls = 0
        self._looked = 0  # of _buf: searched for the call's end already (no re-scan of a long undecided call)
        self._depth, self._in_string, self._escaped = 0, False, False  # the arguments' JSON, while streaming
        self.content = ""
        self.calls: list[dict] = []  # {id, name, arguments}
        self.ended = False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """Add generated ``text``; returns the content it releases and the call deltas ``[{index, id?, name?,
        arguments}]`` (``id`` and ``name`` on a call's first delta). ``final``: the reply is complete."""
        self._buf += text
        out: list[str] = []
        deltas: list[dict] = []
        while getattr(self, "_" + self._state)(out, deltas, final):
            pass
        if final:
            self.ended = True
        released = "".join(out)
        self.content += released
        return released, _merged(deltas)

    def result(self) -> tuple[str, list[dict]]:
        """The reply outside call markup (trimmed when it called something) and its calls."""
        return (self.content.strip() if self.calls else self.content), self.calls

    # -- states: each consumes what it can of _buf; True to run the next state on the rest ----------------------
    def _text(self, out: list[str], deltas: list[dict], final: bool) -> bool:
        at = self._buf.find(self._m.section)
        if at == -1:
            keep = 0 if final else _partial(self._buf, self._m.section)
            out.append(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return False
        out.append(self._buf[:at])
        self._raw, self._section_calls = self._m.section, 0
        self._buf = self._buf[at + len(self._m.section) :]
        self._enter("section" if self._m.call else "call")
        return True

    def _section(self, out: list[str], deltas: list[dict], final: bool) -> bool:
        m = self._m
        opens, ends = self._buf.find(m.call), self._buf.find(m.section_end)
        if opens != -1 and (ends == -1 or opens < ends):
            self._raw += self._buf[: opens + len(m.call)]
            self._buf = self._buf[opens + len(m.call) :]
            self._enter("call")
            return True
        if ends != -1:
            self._raw += self._buf[: ends + len(m.section_end)]
            self._buf = self._buf[ends + len(m.section_end) :]
            self._close_section(out)
            return True
        keep = 0 if final else _partial(self._buf, m.call, m.section_end)
        self._raw += self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(self._buf) - keep :]
        if final:
            self._close_section(out)
        return False

    def _call(self, out: list[str], deltas: list[dict], final: bool) -> bool:
        m, buf = self._m, self._buf
        if len(buf) <= HEAD_WINDOW:
            head = m.head.match(buf)
            if head is not None and head.end() < len(buf) and buf[head.end()] == "{" and head[1] in self._names:
                self._raw += buf[: head.end()]
                self._buf = buf[head.end() :]
                self._start(head[1], "", deltas)
                self._depth, self._in_string, self._escaped = 0, False, False
                self._state = "args"
                return True
        ends = buf.find(m.call_end, max(0, self._looked - len(m.call_end)))
        if ends == -1:
            self._looked = len(buf)
            if final:
                self._raw += buf
                self._buf = ""
                self._close_section(out)
            return False
        found = m.whole(buf[:ends])
        self._raw += buf[: ends + len(m.call_end)]
        self._buf = buf[ends + len(m.call_end) :]
        if found is not None and found[0] in self._names:
            self._start(*found, deltas)
        self._after_call(out)
        return True

    def _args(self, out: list[str], deltas: list[dict], final: bool) -> bool:
        buf, n = self._buf, 0
        depth, in_string, escaped = self._depth, self._in_string, self._escaped
        done = False
        for n, ch in enumerate(buf, 1):  # noqa: B007 - n is used after the loop
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    done = True
                    break
            elif ch == "<":  # never outside a string in JSON: malformed arguments, the call's markup follows
                n -= 1
                done = True
                break
        self._depth, self._in_string, self._escaped = depth, in_string, escaped
        piece = buf[:n]
        if piece:
            self.calls[-1]["arguments"] += piece
            deltas.append({"index": len(self.calls) - 1, "arguments": piece})
        self._buf = buf[n:]
        if done:
            self._enter("tail")
        return done

    def _tail(self, out: list[str], deltas: list[dict], final: bool) -> bool:
        ends = self._buf.find(self._m.call_end)
        if ends == -1:
            self._buf = self._buf[-(len(self._m.call_end) - 1) :]  # what is between the arguments and the end goes
            return False
        self._buf = self._buf[ends + len(self._m.call_end) :]
        self._after_call(out)
        return True

    # -- transitions -------------------------------------------------------------------------------------------
    def _enter(self, state: str) -> None:
        self._state, self._looked = state, 0

    def _start(self, name: str, arguments: str, deltas: list[dict]) -> None:
        call = {"id": "call_" + uuid.uuid4().hex[:24], "name": name, "arguments": arguments}
        deltas.append({"index": len(self.calls), "id": call["id"], "name": name, "arguments": arguments})
        self.calls.append(call)
        self._section_calls += 1

    def _after_call(self, out: list[str]) -> None:
        if self._m.call is None:  # a Hermes block is its own section
            self._close_section(out)
        else:
            self._enter("section")

    def _close_section(self, out: list[str]) -> None:
        if not self._section_calls:
            out.append(self._raw)  # no call in it: it was text
        self._raw = ""
        self._enter("text")


def _merged(deltas: list[dict]) -> list[dict]:
    """Consecutive deltas of one call as one (a call's head and its first argument piece in the same reply)."""
    out: list[dict] = []
    for d in deltas:
        if out and out[-1]["index"] == d["index"]:
            out[-1] = {**out[-1], "arguments": out[-1]["arguments"] + d["arguments"]}
        else:
            out.append(d)
    return out


def parse_calls(text: str, tools: tuple[dict, ...], form: str = HERMES) -> tuple[str, list[dict]]:
    """The reply's text outside call markup, and the calls: ``{id, name, arguments}`` with ``arguments`` a JSON
    string (OpenAI's shape). Markup that is not a call naming one of ``tools`` stays in the text."""
    stream = ToolStream(tools, form)
    stream.feed(text, final=True)
    return stream.result()


def markup_in(req: P.Request, markup: tuple[str, ...]) -> str | None:
    """Where the request carries chat-template markup outside message contents (those are masked): tool
    definitions and tool calls reach the template as JSON, which does not escape it. None when nowhere."""
    places = [("tools", json.dumps(req.tools or (), ensure_ascii=False))]
    for n, m in enumerate(req.messages or ()):
        for c in m.get("tool_calls", ()):
            rendered = json.dumps(_loads(c["arguments"]), ensure_ascii=False)
            places.append((f"messages[{n}].tool_calls", c["arguments"] + rendered + c["id"]))
        places.append((f"messages[{n}].tool_call_id", m.get("tool_call_id", "")))
    for where, text in places:
        if any(mark in text for mark in markup):
            return where
    return None
