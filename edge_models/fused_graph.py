"""Fused decoder graphs written straight from the weights, with an in-place static KV cache (Qwen2, Llama;
DeepSeek-V2/V3 layers in ``fused_deepseek``; the node builder and shared blocks in ``graph_builder``).

Unlike ``export.py`` (which traces the PyTorch model), this writes the graph node by node with ONNX
Runtime's contrib operators, the way onnxruntime-genai's model builder does:

- ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (RMSNorm with the
  residual add folded in),
- one packed QKV and one packed gate/up projection per layer (``MatMulNBits`` when quantized),
- ``GroupQueryAttention`` with its built-in rotary embedding and the cache shared between
  ``past`` and ``present`` (``[rows, kv_heads, max_seq_len, head_dim]`` per layer, updated in place
  at each row's own position ``seqlens_k``), so a row is a slot and rows may be ragged.

Weights are read one tensor at a time through ``Weights`` (a state dict or safetensors files) and
quantized as they are read, so the model never needs to be whole in fp32. Past the 2 GB protobuf
limit, tensors are appended to ``model.onnx.data`` as they are produced.

Graph inputs: ``input_ids [B,S]`` int64, ``seqlens_k [B]`` int32 (each row's cached length after
this step, minus one), ``total_sequence_length`` int32 scalar, ``past.i.key`` / ``past.i.value``
``[B,Hkv,T,D]``. Outputs ``logits [B,S,V]`` and ``present.i.*``, the same buffers as ``past``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.engine.spec import DecoderSpec, output_names, static_input_names

from .block_quant import BLOCK_SIZE, Packed
from .errors import EdgeModelsError, ExportError
from .fused_deepseek import check_latent_supported, latent_layers
from .graph_builder import Graph, Initializers, UnsupportedModel, Weights, mlp, norm
from .tokenizer import special_token_ids

LATENT_FAMILIES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")  # MLA: edge_models.fused_deepseek
FAMILIES = ("Qwen2ForCausalLM", "LlamaForCausalLM", *LATENT_FAMILIES)
QUANT_BITS = {"q4": 4, "q8": 8}
PROTOBUF_LIMIT = 2_000_000_000


def _rotary_tables(config, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[positions, head_dim/2]`` from the family's own rotary module (handles rope scaling)."""
    import importlib

    family = type(config).__name__.removesuffix("Config")
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    rotary = getattr(module, f"{family}RotaryEmbedding")(config)
    freqs = np.arange(positions, dtype=np.float64)[:, None] * rotary.inv_freq.double().numpy()[None, :]
    scale = float(rotary.attention_scaling)
    return (np.cos(freqs) * scale).astype(np.float32), (np.sin(freqs) * scale).astype(np.float32)


def _architecture(config) -> str:
    return (config.architectures or [type(config).__name__.replace("Config", "ForCausalLM")])[0]


def check_supported(config) -> None:
    """Raise ``UnsupportedModel`` unless ``config`` describes a family and shape with a fused graph."""
    arch = _architecture(config)
    if arch not in FAMILIES:
        raise UnsupportedModel(f"no fused graph for {arch}; fused families: {', '.join(FAMILIES)}")
    if arch in LATENT_FAMILIES:
        check_latent_supported(config)
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 16:
        raise UnsupportedModel(f"head_dim {head_dim} is not a multiple of 16 (GroupQueryAttention's rotary needs it)")


def build_fused_decoder(
    config,
    weights: Weights,
    out_dir: Path,
    quant: str | None = None,
    external_data: bool | None = None,
    special: dict | None = None,
    method: str = "mse",
    head_bits: int | None = None,
    importance: dict[str, np.ndarray] | None = None,
) -> DecoderSpec:
    """Write ``model.onnx`` (+ ``model.onnx.data``) and ``decoder.json`` for a Qwen2/Llama/DeepSeek checkpoint.

    ``quant``: None (fp32), ``"q4"`` or ``"q8"`` — every projection as ``MatMulNBits`` in blocks of 32 by
    ``method`` (``block_quant``: ``mse`` asymmetric, or ``rtn`` symmetric); the LM head and the embedding table
    (``GatherBlockQuantized``, one copy when tied) at ``head_bits`` (default 8: measured in bench/quality.py,
    4-bit heads cost most of the drift on real weights). Source blocks a GGUF file carries on an exact grid are
    copied, not requantized (``Weights.exact``). ``importance``: calibration weights per graph tensor name.
    ``special``: the checkpoint's pad/BOS/EOS ids as ``edge_models.tokenizer.special_token_ids`` finds
    them (its tokenizer decides the BOS, generation_config.json adds end ids); default: config.json's."""
    check_supported(config)
    if quant is not None and quant not in QUANT_BITS:
        raise EdgeModelsError(f"unknown quantization {quant!r}; use one of {', '.join(QUANT_BITS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = sum(4 * int(np.prod(weights.shape(n))) for n in weights.names) > PROTOBUF_LIMIT
    arch, layers, eps = _architecture(config), config.num_hidden_layers, float(config.rms_norm_eps)
    init = Initializers(out_dir, external_data)
    bits = QUANT_BITS.get(quant)
    head_bits = (head_bits or 8) if bits else None
    g = Graph(init, bits, method, importance)
    w = weights.get
    # Positions up to max_positions inclusive: an idle row in a decode batch writes one scratch slot past its end.
    cos, sin = _rotary_tables(config, config.max_position_embeddings + 1)
    init.add("cos_cache", cos)
    init.add("sin_cache", sin)
    # transformers ties the head to the embedding when the config says so, whatever the files hold
    tied = bool(getattr(config, "tie_word_embeddings", False)) or "lm_head.weight" not in weights.names
    table = weights.rows(["model.embed_tokens.weight"], head_bits)
    stored = None
    if tied and head_bits and table.shape[1] % BLOCK_SIZE == 0:  # one packed table for both ends
        table = g.pack(table, "lm_head", head_bits)
        stored = g.add_packed(table, "lm_head")
    x = embedding(g, table, head_bits, stored)
    if arch in LATENT_FAMILIES:
        x, residual, cache = latent_layers(g, x, config, weights)
    else:
        x, residual, cache = _gqa_layers(g, x, config, weights)
    h, _ = norm(g, x, residual, w("model.norm.weight"), "final_norm", eps)
    if tied and head_bits is None:
        tied_lm_head(g, h, "embed_tokens", config.vocab_size, config.hidden_size)
    else:
        head = table if tied else weights.rows(["lm_head.weight"], head_bits)
        g.linear(h, head, "lm_head", out="logits", bits=head_bits, stored=stored)
    del table
    init.close()

    spec = DecoderSpec(
        architecture=arch,
        num_layers=layers,
        **cache,
        vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings,
        **(special or special_token_ids(config.to_dict())),
        # Read per token: every weight but the embedding table (one row) and the rotary tables.
        weight_bytes=sum(
            v for k, v in init.bytes.items() if not k.startswith(("embed_tokens", "cos_cache", "sin_cache"))
        )
        + config.hidden_size * 4,
        cache="static",
    )
    _save(g, spec, out_dir)
    return spec


def _gqa_layers(g: Graph, x: str, config, weights: Weights) -> tuple[str, str, dict]:
    """Qwen2/Llama decoder layers: packed QKV, GroupQueryAttention with its built-in rotary, packed gate/up MLP.
    Returns the last layer's output, the residual stream and the cache shapes for ``DecoderSpec``."""
    heads, kv_heads, eps = config.num_attention_heads, config.num_key_value_heads, float(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    w = weights.get

    def maybe(name: str) -> np.ndarray | None:
        return w(name) if name in weights.names else None

    residual = None
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        h, residual = norm(g, x, residual, w(p + "input_layernorm.weight"), f"layer{i}.attn_norm", eps)
        attn = p + "self_attn."
        qkv_w = weights.rows([attn + f"{t}_proj.weight" for t in "qkv"], g.bits)
        biases = [maybe(attn + f"{t}_proj.bias") for t in "qkv"]
        qkv_b = np.concatenate(biases) if all(b is not None for b in biases) else None
        qkv = g.linear(h, qkv_w, f"layer{i}.qkv", qkv_b)
        del qkv_w
        (a, _, _) = g.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_sequence_length"]
            + ["cos_cache", "sin_cache"],
            [f"layer{i}.attn", f"present.{i}.key", f"present.{i}.value"],
            domain="com.microsoft",
            num_heads=heads,
            kv_num_heads=kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
        )
        o = g.linear(a, weights.rows([attn + "o_proj.weight"], g.bits), f"layer{i}.o", maybe(attn + "o_proj.bias"))
        h, residual = norm(g, o, residual, w(p + "post_attention_layernorm.weight"), f"layer{i}.mlp_norm", eps)
        x = mlp(g, h, weights, p + "mlp.", f"layer{i}")
    return x, residual, dict(key_shape=(kv_heads, head_dim), value_shape=(kv_heads, head_dim))


def embedding(g: Graph, table: np.ndarray | Packed, bits: int | None, stored: list[str] | None = None) -> str:
    """The token embedding lookup of ``input_ids``; returns ``embedded`` ``[B,S,hidden]``.

    Quantized graphs store the table ``[vocab, hidden]`` in ``MatMulNBits``' own layout (``[vocab, blocks, blob]``
    uint8, scales ``[vocab, blocks]``, zero points when asymmetric) — one copy shared with the LM head when the
    two are tied (``stored``: the head's initializers) — and look rows up with ONNX Runtime's
    ``GatherBlockQuantized`` over the block axis, dequantizing only the rows gathered. A hidden size off the
    block grid stays fp32."""
    vocab, hidden = table.shape
    if not bits or hidden % BLOCK_SIZE:
        if isinstance(table, Packed):
            raise ExportError("embed_tokens: packed source blocks with a hidden size off the block grid")
        (x,) = g.node("Gather", [g.init.add("embed_tokens", table), "input_ids"], "embedded")
        return x
    p = g.pack(table, "embed_tokens", bits)
    data, scales, zero_points = stored or g.add_packed(p, "embed_tokens")
    blocks = hidden // BLOCK_SIZE
    block_shape = g.init.add("embed_tokens.block_shape", np.array([vocab, blocks, 1], np.int64))
    (scales,) = g.node("Reshape", [scales, block_shape], "embed_tokens.block_scales")
    inputs = [data, "input_ids", scales]
    if p.zero_points is not None:
        if bits == 4:  # MatMulNBits packs two blocks' points per byte; over a block axis of 1 each has its own byte
            zps = np.stack([p.zero_points & 0x0F, p.zero_points >> 4], -1).reshape(vocab, -1)[:, :blocks]
            zero_points = g.init.add("embed_tokens.block_zero_points", zps.reshape(vocab, blocks, 1))
        else:
            (zero_points,) = g.node("Reshape", [zero_points, block_shape], "embed_tokens.block_zero_points")
        inputs.append(zero_points)
    (x,) = g.node(
        "GatherBlockQuantized",
        inputs,
        "embedded.blocks",
        domain="com.microsoft",
        bits=bits,
        block_size=BLOCK_SIZE,
        gather_axis=0,
        quantize_axis=2,
    )
    (x,) = g.node(
        "Reshape", [x, g.init.add("embed_tokens.hidden_shape", np.array([0, 0, hidden], np.int64))], "embedded"
    )
    return x


def tied_lm_head(g: Graph, h: str, table: str, vocab: int, hidden: int) -> str:
    """fp32 logits ``h @ table.T`` reading the embedding initializer itself (``Gemm`` with ``transB``), so a tied
    table is stored once instead of once more transposed."""
    hidden_2d = g.init.add("lm_head.flat", np.array([-1, hidden], np.int64))
    (flat,) = g.node("Reshape", [h, hidden_2d], "lm_head.h2d")
    (y,) = g.node("Gemm", [flat, table], "lm_head.y2d", transB=1)
    (shape,) = g.node("Shape", [h], "lm_head.h_shape", end=2)
    (shape,) = g.node(
        "Concat", [shape, g.init.add("lm_head.vocab", np.array([vocab], np.int64))], "lm_head.shape", axis=0
    )
    (logits,) = g.node("Reshape", [y, shape], "logits")
    return logits


def _save(g: Graph, spec: DecoderSpec, out_dir: Path) -> None:
    f32, kv = TensorProto.FLOAT, spec.key_shape
    cache = [
        helper.make_tensor_value_info(name, f32, ["batch", kv[0], "max_seq_len", kv[1]])
        for name in static_input_names(spec.num_layers)[3:]
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        *cache,
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "sequence", spec.vocab_size])] + [
        helper.make_tensor_value_info(name, f32, ["batch", kv[0], "max_seq_len", kv[1]])
        for name in output_names(spec.num_layers)[1:]
    ]
    graph = helper.make_graph(g.nodes, f"{spec.architecture}-fused", inputs, outputs, g.init.tensors)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    model.producer_name = "edge-models fused_graph"
    onnx.save_model(model, str(out_dir / "model.onnx"))
    (out_dir / "decoder.json").write_text(spec.to_json())
