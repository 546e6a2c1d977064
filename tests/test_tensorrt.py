"""TensorRT backend: runs only where TensorRT and a CUDA GPU exist (never in this project's CI)."""

from __future__ import annotations

import importlib.util

import pytest

from appliance.engine import EngineError, create_engine
from appliance.engine.spec import DecoderSpec

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; the missing-TensorRT path cannot be shown")
def test_missing_tensorrt_is_a_clear_error(traced_teacher):
    spec = DecoderSpec.from_json((traced_teacher / "decoder.json").read_text())
    with pytest.raises(EngineError, match="onnxruntime"):
        create_engine("tensorrt", b"not-a-plan", spec, num_slots=1, max_seq_len=64)


@pytest.mark.skipif(
    not HAVE_TRT,
    reason="TensorRT is not installable on this machine (PyPI wheels fetch from "
    "NVIDIA's site); run `python -m appliance.engine.trt_selftest` on a GPU",
)
def test_tensorrt_plan_matches_onnxruntime(traced_teacher):
    from appliance.engine.trt_selftest import main

    assert main(["--onnx", str(traced_teacher), "--fp32"]) == 0


def test_unknown_engine_kind_is_refused(traced_teacher):
    spec = DecoderSpec.from_json((traced_teacher / "decoder.json").read_text())
    with pytest.raises(EngineError, match="unknown engine kind"):
        create_engine("cuda-magic", b"", spec, num_slots=1, max_seq_len=64)


def test_a_fused_graph_is_refused_before_tensorrt_is_asked(tiny_build):
    """The demo's fused static-cache graph uses ONNX Runtime contrib operators TensorRT cannot parse: every way to
    build a plan refuses it with one line naming the export that works (no TensorRT needed to see it)."""
    from appliance.engine.trt_build import build_plan
    from appliance.engine.trt_selftest import main

    spec = DecoderSpec.from_json((tiny_build / "onnx" / "decoder.json").read_text())
    assert spec.cache == "static"
    with pytest.raises(EngineError, match="--traced"):
        build_plan(b"", spec, max_batch=1, max_seq_len=64)
    assert main(["--onnx", str(tiny_build / "onnx")]) == 1


def test_a_malformed_decoder_json_is_one_clear_error():
    from appliance.engine.spec import SpecError

    for text, why in (("{", "not JSON"), ("[]", "not a JSON object"), ('{"format": 1}', "incomplete")):
        with pytest.raises(SpecError, match=why):
            DecoderSpec.from_json(text)
