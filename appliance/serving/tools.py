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


def _blocks(text: str, opening: str, closing: str):
    """Each ``(start, end, inner)`` of ``opening``…``closing`` in ``text``, by plain search: linear in the text (a
    regex with lazy groups took seconds on a reply of many openers or much whitespace)."""
    at = 0
    while (start := text.find(opening, at)) != -1:
        end = text.find(closing, start + len(opening))
        if end == -1:
            return
        yield start, end + len(closing), text[start + len(opening) : end]
        at = end + len(closing)


def _loads(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _deepseek_call(inner: str) -> tuple[str, str] | None:
    """``function<｜tool▁sep｜>NAME\n```json\nARGS\n```\n`` (the inside of one DeepSeek call) as (name, args)."""
    head, sep, body = inner.partition(DS_SEP)
    if not sep or head.strip() not in ("", "function"):
        return None
    name, _, body = body.partition("\n")
    body = body.strip()
    for fence in ("```json", "```"):
        if body.startswith(fence) and body.endswith("```") and len(body) >= len(fence) + 3:
            return name.strip(), body[len(fence) : -3].strip()
    return None


def parse_calls(text: str, tools: tuple[dict, ...], form: str = HERMES) -> tuple[str, list[dict]]:
    """The reply's text outside call blocks, and the calls: ``{id, name, arguments}`` with ``arguments`` a JSON string
    (OpenAI's shape). A block that is not a JSON object naming one of ``tools`` stays in the text."""
    names = {t["name"] for t in tools}
    calls, kept, at = [], [], 0
    if form == DEEPSEEK:
        for _start, _end, inner in _blocks(text, DS_CALL, DS_CALL_END):
            found = _deepseek_call(inner)
            if found is None or found[0] not in names or not isinstance(_loads(found[1]), dict):
                continue
            calls.append({"id": "call_" + uuid.uuid4().hex[:24], "name": found[0], "arguments": found[1]})
        if not calls:
            return text, []
        section = text.find(DS_CALLS)
        closing = text.find(DS_CALLS_END, max(section, 0))
        tail = "" if closing == -1 else text[closing + len(DS_CALLS_END) :]
        return (text[: max(section, 0)] + tail).strip(), calls
    for start, end, inner in _blocks(text, CALL_OPEN, CALL_CLOSE):
        call = _loads(inner.strip())
        if not isinstance(call, dict) or call.get("name") not in names:
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        kept.append(text[at:start])
        at = end
        calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "name": call["name"],
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
            }
        )
    kept.append(text[at:])
    return ("".join(kept).strip() if calls else text), calls


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
