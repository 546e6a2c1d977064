"""Shared pieces for writing ONNX decoder graphs node by node: checkpoint access (``Weights``), the constant
tensors (``Initializers``, inline or appended to ``model.onnx.data``), the node builder (``Graph``: linear
projections, quantized as ``MatMulNBits`` when asked) and the blocks every family uses (``norm``: RMSNorm with the
residual add folded in; ``mlp``: the packed SwiGLU MLP).

The family builders sit on top of it, each importing only modules below it: ``graph_builder`` <- ``fused_moe``
(DeepSeek routed experts) <- ``fused_deepseek`` (MLA layers) <- ``fused_graph`` (the decoder graph, Qwen2/Llama
layers, ``build_fused_decoder``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from .block_quant import BLOCK_SIZE, Packed, quantize
from .errors import ExportError

if TYPE_CHECKING:
    import torch

EXTERNAL_DATA = "model.onnx.data"


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
    ) -> None:
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
    def from_module(cls, model: torch.nn.Module) -> Weights:
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


class Initializers:
    """Collects the graph's constant tensors, inline or appended to the external data file."""

    def __init__(self, out_dir: Path, external: bool) -> None:
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


class Graph:
    """Node-by-node graph construction; each helper returns the name of its output.

    ``bits``: 4/8 for a quantized graph (None: fp32); ``method``: ``block_quant`` method for fp32 weights;
    ``importance``: per-tensor input-channel weights for the error (calibration), keyed by the graph name."""

    def __init__(
        self,
        init: Initializers,
        bits: int | None,
        method: str = "mse",
        importance: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.init, self.bits, self.method = init, bits, method
        self.nodes: list[onnx.NodeProto] = []
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


def norm(g: Graph, x: str, residual: str | None, gamma: np.ndarray, name: str, eps: float) -> tuple[str, str]:
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


def mlp(g: Graph, h: str, weights: Weights, prefix: str, name: str) -> str:
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
