"""Which engine kind serves a bundle on this device, and why.

A bundle may carry ONNX (``onnxruntime``), a safetensors checkpoint (``torch``) and TensorRT plans
(``tensorrt``, each built for one GPU compute capability and TensorRT version). ``[engine] kind =
"auto"`` takes the best one this device can run, in the order TensorRT plan > torch on CUDA >
ONNX Runtime on CPU, and says why each better kind was passed over. A named kind is used or
refused with the reason; it is never silently replaced.

Probing imports torch only when an NVIDIA device node exists, so a CPU-only box never loads it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from appliance.config import ENGINE_KINDS as KINDS
from provisioning.bundle import EngineEntry

from .base import EngineError


class PlanMismatchError(EngineError):
    """A TensorRT plan was built for another GPU model or TensorRT version."""


@dataclass(frozen=True)
class DeviceCaps:
    cuda: bool = False
    compute_capability: str | None = None  # "8.7" (Jetson Orin), "9.0" (H100) ...
    tensorrt: str | None = None  # TensorRT version importable here, e.g. "10.3.0"
    torch: bool = False

    def describe(self) -> str:
        gpu = f"CUDA GPU sm {self.compute_capability}" if self.cuda else "no CUDA GPU"
        return f"{gpu}, TensorRT {self.tensorrt or 'absent'}, torch {'present' if self.torch else 'absent'}"


def probe_device() -> DeviceCaps:
    """What this machine can run (see the module docstring for what gets imported)."""
    has_torch = importlib.util.find_spec("torch") is not None
    nvidia = any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/nvhost-ctrl-gpu").exists()  # x86 / Jetson
    if not (nvidia and has_torch):
        return DeviceCaps(torch=has_torch)
    import torch

    if not torch.cuda.is_available():
        return DeviceCaps(torch=True)
    major, minor = torch.cuda.get_device_capability()
    trt = None
    if importlib.util.find_spec("tensorrt") is not None:
        import tensorrt

        trt = tensorrt.__version__
    return DeviceCaps(cuda=True, compute_capability=f"{major}.{minor}", tensorrt=trt, torch=True)


def check_plan_target(entry: EngineEntry, caps: DeviceCaps) -> None:
    """Refuse a plan this device cannot deserialize: TensorRT plans are specific to the GPU's compute
    capability and to the TensorRT release (major.minor.patch) that built them."""
    want_cc, want_trt = entry.target.get("compute_capability"), entry.target.get("tensorrt")
    if caps.compute_capability != want_cc:
        raise PlanMismatchError(
            f"TensorRT plan {entry.files[0]} was built for GPU compute capability {want_cc}, this device has "
            f"{caps.compute_capability or 'no CUDA GPU'}; seal a plan built on this GPU model, or use kind torch"
        )
    if _release(caps.tensorrt) != _release(want_trt):
        raise PlanMismatchError(
            f"TensorRT plan {entry.files[0]} was built with TensorRT {want_trt}, this device has "
            f"{caps.tensorrt or 'no TensorRT'}; seal a plan built with TensorRT {caps.tensorrt or '(install it)'}, "
            "or use kind torch"
        )


def _release(version: str | None) -> tuple[str, ...] | None:
    return None if version is None else tuple(version.split(".")[:3])


@dataclass(frozen=True)
class Choice:
    entry: EngineEntry
    reason: str


def choose_engine(requested: str, entries: list[EngineEntry], caps: DeviceCaps) -> Choice:
    """The entry to serve with and a one-line reason, or an ``EngineError`` saying what is missing."""
    if requested not in KINDS:
        raise EngineError(f"[engine] kind must be one of {KINDS}, not {requested!r}")
    carried = sorted({e.kind for e in entries}) or ["nothing"]
    if requested != "auto":
        found = [e for e in entries if e.kind == requested]
        if not found:
            raise EngineError(
                f"[engine] kind = {requested!r} but the bundle carries {', '.join(carried)}; "
                'use one of those or kind = "auto"'
            )
        if requested == "tensorrt":
            return Choice(_matching_plan(found, caps), f"[engine] kind = 'tensorrt', plan matches {caps.describe()}")
        return Choice(found[0], f"[engine] kind = {requested!r}")
    passed_over = []
    plans = [e for e in entries if e.kind == "tensorrt"]
    if plans:
        try:
            plan = _matching_plan(plans, caps)
            return Choice(plan, f"auto: TensorRT plan for sm {plan.target['compute_capability']} matches this GPU")
        except PlanMismatchError as exc:
            passed_over.append(f"tensorrt refused ({exc})")
    torch_entry = next((e for e in entries if e.kind == "torch"), None)
    if torch_entry is not None:
        if caps.cuda:
            return Choice(torch_entry, _auto_reason("torch on CUDA", caps, passed_over))
        passed_over.append("torch skipped (no CUDA GPU: ONNX Runtime is the faster CPU engine)")
    ort = next((e for e in entries if e.kind == "onnxruntime"), None)
    if ort is not None:
        return Choice(ort, _auto_reason("onnxruntime on CPU", caps, passed_over))
    if torch_entry is not None:
        return Choice(torch_entry, _auto_reason("torch on CPU (the bundle carries no ONNX)", caps, passed_over))
    raise EngineError(
        f"the bundle carries {', '.join(carried)} and none runs on this device ({caps.describe()}); "
        + "; ".join(passed_over)
    )


def _matching_plan(plans: list[EngineEntry], caps: DeviceCaps) -> EngineEntry:
    if not caps.cuda or caps.tensorrt is None:
        raise PlanMismatchError(
            f"the bundle's TensorRT plans need a CUDA GPU and TensorRT; this device has {caps.describe()}; "
            "use kind torch or onnxruntime"
        )
    errors = []
    for plan in plans:
        try:
            check_plan_target(plan, caps)
            return plan
        except PlanMismatchError as exc:
            errors.append(str(exc))
    raise PlanMismatchError(errors[0] if len(errors) == 1 else f"no plan matches: {' | '.join(errors)}")


def _auto_reason(what: str, caps: DeviceCaps, passed_over: list[str]) -> str:
    return f"auto: {what} ({caps.describe()})" + (f"; {'; '.join(passed_over)}" if passed_over else "")
