"""``edge-appliance selftest``: run the installed bundle on every engine this device can run.

For each engine kind the bundle carries and the device supports, the model is loaded exactly as
the daemon loads it (decrypted in memory), greedy tokens on a fixed prompt are compared with the
ONNX Runtime CPU engine's, and batch-1 decode speed is measured with the bandwidth it implies
(weight bytes read per token × tokens/s, gpt-fast's "bandwidth achieved"). One table is printed.

A kind whose precision equals ONNX Runtime's must produce identical tokens; one that runs in
another precision (bf16 on CUDA, int8/int4 weights, a quantized ONNX graph) is expected to drift
after a few tokens, so the table reports how many leading tokens agree and does not fail on it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from appliance.config import Config
from appliance.engine import EngineError
from appliance.engine.select import DeviceCaps, PlanMismatchError, check_plan_target, probe_device
from appliance.loader import LoadedModel, installed_bundle, load_model

PROMPT = "How do I reset the conveyor?"


@dataclass
class Row:
    kind: str
    device: str
    precision: str
    agree: int  # leading greedy tokens equal to ONNX Runtime's
    tokens: int
    verdict: str  # reference | identical | drift (precision differs) | DIFFERS | skipped: why
    tokens_per_s: float = 0.0
    bandwidth_gb_s: float = 0.0


def runnable_kinds(config: Config, caps: DeviceCaps) -> list[tuple[str, str | None]]:
    """(kind, why not) for each kind the installed bundle carries; ``None`` when it can run here."""
    out = []
    for entry in installed_bundle(config).engines():
        why = None
        if entry.kind == "torch" and not caps.torch:
            why = "torch is not installed"
        elif entry.kind == "tensorrt":
            try:
                check_plan_target(entry, caps)
            except PlanMismatchError as exc:
                why = str(exc)
        if all(k != entry.kind for k, _ in out):
            out.append((entry.kind, why))
    return out


def greedy(model: LoadedModel, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """Greedy tokens (EOS allowed) and batch-1 decode tokens/s, prefill excluded."""
    engine = model.engine
    out = [int(np.argmax(engine.prefill([(0, prompt)])[0]))]
    start = time.perf_counter()
    for _ in range(tokens - 1):
        out.append(int(np.argmax(engine.decode([(0, out[-1])])[0])))
    elapsed = time.perf_counter() - start
    engine.release(0)
    return out, (tokens - 1) / max(elapsed, 1e-9)


def precision(model: LoadedModel, manifest_dtype: str) -> str:
    engine = model.engine
    if engine.kind == "torch":
        q = getattr(engine, "quantize", "none")
        return str(engine.dtype).removeprefix("torch.") + ("" if q == "none" else f"+{q}")
    return manifest_dtype


def run_selftest(config: Config, tokens: int = 32, caps: DeviceCaps | None = None) -> list[Row]:
    caps = caps or probe_device()
    dtypes = {e.kind: e.dtype for e in installed_bundle(config).engines()}
    reference = load_model(config, kind="onnxruntime", caps=caps)
    prompt = [reference.spec.bos_token_id, *reference.tokenizer.encode(PROMPT).ids]
    tokens = min(tokens, reference.engine.max_seq_len - len(prompt))
    ref_tokens, _ = greedy(reference, prompt, tokens)  # untimed: also warms ONNX Runtime up
    rows = []
    for kind, why_not in runnable_kinds(config, caps):
        if why_not is not None:
            rows.append(Row(kind, "-", dtypes[kind], 0, tokens, f"skipped: {why_not}"))
            continue
        try:
            model = reference if kind == "onnxruntime" else load_model(config, kind=kind, caps=caps)
        except EngineError as exc:
            rows.append(Row(kind, "-", dtypes[kind], 0, tokens, f"skipped: {exc}"))
            continue
        greedy(model, prompt, min(tokens, 4))  # warm-up (CUDA graphs are captured here)
        ours, tok_s = greedy(model, prompt, tokens)
        agree = next((i for i, (a, b) in enumerate(zip(ours, ref_tokens, strict=True)) if a != b), tokens)
        prec = precision(model, dtypes[kind])
        same_precision = prec == dtypes["onnxruntime"]
        if kind == "onnxruntime":
            verdict = "reference"
        elif agree == tokens:
            verdict = "identical"
        else:
            verdict = "DIFFERS" if same_precision else "drift (precision differs)"
        weight_bytes = getattr(model.engine, "weight_bytes", 0) or model.spec.weight_bytes
        device = str(getattr(model.engine, "device", "cpu"))
        rows.append(
            Row(kind, device, prec, agree, tokens, verdict, round(tok_s, 1), round(weight_bytes * tok_s / 1e9, 4))
        )
        if model is not reference:
            del model
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("engine", "device", "precision", "parity vs onnxruntime", "tok/s (batch 1)", "bandwidth GB/s")
    body = [
        (
            r.kind,
            r.device,
            r.precision,
            f"{r.verdict} ({r.agree}/{r.tokens})",
            f"{r.tokens_per_s:.1f}",
            f"{r.bandwidth_gb_s:.3g}",
        )
        if not r.verdict.startswith("skipped")
        else (r.kind, r.device, r.precision, r.verdict, "-", "-")
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = [" | ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) for line in (head, *body)]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
