"""Fused DeepSeek-V2/V3 graphs (absorbed MLA, one latent+rotary cache buffer per layer) on the static
cache: the same behaviours test_fused_graph.py specifies for Qwen2/Llama, run here on DeepSeek
checkpoints (V3 and V2, with and without q_lora, half-split and interleaved rotary pairs), plus what
is particular to MLA: the cache holds kv_lora + rope floats per token and layer, once.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

from appliance.engine import DecoderSpec
from edge_models.fused_graph import Weights, build_fused_decoder
from edge_models.parity import engine_greedy, hf_greedy
from tests.test_fused_graph import (  # noqa: F401 - the shared specifications, run on this module's `family`
    PROMPTS,
    build_family,
    engine,
    test_batch_of_one_matches_transformers,
    test_borrowed_weights_built_in_pieces_serve_as_one_session,
    test_chunked_prefill_equals_one_shot,
    test_external_data_graph_loads_from_memory_and_matches,
    test_quantized_fused_graphs_report_perplexity_drift,
    test_ragged_batch_matches_transformers,
    test_requests_joining_and_leaving_mid_decode_match_running_alone,
    test_session_save_and_load_continue_exactly,
)

SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=128,
    vocab_size=1024,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
    tie_word_embeddings=False,
)
CONFIGS = {
    "v3": lambda: DeepseekV3Config(
        **SHAPE, q_lora_rank=24, rope_interleave=False, architectures=["DeepseekV3ForCausalLM"]
    ),
    "v3-no-q-lora-interleaved": lambda: DeepseekV3Config(
        **SHAPE, q_lora_rank=None, rope_interleave=True, architectures=["DeepseekV3ForCausalLM"]
    ),
    "v2": lambda: DeepseekV2Config(
        **SHAPE, q_lora_rank=24, topk_method="group_limited_greedy", architectures=["DeepseekV2ForCausalLM"]
    ),
    "v2-no-q-lora": lambda: DeepseekV2Config(
        **SHAPE, q_lora_rank=None, topk_method="greedy", architectures=["DeepseekV2ForCausalLM"]
    ),
}
LATENT = SHAPE["kv_lora_rank"] + SHAPE["qk_rope_head_dim"]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory):
    """(transformers model, fp32 fused graph dir) for one DeepSeek variant, built from its safetensors."""
    return build_family(CONFIGS[request.param](), tmp_path_factory.mktemp(request.param))


def test_graph_is_one_multi_query_attention_per_layer_on_the_latent(family):
    _, graph_dir = family
    graph = onnx.load(str(graph_dir / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("RotaryEmbedding") == 4
    assert ops.count("MoE") == 1 and "Transpose" not in ops
    for node in graph.node:
        if node.op_type == "GroupQueryAttention":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["kv_num_heads"] == 1 and attrs["num_heads"] == 4 and attrs["do_rotary"] == 0
            assert node.input[1] == node.input[2]  # the value is the key
    spec = DecoderSpec.from_json((graph_dir / "decoder.json").read_text())
    assert spec.key_shape == spec.value_shape == (1, LATENT) and spec.value_is_key


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_logits_at_every_position_match_transformers(variant, tmp_path):
    """Weights 10x wider than transformers' default: attention sharp enough that a wrong rotary pairing
    or softmax scale moves the logits far past the tolerance."""
    torch.manual_seed(0)
    config = CONFIGS[variant]()
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config).eval()
    build_fused_decoder(config, Weights.from_module(model), tmp_path)
    tokens = list(range(1, 80))
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    np.testing.assert_allclose(engine(tmp_path).score(tokens), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_cache_is_one_latent_buffer_per_layer_and_a_session_saves_it_once(family):
    _, graph_dir = family
    eng = engine(graph_dir, slots=2)
    assert all(eng.cache[2 * i] is eng.cache[2 * i + 1] for i in range(2))
    assert eng.cache_bytes() == 2 * 2 * (eng.max_seq_len + 1) * LATENT * 4  # layers x slots x positions x floats
    eng.prefill([(1, PROMPTS[0])])
    saved = eng.save(1)
    assert [a.shape for a in saved] == [(1, 1, len(PROMPTS[0]), LATENT)] * 2
    assert eng.stats.copied_bytes == 2 * len(PROMPTS[0]) * LATENT * 4


def test_q8_and_q4_graphs_stay_close(family, tmp_path):
    """Every projection, the experts and the LM head in 4/8 bits; only the routers stay fp32 (a rounding
    error there would change which experts run). Greedy tokens are not compared here: a near-tie in an
    expert top-k can flip under any rounding (the perplexity drift test bounds the effect)."""
    model, graph_dir = family
    weights = Weights.from_module(model)
    for mode in ("q8", "q4"):
        build_fused_decoder(model.config, weights, tmp_path / mode, quant=mode)
    nodes = onnx.load(str(tmp_path / "q4" / "model.onnx")).graph.node
    ops = [n.op_type for n in nodes]
    assert ops.count("QMoE") == 1 and "MoE" not in ops
    assert [n.input[1] for n in nodes if n.op_type == "MatMul"] == ["layer1.moe.router"]
    fp32 = engine(graph_dir).prefill([(0, PROMPTS[0])])[0]
    for mode, bound in (("q8", 0.999), ("q4", 0.95)):
        logits = engine(tmp_path / mode).prefill([(0, PROMPTS[0])])[0]
        assert np.corrcoef(logits, fp32)[0, 1] > bound, mode


@pytest.mark.parametrize("variant", ["v2-no-q-lora", "v3"])
def test_q8_latent_attention_matches_transformers_token_for_token(variant, tmp_path):
    """Dense layers only (no expert top-k to flip): the absorbed, 8-bit MLA path keeps greedy parity."""
    torch.manual_seed(0)
    config = CONFIGS[variant]()
    config.first_k_dense_replace = config.num_hidden_layers
    model = AutoModelForCausalLM.from_config(config).eval()
    build_fused_decoder(config, Weights.from_module(model), tmp_path, quant="q8")
    prompts = [PROMPTS[0], PROMPTS[1]]
    assert engine_greedy(engine(tmp_path), prompts, 12, 2) == hf_greedy(model, prompts, 12, 2)


@pytest.mark.parametrize("quant", [None, "q4"])
def test_graph_does_not_grow_with_the_number_of_experts(quant, tmp_path):
    counts = set()
    for experts in (4, 16):
        torch.manual_seed(0)
        config = CONFIGS["v3"]()
        config.n_routed_experts = experts
        model = AutoModelForCausalLM.from_config(config).eval()
        build_fused_decoder(config, Weights.from_module(model), tmp_path / str(experts), quant=quant)
        counts.add(len(onnx.load(str(tmp_path / str(experts) / "model.onnx"), load_external_data=False).graph.node))
    assert len(counts) == 1


def test_q4_deepseek_graph_serves_through_the_daemon_from_a_sealed_bundle(tiny_build, tmp_path):
    """`edge-models export --quantize q4` on a DeepSeek safetensors checkpoint, sealed, installed and served
    by `edge-appliance serve` over ZeroMQ: the same text as the graph run in this process."""
    import shutil

    from appliance.transport.client import Client
    from tests.conftest import Daemon, provision_device, run_cli
    from tests.test_daemon_e2e import in_process_greedy

    torch.manual_seed(0)
    hf = tmp_path / "hf"
    AutoModelForCausalLM.from_config(CONFIGS["v3"]()).save_pretrained(hf)
    build = tmp_path / "build"
    run_cli("edge-models", "export", "--model", str(hf), "--out", str(build / "onnx"), "--quantize", "q4")
    shutil.copy(tiny_build / "onnx" / "tokenizer.json", build / "onnx" / "tokenizer.json")
    nodes = onnx.load(str(build / "onnx" / "model.onnx")).graph.node
    assert {"MatMulNBits", "QMoE"} <= {n.op_type for n in nodes}
    assert [n.input[1] for n in nodes if n.op_type == "MatMul"] == ["layer1.moe.router"]
    device = provision_device(build, tmp_path / "site")
    daemon = Daemon(device, tmp_path / "daemon")
    try:
        daemon.wait_for("READY=1")
        with Client(daemon.endpoint, timeout_s=30) as client:
            final = client.complete("Return the", max_tokens=12)
    finally:
        daemon.stop()
    assert final["usage"]["completion_tokens"] >= 1
    assert final["text"] == in_process_greedy(device.config, "Return the", 12)
