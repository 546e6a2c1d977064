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
) -> Engine:
    """Build the backend named ``kind`` from an in-memory model (never a path to plaintext).

    ``external`` maps external-data file names the graph refers to (``model.onnx.data``) to their
    decrypted contents, for models past the 2 GB protobuf limit.
    """
    if kind == "onnxruntime":
        from .ort_engine import OrtEngine
        from .static_cache import StaticCacheEngine

        return (StaticCacheEngine if spec.cache == "static" else OrtEngine)(
            model,
            spec,
            num_slots=num_slots,
            max_seq_len=max_seq_len,
            threads=threads,
            external=external,
            spin=spin,
            affinity=affinity,
        )
    if kind == "tensorrt":
        from .trt_engine import TrtEngine

        return TrtEngine(model, spec, num_slots=num_slots, max_seq_len=max_seq_len)
    raise EngineError(f"unknown engine kind {kind!r}; use 'onnxruntime' or 'tensorrt'")
