"""A sealed chat template that misbehaves on some conversations costs that request a ``bad_request`` and nothing
else: a data-dependent ``1/0``, a recursive macro, a loop of 10^10 iterations and an output flood, rendered by a
real daemon, while ``health`` keeps answering and the next ordinary chat is served."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from appliance.client import Client, ClientError
from appliance.serving.chat import RENDER_BUDGET_S, ChatError, ChatTemplate

from .conftest import Daemon, provision_device

HOSTILE = (
    "{% set c = messages[-1]['content'] %}"
    "{% if c == 'zero' %}{{ 1 / 0 }}{% endif %}"
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{% if c == 'recurse' %}{{ f(0) }}{% endif %}"
    "{% if c == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
    "{% if c == 'flood' %}{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>"
)
ATTACKS = {
    "zero": "ZeroDivisionError",
    "recurse": "recursed without end",
    "loop": "ran longer than",
    "flood": "more than 1,048,576 characters",
}


@pytest.mark.parametrize("content", sorted(ATTACKS))
def test_each_failure_is_a_chat_error_naming_it(content):
    started = time.monotonic()
    with pytest.raises(ChatError, match=ATTACKS[content]):
        ChatTemplate(HOSTILE, {}).render([{"role": "user", "content": content}])
    assert time.monotonic() - started < RENDER_BUDGET_S + 0.5


def test_a_hostile_template_costs_one_request_not_the_daemon(tiny_build, tmp_path):
    root = tmp_path / "build"
    shutil.copytree(tiny_build / "onnx-chat", root / "onnx-chat")
    cfg_path = root / "onnx-chat" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = HOSTILE
    cfg_path.write_text(json.dumps(cfg))
    (root / "onnx-chat" / "chat_template.jinja").unlink(missing_ok=True)
    device = provision_device(root, tmp_path / "site", onnx="onnx-chat")
    daemon = Daemon(device, tmp_path / "daemon")
    try:
        daemon.wait_for("READY=1")
        with Client(device.endpoint, timeout_s=30) as client:
            for content, reason in ATTACKS.items():
                started = time.monotonic()
                with pytest.raises(ClientError) as err:
                    client.complete(messages=[{"role": "user", "content": content}], max_tokens=4)
                assert err.value.code == "bad_request" and reason in str(err.value), (content, err.value)
                assert time.monotonic() - started < 5
                assert client.health()["status"] in ("ok", "degraded")
            done = client.complete(messages=[{"role": "user", "content": "hello"}], max_tokens=4)
            assert done["type"] == "done"
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
