"""Chat templates render exactly as transformers renders them; reasoning splits from the answer as it streams."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from appliance.serving.chat import ChatError, ChatTemplate, ReasoningSplitter, opens_reasoning, split_reasoning
from edge_models import reference_tokenizers as R

TEXTS = [
    "Return the conveyor to its home position before a reset.",
    "Raise ValueError if the pressure is out of range; naïve operators may not know.",
    "The socket module provides access to the BSD socket interface.",
] * 20

CONVERSATIONS = [
    [{"role": "user", "content": "How do I reset the conveyor?"}],
    [
        {"role": "system", "content": "You are the line's maintenance assistant. Answer in one sentence."},
        {"role": "user", "content": "Which valve is V-12?"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello! How can I help?"},
        {"role": "user", "content": "  Reset the line, please. 中文 😀  "},
    ],
]


def checkpoint(tmp_path, style: str):
    """A tokenizer directory as a real checkpoint ships it, and transformers' tokenizer loaded from it."""
    from transformers import AutoTokenizer

    if style == "r1":
        tok, config, template = R.qwen_style(TEXTS, 400), R.qwen_config(), R.R1_DISTILL_TEMPLATE
        config = {**config, "bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
    else:
        tok, config, template = R.llama_style(TEXTS, 300), R.llama_config(), R.LLAMA2_TEMPLATE
    R.save(tok, tmp_path, config, template)
    return ChatTemplate.from_files((tmp_path / "tokenizer_config.json").read_text()), AutoTokenizer.from_pretrained(
        tmp_path, local_files_only=True
    )


@pytest.mark.parametrize("style", ["r1", "llama"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_rendering_is_byte_identical_to_transformers(tmp_path, style, conversation, generation_prompt):
    ours, theirs = checkpoint(tmp_path, style)
    messages = CONVERSATIONS[conversation]
    expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.render(messages, add_generation_prompt=generation_prompt) == expected


def test_template_errors_and_sandbox_escapes_are_chat_errors(tmp_path):
    llama, _ = checkpoint(tmp_path, "llama")
    with pytest.raises(ChatError, match="roles must alternate"):
        llama.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", {})
    with pytest.raises(ChatError):
        escape.render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatError, match="does not compile"):
        ChatTemplate("{% for %}", {}).render([{"role": "user", "content": "x"}])


def test_template_file_wins_over_tokenizer_config_and_none_without_either():
    config = json.dumps({"chat_template": "config", "bos_token": {"content": "<s>", "special": True}})
    assert ChatTemplate.from_files(config, b"{{ bos_token }}file").render([]) == "<s>file"
    named = json.dumps({"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]})
    assert ChatTemplate.from_files(named).source == "d"
    assert ChatTemplate.from_files(json.dumps({"bos_token": "<s>"})) is None
    assert ChatTemplate.from_files(None) is None


def test_a_later_turn_adds_exactly_what_the_full_conversation_renders_after_the_reply(tmp_path):
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
        {"bos_token": "<s>"},
    )
    first = [{"role": "user", "content": "Hi"}]
    reply = "Hello there"
    history = [*first, {"role": "assistant", "content": reply}]
    new = [{"role": "user", "content": "Reset it"}]
    cached = template.render(first) + reply  # what the KV cache holds after turn 1
    assert cached + template.continuation(history, new) == template.render(history + new)


def test_continuation_refuses_templates_that_rewrite_earlier_turns():
    # a template that numbers turns from the end renders turn 1 differently once turn 2 exists
    template = ChatTemplate("{% for m in messages %}{{ loop.revindex }}{{ m.content }}{% endfor %}", {})
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ChatError, match="without a session"):
        template.continuation(history, [{"role": "user", "content": "c"}])


R1_OUTPUT = "<think>\nThe valve is V-12.\n</think>\n\nOpen V-12, then press reset."


def chunkings(text: str):
    yield [text]
    yield list(text)  # one character at a time: every tag arrives split
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        yield [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]


@pytest.mark.parametrize("chunks", list(chunkings(R1_OUTPUT)))
def test_reasoning_is_split_the_same_however_the_tags_arrive(chunks):
    splitter = ReasoningSplitter()
    pieces = [splitter.feed(c) for c in chunks] + [splitter.flush()]
    reasoning = "".join(r for r, _ in pieces)
    answer = "".join(a for _, a in pieces)
    assert (reasoning, answer) == ("\nThe valve is V-12.\n", "Open V-12, then press reset.")
    assert not any("<" in r or "<" in a for r, a in pieces)  # no fragment of a tag ever leaks


def test_reply_that_starts_inside_reasoning_when_the_prompt_opened_it():
    r1 = ChatTemplate(R.R1_DISTILL_TEMPLATE, {"bos_token": "<｜begin▁of▁sentence｜>"})
    assert opens_reasoning(r1.render([{"role": "user", "content": "hi"}]))
    assert not opens_reasoning(r1.render([{"role": "user", "content": "hi"}], add_generation_prompt=False))
    assert split_reasoning("thinking...</think>\n\nAnswer.", in_reasoning=True) == ("thinking...", "Answer.")


def test_output_without_reasoning_is_all_answer_and_a_late_think_tag_is_text():
    assert split_reasoning("Press reset.") == ("", "Press reset.")
    assert split_reasoning("Use <think> tags like this.") == ("", "Use <think> tags like this.")
    assert split_reasoning("  <thi") == ("", "  <thi")  # ended before it could be a tag
    assert split_reasoning("<think>cut off by max_tokens") == ("cut off by max_tokens", "")
