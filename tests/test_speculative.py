"""Speculative decoding through the real engine thread (``EngineRunner``) on the tiny demo: the same tokens with and
without speculation — greedy and seeded sampling, batch 1 and ragged batches with requests joining and leaving, a
stop string, an end-of-sequence token and max_tokens reached inside an accepted draft, a conversation continued after
a speculative turn — with the n-gram drafter and with a draft model sealed in the bundle; the sampler keeps the target
distribution; a draft with another tokenizer is refused when sealing and on the device."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from appliance.config import load_config
from appliance.loader import load_model
from appliance.serving.sampling import sample
from appliance.serving.sessions import SessionStore
from appliance.serving.speculative import DraftState, SpeculationConfig, build_speculator
from appliance.transport import protocol as P
from provisioning.bundle import infer_engines, seal
from provisioning.draft import DraftMismatchError
from provisioning.keys import DeviceIdentity, load_ed25519
from tests.conftest import provision_device, run_cli, serve_in_process

# The demo corpus repeats maintenance phrases: the tiny model's answers copy spans of their prompts.
PROMPTS = [
    "Reset the conveyor: stop the conveyor, reset the conveyor, restart the conveyor. Reset the conveyor:",
    "Check the pump pressure. Check the pump pressure. Check the",
    "The valve",
]


def run(model, requests: list[P.Request], mode: str, *, eos=None, max_rows: int = 4, sessions=None, after=None):
    """Serve ``requests`` on a real engine thread with speculation ``mode``; returns {id: done reply}."""
    speculator = build_speculator(SpeculationConfig(mode, draft_tokens=4, max_rows=max_rows), model.draft)
    return serve_in_process(model, requests, eos=eos, speculator=speculator, sessions=sessions, after=after)[0]


def gen(rid: str, prompt: str, max_tokens: int = 40, **kw) -> P.Request:
    return P.Request(op=P.OP_GENERATE, id=rid, prompt=prompt, max_tokens=max_tokens, **kw)


def same(plain: dict, fast: dict) -> None:
    for rid, reply in plain.items():
        assert reply["type"] == "done", reply
        got = fast[rid]
        assert (got["text"], got["finish_reason"], got["usage"]["completion_tokens"]) == (
            reply["text"],
            reply["finish_reason"],
            reply["usage"]["completion_tokens"],
        ), rid


def drafted(replies: dict) -> tuple[int, int]:
    spec = [r["speculative"] for r in replies.values() if "speculative" in r]
    return sum(s["drafted"] for s in spec), sum(s["accepted"] for s in spec)


@pytest.fixture(scope="module")
def model(device):
    return load_model(load_config(device.config))


def test_ngram_greedy_tokens_identical_at_batch_one(model):
    for n, prompt in enumerate(PROMPTS):
        req = [gen(f"r{n}", prompt, 60)]
        plain, fast = run(model, req, "off"), run(model, req, "ngram")
        same(plain, fast)
        assert "speculative" not in plain[f"r{n}"]
    total, accepted = drafted(run(model, [gen(f"r{n}", p, 60) for n, p in enumerate(PROMPTS)], "ngram", max_rows=1))
    assert total == 0  # three rows decode together: more than max_rows, nothing is drafted
    fast = run(model, [gen("copy", PROMPTS[0], 60)], "ngram")
    total, accepted = drafted(fast)
    assert total > 0 and accepted > 0, "the repetitive prompt must be drafted for and accepted"


def test_ragged_batches_with_requests_joining_and_leaving(model):
    reqs = [gen("a", PROMPTS[0], 6), gen("b", PROMPTS[1], 45), gen("c", PROMPTS[2], 30)]
    late = ("a", gen("d", PROMPTS[0] + " stop the conveyor", 25))  # joins when "a" leaves
    plain, fast = run(model, reqs, "off", after=late), run(model, reqs, "ngram", after=late)
    same(plain, fast)
    assert drafted(fast)[1] > 0


def test_stop_eos_and_max_tokens_inside_an_accepted_draft(model):
    base = run(model, [gen("x", PROMPTS[0], 60)], "off")["x"]
    ids = model.tokenizer.encode(base["text"], add_special_tokens=False).ids
    text = base["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 6]
    cases = [
        ([gen("stop", PROMPTS[0], 60, stop=(stop,))], None),
        ([gen("eos", PROMPTS[0], 60)], (ids[len(ids) // 2],)),  # that token ends the sequence in both runs
        ([gen("len", PROMPTS[0], 7)], None),
    ]
    for reqs, eos in cases:
        plain, fast = run(model, reqs, "off", eos=eos), run(model, reqs, "ngram", eos=eos)
        same(plain, fast)
    assert plain["len"]["finish_reason"] == "length"


def test_seeded_sampling_gives_the_same_tokens_with_and_without_speculation(model):
    reqs = [gen(f"s{seed}", PROMPTS[0], 50, ignore_eos=True, sampling=P.Sampling(temperature=0.7, top_k=20, seed=seed))
            for seed in range(3)]  # fmt: skip
    plain, fast = run(model, reqs, "off"), run(model, reqs, "ngram")
    same(plain, fast)
    assert drafted(fast)[0] > 0


def test_a_conversation_continues_exactly_after_a_speculative_turn(model):
    def turns(mode: str) -> list[str]:
        sessions = SessionStore(8 << 20, 60, 8)
        out = []
        for n, prompt in enumerate((PROMPTS[0], " Check the pump pressure. Reset the conveyor:")):
            reply = run(model, [gen(f"t{n}", prompt, 30, session="conv")], mode, sessions=sessions)[f"t{n}"]
            out.append(reply["text"])
        return out

    assert turns("ngram") == turns("off")


TICKET = {
    "type": "object",
    "properties": {
        "machine": {"enum": ["conveyor", "pump", "valve"]},
        "action": {"type": "string", "maxLength": 24},
        "stopped": {"type": "boolean"},
    },
    "required": ["machine", "action", "stopped"],
    "additionalProperties": False,
}


def test_a_constrained_row_drafts_what_its_grammar_forces_and_keeps_its_tokens(model):
    """The keys and punctuation a JSON schema forces are drafted and verified: the same output as decoding them one
    by one (greedy and seeded sampling, batch 1 and beside unconstrained rows), fewer engine steps."""

    def schema(rid: str, **kw) -> P.Request:
        return gen(rid, PROMPTS[0], 80, constraint=P.Constraint("json_schema", json.dumps(TICKET)), **kw)

    reqs = [schema("greedy"), schema("sampled", sampling=P.Sampling(temperature=0.8, seed=7))]
    mixed = [schema("m1"), gen("m2", PROMPTS[1], 40), gen("m3", PROMPTS[0], 30)]
    choice = [gen("pick", "The valve", 20, constraint=P.Constraint("choice", json.dumps(["open valve 3", "close"])))]
    for batch, max_rows in ((reqs[:1], 1), (reqs[1:], 1), (mixed, 4), (choice, 1)):
        plain, fast = run(model, batch, "off", max_rows=max_rows), run(model, batch, "ngram", max_rows=max_rows)
        same(plain, fast)
        assert all("speculative" not in r for r in plain.values())
    assert fast["pick"]["text"] in ("open valve 3", "close")
    for reply in run(model, reqs, "ngram", max_rows=4).values():  # two constrained rows drafting in one step
        assert set(json.loads(reply["text"])) == set(TICKET["properties"]), reply
    fast = run(model, reqs[:1], "ngram", max_rows=1)["greedy"]
    spec = fast["speculative"]
    assert spec["drafter"] == "grammar" and spec["accepted"] > 0 and spec["drafted"] >= spec["accepted"], spec
    assert fast["finish_reason"] == "grammar" and set(json.loads(fast["text"])) == set(TICKET["properties"])


def test_opting_out_per_request(model):
    fast = run(model, [gen("no", PROMPTS[0], 40, speculative=False)], "ngram")
    assert "speculative" not in fast["no"]


CHI2_999 = {1: 10.83, 4: 18.47}  # chi-square critical values at p = 0.001, by degrees of freedom


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def test_sampling_keeps_the_target_distribution():
    """Each position's token is drawn by inverse CDF from one uniform draw: a draft is accepted exactly when it is
    that token, so acceptance happens with probability p(draft) and the output follows p (chi-square)."""
    logits = np.log(np.array([0.4, 0.25, 0.2, 0.1, 0.05]))
    params = P.Sampling(temperature=1.0, seed=1)
    rng = np.random.default_rng(1)
    draws = np.bincount([sample(logits, params, [], rng) for _ in range(20000)], minlength=5)
    assert chi_square(draws, 20000 * np.exp(logits)) < CHI2_999[4]
    # with top-k 2 at temperature 0.5 the distribution is renormalised over the two most likely tokens
    sharp = P.Sampling(temperature=0.5, top_k=2, seed=2)
    draws = np.bincount([sample(logits, sharp, [], rng) for _ in range(20000)], minlength=5)
    p = np.array([0.4, 0.25]) ** 2
    assert draws[2:].sum() == 0 and chi_square(draws[:2], 20000 * p / p.sum()) < CHI2_999[1]


@pytest.fixture(scope="module")
def draft_device(tiny_build, tmp_path_factory):
    """The demo teacher served with the distilled student as its sealed draft."""
    root = tmp_path_factory.mktemp("draft-device")
    dev = provision_device(tiny_build, root, onnx="teacher-onnx", draft="onnx")
    return dev


def test_draft_model_from_the_bundle_keeps_greedy_tokens(draft_device):
    model = load_model(load_config(draft_device.config))
    assert model.draft is not None
    reqs = [gen("a", PROMPTS[0], 40), gen("b", PROMPTS[1], 25)]
    for rows in (1, 4):
        plain = {}
        for r in reqs:  # one at a time: batch 1
            plain |= run(model, [r], "off")
        fast = {}
        for r in reqs:
            fast |= run(model, [r], "draft", max_rows=rows)
        same(plain, fast)
        total, accepted = drafted(fast)
        assert total > 0 and accepted > 0
    both = run(model, reqs, "draft", max_rows=4)  # ragged: two rows verified in one step
    same(plain, both)


def test_a_draft_with_another_tokenizer_is_refused(tiny_build, draft_device, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_build / "onnx", other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab[first + "x"] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(tok))
    proc = run_cli(
        "edge-provision", "seal", "--model", str(tiny_build / "onnx"), "--draft", str(other), "--model-id", "m",
        "--version", "1", "--signing-key", str(tmp_path / "none.key"), "--recipient", str(tmp_path / "none.json"),
        "--out", str(tmp_path / "bundle"), check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "tokenizer differs" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    # a bundle sealed around that check (by other tooling) is refused on the device before the draft is used
    dev = draft_device
    files = {f: tiny_build / "teacher-onnx" / f for f in ("model.onnx", "decoder.json", "tokenizer.json")}
    files |= {f"draft/{f}": other / f for f in ("model.onnx", "decoder.json", "tokenizer.json")}
    signing = load_ed25519("vendor-ed25519.key", dev.vendor)
    recipient = X25519PublicKey.from_public_bytes(DeviceIdentity.load(dev.identity).x25519)
    seal(files, tmp_path / "forged", model_id="tiny", version=9, architecture="DeepseekV3ForCausalLM",
         engines=infer_engines(files), signing_key=signing, recipients=[recipient], chunk_size=1 << 16)  # fmt: skip
    run_cli("edge-provision", "install", str(tmp_path / "forged"), "--state", str(dev.state), "--trust",
            str(dev.trust), "--keys", str(dev.keys))  # fmt: skip
    with pytest.raises(DraftMismatchError, match="tokenizer differs"):
        load_model(load_config(dev.config))
    run_cli("edge-provision", "rollback", "--state", str(dev.state))


def test_the_draft_length_keeps_after_a_partial_accept_and_drafting_pauses_only_after_repeated_misses():
    st = DraftState(k=4)
    st.record(4, 4, k_max=4)
    st.record(4, 2, k_max=4)  # partial: the next draft starts where this one went wrong, same length
    assert (st.k, st.pause) == (4, 0)
    st.record(4, 0, k_max=4)  # one miss (a changed digit in copied text): shorter, no pause
    assert (st.k, st.pause) == (3, 0)
    st.record(3, 0, k_max=4)  # two in a row: drafting pauses a step
    assert (st.k, st.pause) == (2, 1)
    assert not st.tick() and st.tick()
    st.record(2, 0, k_max=4)  # acceptance now 6/17: below 0.4, every miss pauses, doubling
    assert st.pause == 4
    st.record(1, 1, k_max=4)  # a whole draft accepted: the count resets, the length grows
    assert (st.k, st.failures) == (2, 0)

    low = DraftState(k=4)
    low.record(8, 1, k_max=4)  # acceptance 1/8 over 8 drafted tokens: drafts rarely pay, one miss pauses
    low.record(4, 0, k_max=4)
    drafted, accepted = low.own()
    assert low.pause == 1 and accepted < 0.4 * drafted
