"""TensorRT 10 backend (Jetson / x86 GPUs). Needs ``tensorrt`` and torch with CUDA (device buffers).

The plan arrives as decrypted bytes and is deserialized in memory
(``IRuntime.deserialize_cuda_engine``); it never exists as a file on the device. I/O uses the
name-based tensor API of TensorRT 10 (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). A plan is specific to the GPU model and TensorRT version that built it;
``appliance.engine.trt_build`` builds it from a traced float32 export (on the device or an identical one).

Not run in this project's CI: TensorRT cannot be installed there. Run
``python -m appliance.engine.trt_selftest`` on a GPU to check it against ONNX Runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import EngineError
from .padded import PaddedKVEngine
from .spec import DecoderSpec, input_names, output_names


def _require():
    try:
        import tensorrt as trt
        import torch
    except ImportError as exc:
        raise EngineError(
            f"the TensorRT engine needs the 'gpu' extra and torch with CUDA ({exc}); "
            "use engine kind 'onnxruntime' on machines without them"
        ) from None
    if not torch.cuda.is_available():
        raise EngineError("the TensorRT engine needs a CUDA GPU and none is visible")
    return trt, torch


class TrtEngine(PaddedKVEngine):
    kind = "tensorrt"

    def __init__(self, plan: bytes, spec: DecoderSpec, *, num_slots: int, max_seq_len: int):
        trt, torch = _require()
        super().__init__(spec, num_slots, max_seq_len)
        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(
                "TensorRT could not deserialize the plan: it was built for another GPU or TensorRT version; seal a "
                "plan built on this GPU model, or seal none and let the daemon build one here (docs/TENSORRT.md)"
            )
        self.context = self.engine.create_execution_context()
        self._inputs, self._outputs = input_names(spec.num_layers), output_names(spec.num_layers)
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        missing = set(self._inputs + self._outputs) - names
        if missing:
            raise EngineError(f"plan lacks tensors {sorted(missing)[:4]}...; it was not built from this decoder")
        self._dtypes = {n: _torch_dtype(trt, torch, self.engine.get_tensor_dtype(n)) for n in names}
        self._stream = torch.cuda.Stream()

    def _empty(self, shape: tuple[int, ...]) -> Any:
        return self._torch.zeros(shape, dtype=self._dtypes["past.0.key"], device="cuda")

    def _host(self, logits: Any) -> np.ndarray:
        return logits.float().cpu().numpy()

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[Any], out=None):
        torch = self._torch
        feeds = [
            torch.from_numpy(a).to("cuda", dtype=self._dtypes[n])
            for n, a in zip(self._inputs[:3], (ids, mask, positions), strict=True)
        ]
        feeds += [p.contiguous() for p in past]
        for name, tensor in zip(self._inputs, feeds, strict=True):
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise EngineError(
                    f"shape {tuple(tensor.shape)} for {name} is outside the plan's optimization profile; "
                    "rebuild the plan with larger limits"
                )
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for i, name in enumerate(self._outputs):
            shape = tuple(self.context.get_tensor_shape(name))
            if out is not None and i > 0:  # the decode arena: present is written where the next step reads it
                buf = out[i - 1]
            else:
                buf = torch.empty(shape, dtype=self._dtypes[name], device="cuda")
            self.context.set_tensor_address(name, buf.data_ptr())
            outputs.append(buf)
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise EngineError("TensorRT execution failed (see the TensorRT log above)")
        self._stream.synchronize()
        logits, *present = outputs
        return logits, present


def _torch_dtype(trt, torch, dtype):
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
        trt.bfloat16: torch.bfloat16,
        trt.bool: torch.bool,
    }
    if dtype not in table:
        raise EngineError(f"unsupported TensorRT tensor type {dtype}")
    return table[dtype]
