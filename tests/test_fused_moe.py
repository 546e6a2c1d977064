"""Routed experts of a DeepSeek MoE layer as one ONNX Runtime MoE/QMoE node: equal to transformers'
DeepseekV3MoE / DeepseekV2Moe (minus the shared experts) on random weights, for every routing variant."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from edge_models.block_quant import quantize_blocks
from edge_models.fused_graph import UnsupportedModel, Weights
from edge_models.fused_moe import routed_experts_model

PREFIX = "model.layers.1.mlp."
SHAPE = dict(hidden_size=64, moe_intermediate_size=32, n_shared_experts=1, hidden_act="silu")
# Error of the routed output relative (Frobenius norm) to the fp32 reference on random Gaussian weights, the
# worst case for symmetric blocks (q4: two quantized matmuls in series at ~9% each). Against the
# dequantized weights, what remains is QMoE's int8 activations (accuracy_level 4): ~1.2%.
TOLERANCE = {8: 0.02, 4: 0.2}
ACTIVATION_TOLERANCE = 0.02
# Per output channel (hidden size off the blocks): fp32 activations, coarser 4-bit scales.
PER_CHANNEL_TOLERANCE = {8: 0.02, 4: 0.25}


def v3_config(experts: int = 16, **overrides) -> DeepseekV3Config:
    routing = dict(num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    return DeepseekV3Config(n_routed_experts=experts, **(SHAPE | routing | overrides))


def v2_config(topk_method: str, norm_topk_prob: bool = False) -> DeepseekV2Config:
    return DeepseekV2Config(
        **SHAPE,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        topk_method=topk_method,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=1.5,
    )


def random_moe(config, seed: int = 0):
    """transformers' MoE layer with every weight random (its experts are created uninitialized)."""
    torch.manual_seed(seed)
    moe = (DeepseekV3MoE if config.model_type == "deepseek_v3" else DeepseekV2Moe)(config).eval()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.normal_(0, 0.5 if name == "gate.weight" else 0.1)
        for b in moe.buffers():  # e_score_correction_bias: large enough to change the choice
            b.uniform_(-0.3, 0.3)
    return moe


def reference(moe, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        t = torch.from_numpy(x)
        return (moe(t) - moe.shared_experts(t)).numpy()


def checkpoint_weights(moe, stacked: bool = True) -> Weights:
    """The layer's tensors under the decoder's names: transformers' stacked experts (a loaded model) or
    one tensor per expert projection (the layout of DeepSeek's safetensors checkpoints)."""
    state = {PREFIX + k: v.detach().float().numpy() for k, v in moe.state_dict().items()}
    if not stacked:
        gate_up, down = state.pop(PREFIX + "experts.gate_up_proj"), state.pop(PREFIX + "experts.down_proj")
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            state[f"{PREFIX}experts.{e}.gate_proj.weight"] = gate_up[e, :inter]
            state[f"{PREFIX}experts.{e}.up_proj.weight"] = gate_up[e, inter:]
            state[f"{PREFIX}experts.{e}.down_proj.weight"] = down[e]
    return Weights(set(state), lambda n: state[n].shape, lambda n: state[n])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def hidden_states(config, batch: int = 3, sequence: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, sequence, config.hidden_size)).astype(np.float32)


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "per_expert"])
def test_v3_grouped_routing_with_correction_bias_equals_transformers(stacked):
    config = v3_config()
    moe = random_moe(config)
    x = hidden_states(config)
    model = routed_experts_model(config, checkpoint_weights(moe, stacked), PREFIX)
    np.testing.assert_allclose(run(model, x), reference(moe, x), atol=1e-4, rtol=0)


def test_layer_built_from_a_saved_checkpoint_equals_the_loaded_model(tmp_path):
    """The export path: safetensors as ``save_pretrained`` writes them (one tensor per expert projection),
    read through ``Weights.from_safetensors``, against the MoE layer of the model loaded back."""
    config = v3_config(
        num_hidden_layers=2,
        first_k_dense_replace=1,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        vocab_size=100,
    )
    torch.manual_seed(0)
    saved = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a router far from its near-zero init, so the choice is not a coin toss
        saved.model.layers[1].mlp.gate.weight.normal_(0, 0.5)
        saved.model.layers[1].mlp.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    saved.save_pretrained(tmp_path)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).model.layers[1].mlp.eval()
    model = routed_experts_model(config, Weights.from_safetensors(tmp_path), PREFIX)
    x = hidden_states(config)
    np.testing.assert_allclose(run(model, x), reference(moe, x), atol=1e-4, rtol=0)


def _without_bias(config):
    moe = random_moe(config)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
    return moe


@pytest.mark.parametrize(
    "variant, baseline",
    [
        (lambda: random_moe(v3_config()), lambda: _without_bias(v3_config())),
        (lambda: random_moe(v3_config()), lambda: random_moe(v3_config(topk_group=4))),
        (lambda: random_moe(v2_config("group_limited_greedy")), lambda: random_moe(v2_config("greedy"))),
    ],
    ids=["v3_correction_bias", "v3_groups", "v2_groups"],
)
def test_each_routing_feature_changes_the_output_of_the_test_weights(variant, baseline):
    """The equality tests above could not tell a routing feature from its absence unless it matters here."""
    x = hidden_states(v3_config())
    assert np.abs(reference(variant(), x) - reference(baseline(), x)).max() > 1e-2


def test_v3_without_normalization_equals_transformers():
    config = v3_config(norm_topk_prob=False)
    moe = random_moe(config)
    x = hidden_states(config)
    model = routed_experts_model(config, checkpoint_weights(moe), PREFIX)
    np.testing.assert_allclose(run(model, x), reference(moe, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
@pytest.mark.parametrize("norm_topk_prob", [False, True], ids=["no_norm", "norm"])
def test_v2_routing_equals_transformers(topk_method, norm_topk_prob):
    """transformers' DeepseekV2TopkRouter never normalizes the chosen weights; neither does the graph."""
    config = v2_config(topk_method, norm_topk_prob)
    moe = random_moe(config)
    x = hidden_states(config)
    model = routed_experts_model(config, checkpoint_weights(moe, stacked=False), PREFIX)
    np.testing.assert_allclose(run(model, x), reference(moe, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", ["v3", "v2"])
def test_quantized_experts_stay_within_stated_error(bits, family):
    config = v3_config() if family == "v3" else v2_config("group_limited_greedy")
    moe = random_moe(config)
    x = hidden_states(config, batch=4, sequence=8)
    model = routed_experts_model(config, checkpoint_weights(moe), PREFIX, bits)
    assert [n.op_type for n in model.graph.node if n.domain == "com.microsoft"] == ["QMoE"]
    assert relative_error(run(model, x), reference(moe, x)) < TOLERANCE[bits]


def dequantized(weight: np.ndarray, bits: int) -> np.ndarray:
    """What QMoE computes with: quantize_blocks' codes (low nibble first) minus the implicit zero point, × scale."""
    q, scales = quantize_blocks(weight, bits)
    rows = weight.shape[0]
    codes = np.stack([q & 0x0F, q >> 4], -1).reshape(rows, q.shape[1], -1) if bits == 4 else q
    values = (codes.astype(np.float32) - 2 ** (bits - 1)) * scales.reshape(rows, -1, 1)
    return values.reshape(rows, -1)[:, : weight.shape[1]]  # quantize_blocks pads the last block with zeros


@pytest.mark.parametrize("inter", [32, 48], ids=["aligned", "padded"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_compute_with_exactly_the_packed_weights(bits, inter):
    """The packing is right: against transformers running the dequantized weights, only the int8
    activations differ (a wrong interleave, nibble order or scale layout gives errors near 100%).
    An intermediate size off the blocks is padded with zero channels, which must change nothing."""
    config = v3_config(moe_intermediate_size=inter)
    moe = random_moe(config)
    x = hidden_states(config, batch=4, sequence=8)
    model = routed_experts_model(config, checkpoint_weights(moe), PREFIX, bits)
    scale = config.routed_scaling_factor
    with torch.no_grad():
        for gate_up, down in zip(moe.experts.gate_up_proj, moe.experts.down_proj, strict=True):
            fc1 = np.stack([gate_up[:inter].numpy(), gate_up[inter:].numpy()], 1).reshape(2 * inter, -1)
            gate_up.copy_(
                torch.from_numpy(dequantized(fc1, bits).reshape(inter, 2, -1).transpose(1, 0, 2).reshape(fc1.shape))
            )
            down.copy_(torch.from_numpy(dequantized(down.numpy() * scale, bits) / scale))
    assert relative_error(run(model, x), reference(moe, x)) < ACTIVATION_TOLERANCE


def test_single_token_decode_step_equals_transformers():
    config = v3_config()
    moe = random_moe(config)
    x = hidden_states(config, batch=1, sequence=1)
    model = routed_experts_model(config, checkpoint_weights(moe), PREFIX)
    np.testing.assert_allclose(run(model, x), reference(moe, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [None, 4])
def test_graph_does_not_grow_with_the_number_of_experts(bits):
    sizes = []
    for experts in (4, 32):
        config = v3_config(experts, n_group=2, topk_group=1, num_experts_per_tok=2)
        model = routed_experts_model(config, checkpoint_weights(random_moe(config)), PREFIX, bits)
        sizes.append([n.op_type for n in model.graph.node])
    assert sizes[0] == sizes[1]
    assert sizes[0].count("QMoE" if bits else "MoE") == 1


def test_experts_are_read_one_tensor_at_a_time():
    config = v3_config()
    weights = checkpoint_weights(random_moe(config), stacked=False)
    largest = []
    read = weights._get
    weights._get = lambda n: largest.append(read(n).size) or read(n)
    routed_experts_model(config, weights, PREFIX, bits=4)
    assert max(largest) == config.hidden_size * config.moe_intermediate_size


@pytest.mark.parametrize("bits", [8, 4])
def test_hidden_size_off_the_blocks_is_quantized_per_channel(bits):
    config = v3_config(hidden_size=48, moe_intermediate_size=40)
    moe = random_moe(config)
    x = hidden_states(config, batch=4, sequence=8)
    model = routed_experts_model(config, checkpoint_weights(moe), PREFIX, bits)
    (qmoe,) = [n for n in model.graph.node if n.op_type == "QMoE"]
    assert "block_size" not in {a.name for a in qmoe.attribute}
    assert relative_error(run(model, x), reference(moe, x)) < PER_CHANNEL_TOLERANCE[bits]


def test_odd_hidden_size_cannot_be_packed_in_4_bits():
    config = v3_config(hidden_size=63)
    with pytest.raises(UnsupportedModel, match="whole bytes"):
        routed_experts_model(config, checkpoint_weights(random_moe(config)), PREFIX, bits=4)


def test_unknown_v2_topk_method_is_refused():
    config = v2_config("greedy")
    moe = random_moe(config)
    config.topk_method = "noaux_tc"
    with pytest.raises(UnsupportedModel, match="topk_method"):
        routed_experts_model(config, checkpoint_weights(moe), PREFIX)
