"""DeepSeek MoE routed experts as one ONNX Runtime ``MoE`` (fp32) or ``QMoE`` (4/8-bit) node per layer.

The routing is DeepSeek's own, computed in the graph with a fixed number of nodes:

- V3: sigmoid scores; ``e_score_correction_bias`` is added for the *selection* only; group-limited
  top-k (the best ``topk_group`` of ``n_group`` groups, a group scored by its two best experts);
  the weights are the unbiased scores, normalized when ``norm_topk_prob``.
- V2: softmax scores; ``greedy`` top-k, or ``group_limited_greedy`` (a group scored by its best
  expert). Like transformers' ``DeepseekV2TopkRouter`` (our parity reference), V2 never
  normalizes the selected weights, whatever ``norm_topk_prob`` says.

The operators pick the top ``k`` experts of each row of ``router_probs`` themselves (ONNX Runtime
1.32 CPU kernels; semantics checked against references in ``tests/test_fused_moe.py``):

- ``QMoE`` takes DeepSeek's choice scores as ``router_probs`` (biased, excluded groups pushed out of
  reach) and the scores the weights come from as ``router_weights``; it gathers those at the chosen
  experts and normalizes them when asked. Routing costs 4-5 nodes (about 14 when grouped).
- ``MoE`` has no ``router_weights``: it weighs the chosen experts by a softmax over their
  ``router_probs``. So the graph chooses the experts itself and hands it ``log(weight)`` at those and
  a large negative value elsewhere; the softmax then yields ``weight / sum(weights)``, and when the
  model does not normalize, a ``Mul`` by ``sum(weights)`` restores the scale.

``routed_scaling_factor`` is folded into the down projection's weights.

Operand layout (found by testing against a numpy reference, not by the spec alone): ``fc1`` is
``[experts, 2 * inter, hidden]`` with gate and up rows interleaved (``swiglu_fusion=1``, the only
SwiGLU layout the CPU kernels run), ``fc2`` is ``[experts, hidden, inter]``; quantized, each expert's
rows are ``quantize_blocks`` output (symmetric blocks of 32 along the input dimension, implicit zero
point) flattened to ``[rows, in * bits / 8]`` with scales ``[experts, rows, in / 32]``. A hidden size
that is no multiple of 32 is quantized per output channel instead (scales ``[experts, rows]``, the
operator's layout without ``block_size``); a misaligned ``moe_intermediate_size`` is padded with zero
channels, which is exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .block_quant import BLOCK_SIZE, quantize_blocks
from .graph_builder import Graph, Initializers, UnsupportedModel, Weights

# A router_probs entry that can never win top-k against log(weight) >= log(smallest float), and
# whose softmax weight underflows to exactly 0.
_NOT_CHOSEN = -1e4
# Added to the choice scores of the groups a token may not use.
_EXCLUDED_GROUP = -1e30


def routed_experts(g: Graph, x: str, weights: Weights, prefix: str, config, name: str) -> str:
    """Routed experts of one DeepSeek MoE layer (prefix "model.layers.{i}.mlp."): x is the normalized
    hidden state [B,S,hidden] (graph value name); returns the graph value name of the routed output
    [B,S,hidden] = routed_scaling_factor-scaled weighted sum of the selected experts, WITHOUT shared experts."""
    family = routing_family(config)
    # The operators' router inputs are [tokens, experts]: route token rows.
    row_shape = g.init.add(f"{name}.row_shape", np.array([-1, config.hidden_size], np.int64))
    (rows,) = g.node("Reshape", [x, row_shape], f"{name}.rows")
    scores, choice = _scores(g, rows, weights, prefix, config, family, name)
    fc1, fc2, blocked = _stacked_operands(g, weights, prefix, config, name)
    attrs = dict(
        domain="com.microsoft",
        k=config.num_experts_per_tok,
        activation_type="swiglu",
        swiglu_fusion=1,
        activation_alpha=1.0,  # SiLU(g) * u: the operator's SwiGLU is g * sigmoid(alpha * g) * (u + beta)
        activation_beta=0.0,
    )
    if not g.bits:
        return _moe(g, x, rows, scores, choice, fc1, fc2, _normalizes(config, family), attrs, name)
    no_inputs = [""] * 7  # fc2 bias, fc3 weights/scales/bias, zero points: none
    (y,) = g.node(
        "QMoE",
        [x, choice, fc1.weight, fc1.scales, "", fc2.weight, fc2.scales, *no_inputs, scores],
        f"{name}.routed",
        expert_weight_bits=g.bits,
        **({"block_size": BLOCK_SIZE} if blocked else {}),
        weights_prepacked=0,  # the raw quantize_matmul_{4,8}bits layout, not a kernel-specific one
        accuracy_level=4,  # int8 activations: the fast CPU path, as for MatMulNBits
        normalize_routing_weights=int(_normalizes(config, family)),
        **attrs,
    )
    return y


def _moe(
    g: Graph,
    x: str,
    rows: str,
    scores: str,
    choice: str,
    fc1: _Operand,
    fc2: _Operand,
    normalize: bool,
    attrs: dict,
    name: str,
) -> str:
    """The fp32 ``MoE`` node, which has no ``router_weights``: choose here, hand it ``log(weight)``."""
    k = g.init.add(f"{name}.top_k", np.array([attrs["k"]], np.int64))
    _, chosen = g.node("TopK", [choice, k], [f"{name}.top_choice", f"{name}.chosen"], axis=-1)
    (routing_weights,) = g.node("GatherElements", [scores, chosen], f"{name}.weights", axis=-1)
    (log_weights,) = g.node("Log", [routing_weights], f"{name}.log_weights")
    (shape,) = g.node("Shape", [scores], f"{name}.scores_shape")
    not_chosen = numpy_helper.from_array(np.array([_NOT_CHOSEN], np.float32), f"{name}.not_chosen_value")
    (base,) = g.node("ConstantOfShape", [shape], f"{name}.not_chosen", value=not_chosen)
    (probs,) = g.node("ScatterElements", [base, chosen, log_weights], f"{name}.probs", axis=-1)
    fc = [fc1.weight, "", fc2.weight]
    if normalize:
        (y,) = g.node("MoE", [x, probs, *fc], f"{name}.routed", normalize_routing_weights=1, **attrs)
        return y
    # The operator normalized the weights: scale each token row back by their sum.
    (y,) = g.node("MoE", [rows, probs, *fc], f"{name}.normalized", normalize_routing_weights=1, **attrs)
    axes = g.init.add(f"{name}.last_axis", np.array([-1], np.int64))
    (total,) = g.node("ReduceSum", [routing_weights, axes], f"{name}.weight_sum", keepdims=1)
    (y,) = g.node("Mul", [y, total], f"{name}.routed_rows")
    (shape,) = g.node("Shape", [x], f"{name}.x_shape")
    (y,) = g.node("Reshape", [y, shape], f"{name}.routed")
    return y


def routed_experts_model(config, weights: Weights, prefix: str, bits: int | None = None) -> onnx.ModelProto:
    """One layer's routed experts as a standalone graph ``x [B,S,hidden]`` → ``routed``: for tests and
    benchmarks of the operator on its own (the decoder builders call ``routed_experts`` instead)."""
    g = Graph(Initializers(Path("."), external=False), bits)
    y = routed_experts(g, "x", weights, prefix, config, "moe")
    value = ["batch", "sequence", config.hidden_size]
    graph = helper.make_graph(
        g.nodes,
        "routed-experts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, value)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, value)],
        g.init.tensors,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


class _Operand:
    def __init__(self, weight: str, scales: str = ""):
        self.weight, self.scales = weight, scales


def routing_family(config) -> str:
    """``config``'s model type (``deepseek_v2``/``deepseek_v3``), after checking that its routing is one the
    MoE operators express; raises ``UnsupportedModel`` otherwise."""
    family = getattr(config, "model_type", "")
    if family not in ("deepseek_v2", "deepseek_v3"):
        raise UnsupportedModel(f"routed experts are built for deepseek_v2/deepseek_v3, not {family!r}")
    method = getattr(config, "topk_method", None)
    if family == "deepseek_v2" and method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModel(
            f"DeepSeek-V2 topk_method {method!r} is not supported; use greedy or group_limited_greedy"
        )
    if _grouped(config, family) and config.n_routed_experts % config.n_group:
        raise UnsupportedModel(
            f"n_routed_experts {config.n_routed_experts} is not a multiple of n_group {config.n_group}"
        )
    if family == "deepseek_v3" and _grouped(config, family) and config.n_routed_experts < 2 * config.n_group:
        raise UnsupportedModel(f"DeepSeek-V3 scores a group by its 2 best experts: n_group {config.n_group} is too big")
    return family


def _grouped(config, family: str) -> bool:
    """Whether group-limited routing can exclude anything (it is a no-op when every group is kept)."""
    if family == "deepseek_v2" and config.topk_method == "greedy":
        return False
    return bool(config.n_group) and bool(config.topk_group) and config.topk_group < config.n_group


def _normalizes(config, family: str) -> bool:
    return family == "deepseek_v3" and bool(config.norm_topk_prob)


def _scores(g: Graph, rows: str, weights: Weights, prefix: str, config, family: str, name: str) -> tuple[str, str]:
    """The router on token rows [T,hidden]: (scores the weights come from, choice scores the top-k picks
    from), both [T,experts]."""
    # The router stays fp32 at q4/q8: it is a few KB, and a flipped expert choice costs more than its reads.
    router = weights.get(prefix + "gate.weight")
    (logits,) = g.node("MatMul", [rows, g.init.add(f"{name}.router", router.T)], f"{name}.logits")
    if family == "deepseek_v3":
        (scores,) = g.node("Sigmoid", [logits], f"{name}.scores")
        bias = g.init.add(f"{name}.correction_bias", weights.get(prefix + "gate.e_score_correction_bias"))
        (choice,) = g.node("Add", [scores, bias], f"{name}.choice")
    else:
        (scores,) = g.node("Softmax", [logits], f"{name}.scores", axis=-1)
        choice = scores
    if _grouped(config, family):
        choice = _keep_best_groups(g, choice, config, family, name)
    return scores, choice


def _keep_best_groups(g: Graph, choice: str, config, family: str, name: str) -> str:
    """``choice`` with the experts outside each token's best ``topk_group`` groups pushed out of reach."""
    groups, per_group = config.n_group, config.n_routed_experts // config.n_group
    grouped_shape = g.init.add(f"{name}.grouped_shape", np.array([0, groups, per_group], np.int64))
    (grouped,) = g.node("Reshape", [choice, grouped_shape], f"{name}.grouped")
    if family == "deepseek_v3":  # a group's score: the sum of its two best experts
        two = g.init.add(f"{name}.two", np.array([2], np.int64))
        best_two, _ = g.node("TopK", [grouped, two], [f"{name}.best_two", f"{name}.best_two_idx"], axis=-1)
        axes = g.init.add(f"{name}.group_axis", np.array([-1], np.int64))
        (group_scores,) = g.node("ReduceSum", [best_two, axes], f"{name}.group_scores", keepdims=0)
    else:  # V2: a group's score is its best expert
        (group_scores,) = g.node("ReduceMax", [grouped], f"{name}.group_scores", axes=[-1], keepdims=0)
    kept = g.init.add(f"{name}.topk_group", np.array([config.topk_group], np.int64))
    _, best = g.node("TopK", [group_scores, kept], [f"{name}.best_groups", f"{name}.best_group_idx"], axis=-1)
    # One-hot rows of penalties ([T,topk_group,G]), then the max over the kept slots: 0 for a kept group.
    depth = g.init.add(f"{name}.groups", np.array(groups, np.int64))
    values = g.init.add(f"{name}.penalty_values", np.array([_EXCLUDED_GROUP, 0.0], np.float32))
    (onehot,) = g.node("OneHot", [best, depth, values], f"{name}.group_onehot", axis=-1)
    (penalty,) = g.node("ReduceMax", [onehot], f"{name}.group_penalty", axes=[-2], keepdims=0)
    (penalty,) = g.node(
        "Unsqueeze", [penalty, g.init.add(f"{name}.expert_axis", np.array([-1], np.int64))], f"{name}.penalty"
    )
    (masked,) = g.node("Add", [grouped, penalty], f"{name}.masked_grouped")
    flat_shape = g.init.add(f"{name}.flat_shape", np.array([0, config.n_routed_experts], np.int64))
    (masked,) = g.node("Reshape", [masked, flat_shape], f"{name}.masked_choice")
    return masked


def _expert_weights(weights: Weights, prefix: str, experts: int):
    """Yield (gate [I,H], up [I,H], down [H,I]) per expert, from per-expert tensors (a checkpoint) or
    transformers' stacked ``experts.gate_up_proj`` / ``experts.down_proj`` (a loaded model's state)."""
    stacked = prefix + "experts.gate_up_proj"
    if stacked in weights.names:
        gate_up, down = weights.get(stacked), weights.get(prefix + "experts.down_proj")
        inter = gate_up.shape[1] // 2
        for e in range(experts):
            yield gate_up[e, :inter], gate_up[e, inter:], down[e]
        return
    for e in range(experts):
        p = f"{prefix}experts.{e}."
        yield (
            weights.get(p + "gate_proj.weight"),
            weights.get(p + "up_proj.weight"),
            weights.get(p + "down_proj.weight"),
        )


def _stacked_operands(g: Graph, weights: Weights, prefix: str, config, name: str) -> tuple[_Operand, _Operand, bool]:
    """fc1 (interleaved gate/up) and fc2 (down × routed_scaling_factor), filled one expert at a time, and
    whether they are quantized in blocks along the input dimension (else per output channel)."""
    experts, hidden, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
    bits, scale = g.bits, np.float32(config.routed_scaling_factor)
    blocked = bool(bits) and hidden % BLOCK_SIZE == 0
    if bits and hidden * bits % 8:
        raise UnsupportedModel(f"QMoE cannot pack {bits}-bit rows of hidden_size {hidden}: it needs whole bytes")
    # Zero intermediate channels change nothing (SiLU(0) * 0 meets zero down columns) and keep the
    # quantized rows whole: blocks of 32, or whole bytes of 4-bit codes.
    align = BLOCK_SIZE if blocked else 2 if bits == 4 else 1
    pad = -inter % align
    stacked: dict[str, list[np.ndarray]] = {}
    for e, (gate, up, down) in enumerate(_expert_weights(weights, prefix, experts)):
        if gate.shape != (inter, hidden) or down.shape != (hidden, inter):
            raise UnsupportedModel(
                f"{prefix}experts: expert {e} has gate {gate.shape} / down {down.shape}, "
                f"config says ({inter}, {hidden}) / ({hidden}, {inter})"
            )
        fc1 = np.pad(np.stack([gate, up], axis=1).reshape(2 * inter, hidden), ((0, 2 * pad), (0, 0)))
        fc2 = np.pad(down * scale, ((0, 0), (0, pad)))
        for key, w in (("fc1", fc1), ("fc2", fc2)):
            parts = _quantize(w, bits, blocked) if bits else (w,)
            if key not in stacked:
                stacked[key] = [np.empty((experts, *part.shape), part.dtype) for part in parts]
            for whole, part in zip(stacked[key], parts, strict=True):
                whole[e] = part
    kinds = ("qweight", "scales") if bits else ("weight",)
    fc1, fc2 = (
        _Operand(*(g.init.add(f"{name}.{key}.{kind}", a) for kind, a in zip(kinds, stacked[key], strict=True)))
        for key in ("fc1", "fc2")
    )
    return fc1, fc2, blocked


def _quantize(weight: np.ndarray, bits: int, blocked: bool) -> tuple[np.ndarray, np.ndarray]:
    """QMoE operands of one ``[N, K]`` weight: codes ``[N, K * bits / 8]`` (symmetric, implicit zero point
    2^(bits-1), low nibble first) and scales ``[N, K / 32]`` (blocks) or ``[N]`` (per output channel)."""
    rows = weight.shape[0]
    if blocked:
        codes, scales = quantize_blocks(weight, bits)
        return codes.reshape(rows, -1), scales.reshape(rows, -1)
    top = 2 ** (bits - 1)
    scales = (np.abs(weight).max(axis=1) / (top - 1)).astype(np.float32)
    steps = np.rint(weight / np.where(scales == 0, 1, scales)[:, None])
    codes = (np.clip(steps, -top, top - 1) + top).astype(np.uint8)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes, scales
