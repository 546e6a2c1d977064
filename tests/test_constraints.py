"""Constrained generation through the daemon (a real subprocess, ZeroMQ): every constraint kind, batch-mates with and
without constraints in one batch, sampling with a seed, refusals before a slot is taken, deadlines while
constrained, and the audit record. Every constrained output is checked independently of the daemon: JSON against
its schema with ``jsonschema``, regexes with ``re``, and the output replayed through a fresh llguidance matcher (the
daemon may never emit text its constraint forbids, even when ``max_tokens`` cuts the output)."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import llguidance
import numpy as np
import pytest

from appliance.config import load_config
from appliance.loader import load_model
from appliance.serving.constraints import Grammars, Guide, grammar_of
from appliance.transport import protocol as P
from appliance.transport.client import Client, ClientError
from tests.conftest import wait_for_rows
from tests.test_scheduling_daemon import dealer, recv

TICKET = {
    "type": "object",
    "properties": {
        "machine": {"enum": ["press", "conveyor", "robot"]},
        "severity": {"type": "integer", "minimum": 1, "maximum": 5},
        "stopped": {"type": "boolean"},
    },
    "required": ["machine", "severity", "stopped"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[A-Z]{2}"
LARK = 'start: "status: " STATUS\nSTATUS: "ok" | "fault" | "idle"'
CHOICES = ["conveyor", "press", "robot arm", 'say "stop"']
DEEP: dict = {"a": 1}
for _ in range(P.MAX_SCHEMA_DEPTH):
    DEEP = {"items": DEEP}
KINDS = {"json_schema": TICKET, "json": True, "regex": REGEX, "grammar": LARK, "choice": CHOICES}


@pytest.fixture(scope="module")
def model(device):
    return load_model(load_config(device.config))


def run(client: Client, prompt: str = "Report the fault on line 4:", **fields) -> tuple[dict, str]:
    """A streamed generate; the final event and the text streamed before it."""
    streamed, final = "", {}
    for event in client.generate(prompt, **fields):
        if event["type"] == P.T_TOKEN:
            streamed += event["text"]
        final = event
    return final, streamed


def replay(model, kind: str, value, text: str) -> llguidance.LLMatcher:
    """A fresh matcher that has consumed ``text`` (tokenized afresh); fails if any of it was forbidden."""
    ids = model.tokenizer.encode(text, add_special_tokens=False).ids
    constraint = P.parse_request(P.request(P.OP_GENERATE, "x", prompt="p", **{kind: value}), 4096).constraint
    grammars = Grammars(model.tokenizer, model.spec.vocab_size, model.spec.eos_token_ids, None)
    matcher = llguidance.LLMatcher(grammars.ll_tokenizer, grammar_of(constraint), log_level=0)
    for token in ids:
        assert matcher.consume_token(token), f"token {token} broke the {kind} constraint: {matcher.get_error()}"
    return matcher


def check_output(kind: str, text: str) -> None:
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), TICKET)
    elif kind == "json":
        assert isinstance(json.loads(text), dict)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "grammar":
        assert text in ("status: ok", "status: fault", "status: idle"), text
    else:
        assert text in CHOICES, text


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_is_enforced_token_by_token(daemon, device, model, kind):
    with Client(device.endpoint, timeout_s=60) as client:
        final, streamed = run(client, max_tokens=120, **{kind: KINDS[kind]})
    assert final["type"] == P.T_DONE and final["text"] == streamed, final
    matcher = replay(model, kind, KINDS[kind], final["text"])  # all of it allowed, whatever the finish
    if final["finish_reason"] == "length":  # cut by max_tokens: a valid prefix, never a violation
        assert kind == "json" and final["usage"]["completion_tokens"] == 120
        return
    assert final["finish_reason"] in ("grammar", "eos") and matcher.is_accepting()
    check_output(kind, final["text"])


def test_seeded_sampling_is_constrained_and_reproducible(daemon, device):
    fields = {"json_schema": TICKET, "temperature": 1.2, "top_p": 0.95, "seed": 7, "max_tokens": 120}
    with Client(device.endpoint, timeout_s=60) as client:
        texts = [run(client, **fields)[0]["text"] for _ in range(2)]
        others = [run(client, **{**fields, "seed": seed})[0]["text"] for seed in (1, 2, 3)]
    assert texts[0] == texts[1]
    for text in (texts[0], *others):
        jsonschema.validate(json.loads(text), TICKET)


def test_constrained_and_free_rows_share_a_batch_without_harm(daemon, device):
    """Four requests at once (max_batch 4): two constrained, two free; the free ones answer exactly as alone."""
    prompt = "The press stopped because"
    with Client(device.endpoint, timeout_s=60) as client:
        alone = run(client, prompt, max_tokens=24)[0]["text"]
    results: dict[str, dict] = {}

    def one(name: str, fields: dict) -> None:
        with Client(device.endpoint, timeout_s=60) as client:
            results[name] = run(client, prompt, **fields)[0]

    jobs = {
        "schema": {"json_schema": TICKET, "max_tokens": 120},
        "free-1": {"max_tokens": 24},
        "choice": {"choice": CHOICES, "max_tokens": 24},
        "free-2": {"max_tokens": 24},
    }
    threads = [threading.Thread(target=one, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["free-1"]["text"] == results["free-2"]["text"] == alone
    jsonschema.validate(json.loads(results["schema"]["text"]), TICKET)
    assert results["choice"]["text"] in CHOICES


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"regex": "("}, "regex"),
        ({"json_schema": {"type": "frob"}}, "json_schema"),
        ({"grammar": "start: undefined_rule"}, "grammar"),
        ({"json": False}, "json"),
        ({"choice": []}, "choice"),
        ({"regex": "a", "choice": ["a"]}, "at most one"),
        ({"json_scheme": TICKET}, "'json_scheme'"),
        ({"json_schema": DEEP}, "nests deeper"),
        ({"regex": "a" * (P.MAX_CONSTRAINT_CHARS + 1)}, "the limit is"),
    ],
    ids=["regex", "schema", "lark", "json-false", "choice-empty", "two-kinds", "unknown-field", "deep", "huge"],
)
def test_a_constraint_that_cannot_be_used_is_refused_before_a_slot(daemon, device, fields, named):
    with Client(device.endpoint, timeout_s=60) as client:
        with pytest.raises(ClientError) as err:
            run(client, max_tokens=8, **fields)
        assert client.health()["running"] == 0
    assert err.value.code == P.E_BAD_REQUEST and named in err.value.message, err.value.message


def test_a_deadline_ends_a_constrained_request(daemon, device):
    with Client(device.endpoint, timeout_s=60) as client, pytest.raises(ClientError) as err:
        run(client, json=True, max_tokens=256, ignore_eos=True, deadline_ms=1)
    assert err.value.code == P.E_DEADLINE


def test_a_constrained_request_is_cancelled_mid_stream_and_its_slot_serves_the_next(daemon, device):
    sock = dealer(device.endpoint)
    try:
        sock.send(P.request(P.OP_GENERATE, "long", prompt="Report:", regex="[a-z ]{250}", max_tokens=250))
        replies: dict[str, dict] = {}
        sent = False
        while len(replies) < 2:
            reply = recv(sock, 30_000)
            if reply["type"] != P.T_TOKEN:
                replies[reply["id"]] = reply
            elif not sent:  # it is running: cancel it
                sock.send(P.request(P.OP_CANCEL, "stop-it", target="long"))
                sent = True
        assert replies["stop-it"]["result"] == {"cancelled": True, "target": "long"}, replies
        assert replies["long"]["type"] == P.T_ERROR and replies["long"]["code"] == P.E_CANCELLED, replies
    finally:
        sock.close()
    with Client(device.endpoint, timeout_s=60) as client:
        final, _ = run(client, regex=REGEX, max_tokens=40)
    assert final["type"] == P.T_DONE and re.fullmatch(REGEX, final["text"]), final


def test_the_audit_row_records_kind_and_digest(daemon, device):
    with Client(device.endpoint, timeout_s=60) as client:
        final, _ = run(client, request_id="constrained-audit", choice=CHOICES, max_tokens=24)
    digest = P.Constraint("choice", json.dumps(CHOICES, ensure_ascii=False)).digest
    rows = wait_for_rows(device, lambda r: r.request_id == "constrained-audit")
    assert (rows[0].constraint_kind, rows[0].constraint_sha256, rows[0].status) == ("choice", digest, "ok")


def test_info_lists_every_constraint_kind(daemon, device):
    with Client(device.endpoint, timeout_s=60) as client:
        info = client.info()
    assert info["protocol_minor"] == P.MINOR == 5
    assert set(P.CONSTRAINT_KINDS) <= set(info["features"]) and "unknown_fields_refused" in info["features"]


def test_reasoning_budget_forces_the_close_then_the_constraint_applies(model):
    """R1-style: the constraint waits for </think>; max_reasoning_tokens forces it after that many tokens."""
    req = P.parse_request(P.request(P.OP_GENERATE, "r", prompt="p", choice=["yes", "no"], max_reasoning_tokens=2), 4096)
    close = 7  # stands in for the </think> id
    grammars = Grammars(model.tokenizer, model.spec.vocab_size, model.spec.eos_token_ids, close)
    guide = grammars.guide(req, opens_reasoning=True)
    logits = np.zeros(model.spec.vocab_size, np.float32)
    for token in (11, 12):  # two reasoning tokens, unconstrained
        assert np.isfinite(guide.mask(logits)).all() and not guide.advance(token)
    forced = guide.mask(logits)
    assert np.flatnonzero(np.isfinite(forced)).tolist() == [close]
    guide.advance(close)
    allowed = np.flatnonzero(np.isfinite(guide.mask(logits)))
    first = {model.tokenizer.decode([int(t)]) for t in allowed}
    assert first and all("yes".startswith(s) or "no".startswith(s) for s in first)


def test_a_guide_without_a_constraint_exists_only_for_a_reasoning_budget(model):
    grammars = Grammars(model.tokenizer, model.spec.vocab_size, model.spec.eos_token_ids, 7)
    plain = P.parse_request(P.request(P.OP_GENERATE, "r", prompt="p"), 4096)
    budget = P.parse_request(P.request(P.OP_GENERATE, "r", prompt="p", max_reasoning_tokens=3), 4096)
    assert grammars.guide(plain, opens_reasoning=True) is None
    assert isinstance(grammars.guide(budget, opens_reasoning=True), Guide)
    assert grammars.guide(budget, opens_reasoning=False) is None


def test_a_schema_keeps_its_property_order(model):
    """Properties come out in the order the schema lists them (a "reasoning before answer" schema relies on it);
    the canonical form used to sort them."""
    schema = {"type": "object", "properties": {"zeta": {"type": "boolean"}, "alpha": {"type": "boolean"}},
              "required": ["zeta", "alpha"], "additionalProperties": False}  # fmt: skip
    matcher = replay(model, "json_schema", schema, "")
    assert matcher.consume_tokens(model.tokenizer.encode('{"zeta":', add_special_tokens=False).ids)
