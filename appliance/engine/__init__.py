"""Inference engines: one interface (``base.Engine``), several backends."""

from .base import Engine, EngineError
from .spec import DecoderSpec

__all__ = ["DecoderSpec", "Engine", "EngineError", "create_engine"]


def create_engine(
    kind: str,
    model: bytes,
    spec: DecoderSpec,
    *,
    num_slots: int,
    max_seq_len: int,
    threads: int = 0,
    external: dict[str, bytearray] | None = None,
    spin: bool = True,
    affinity: str = "",
    load_pieces: int = 1,
    checkpoint_config: bytes | None = None,
    quantize: str = "none",
) -> Engine:
    """Build the backend named ``kind`` from an in-memory model (never a path to plaintext).

    ``model`` is the ONNX graph (onnxruntime), the safetensors weights (torch, with the checkpoint's
    ``config.json`` as ``checkpoint_config``) or the serialized plan (tensorrt). ``external`` maps
    external-data file names the graph refers to (``model.onnx.data``) to their decrypted contents,
    for models past the 2 GB protobuf limit; a static-cache graph with them is built as ``load_pieces`` sessions
    (``pipeline``). torch is imported only for kind ``torch``/``tensorrt``.
    """
    if kind == "onnxruntime":
        from .ort_engine import OrtEngine
        from .static_cache import StaticCacheEngine
        from .weights import check_external_ranges

        if external:
            check_external_ranges(model, {name: len(buf) for name, buf in external.items()})

        settings = dict(num_slots=num_slots, max_seq_len=max_seq_len, threads=threads, external=external, spin=spin)
        if spec.cache == "static":
            return StaticCacheEngine(model, spec, **settings, affinity=affinity, pieces=load_pieces)
        return OrtEngine(model, spec, **settings, affinity=affinity)
    if kind == "torch":
        try:
            from .torch_engine import TorchEngine
        except ImportError as exc:
            raise EngineError(
                f"the torch engine needs torch and safetensors ({exc}); use engine kind 'onnxruntime'"
            ) from None
        if checkpoint_config is None:
            raise EngineError("the torch engine needs the checkpoint's config.json; the bundle lacks it")
        return TorchEngine(
            model,
            checkpoint_config,
            spec,
            num_slots=num_slots,
            max_seq_len=max_seq_len,
            quantize=quantize,
            threads=threads,
        )
    if kind == "tensorrt":
        from .trt_engine import TrtEngine

        return TrtEngine(model, spec, num_slots=num_slots, max_seq_len=max_seq_len)
    raise EngineError(f"unknown engine kind {kind!r}; use 'onnxruntime', 'torch' or 'tensorrt'")
