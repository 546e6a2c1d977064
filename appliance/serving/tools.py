"""Tool calls: tools rendered through the checkpoint's own chat template, the call constrained to the function's JSON
schema, and the reply's tool-call markup parsed back into ``tool_calls``.

The markup is the template's: a template that writes Hermes-style ``<tool_call>{"name": ..., "arguments": ...}
</tool_call>`` blocks (Qwen2.5, Qwen3, Hermes, SmolLM3 and most instruction-tuned checkpoints since) and renders
the ``tools`` variable is supported; any other template is refused with one line (DeepSeek-R1-Distill's renders no
tool definitions, and DeepSeek-V3's markers are special tokens the detokenizer does not return as text). With
``tool_choice`` ``required`` or a named function the output is constrained (llguidance's Lark with ``%json``) to
exactly one call whose arguments are valid against that function's ``parameters``; with ``auto`` the model decides
and any complete call blocks in its output are parsed.
"""

from __future__ import annotations

import json
import re
import uuid

from appliance.transport import protocol as P

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.S)


class ToolError(ValueError):
    """The request's tools cannot be used with this model (one line, the request's ``bad_request``)."""


def tools_supported(source: str) -> bool:
    """Whether a chat template renders ``tools`` and writes ``<tool_call>`` blocks (what ``tools`` needs)."""
    return "tools" in source and CALL_OPEN in source


def check_template(source: str) -> None:
    """Refuse a chat template that cannot carry tools: it must render ``tools`` and write ``<tool_call>`` blocks."""
    if not tools_supported(source):
        raise ToolError(
            "this model's chat template has no tool support (it must render 'tools' and <tool_call> blocks); "
            "send the request without 'tools'"
        )


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


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as templates read them: an assistant's ``tool_calls`` as function objects with parsed arguments."""
    out = []
    for m in messages:
        if "tool_calls" in m:
            calls = [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": _args(c["arguments"])}}
                for c in m["tool_calls"]
            ]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _args(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def call_grammar(tools: tuple[dict, ...], name: str | None) -> str:
    """A Lark grammar (llguidance's dialect) for exactly one call block: of function ``name``, or of any tool."""
    chosen = [t for t in tools if name is None or t["name"] == name]
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["name"]},
                "arguments": t.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    return f'start: "{CALL_OPEN}\\n" call "\\n{CALL_CLOSE}"\ncall: %json {json.dumps(schema)}\n'


def tool_constraint(req: P.Request) -> P.Constraint | None:
    """The constraint that ``tool_choice`` ``required`` or a named function puts on the reply (None for auto/none)."""
    if not req.tools or req.tool_choice not in ("required", "function"):
        return None
    return P.Constraint("grammar", call_grammar(req.tools, req.tool_name))


def parse_calls(text: str, tools: tuple[dict, ...]) -> tuple[str, list[dict]]:
    """The reply's text outside call blocks, and the calls: ``{id, name, arguments}`` with ``arguments`` a JSON string
    (OpenAI's shape). A block that is not a JSON object naming one of ``tools`` stays in the text."""
    names = {t["name"] for t in tools}
    calls, kept, at = [], [], 0
    for match in _BLOCK.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(call, dict) or call.get("name") not in names:
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        kept.append(text[at : match.start()])
        at = match.end()
        calls.append(
            {
                "id": "call_" + uuid.uuid4().hex[:24],
                "name": call["name"],
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
            }
        )
    kept.append(text[at:])
    return ("".join(kept).strip() if calls else text), calls
