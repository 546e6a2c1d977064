"""DeepSeek-V2/V3 decoder layers for ``fused_graph``: absorbed multi-head latent attention (MLA) on one
``GroupQueryAttention`` per layer, its cache one latent + rotary key per token.

MLA caches, per token, the compressed latent ``c_kv`` (``kv_lora_rank`` floats, after ``kv_a_layernorm``)
and one rotary key ``k_pe`` shared by every head. The up-projection ``kv_b_proj`` is *absorbed* into
the weights when the graph is written (DeepSeek-V2 paper, section 2.1.2):

- each head's ``W_UK`` (the k_nope rows of ``kv_b_proj``) is folded into the query projection, so
  one projection yields, per head, ``[q_pe, q_latent]`` and ``q_latent · c_kv = q_nope · k_nope``;
- each head's ``W_UV`` (the value rows) is folded into ``o_proj``, which then reads the per-head
  attention output in the latent space.

The attention is then ordinary multi-query attention with head size ``rope + kv_lora``: query
``[B,S,H*(rope+kv_lora)]``, key ``[k_pe, c_kv]`` with one KV head. The value is the key itself, so
``past``/``present`` key and value are bound to one buffer per layer (``DecoderSpec.value_is_key``):
the operator writes the same bytes twice and reads the value's latent columns from the key. The
rotary part of each head's output is dropped before ``o_proj``.

MoE layers (from ``first_k_dense_replace`` on): the routed experts are one ``MoE``/``QMoE`` node
(``fused_moe``), the shared experts one packed gate/up MLP beside it, so the graph does not grow with
the number of experts. Dense layers use the same packed MLP.

Rotary: ``RotaryEmbedding`` (half-split pairs) on the first ``rope`` columns of each query head and on
``k_pe``, at positions computed in the graph from ``seqlens_k``. Checkpoints that pair rotary dims
interleaved (V2's complex rotation, V3's ``rope_interleave``) get their rope rows permuted to the
half-split order when the weights are read: the same permutation of q and k leaves ``q·k`` unchanged,
and the rotary key never reaches the output.
"""

from __future__ import annotations

import importlib

import numpy as np

from .fused_moe import routed_experts, routing_family
from .graph_builder import Graph, UnsupportedModel, Weights, mlp, norm


def check_latent_supported(config) -> None:
    """Raise ``UnsupportedModel`` for DeepSeek shapes the fused graph does not cover."""
    if getattr(config, "attention_bias", False):
        raise UnsupportedModel("DeepSeek attention with biases has no fused graph; export it --traced")
    if config.qk_rope_head_dim % 2:
        raise UnsupportedModel(f"qk_rope_head_dim {config.qk_rope_head_dim} is odd; rotary pairs need it even")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"activation {config.hidden_act!r} has no fused graph (SwiGLU only)")
    if any(_is_moe(config, i) for i in range(config.num_hidden_layers)):
        routing_family(config)  # refuses routing methods the MoE operators do not express


def latent_layers(g: Graph, x: str, config, weights: Weights) -> tuple[str, str, dict]:
    """Every decoder layer of a DeepSeek-V2/V3 checkpoint; returns the last layer's output, the residual
    stream and the cache description for ``DecoderSpec``."""
    w, eps = weights.get, float(config.rms_norm_eps)
    positions = _positions(g)
    residual = None
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        h, residual = norm(g, x, residual, w(p + "input_layernorm.weight"), f"layer{i}.attn_norm", eps)
        a = latent_attention(g, h, weights, config, i, positions)
        h, residual = norm(g, a, residual, w(p + "post_attention_layernorm.weight"), f"layer{i}.mlp_norm", eps)
        x = _moe(g, h, weights, config, i) if _is_moe(config, i) else mlp(g, h, weights, p + "mlp.", f"layer{i}")
    width = config.qk_rope_head_dim + config.kv_lora_rank
    return x, residual, dict(key_shape=(1, width), value_shape=(1, width), value_is_key=True)


def latent_attention(g: Graph, h: str, weights: Weights, config, i: int, positions: str) -> str:
    """Absorbed MLA of layer ``i`` over the normalized hidden states ``h``; returns the ``o_proj`` output."""
    w, eps = weights.get, float(config.rms_norm_eps)
    heads, rank = config.num_attention_heads, config.kv_lora_rank
    nope, rope, v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    a, name = f"model.layers.{i}.self_attn.", f"layer{i}"
    order = _rope_order(config)
    kv_b = w(a + "kv_b_proj.weight").astype(np.float64).reshape(heads, nope + v_dim, rank)
    w_uk, w_uv = kv_b[:, :nope], kv_b[:, nope:]
    q_w = w(a + ("q_proj.weight" if config.q_lora_rank is None else "q_b_proj.weight")).astype(np.float64)
    q_w = q_w.reshape(heads, nope + rope, -1)
    q_latent = np.einsum("hdr,hdi->hri", w_uk, q_w[:, :nope])  # q_nope · k_nope = (W_UK^T q_nope) · c_kv
    query_w = np.concatenate([q_w[:, nope:][:, order], q_latent], axis=1).reshape(heads * (rope + rank), -1)
    kv_a = w(a + "kv_a_proj_with_mqa.weight")  # rows: c_kv, then k_pe
    key_w = np.concatenate([kv_a[rank:][order], kv_a[:rank]])
    del kv_b, q_w, q_latent

    # One projection of h feeds both sides: (q_a or the whole query) and the compressed key.
    first = query_w if config.q_lora_rank is None else w(a + "q_a_proj.weight")
    packed = g.linear(h, np.concatenate([first, key_w]).astype(np.float32), f"{name}.qkv_a")
    sizes = g.init.add(f"{name}.qkv_a.split", np.array([first.shape[0], rope, rank], np.int64))
    q, k_pe, c_kv = g.node("Split", [packed, sizes], [f"{name}.q_a", f"{name}.k_pe", f"{name}.c_kv"], axis=-1)
    if config.q_lora_rank is not None:
        q, _ = norm(g, q, None, w(a + "q_a_layernorm.weight"), f"{name}.q_a_norm", eps)
        q = g.linear(q, query_w.astype(np.float32), f"{name}.q_b")
    del first, query_w, key_w
    q = _rotary(g, q, positions, heads, rope, f"{name}.q_rot")
    k_pe = _rotary(g, k_pe, positions, 1, rope, f"{name}.k_rot")
    c_kv, _ = norm(g, c_kv, None, w(a + "kv_a_layernorm.weight"), f"{name}.kv_a_norm", eps)
    (key,) = g.node("Concat", [k_pe, c_kv], f"{name}.key", axis=-1)
    (out, _, _) = g.node(
        "GroupQueryAttention",
        [q, key, key, f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_sequence_length"],
        [f"{name}.attn", f"present.{i}.key", f"present.{i}.value"],
        domain="com.microsoft",
        num_heads=heads,
        kv_num_heads=1,
        do_rotary=0,
        scale=_softmax_scale(config),
    )
    # Each head's output is [rotary part (discarded), latent]: the latent goes through W_UV folded into o_proj.
    per_head = g.init.add(f"{name}.heads", np.array([0, 0, heads, rope + rank], np.int64))
    (out,) = g.node("Reshape", [out, per_head], f"{name}.attn_heads")
    start, end, axis = (
        g.init.add(f"{name}.latent.{k}", np.array([v], np.int64))
        for k, v in (("start", rope), ("end", rope + rank), ("axis", -1))
    )
    (out,) = g.node("Slice", [out, start, end, axis], f"{name}.latent")
    flat = g.init.add(f"{name}.flat", np.array([0, 0, heads * rank], np.int64))
    (out,) = g.node("Reshape", [out, flat], f"{name}.latent_flat")
    o_w = w(a + "o_proj.weight").astype(np.float64).reshape(-1, heads, v_dim)
    o_absorbed = np.einsum("ohv,hvr->ohr", o_w, w_uv).reshape(o_w.shape[0], heads * rank).astype(np.float32)
    return g.linear(out, o_absorbed, f"{name}.o")


def _moe(g: Graph, h: str, weights: Weights, config, i: int) -> str:
    """Layer ``i``'s routed experts (one MoE/QMoE node) plus its shared experts (one packed SwiGLU MLP)."""
    p, name = f"model.layers.{i}.mlp.", f"layer{i}"
    routed = routed_experts(g, h, weights, p, config, f"{name}.moe")
    if not getattr(config, "n_shared_experts", None):
        return routed
    shared = mlp(g, h, weights, p + "shared_experts.", f"{name}.shared")
    (y,) = g.node("Add", [routed, shared], f"{name}.moe_out")
    return y


def _is_moe(config, i: int) -> bool:
    return bool(getattr(config, "n_routed_experts", None)) and i >= config.first_k_dense_replace


def _rope_order(config) -> np.ndarray:
    """The order of the rope rows that makes the checkpoint's rotary pairs half-split ``(j, j + rope/2)``."""
    rope = config.qk_rope_head_dim
    interleaved = config.model_type == "deepseek_v2" or getattr(config, "rope_interleave", False)
    return np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)]) if interleaved else np.arange(rope)


def _softmax_scale(config) -> float:
    """transformers' own MLA scaling: ``1/sqrt(qk_nope + qk_rope)``, times yarn's mscale² when configured."""
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return float(module.yarn_apply_mscale(rope, (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5))


def _positions(g: Graph) -> str:
    """``positions [B,S]`` int64 of the new tokens: row b's first is ``seqlens_k[b] - S + 1``."""
    (shape,) = g.node("Shape", ["input_ids"], "ids_shape")
    one = g.init.add("one_i64", np.array(1, np.int64))
    (length,) = g.node("Gather", [shape, one], "new_tokens")
    (first,) = g.node("Sub", [one, length], "first_offset")
    (offsets,) = g.node("Range", [first, one, one], "offsets")  # 1-S .. 0
    (seqlens,) = g.node("Cast", ["seqlens_k"], "seqlens_i64", to=7)  # INT64
    (last,) = g.node("Unsqueeze", [seqlens, g.init.add("axis_1", np.array([1], np.int64))], "last_position")
    (pos,) = g.node("Add", [last, offsets], "positions")
    return pos


def _rotary(g: Graph, x: str, positions: str, heads: int, rope: int, name: str) -> str:
    """Rotate the first ``rope`` columns of each of ``heads`` heads of ``x [B,S,heads*D]`` (half-split pairs)."""
    (y,) = g.node(
        "RotaryEmbedding",
        [x, positions, "cos_cache", "sin_cache"],
        name,
        domain="com.microsoft",
        interleaved=0,
        num_heads=heads,
        rotary_embedding_dim=rope,
    )
    return y
