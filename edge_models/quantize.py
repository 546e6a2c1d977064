"""Weight-only and dynamic quantization of the exported decoder, with drift and speed measured.

Modes: ``q4`` / ``q8`` — ONNX Runtime ``MatMulNBits`` (weights in 4 or 8 bits, blocks of 32,
int8 compute on CPU, ``accuracy_level=4``); ``int8`` — dynamic int8 quantization of every MatMul.
The routed experts' 3-D weight tensors (DeepSeek MoE) and the embedding stay in fp32. Fused graphs
(``edge_models.fused_graph``) are better quantized while they are written (``edge-models export
--quantize``, or ``compare_modes(build=...)``); quantizing their fp32 graph here gives the same operators
except DeepSeek's routed experts, which stay an fp32 ``MoE`` node.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from appliance.engine import create_engine
from appliance.engine.spec import DecoderSpec

from .errors import EdgeModelsError
from .tokenizer import copy_tokenizer_files

MODES = ("q4", "q8", "int8")


def quantize(onnx_dir: Path, out_dir: Path, mode: str) -> Path:
    """Write a quantized copy of ``onnx_dir`` (graph + decoder.json + tokenizer.json) to ``out_dir``."""
    if mode not in MODES:
        raise EdgeModelsError(f"unknown quantization mode {mode!r}; use one of {', '.join(MODES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src, dst = Path(onnx_dir) / "model.onnx", out_dir / "model.onnx"
    with _quiet():
        _run(mode, src, dst)
    shutil.copy(Path(onnx_dir) / "decoder.json", out_dir / "decoder.json")
    copy_tokenizer_files(Path(onnx_dir), out_dir)
    _update_weight_bytes(src, dst, out_dir / "decoder.json")
    return out_dir


def _update_weight_bytes(src: Path, dst: Path, spec_path: Path) -> None:
    """decoder.json's bytes-read-per-token, corrected for the weights the quantizer replaced (for
    honest "bandwidth achieved" figures): minus the fp32 tensors removed, plus what replaced them."""
    import dataclasses

    import onnx

    def sizes(path: Path) -> dict[str, int]:
        graph = onnx.load(str(path), load_external_data=False).graph
        return {
            t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            for t in graph.initializer
        }

    before, after = sizes(src), sizes(dst)
    removed = sum(v for k, v in before.items() if k not in after)
    added = sum(v for k, v in after.items() if k not in before)
    spec = DecoderSpec.from_json(spec_path.read_text())
    spec_path.write_text(dataclasses.replace(spec, weight_bytes=max(1, spec.weight_bytes - removed + added)).to_json())


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizers log one INFO line per node, on the root logger too."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(previous)


def _run(mode: str, src: Path, dst: Path) -> None:
    import onnx

    if mode == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Fused graphs: shape inference cannot type contrib operators' outputs; they are all fp32.
        extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], extra_options=extra
        )
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)), bits=4 if mode == "q4" else 8, block_size=32, is_symmetric=True, accuracy_level=4
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)


def _engine(onnx_dir: Path, slots: int = 1):
    spec = DecoderSpec.from_json((Path(onnx_dir) / "decoder.json").read_text())
    return create_engine(
        "onnxruntime", (Path(onnx_dir) / "model.onnx").read_bytes(), spec, num_slots=slots, max_seq_len=1024
    )


def onnx_perplexity(onnx_dir: Path, windows: np.ndarray, limit: int = 64) -> float:
    """Perplexity of the ONNX graph itself (what the appliance runs) on held-out windows."""
    engine = _engine(onnx_dir)
    total, count = 0.0, 0
    for window in windows[:limit]:
        logits = engine.score([int(t) for t in window[:-1]]).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        total -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return math.exp(total / count)


def decode_speed(onnx_dir: Path, new_tokens: int = 64, rounds: int = 3) -> float:
    """Median batch-1 greedy decode tokens/s through the appliance engine."""
    engine = _engine(onnx_dir)
    head = [] if engine.spec.bos_token_id is None else [engine.spec.bos_token_id]
    rates = []
    for _ in range(rounds):
        logits = engine.prefill([(0, [*head, 40, 41, 42, 43, 44, 45, 46])])
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = engine.decode([(0, int(np.argmax(logits[0])))])
        rates.append(new_tokens / (time.perf_counter() - start))
        engine.release(0)
    return float(np.median(rates))


def compare_modes(onnx_dir: Path, out_root: Path, windows: np.ndarray, modes=MODES, build=None) -> dict:
    """fp32 and each quantized variant: perplexity, drift, decode speed, bytes. Same run, same windows.

    ``build(mode, out_dir)``, when given, writes the q4/q8 variants itself (a fused graph quantized while it
    is written from the weights: ``QMoE`` experts, which quantizing the fp32 graph here would leave fp32)."""
    rows = {"fp32": Path(onnx_dir)}
    for mode in modes:
        if build is not None and mode in ("q4", "q8"):
            rows[mode] = Path(out_root) / mode
            build(mode, rows[mode])
            copy_tokenizer_files(Path(onnx_dir), rows[mode])
        else:
            rows[mode] = quantize(onnx_dir, Path(out_root) / mode, mode)
    report = {}
    for name, path in rows.items():
        report[name] = {
            "perplexity": onnx_perplexity(path, windows),
            "tokens_per_s": decode_speed(path),
            "bytes": (path / "model.onnx").stat().st_size,
        }
    base = report["fp32"]
    for r in report.values():
        r["perplexity_drift"] = r["perplexity"] / base["perplexity"] - 1
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
    return report
