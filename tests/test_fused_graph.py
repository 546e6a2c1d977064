"""Fused Qwen2/Llama graphs on the static in-place cache: token-exact parity with transformers,
slots joining and leaving, sessions, and a q4 graph served from a sealed bundle.

The checkpoints are written as safetensors and the graphs built from those files tensor by tensor,
the path `edge-models export` takes for real checkpoints.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from appliance.engine import DecoderSpec, create_engine
from appliance.engine.static_cache import StaticCacheEngine
from edge_models.fused_graph import Weights, build_fused_decoder
from edge_models.parity import engine_greedy, hf_greedy

SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=1024,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS = {
    "qwen2": lambda: Qwen2Config(**SHAPE, architectures=["Qwen2ForCausalLM"]),
    "llama": lambda: LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"]),
}


def build_family(config, root):
    """(transformers model, fp32 fused graph dir) for ``config``: random weights saved as safetensors,
    reloaded, and the fused graph built from those files."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    model = AutoModelForCausalLM.from_pretrained(root / "hf", local_files_only=True).eval()
    config = AutoConfig.from_pretrained(root / "hf", local_files_only=True)
    build_fused_decoder(config, Weights.from_safetensors(root / "hf"), root / "onnx")
    return model, root / "onnx"


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
    """(transformers model, fp32 fused graph dir) for one family, built from its safetensors."""
    return build_family(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


def engine(graph_dir, slots: int = 4) -> StaticCacheEngine:
    spec = DecoderSpec.from_json((graph_dir / "decoder.json").read_text())
    eng = create_engine("onnxruntime", (graph_dir / "model.onnx").read_bytes(), spec, num_slots=slots, max_seq_len=128)
    assert isinstance(eng, StaticCacheEngine)
    return eng


PROMPTS = [[1, 50, 60, 70, 80, 90, 100, 110], [1, 300, 301], [1, 7, 8, 9, 10, 11]]


def test_graph_uses_fused_operators(family):
    _, graph_dir = family
    ops = [n.op_type for n in onnx.load(str(graph_dir / "model.onnx")).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops and "Concat" not in ops
    assert ops.count("SkipSimplifiedLayerNormalization") == 4 and ops.count("MatMul") == 2 * 4 + 1


def test_batch_of_one_matches_transformers(family):
    model, graph_dir = family
    prompts = [PROMPTS[0]]
    assert engine_greedy(engine(graph_dir), prompts, 20, 2) == hf_greedy(model, prompts, 20, 2)


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 2, 0)], ids=["longest-first", "longest-last"])
def test_ragged_batch_matches_transformers(family, order):
    model, graph_dir = family
    prompts = [PROMPTS[i] for i in order]
    assert engine_greedy(engine(graph_dir), prompts, 16, 2) == hf_greedy(model, prompts, 16, 2)


def greedy_from(eng, slot: int, logits: np.ndarray, n: int) -> list[int]:
    out = [int(np.argmax(logits[0]))]
    for _ in range(n - 1):
        out.append(int(np.argmax(eng.decode([(slot, out[-1])])[0])))
    return out


def test_chunked_prefill_equals_one_shot(family):
    _, graph_dir = family
    prompt = [1] + list(range(40, 77))
    one, chunked = engine(graph_dir), engine(graph_dir)
    whole = one.prefill([(0, prompt)])
    for start in range(0, len(prompt), 8):
        last = chunked.prefill([(0, prompt[start : start + 8])])
    np.testing.assert_allclose(last, whole, rtol=1e-4, atol=1e-4)
    assert greedy_from(chunked, 0, last, 12) == greedy_from(one, 0, whole, 12)


def test_requests_joining_and_leaving_mid_decode_match_running_alone(family):
    """Slots 0, 3 and 1 join at different steps, slot 0 leaves early: every stream equals its solo
    run, and no step copies cache bytes on the host (nothing is gathered when the batch changes)."""
    _, graph_dir = family
    alone = [engine_greedy(engine(graph_dir, 1), [p], 14, 2)[0] for p in PROMPTS]
    eng = engine(graph_dir)
    slot_of = {0: 0, 1: 3, 2: 1}
    joins, limits = {0: 0, 1: 3, 2: 6}, {0: 8, 1: 14, 2: 14}
    outs: dict[int, list[int]] = {}

    def pick(row: np.ndarray) -> int:
        row = row.copy()
        row[2] = -np.inf
        return int(np.argmax(row))

    for step in range(30):
        for req, at in joins.items():
            if at == step:
                outs[req] = [pick(eng.prefill([(slot_of[req], PROMPTS[req])])[0])]
        active = [r for r in outs if len(outs[r]) < limits[r]]
        for r in outs:
            if len(outs[r]) == limits[r] and eng.length(slot_of[r]):
                eng.release(slot_of[r])
        if not active:
            break
        logits = eng.decode([(slot_of[r], outs[r][-1]) for r in active])
        for row, r in enumerate(active):
            outs[r].append(pick(logits[row]))
    assert outs[0] == alone[0][:8] and outs[1] == alone[1] and outs[2] == alone[2]
    assert eng.stats.copied_bytes == 0 and eng.stats.decode_steps > 0


def test_session_save_and_load_continue_exactly(family):
    _, graph_dir = family
    prompt = [1] + list(range(40, 60))
    eng = engine(graph_dir)
    first = greedy_from(eng, 0, eng.prefill([(0, prompt)]), 6)
    saved = eng.save(0)
    eng.release(0)
    eng.prefill([(0, [1, 5, 6, 7])])  # the row is reused by someone else meanwhile
    eng.load(2, saved)
    assert eng.length(2) == len(prompt) + 5
    cont = eng.prefill([(2, [first[-1]])])
    ref = engine(graph_dir).prefill([(0, prompt + first)])
    np.testing.assert_allclose(cont, ref, rtol=1e-4, atol=1e-4)


def test_q8_graph_matches_transformers_and_q4_stays_close(family, tmp_path):
    """Every projection, the LM head and the embedding table quantized. Random tiny models have near-tie
    logits (top-2 margins down to 0.004), so q8 is held to a logit error bound, not to exact greedy tokens."""
    model, graph_dir = family
    weights = Weights.from_module(model)
    for mode in ("q8", "q4"):
        build_fused_decoder(model.config, weights, tmp_path / mode, quant=mode)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q4" / "model.onnx")).graph.node]
    assert "MatMulNBits" in ops and "MatMul" not in ops  # the LM head too
    assert "GatherBlockQuantized" in ops and "Gather" not in ops  # the embedding table too
    tokens = PROMPTS[0] + hf_greedy(model, [PROMPTS[0]], 12, 2)[0]
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    q8 = engine(tmp_path / "q8").score(tokens)
    err = np.abs(q8 - ref).max()
    assert err < 0.1 * ref.std(), (err, ref.std())
    top2 = np.sort(ref, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * err  # a token whose lead exceeds twice the error cannot flip
    assert clear.sum() >= len(tokens) // 2 and (q8.argmax(-1) == ref.argmax(-1))[clear].all()
    q4 = engine(tmp_path / "q4").prefill([(0, PROMPTS[0])])
    fp32 = engine(graph_dir).prefill([(0, PROMPTS[0])])
    assert np.corrcoef(q4[0], fp32[0])[0, 1] > 0.95


def test_embedding_bytes_per_weight_at_each_head_width(family, tmp_path):
    """q4 graphs keep the embedding (and LM head) at 8 bits by default: a byte per weight and a fp32 scale per
    block of 32 (symmetric); ``head_bits=4`` stores half a byte, the scale and a 4-bit zero point."""
    model, _ = family
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    blocks = vocab * hidden // 32
    for head_bits, expected in (
        (8, vocab * hidden + blocks * 4),
        (4, vocab * hidden // 2 + blocks * 4 + blocks // 2),
    ):
        out = tmp_path / str(head_bits)
        build_fused_decoder(model.config, Weights.from_module(model), out, quant="q4", head_bits=head_bits)
        init = {t.name: t for t in onnx.load(str(out / "model.onnx")).graph.initializer}
        parts = ("qweight", "scales", "zero_points")
        stored = sum(len(init[f"embed_tokens.{p}"].raw_data) for p in parts if f"embed_tokens.{p}" in init)
        assert stored == expected, (head_bits, stored, expected)


def test_tied_table_is_stored_once(tmp_path):
    """A tied embedding / LM head is one initializer in fp32 (read by Gather and by Gemm transB) and one packed
    table in quantized graphs (read by GatherBlockQuantized and MatMulNBits)."""
    config = LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"], tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    vocab, hidden = config.vocab_size, config.hidden_size
    for quant in (None, "q4", "q8"):
        out = tmp_path / str(quant)
        build_fused_decoder(config, Weights.from_module(model), out, quant=quant)
        tables = [
            t.name
            for t in onnx.load(str(out / "model.onnx")).graph.initializer
            if sorted(t.dims) == sorted([vocab, hidden]) or list(t.dims) == [vocab, hidden // 32, 32]
        ]
        assert len(tables) == 1, (quant, tables)
    tokens = [1, 50, 60, 70, 80]
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    assert np.abs(engine(tmp_path / "None").score(tokens) - ref).max() < 1e-4


def test_external_data_graph_loads_from_memory_and_matches(family, tmp_path):
    model, _ = family
    spec = build_fused_decoder(model.config, Weights.from_module(model), tmp_path, external_data=True)
    weights = bytearray((tmp_path / "model.onnx.data").read_bytes())
    (tmp_path / "model.onnx.data").unlink()
    eng = create_engine(
        "onnxruntime",
        (tmp_path / "model.onnx").read_bytes(),
        spec,
        num_slots=1,
        max_seq_len=64,
        external={"model.onnx.data": weights},
    )
    prompts = [PROMPTS[1]]
    assert engine_greedy(eng, prompts, 10, 2) == hf_greedy(model, prompts, 10, 2)


@pytest.mark.parametrize("quant", [None, "q4"])
def test_borrowed_weights_built_in_pieces_serve_as_one_session(family, tmp_path, quant):
    """External weights borrowed in place (``WeightBuffer``) and the graph built as 1 or 3 sessions
    (``appliance.engine.pipeline``): both release the same prepacked weights, and answer as a session that copied
    the weights (nothing it still reads was released): the same greedy tokens over a ragged batch, the same logits
    over a prompt long enough to route through every expert."""
    from appliance.engine.pipeline import PipelineSession
    from appliance.engine.weights import WeightBuffer

    model, _ = family
    spec = build_fused_decoder(model.config, Weights.from_module(model), tmp_path, quant=quant, external_data=True)
    graph, data = (tmp_path / "model.onnx").read_bytes(), (tmp_path / "model.onnx.data").read_bytes()

    def load(pieces: int):
        weights = WeightBuffer(len(data))
        weights.view()[:] = data
        return create_engine(
            "onnxruntime", graph, spec, num_slots=3, max_seq_len=64,
            external={"model.onnx.data": weights}, load_pieces=pieces,
        )  # fmt: skip

    one, three = load(1), load(3)
    copied = create_engine(
        "onnxruntime", graph, spec, num_slots=3, max_seq_len=64, external={"model.onnx.data": bytearray(data)}
    )
    assert not isinstance(one.session, PipelineSession)
    assert isinstance(three.session, PipelineSession) and len(three.session.sessions) == 3
    assert one.released_bytes == three.released_bytes > 0
    expected = engine_greedy(copied, PROMPTS, 8, 2)
    assert engine_greedy(one, PROMPTS, 8, 2) == expected == engine_greedy(three, PROMPTS, 8, 2)
    long = [int(t) for t in np.random.default_rng(1).integers(3, 1000, 48)]
    for eng in (one, three):
        np.testing.assert_allclose(eng.score(long), copied.score(long), rtol=1e-5, atol=1e-5)


def test_quantized_fused_graphs_report_perplexity_drift(family, tmp_path):
    from edge_models.quantize import onnx_perplexity

    model, graph_dir = family
    windows = np.random.default_rng(0).integers(3, 1024, (4, 33))
    base = onnx_perplexity(graph_dir, windows)
    for mode, bound in (("q8", 0.01), ("q4", 0.1)):
        build_fused_decoder(model.config, Weights.from_module(model), tmp_path / mode, quant=mode)
        drift = onnx_perplexity(tmp_path / mode, windows) / base - 1
        assert abs(drift) < bound, (mode, drift)


def test_q4_fused_graph_serves_from_a_sealed_bundle(tiny_build, tmp_path):
    """`edge-models export --quantize q4` on a safetensors checkpoint, sealed, installed, loaded by the
    appliance's loader (decrypted in memory): the same greedy tokens as the graph run directly."""
    import shutil

    from appliance.config import load_config
    from appliance.loader import load_model
    from tests.conftest import provision_device, run_cli

    torch.manual_seed(0)
    hf = tmp_path / "hf"
    AutoModelForCausalLM.from_config(CONFIGS["qwen2"]()).save_pretrained(hf)
    build = tmp_path / "build"
    run_cli("edge-models", "export", "--model", str(hf), "--out", str(build / "onnx"), "--quantize", "q4")
    shutil.copy(tiny_build / "onnx" / "tokenizer.json", build / "onnx" / "tokenizer.json")
    device = provision_device(build, tmp_path / "site")
    loaded = load_model(load_config(device.config))
    assert isinstance(loaded.engine, StaticCacheEngine) and loaded.spec.cache == "static"
    prompts = [PROMPTS[0], PROMPTS[1]]
    assert engine_greedy(loaded.engine, prompts, 10, 2) == engine_greedy(engine(build / "onnx"), prompts, 10, 2)
