"""Chat: ``messages`` rendered with the checkpoint's own chat template, and R1-style reasoning split
from the answer as it streams.

The template is untrusted code shipped with the checkpoint, so it runs in Jinja2's immutable
sandbox, set up exactly as transformers' ``apply_chat_template`` sets it up (same options, globals
and filters), so the daemon feeds the model the very text it was trained on. Pure: no model, no I/O.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The special-token variables transformers passes to every template (its ``special_tokens_map``).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_REPLY_MARK = "\x00edge-appliance reply\x00"  # stands for a generated reply while locating its template frame


# A template runs on the serving loop: bounded in time and output so a bad one costs one request, never the daemon.
RENDER_BUDGET_S = 0.25
RENDER_MAX_CHARS = 1 << 20


class ChatError(ValueError):
    """The conversation cannot be rendered (the template refused it, or it cannot be continued)."""


class _OverBudget(Exception):
    pass


class _Generation(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` (assistant-mask markers in newer templates) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _TemplateDict:
    """``dict`` for templates without attribute access to the type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace`` refusing underscore-prefixed attributes (no route to CPython internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which changes the text the model sees.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace
    )
    return env


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    tokens: dict[str, str]  # bos_token, eos_token, ... as the template sees them

    @classmethod
    def from_files(cls, tokenizer_config: str | bytes | None, jinja: str | bytes | None = None) -> ChatTemplate | None:
        """The template of a checkpoint: ``chat_template.jinja`` when present, else tokenizer_config.json's
        ``chat_template`` (a string, or a list of named templates of which ``default`` is used); None
        when it has none."""
        config = json.loads(tokenizer_config) if tokenizer_config else {}
        source = jinja.decode("utf-8") if isinstance(jinja, bytes) else jinja
        if source is None:
            source = config.get("chat_template")
            if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
                source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            return None
        tokens = {name: _token_text(config[name]) for name in TEMPLATE_TOKENS if config.get(name) is not None}
        return cls(source, tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The conversation as the model reads it (what ``apply_chat_template(tokenize=False)`` returns)."""
        template = _compiled(self.source)
        variables = dict(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **self.tokens
        )
        return bounded_render(template, variables)

    def continuation(self, history: list[dict], new: list[dict], tools: list[dict] | None = None) -> str:
        """The text a later turn adds to a conversation whose last message, the model's reply, is
        already in the KV cache: the template's close of that reply, then ``new`` with the prompt
        for the next reply. ``history`` ends with that reply (``role: assistant``)."""
        closed = self.render([*history[:-1], {"role": "assistant", "content": _REPLY_MARK}], False, tools)
        extended = self.render([*history[:-1], {"role": "assistant", "content": _REPLY_MARK}, *new], True, tools)
        if _REPLY_MARK not in closed or not extended.startswith(closed):
            raise ChatError(
                "this model's chat template renders earlier turns differently once a turn is added; "
                "send the whole conversation in 'messages' without a session"
            )
        return closed[closed.index(_REPLY_MARK) + len(_REPLY_MARK) :] + extended[len(closed) :]


def bounded_render(template: jinja2.Template, variables: dict) -> str:
    """``template.render(**variables)`` within ``RENDER_BUDGET_S`` of this thread's time and ``RENDER_MAX_CHARS``
    of output. Any failure of the template — a refusal, a data-dependent ``1/0``, runaway recursion, a loop past
    the budget, an output flood — is a ``ChatError`` naming it: that request's ``bad_request``, nothing more.

    The budget is enforced by a trace function on this thread while the compiled template runs (every line of
    the template's code checks the clock), the output cap by consuming the template's stream chunk by chunk."""
    deadline = time.monotonic() + RENDER_BUDGET_S

    def tracer(frame, event, arg):
        if time.monotonic() > deadline:
            raise _OverBudget
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        out, size = [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > RENDER_MAX_CHARS:
                raise ChatError(f"the model's chat template produced more than {RENDER_MAX_CHARS:,} characters")
            out.append(chunk)
        return "".join(out)
    except ChatError:
        raise
    except _OverBudget:
        raise ChatError(f"the model's chat template ran longer than {RENDER_BUDGET_S * 1000:.0f} ms") from None
    except jinja2.exceptions.TemplateError as exc:
        raise ChatError(f"the model's chat template refused the conversation: {exc}") from None
    except RecursionError:
        raise ChatError("the model's chat template recursed without end") from None
    except Exception as exc:  # noqa: BLE001 - vendor template code: any failure is this request's, not the daemon's
        raise ChatError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from None
    finally:
        sys.settrace(previous)


_CACHE: dict[str, jinja2.Template] = {}


def _compiled(source: str) -> jinja2.Template:
    if source not in _CACHE:
        try:
            _CACHE[source] = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatError(f"the model's chat template does not compile: {exc}") from None
    return _CACHE[source]


def opens_reasoning(prompt: str) -> bool:
    """R1 templates end the generation prompt with ``<think>``: the reply starts inside reasoning."""
    return prompt.rstrip().endswith(THINK_OPEN)


class ReasoningSplitter:
    """Splits streamed model output into reasoning (inside ``<think>…</think>``) and answer.

    Works on text deltas as they stream: a tag split across tokens (``</th`` + ``ink>``) is held back
    until it is complete or proven not to be a tag. Reasoning only opens at the start of the output
    (or is already open when the prompt ended with ``<think>``); a ``<think>`` later in an answer is
    answer text. The whitespace between ``</think>`` and the answer is dropped.
    """

    def __init__(self, in_reasoning: bool = False):
        self._state = "reasoning" if in_reasoning else "start"
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        """Add ``text``; returns the (reasoning, answer) text that is now certain."""
        self._pending += text
        reasoning, answer = "", ""
        while True:
            if self._state == "start":
                head = self._pending.lstrip()
                if head.startswith(THINK_OPEN):
                    self._state, self._pending = "reasoning", head[len(THINK_OPEN) :]
                    continue
                if THINK_OPEN.startswith(head):  # empty, or a part of the tag: wait
                    return reasoning, answer
                self._state = "answer"
            if self._state == "reasoning":
                at = self._pending.find(THINK_CLOSE)
                if at < 0:
                    keep = _partial_suffix(self._pending, THINK_CLOSE)
                    cut = len(self._pending) - keep
                    reasoning += self._pending[:cut]
                    self._pending = self._pending[cut:]
                    return reasoning, answer
                reasoning += self._pending[:at]
                self._state, self._pending = "after", self._pending[at + len(THINK_CLOSE) :]
            if self._state == "after":
                self._pending = self._pending.lstrip()
                if not self._pending:
                    return reasoning, answer
                self._state = "answer"
            answer += self._pending
            self._pending = ""
            return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """The output ended: whatever was held back is final (an unclosed reasoning stays reasoning)."""
        pending, self._pending = self._pending, ""
        if self._state == "reasoning":
            return pending, ""
        return "", pending if self._state in ("start", "answer") else ""


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole output, exactly as streaming it through a splitter gives."""
    splitter = ReasoningSplitter(in_reasoning)
    r1, a1 = splitter.feed(text)
    r2, a2 = splitter.flush()
    return r1 + r2, a1 + a2


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``tag``."""
    return max((k for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)


# -- message content is text, never markup ----------------------------------------------------------------------------
_MASK = "\ue000"  # a private-use character no tokenizer treats as markup
# The template strips reasoning from earlier replies by these texts: left as they are in assistant messages.
_REASONING_TAGS = ("<think>", "</think>")


def markup_texts(tokenizer) -> tuple[str, ...]:
    """The texts a tokenizer turns into added tokens wherever they appear: special ones (``<|im_end|>``) and
    not (DeepSeek-V3/R1 ship ``<｜User｜>`` and ``<｜Assistant｜>`` as added, *non-special* tokens, so
    transformers' ``split_special_tokens`` does not cover them)."""
    return tuple(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.content)


def mask_contents(messages: list[dict], markup: tuple[str, ...]) -> list[dict] | None:
    """``messages`` with every markup text inside a content replaced by as many ``_MASK`` characters, or None
    when no content holds one (the common case: nothing to protect)."""
    masked, found = [], False
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            kept = _REASONING_TAGS if message.get("role") == "assistant" else ()
            texts = [t for t in markup if t in content and t not in kept]
            if texts:
                for t in sorted(texts, key=len, reverse=True):
                    content = content.replace(t, _MASK * len(t))
                message, found = {**message, "content": content}, True
        masked.append(message)
    return masked if found else None


class LiteralContent:
    """Tokenizes a rendered conversation the way ``apply_chat_template`` does, except that markup texts which
    come from message *content* stay text: a user who writes ``<｜Assistant｜>`` cannot open a turn.

    Protected positions are found by rendering the conversation a second time with those texts masked (same
    length); the template's own markup is everything else. Outside protected spans the ids are exactly the
    tokenizer's; a template that moves or drops masked text is refused (fail closed)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.markup = markup_texts(tokenizer)
        self.markup_ids = set(tokenizer.get_added_tokens_decoder())
        self._plain = None

    def plain(self):
        """The tokenizer without its added tokens: reads every markup text as text (built on first use)."""
        if self._plain is None:
            from tokenizers import Tokenizer

            spec = json.loads(self.tokenizer.to_str())
            spec["added_tokens"] = []
            self._plain = Tokenizer.from_str(json.dumps(spec))
        return self._plain

    def encode(self, text: str, masked_text: str | None) -> list[int]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        if masked_text is None:
            return encoding.ids
        if len(masked_text) != len(text) or any(a != b and b != _MASK for a, b in zip(text, masked_text, strict=True)):
            raise ChatError(
                "a message contains a control token of this model that its chat template rewrites; remove it "
                "from the content"
            )
        protected = [a != b for a, b in zip(text, masked_text, strict=True)]
        ids: list[int] = []
        start = 0
        for token, (begin, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token in self.markup_ids and not any(protected[begin:end]):
                if begin > start:
                    ids += self.plain().encode(text[start:begin], add_special_tokens=False).ids
                ids.append(token)
                start = end
        if start < len(text):
            ids += self.plain().encode(text[start:], add_special_tokens=False).ids
        return ids
