"""Build a TensorRT 10 plan from an exported decoder (on the target GPU, or an identical one).

TensorRT parses standard ONNX only: the graph must be a traced float32 export (``edge-models export --traced``,
``cache = "concat"`` in its decoder.json). The fused graphs (static cache, ``GroupQueryAttention``,
``MatMulNBits``) are ONNX Runtime contrib operators and are refused before TensorRT is asked.

Dynamic axes get one optimization profile: batch 1..max_batch, new tokens 1..max_seq_len,
past 0..max_seq_len-1. The plan is returned as bytes so it can be sealed straight into a bundle.
The daemon calls this on the device (``appliance.loader``); ``python -m appliance.engine.trt_selftest``
checks a plan against ONNX Runtime.
"""

from __future__ import annotations

from .base import EngineError
from .spec import DecoderSpec, input_names


class TensorRTUnavailable(EngineError):
    pass


def check_parsable(spec: DecoderSpec) -> None:
    """Refuse a graph TensorRT cannot parse (a fused static-cache graph), naming the export that it can."""
    if spec.cache != "concat":
        raise EngineError(
            f"TensorRT cannot parse this {spec.cache}-cache graph (ONNX Runtime contrib operators); build the plan "
            "from a traced float32 export: edge-models export --model CHECKPOINT --out DIR --traced"
        )


def build_plan(
    onnx_model: bytes,
    spec: DecoderSpec,
    *,
    max_batch: int,
    max_seq_len: int,
    fp16: bool = True,
    workspace_bytes: int = 4 << 30,
) -> bytes:
    check_parsable(spec)
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed: install NVIDIA's tensorrt wheel (TensorRT 10) "
            "on the GPU machine, or serve with the onnxruntime engine"
        ) from None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_model):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse the ONNX decoder: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    opt_batch, opt_seq = max(1, max_batch // 2), max(1, max_seq_len // 4)
    names = input_names(spec.num_layers)
    for name in names[:3]:
        total = name == "attention_mask"
        profile.set_shape(name, (1, 1), (opt_batch, opt_seq if not total else opt_seq * 2), (max_batch, max_seq_len))
    for i, name in enumerate(names[3:]):
        heads, dim = spec.key_shape if i % 2 == 0 else spec.value_shape
        profile.set_shape(
            name, (1, heads, 0, dim), (opt_batch, heads, opt_seq, dim), (max_batch, heads, max_seq_len - 1, dim)
        )
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError("TensorRT failed to build the plan (see the TensorRT log above)")
    return bytes(plan)
