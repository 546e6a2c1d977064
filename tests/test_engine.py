"""The ONNX Runtime engine's cache handling: chunked prefill, resident decode batches, save/load.

Each test compares against the simplest possible run of the same graph (one-shot prefill, each
prompt alone), so any bookkeeping error in padding, offsets or arenas shows up as different tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from appliance.engine import DecoderSpec
from appliance.engine.ort_engine import OrtEngine
from edge_models.parity import engine_greedy


@pytest.fixture(scope="module")
def graph(traced_teacher):
    onnx = traced_teacher
    return (onnx / "model.onnx").read_bytes(), DecoderSpec.from_json((onnx / "decoder.json").read_text())


def make(graph, slots: int = 4, **kw) -> OrtEngine:
    model, spec = graph
    return OrtEngine(model, spec, num_slots=slots, max_seq_len=256, **kw)


def greedy_from(engine, slot: int, logits: np.ndarray, n: int) -> list[int]:
    out = [int(np.argmax(logits[0]))]
    for _ in range(n - 1):
        out.append(int(np.argmax(engine.decode([(slot, out[-1])])[0])))
    return out


PROMPT = [1] + list(range(40, 77))


def test_chunked_prefill_equals_one_shot(graph):
    one = make(graph)
    whole = one.prefill([(0, PROMPT)])
    chunked = make(graph)
    for start in range(0, len(PROMPT), 8):
        last = chunked.prefill([(0, PROMPT[start : start + 8])])
    assert chunked.length(0) == len(PROMPT)
    np.testing.assert_allclose(last, whole, rtol=1e-4, atol=1e-4)
    assert greedy_from(chunked, 0, last, 12) == greedy_from(one, 0, whole, 12)


def test_rows_of_different_past_and_chunk_lengths_prefill_together(graph):
    """One call appends a 5-token chunk to a 30-token past and a 9-token prompt to an empty slot."""
    alone_a, alone_b = make(graph), make(graph)
    alone_a.prefill([(0, PROMPT[:30])])
    ref_a = alone_a.prefill([(0, PROMPT[30:35])])
    ref_b = alone_b.prefill([(0, PROMPT[:9])])
    both = make(graph)
    both.prefill([(0, PROMPT[:30])])
    logits = both.prefill([(0, PROMPT[30:35]), (1, PROMPT[:9])])
    np.testing.assert_allclose(logits[0], ref_a[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[1], ref_b[0], rtol=1e-4, atol=1e-4)


def test_steady_decode_copies_nothing_and_joins_match_running_alone(graph):
    model, spec = graph
    prompts = [[1, 40, 41, 42, 43, 44], [1, 300, 301], [1, 7, 8, 9, 10, 11, 12, 13]]
    alone = [engine_greedy(make(graph), [p], 16, spec.eos_token_id)[0] for p in prompts]
    eng = make(graph)
    outs: dict[int, list[int]] = {}

    def join(slot):
        logits = eng.prefill([(slot, prompts[slot])])
        lg = logits[0].copy()
        lg[spec.eos_token_id] = -np.inf
        outs[slot] = [int(np.argmax(lg))]

    join(0)
    for step in range(15 + 8):
        if step == 4:
            join(1)
        if step == 8:
            join(2)
        active = [s for s in outs if len(outs[s]) < 16]
        if not active:
            break
        before = eng.stats.copied_bytes
        logits = eng.decode([(s, outs[s][-1]) for s in active])
        for row, s in enumerate(active):
            lg = logits[row].copy()
            lg[spec.eos_token_id] = -np.inf
            outs[s].append(int(np.argmax(lg)))
        if step in (2, 3):  # a steady batch: the previous step's output is read in place
            assert eng.stats.copied_bytes == before
    assert [outs[s] for s in range(3)] == alone
    assert eng.stats.resident_steps > eng.stats.regathers > 0


def test_a_finished_row_leaving_does_not_disturb_the_others(graph):
    model, spec = graph
    eng = make(graph)
    a, b = [1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55]
    ref_b = engine_greedy(make(graph), [b], 12, spec.eos_token_id)[0]
    la = eng.prefill([(0, a), (1, b)])
    toks = [int(np.argmax(la[0])), int(np.argmax(la[1]))]
    out_b = [toks[1]]
    logits = eng.decode([(0, toks[0]), (1, toks[1])])
    eng.release(0)  # row 0 leaves; row 1 goes on alone
    out_b.append(int(np.argmax(logits[1])))
    for _ in range(10):
        out_b.append(int(np.argmax(eng.decode([(1, out_b[-1])])[0])))
    if spec.eos_token_id not in out_b:  # engine_greedy suppresses EOS, this loop does not
        assert out_b == ref_b


def test_save_and_load_continue_exactly(graph):
    eng = make(graph)
    logits = eng.prefill([(0, PROMPT[:20])])
    first = greedy_from(eng, 0, logits, 6)
    saved = eng.save(0)
    eng.release(0)
    eng.load(2, saved)
    assert eng.length(2) == 20 + 5
    cont = eng.prefill([(2, [first[-1]])])
    ref = make(graph)
    ref_logits = ref.prefill([(0, PROMPT[:20] + first)])
    np.testing.assert_allclose(cont, ref_logits, rtol=1e-4, atol=1e-4)


def test_residency_off_gives_the_same_tokens(graph):
    model, spec = graph
    prompts = [[1, 40, 41, 42, 43, 44], [1, 300, 301]]
    on = engine_greedy(make(graph), prompts, 12, spec.eos_token_id)
    off_engine = make(graph, keep_resident=False)
    assert engine_greedy(off_engine, prompts, 12, spec.eos_token_id) == on
    assert off_engine.stats.resident_steps == 0 and off_engine.stats.regathers == 11
