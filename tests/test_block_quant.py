"""The 4/8-bit block formats are exactly what ONNX Runtime's MatMulNBits computes with: every method's packing
(codes, scales, zero points — two per byte, odd block counts, K off the block grid) run through the operator
equals the weights the format says, and the error-minimising methods beat round-to-nearest."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_models.block_quant import BLOCK_SIZE, Packed, quantize


def dequantize(p: Packed) -> np.ndarray:
    n, blocks, _ = p.packed.shape
    codes = np.stack([p.packed & 15, p.packed >> 4], -1).reshape(n, blocks, BLOCK_SIZE) if p.bits == 4 else p.packed
    if p.zero_points is None:
        zero = np.full((n, blocks), 1 << (p.bits - 1))
    elif p.bits == 4:
        zero = np.stack([p.zero_points & 0x0F, p.zero_points >> 4], -1).reshape(n, -1)[:, :blocks]
    else:
        zero = p.zero_points
    values = (codes.astype(np.float32) - zero[..., None]) * p.scales[..., None]
    return values.reshape(n, -1)[:, : p.k]


def run_matmulnbits(p: Packed, x: np.ndarray) -> np.ndarray:
    n, k = p.shape
    inits = [numpy_helper.from_array(p.packed, "B"), numpy_helper.from_array(p.scales.reshape(-1), "S")]
    inputs = ["X", "B", "S"]
    if p.zero_points is not None:
        inits.append(numpy_helper.from_array(p.zero_points.reshape(-1), "Z"))
        inputs.append("Z")
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=p.bits,
        block_size=BLOCK_SIZE,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    return ort.InferenceSession(model.SerializeToString()).run(None, {"X": x})[0]


@pytest.mark.parametrize("method", ["mse", "mse-sym", "rtn"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [96, 100])  # 3 blocks (an odd count of 4-bit zero points), and K off the grid
def test_the_operator_computes_with_exactly_the_packed_weights(method, bits, k):
    rng = np.random.default_rng(k + bits)
    weight = (rng.standard_normal((48, k)) * rng.uniform(0.01, 2, (48, 1))).astype(np.float32)
    weight[:, :8] += 0.5  # blocks off centre: asymmetric grids earn their zero point
    importance = rng.uniform(0.1, 10, k).astype(np.float32)
    p = quantize(weight, bits, method, importance if method != "rtn" else None)
    x = rng.standard_normal((3, k)).astype(np.float32)
    expected = x @ dequantize(p).T
    np.testing.assert_allclose(run_matmulnbits(p, x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.abs(dequantize(p) - weight).max() < np.abs(weight).max() / (2 if bits == 4 else 50)


def test_error_minimising_methods_beat_round_to_nearest():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 256)).astype(np.float32)
    weight[:, ::7] *= 4  # outlier channels, as trained weights have
    importance = rng.uniform(0.1, 10, 256).astype(np.float32)

    def error(method: str) -> float:
        p = quantize(weight, 4, method, None if method == "rtn" else importance)
        return float((importance * (dequantize(p) - weight) ** 2).mean())

    rtn, sym, mse = error("rtn"), error("mse-sym"), error("mse")
    assert mse < sym < rtn, (mse, sym, rtn)
