"""The engine side of speculative decoding, on every engine and family: ``verify`` returns the logits plain decoding
would at each appended position, and ``rewind`` leaves the cache as if the rejected tokens were never written.

Each engine decodes greedily twice: plainly, and speculatively with drafts built from the plain output with some
tokens deliberately wrong (so every step mixes acceptance and rejection), for two requests with different draft
lengths in one ragged verify step, one joining late and one leaving early. The tokens must be identical and the
cache each slot ends with must equal the plain run's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from appliance.engine import DecoderSpec, create_engine
from appliance.engine.base import EngineError
from appliance.serving.speculative import NgramIndex
from tests.test_fused_deepseek import CONFIGS as DEEPSEEK_CONFIGS
from tests.test_fused_graph import CONFIGS as FUSED_CONFIGS
from tests.test_fused_graph import build_family

PROMPTS = [[1, 50, 60, 70, 80, 90, 100, 110], [1, 300, 301, 302]]
NEW = 14


def plain(eng, slot: int, prompt: list[int], n: int) -> list[int]:
    out = [int(np.argmax(eng.prefill([(slot, prompt)])[0]))]
    while len(out) < n:
        out.append(int(np.argmax(eng.decode([(slot, out[-1])])[0])))
    return out


def draft_for(reference: list[int], have: int, k: int, step: int, vocab: int) -> list[int]:
    """The next ``k`` reference tokens, one of them wrong on most steps (where depends on the step)."""
    draft = list(reference[have : have + k])
    if draft and step % 3:
        at = (step * 7) % len(draft)
        draft[at] = (draft[at] + 1) % vocab
    return draft


def speculative(eng, reference: list[list[int]], joins: dict[int, int], limits: dict[int, int]) -> dict[int, list]:
    """Greedy decoding of PROMPTS[i] in slot i with drafts of 1..4 tokens checked by ``verify``; request i joins at
    step ``joins[i]`` and stops (its slot kept, for the cache comparison) after ``limits[i]`` tokens."""
    vocab = eng.spec.vocab_size
    outs: dict[int, list[int]] = {}
    for step in range(60):
        for i, at in joins.items():
            if at == step:
                outs[i] = [int(np.argmax(eng.prefill([(i, PROMPTS[i])])[0]))]
        active = [i for i in outs if len(outs[i]) < limits[i]]
        if not active and len(outs) == len(joins):
            return outs
        rows = []
        for i in active:
            k = min(1 + (step + i) % 4, limits[i] - len(outs[i]) - 1)
            rows.append((i, draft_for(reference[i], len(outs[i]), k, step, vocab) if k > 0 else []))
        if not rows:
            continue
        base = [eng.length(i) for i, _ in rows]
        logits = eng.verify([(i, [outs[i][-1], *draft]) for i, draft in rows])
        for (i, draft), at, row in zip(rows, base, logits, strict=True):
            assert row.shape == (len(draft) + 1, vocab)
            used = 0
            for j in range(len(draft) + 1):
                token = int(np.argmax(row[j]))
                outs[i].append(token)
                used = j + 1
                if j == len(draft) or token != draft[j] or len(outs[i]) == limits[i]:
                    break
            eng.rewind(i, at + used)
    raise AssertionError("did not finish")


def check(make):
    """``make(slots)`` builds a fresh engine of the kind under test."""
    solo = make(1)
    reference = []
    for p in PROMPTS:
        reference.append(plain(solo, 0, p, NEW))
        solo.release(0)
    eng = make(2)
    outs = speculative(eng, reference, joins={0: 0, 1: 2}, limits={0: 9, 1: NEW})
    assert outs[0] == reference[0][:9] and outs[1] == reference[1]
    # the cache each slot holds: the prompt and every output token but the last (not yet fed), as plain decoding
    for i, n in ((0, 9), (1, NEW)):
        assert eng.length(i) == len(PROMPTS[i]) + n - 1
        fresh = make(1)
        fresh.prefill([(0, PROMPTS[i] + reference[i][: n - 1])])
        for got, want in zip(eng.save(i), fresh.save(0), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    # and the next step after a rewind reads only what was kept
    eng.rewind(1, len(PROMPTS[1]) + 3)
    expect = solo.prefill([(0, PROMPTS[1] + reference[1][:4])])
    got = eng.decode([(1, reference[1][3])])
    np.testing.assert_allclose(got[0], expect[0], rtol=1e-3, atol=1e-3)


def fused_maker(graph_dir):
    spec = DecoderSpec.from_json((graph_dir / "decoder.json").read_text())
    model = (graph_dir / "model.onnx").read_bytes()
    return lambda slots: create_engine("onnxruntime", model, spec, num_slots=slots, max_seq_len=128)


FUSED = {**{f"fused-{k}": v for k, v in FUSED_CONFIGS.items()}, "fused-deepseek-v3": DEEPSEEK_CONFIGS["v3"]}


@pytest.mark.parametrize("family", sorted(FUSED))
def test_fused_static_cache_verify_and_rewind_keep_greedy_tokens_exact(family, tmp_path):
    _, graph_dir = build_family(FUSED[family](), tmp_path)
    check(fused_maker(graph_dir))


def test_traced_padded_cache_verify_and_rewind_keep_greedy_tokens_exact(traced_teacher):
    check(fused_maker(traced_teacher))


@pytest.mark.parametrize("family", ["qwen2", "deepseek_v3"])
def test_torch_engine_verify_and_rewind_keep_greedy_tokens_exact(family, tmp_path):
    from appliance.engine.torch_engine import TorchEngine
    from edge_models.export import decoder_spec
    from tests.test_torch_engine import FAMILIES

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    model.save_pretrained(tmp_path)
    weights, config = (tmp_path / "model.safetensors").read_bytes(), (tmp_path / "config.json").read_bytes()
    spec = decoder_spec(model)
    check(lambda slots: TorchEngine(weights, config, spec, num_slots=slots, max_seq_len=128))


def test_rewind_may_only_drop_tokens(tmp_path):
    _, graph_dir = build_family(FUSED_CONFIGS["qwen2"](), tmp_path)
    eng = fused_maker(graph_dir)(1)
    eng.prefill([(0, [1, 2, 3])])
    for bad in (0, 4):
        with pytest.raises(EngineError, match="rewind"):
            eng.rewind(0, bad)
    eng.rewind(0, 2)
    assert eng.length(0) == 2


def test_ngram_index_proposes_what_followed_the_latest_match():
    index = NgramIndex(2, 4)
    tokens = [5, 6, 7, 8, 9, 1, 5, 6, 7]
    assert index.propose(tokens, 3) == [8, 9, 1]  # [5, 6, 7] occurred before, followed by 8 9 1
    tokens += [8, 2, 5, 6]
    assert index.propose(tokens, 2) == [7, 8]  # the latest [5, 6] is followed by 7 8
    assert index.propose([1, 2, 3], 4) == []
