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
