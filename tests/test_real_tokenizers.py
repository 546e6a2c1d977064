"""Checkpoints tokenized like real ones: a Qwen2 checkpoint with a DeepSeek-R1-Distill-style tokenizer
(no BOS, two EOS ids in generation_config.json, added special tokens, byte-level, a chat template)
through export, the quantize CLI, eval, seal, install and the daemon; streamed detokenization with
byte-level and byte-fallback tokenizers."""

from __future__ import annotations

import json

import pytest

from appliance.engine.spec import DecoderSpec
from appliance.serving.chat import ChatTemplate, split_reasoning
from appliance.serving.detokenize import Detokenizer
from appliance.transport.client import Client
from edge_models import reference_tokenizers as R
from tests.conftest import Daemon, provision_device, run_cli

WORDS = ["conveyor", "valve", "reset", "pressure", "sensor", "motor", "belt", "operator", "manual", "alarm"]
DOCS = [f"Document {i}: the {WORDS[i % 10]} of line {i} needs a {WORDS[(i * 3) % 10]} check." for i in range(120)]
TRICKY = "naïve 中文 😀 reset"


@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_streamed_text_is_whole_characters_and_equals_the_full_decode(style):
    tok = R.qwen_style(DOCS, 400) if style == "qwen" else R.llama_style(DOCS, 300)
    end = tok.token_to_id("<|im_end|>" if style == "qwen" else "</s>")
    ids = [*tok.encode(TRICKY, add_special_tokens=False).ids, end]
    assert len(ids) > len(TRICKY.split()) + 6  # the rare characters really are split into byte tokens
    detok = Detokenizer(tok.decode)
    pieces = [detok.step(ids[: n + 1], finished=n == len(ids) - 1) for n in range(len(ids))]
    emitted = [p for p in pieces if p]
    assert "".join(emitted) == tok.decode(ids) == TRICKY  # special end token skipped
    assert not any("\ufffd" in p for p in emitted)
    assert "" in pieces  # some steps ended inside a character and were held back


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    """A tiny random Qwen2 checkpoint as DeepSeek-R1-Distill-Qwen ships one, and its corpus file."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("qwen")
    ckpt = root / "checkpoint"
    tok = R.qwen_style(DOCS, 480)
    im_end, endoftext = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=endoftext,  # Qwen2's config names a BOS its tokenizer never adds
        eos_token_id=im_end,
        pad_token_id=endoftext,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).eval().save_pretrained(ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, endoftext]}))
    R.save(tok, ckpt, R.qwen_config(), R.R1_DISTILL_TEMPLATE)
    corpus = root / "manuals.txt"
    corpus.write_text("\n\n\n".join(DOCS))
    return ckpt, corpus, (im_end, endoftext)


@pytest.fixture(scope="module")
def qwen_build(qwen_checkpoint, tmp_path_factory):
    """``edge-models export`` then ``edge-models quantize --mode q4`` (CLI, as a user runs them)."""
    ckpt, corpus, _ = qwen_checkpoint
    build = tmp_path_factory.mktemp("qwen-build")
    run_cli("edge-models", "export", "--model", str(ckpt), "--out", str(build / "fp32"))
    run_cli(
        "edge-models",
        "quantize",
        "--onnx",
        str(build / "fp32"),
        "--out",
        str(build / "quant"),
        "--mode",
        "q4",
        "--data",
        str(corpus),
        "--seq-len",
        "32",
    )
    (build / "onnx").symlink_to(build / "quant" / "q4")  # provision_device seals <build>/onnx
    return build


def test_export_records_no_bos_and_both_end_ids_and_keeps_the_chat_template(qwen_checkpoint, qwen_build):
    _, _, (im_end, endoftext) = qwen_checkpoint
    for variant in ("fp32", "quant/q4"):
        spec = DecoderSpec.from_json((qwen_build / variant / "decoder.json").read_text())
        assert spec.bos_token_id is None
        assert spec.eos_token_ids == (im_end, endoftext)
        assert "chat_template" in json.loads((qwen_build / variant / "tokenizer_config.json").read_text())
    report = json.loads((qwen_build / "quant" / "quantize-report.json").read_text())
    assert report["q4"]["perplexity"] > 0


def test_an_old_decoder_json_with_one_end_id_still_loads(qwen_build):
    data = json.loads((qwen_build / "fp32" / "decoder.json").read_text())
    del data["eos_token_ids"]
    data["bos_token_id"] = 1
    spec = DecoderSpec.from_json(json.dumps(data))
    assert spec.eos_token_ids == (spec.eos_token_id,) and spec.bos_token_id == 1


def test_eval_scores_the_whole_corpus_it_is_given(qwen_checkpoint, tmp_path):
    ckpt, corpus, _ = qwen_checkpoint
    out = tmp_path / "eval.json"
    run_cli("edge-models", "eval", "--model", str(ckpt), "--data", str(corpus), "--seq-len", "32", "--out", str(out))
    report = json.loads(out.read_text())
    # every token but the last partial window (< 33) is scored; the held-out split would keep ~5%
    assert report["corpus_tokens"] - 33 < report["tokens"] <= report["corpus_tokens"] - 1
    assert report["scored"] == "whole corpus"


@pytest.fixture(scope="module")
def qwen_daemon(qwen_build, tmp_path_factory):
    device = provision_device(qwen_build, tmp_path_factory.mktemp("qwen-site"))
    d = Daemon(device, tmp_path_factory.mktemp("qwen-daemon"))
    d.wait_for("READY=1")
    yield d
    d.stop()


def stream(client: Client, **params) -> tuple[list[dict], dict]:
    events = list(client.generate(**params))
    return events[:-1], events[-1]


def test_messages_render_with_the_sealed_template_and_reasoning_streams_apart(qwen_checkpoint, qwen_daemon):
    ckpt = qwen_checkpoint[0]
    template = ChatTemplate.from_files((ckpt / "tokenizer_config.json").read_text())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I reset it?"}]
    with Client(qwen_daemon.endpoint) as client:
        assert client.info()["chat_template"] is True
        tokens, done = stream(client, messages=messages, max_tokens=12, ignore_eos=True)
        hidden_tokens, hidden = stream(client, messages=messages, max_tokens=12, ignore_eos=True, reasoning="hide")
        inline = client.complete(messages=messages, max_tokens=12, ignore_eos=True, reasoning="inline")
    rendered = template.render(messages)
    assert rendered.endswith("<｜Assistant｜><think>\n")  # the R1 generation prompt opens reasoning
    assert done["usage"]["prompt_tokens"] == len(tok.encode(rendered, add_special_tokens=False).ids)
    # greedy: the same output three ways. Opened by the prompt, all of it is reasoning until </think>.
    assert "".join(t["text"] for t in tokens) == done["text"] == hidden["text"]
    assert "".join(t.get("reasoning", "") for t in tokens) == done["reasoning"]
    assert "reasoning" not in hidden and not any("reasoning" in t for t in hidden_tokens)
    assert split_reasoning(inline["text"], in_reasoning=True) == (done["reasoning"], done["text"])


def test_a_chat_session_continues_with_only_the_new_messages(qwen_checkpoint, qwen_daemon):
    ckpt = qwen_checkpoint[0]
    template = ChatTemplate.from_files((ckpt / "tokenizer_config.json").read_text())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    first = [{"role": "user", "content": "Which valve?"}]
    second = [{"role": "user", "content": "And then?"}]
    with Client(qwen_daemon.endpoint) as client:
        one = client.complete(messages=first, max_tokens=6, ignore_eos=True, session="chat-1", reasoning="inline")
        two = client.complete(messages=second, max_tokens=6, ignore_eos=True, session="chat-1")
        with pytest.raises(Exception, match="continue it with 'messages'"):
            client.complete("raw text", max_tokens=2, session="chat-1")
    history = [*first, {"role": "assistant", "content": one["text"]}]
    added = template.continuation(history, second)
    assert added.startswith("<｜end▁of▁sentence｜><｜User｜>And then?")
    # prefilled this turn: the last reply token (never fed) and what the new messages add, not the history
    fed = two["usage"]["prompt_tokens"] - two["usage"]["cached_tokens"]
    assert fed == 1 + len(tok.encode(added, add_special_tokens=False).ids)


def test_a_raw_prompt_gets_no_bos_when_the_tokenizer_has_none(qwen_checkpoint, qwen_daemon):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(qwen_checkpoint[0] / "tokenizer.json"))
    with Client(qwen_daemon.endpoint) as client:
        done = client.complete("Reset the conveyor", max_tokens=3, ignore_eos=True)
    assert done["usage"]["prompt_tokens"] == len(tok.encode("Reset the conveyor", add_special_tokens=False).ids)
