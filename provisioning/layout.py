"""The one weight layout every bundle carries: the graph in ``model.onnx``, every tensor of 1 KiB or more in
``model.onnx.data``.

The daemon borrows ``model.onnx.data`` in place (decrypted into page-aligned memory, never copied) and builds a large
graph as consecutive sessions, handing back what ONNX Runtime prepacked; a graph with its weights inline would be
copied whole instead (the daemon's peak was 3-5x the weights for models under the 2 GB protobuf limit). So
``edge-provision seal`` moves inline weights out before encrypting, and every model, whatever its size, loads the
same way. Tensors under 1 KiB stay inline: shape-carrying constants must, for shape inference.
"""

from __future__ import annotations

from pathlib import Path

from .errors import BundleFormatError

EXTERNAL_DATA = "model.onnx.data"
INLINE_LIMIT = 1024  # bytes: smaller tensors stay in the graph


def externalize(model: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write ``model``'s graph to ``out_dir/model.onnx`` with its tensors of ``INLINE_LIMIT`` bytes or more in
    ``out_dir/model.onnx.data``; returns both paths. ``model`` must have no external data of its own."""
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf's DecodeError and others, untyped
        raise BundleFormatError(f"{model} is not an ONNX model ({exc}); export it with 'edge-models export'") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise BundleFormatError(f"{model} refers to external data but {EXTERNAL_DATA} is not beside it")
    convert_model_to_external_data(
        proto, all_tensors_to_one_file=True, location=EXTERNAL_DATA, size_threshold=INLINE_LIMIT
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(out_dir / "model.onnx"), save_as_external_data=True, location=EXTERNAL_DATA,
                    all_tensors_to_one_file=True, size_threshold=INLINE_LIMIT)  # fmt: skip
    data = out_dir / EXTERNAL_DATA
    if not data.exists():  # a graph with no tensor over the limit: an empty file keeps the layout uniform
        data.write_bytes(b"")
    return out_dir / "model.onnx", data
