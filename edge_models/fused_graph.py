"""Fused decoder graphs written straight from the weights, with an in-place static KV cache (Qwen2, Llama;
DeepSeek-V2/V3 layers in ``fused_deepseek``).

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

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.engine.spec import DecoderSpec, output_names, static_input_names

from .block_quant import BLOCK_SIZE, Packed, quantize
from .errors import EdgeModelsError, ExportError
from .tokenizer import special_token_ids

LATENT_FAMILIES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")  # MLA: edge_models.fused_deepseek
FAMILIES = ("Qwen2ForCausalLM", "LlamaForCausalLM", *LATENT_FAMILIES)
QUANT_BITS = {"q4": 4, "q8": 8}
EXTERNAL_DATA = "model.onnx.data"
PROTOBUF_LIMIT = 2_000_000_000


class UnsupportedModel(ExportError):
    """The checkpoint's architecture or shape has no fused graph; the traced export handles it."""


class Weights:
    """Tensor-by-tensor access to a checkpoint: ``names``, ``shape(name)`` and ``get(name)`` (fp32)."""

    def __init__(
        self,
        names: set[str],
        shape: Callable[[str], tuple[int, ...]],
        get: Callable[[str], np.ndarray],
        exact: Callable[[str, int], Packed | None] | None = None,
    ):
        self.names, self.shape, self._get, self._exact = names, shape, get, exact

    def exact(self, name: str, bits: int) -> Packed | None:
        """``name`` already in ``MatMulNBits`` layout at ``bits`` (a GGUF block grid it reproduces), else None."""
        return None if self._exact is None else self._exact(name, bits)

    def rows(self, names: list[str], bits: int | None) -> np.ndarray | Packed:
        """Linear weights stacked along their output rows (packed QKV, gate/up): the source blocks when every one
        of them is exactly representable at ``bits``, else fp32 for the graph to quantize."""
        if bits:
            exact = [self.exact(n, bits) for n in names]
            if all(e is not None for e in exact):
                return Packed.concat(exact)
        return np.concatenate([self.get(n) for n in names]) if len(names) > 1 else self.get(names[0])

    def get(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise UnsupportedModel(f"the checkpoint has no tensor {name!r}; is the checkpoint complete?")
        return self._get(name)

    @classmethod
    def from_module(cls, model) -> Weights:
        """A loaded transformers model: each tensor is converted to fp32 only when it is read."""
        state = model.state_dict()
        return cls(
            set(state),
            lambda n: tuple(state[n].shape),
            lambda n: state[n].detach().float().numpy(),
        )

    @classmethod
    def from_safetensors(cls, checkpoint: Path) -> Weights:
        """The ``*.safetensors`` files of a checkpoint directory (bf16/fp16/fp32 as shipped), each tensor
        read with ``pread`` when asked for. Not memory-mapped: mapped pages stay resident (and count in
        RSS) until the file is closed, so a 7B checkpoint would fill the page table with 15 GB."""
        where = {}
        for path in sorted(Path(checkpoint).glob("*.safetensors")):
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            where.update({name: (path, 8 + size, entry) for name, entry in header.items()})
        if not where:
            raise UnsupportedModel(f"{checkpoint} has no *.safetensors files")
        return cls(set(where), lambda n: tuple(where[n][2]["shape"]), lambda n: _read_tensor(*where[n]))


def _read_tensor(path: Path, data_start: int, entry: dict) -> np.ndarray:
    """One safetensors tensor as fp32 (bf16 widened by a 16-bit shift: bf16 is fp32's upper half)."""
    begin, end = entry["data_offsets"]
    dtype = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}.get(entry["dtype"])
    if dtype is None:
        raise UnsupportedModel(f"{path.name}: tensor dtype {entry['dtype']} (fused graphs read BF16, F16, F32)")
    raw = np.empty(end - begin, np.uint8)
    with open(path, "rb", buffering=0) as f:
        f.seek(data_start + begin)
        if f.readinto(raw) != raw.size:
            raise UnsupportedModel(f"{path.name} is truncated; copy the checkpoint again")
    values = raw.view(dtype).reshape(entry["shape"])
    if entry["dtype"] == "BF16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


class _Initializers:
    """Collects the graph's constant tensors, inline or appended to the external data file."""

    def __init__(self, out_dir: Path, external: bool):
        self.tensors: list[TensorProto] = []
        self.bytes: dict[str, int] = {}
        self._file = open(out_dir / EXTERNAL_DATA, "wb") if external else None  # noqa: SIM115 - closed in close()

    def add(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        self.bytes[name] = array.nbytes
        # Shape-carrying constants (split sizes) must stay inline: shape inference cannot read external data.
        if self._file is None or array.nbytes < 1024:
            self.tensors.append(onnx.numpy_helper.from_array(array, name))
            return name
        t = TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        t.data_location = TensorProto.EXTERNAL
        offset = self._file.tell()
        self._file.write(array.tobytes())
        for key, value in (("location", EXTERNAL_DATA), ("offset", str(offset)), ("length", str(array.nbytes))):
            t.external_data.add(key=key, value=value)
        self.tensors.append(t)
        return name

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _Graph:
    """Node-by-node graph construction; each helper returns the name of its output.

    ``bits``: 4/8 for a quantized graph (None: fp32); ``method``: ``block_quant`` method for fp32 weights;
    ``importance``: per-tensor input-channel weights for the error (calibration), keyed by the graph name."""

    def __init__(
        self,
        init: _Initializers,
        bits: int | None,
        method: str = "mse",
        importance: dict[str, np.ndarray] | None = None,
    ):
        self.init, self.bits, self.method, self.nodes = init, bits, method, []
        self.importance = importance or {}

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, domain: str = "", **attrs) -> list[str]:
        outputs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", domain=domain, **attrs))
        return outputs

    def pack(self, weight: np.ndarray | Packed, name: str, bits: int | None = None) -> Packed:
        """``weight`` in ``MatMulNBits`` layout at ``bits`` (default: the graph's): as given when already packed."""
        bits = bits or self.bits
        if isinstance(weight, Packed):
            if weight.bits != bits:
                raise ExportError(f"{name}: source blocks are {weight.bits}-bit, the graph asked for {bits}")
            return weight
        # 8-bit blocks stay symmetric (llama.cpp's Q8_0 grid; a GGUF's Q8_0 tensors then copy exactly)
        return quantize(weight, bits, self.method if bits == 4 else "rtn", self.importance.get(name))

    def add_packed(self, p: Packed, name: str) -> list[str]:
        """The initializers of ``p``: [qweight, scales, zero points or ""]."""
        zp = "" if p.zero_points is None else self.init.add(f"{name}.zero_points", p.zero_points)
        return [self.init.add(f"{name}.qweight", p.packed), self.init.add(f"{name}.scales", p.scales), zp]

    def linear(
        self,
        x: str,
        weight: np.ndarray | Packed,
        name: str,
        bias: np.ndarray | None = None,
        out: str = "",
        bits: int | None = None,
        stored: list[str] | None = None,
    ) -> str:
        """``x @ weight.T (+ bias)`` for a Linear weight ``[N, K]``, 4/8-bit when the graph is quantized (or
        ``bits`` asks). ``stored``: initializers already in the graph (a tied embedding's) to read instead."""
        bits, (n, k) = bits or self.bits, weight.shape
        out = out or f"{name}.out"
        if bits:
            inputs = [x, *(stored or self.add_packed(self.pack(weight, name, bits), name))]
            if bias is not None:  # MatMulNBits adds the bias itself (inputs 3-4: zero points, g_idx)
                inputs += ["", self.init.add(f"{name}.bias", bias)]
            while inputs[-1] == "":
                inputs.pop()
            (y,) = self.node(
                "MatMulNBits",
                inputs,
                out,
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=BLOCK_SIZE,
                accuracy_level=4,  # int8 compute on CPU: the fast path for MatMulNBits
            )
            return y
        if isinstance(weight, Packed):
            raise ExportError(f"{name}: packed source blocks in an fp32 graph")
        (y,) = self.node("MatMul", [x, self.init.add(f"{name}.weight", weight.T)], out if bias is None else f"{out}.mm")
        if bias is not None:
            (y,) = self.node("Add", [y, self.init.add(f"{name}.bias", bias)], out)
        return y


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
        from .fused_deepseek import check_latent_supported

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
    init = _Initializers(out_dir, external_data)
    bits = QUANT_BITS.get(quant)
    head_bits = (head_bits or 8) if bits else None
    g = _Graph(init, bits, method, importance)
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
    if arch in LATENT_FAMILIES:  # lazy: fused_deepseek builds on this module
        from .fused_deepseek import latent_layers

        x, residual, cache = latent_layers(g, x, config, weights)
    else:
        x, residual, cache = _gqa_layers(g, x, config, weights)
    h, _ = _norm(g, x, residual, w("model.norm.weight"), "final_norm", eps)
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


def _gqa_layers(g: _Graph, x: str, config, weights: Weights) -> tuple[str, str, dict]:
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
        h, residual = _norm(g, x, residual, w(p + "input_layernorm.weight"), f"layer{i}.attn_norm", eps)
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
        h, residual = _norm(g, o, residual, w(p + "post_attention_layernorm.weight"), f"layer{i}.mlp_norm", eps)
        x = mlp(g, h, weights, p + "mlp.", f"layer{i}")
    return x, residual, dict(key_shape=(kv_heads, head_dim), value_shape=(kv_heads, head_dim))


def mlp(g: _Graph, h: str, weights: Weights, prefix: str, name: str) -> str:
    """The SwiGLU MLP under ``prefix`` (``gate_proj``/``up_proj``/``down_proj``) with gate and up packed in one
    projection; returns ``down(silu(gate) * up)``."""
    gate_up = g.linear(h, weights.rows([prefix + "gate_proj.weight", prefix + "up_proj.weight"], g.bits), f"{name}.gu")
    ffn = weights.shape(prefix + "gate_proj.weight")[0]
    halves = g.init.add(f"{name}.split", np.array([ffn, ffn], np.int64))
    gate, up = g.node("Split", [gate_up, halves], [f"{name}.gate", f"{name}.up"], axis=-1)
    (sig,) = g.node("Sigmoid", [gate], f"{name}.sigmoid")
    (silu,) = g.node("Mul", [gate, sig], f"{name}.silu")
    (act,) = g.node("Mul", [silu, up], f"{name}.act")
    return g.linear(act, weights.rows([prefix + "down_proj.weight"], g.bits), f"{name}.down")


def embedding(g: _Graph, table: np.ndarray | Packed, bits: int | None, stored: list[str] | None = None) -> str:
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


def tied_lm_head(g: _Graph, h: str, table: str, vocab: int, hidden: int) -> str:
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


def _norm(g: _Graph, x: str, residual: str | None, gamma: np.ndarray, name: str, eps: float) -> tuple[str, str]:
    """RMSNorm of ``x + residual``; returns (normalized, the new residual stream)."""
    weight = g.init.add(f"{name}.weight", gamma)
    if residual is None:
        (y,) = g.node("SimplifiedLayerNormalization", [x, weight], f"{name}.out", axis=-1, epsilon=eps)
        return y, x
    y, _, _, total = g.node(
        "SkipSimplifiedLayerNormalization",
        [x, residual, weight],
        [f"{name}.out", "", "", f"{name}.residual"],
        domain="com.microsoft",
        epsilon=eps,
    )
    return y, total


def _save(g: _Graph, spec: DecoderSpec, out_dir: Path) -> None:
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
