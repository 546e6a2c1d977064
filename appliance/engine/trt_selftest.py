"""Self-test for GPU owners: build a TensorRT plan from an exported decoder and check that its
greedy tokens match ONNX Runtime's on the same prompts (batch 1 and a left-padded batch of 2).

    edge-models export --model build/demo/student/student --out build/trt-onnx --traced
    python -m appliance.engine.trt_selftest --onnx build/trt-onnx

The graph must be a traced export (TensorRT parses standard ONNX only, not the fused graphs).

Exit status 0 when the tokens match, 1 when they differ, 2 when TensorRT or a GPU is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", required=True, help="directory with model.onnx and decoder.json (edge-models export)")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare (default: 16)")
    p.add_argument(
        "--fp32",
        action="store_true",
        help="build the plan in fp32 (default fp16; fp16 may differ from fp32 ONNX Runtime after a few tokens)",
    )
    args = p.parse_args(argv)

    from . import EngineError
    from .greedy import engine_greedy
    from .ort_engine import OrtEngine
    from .spec import DecoderSpec
    from .trt_build import TensorRTUnavailable, build_plan, check_parsable
    from .trt_engine import TrtEngine

    onnx_dir = Path(args.onnx)
    spec = DecoderSpec.from_json((onnx_dir / "decoder.json").read_text())
    model = (onnx_dir / "model.onnx").read_bytes()
    try:
        check_parsable(spec)
    except EngineError as exc:
        print(f"trt_selftest: error: {exc}", file=sys.stderr)
        return 1
    try:
        start = time.monotonic()
        plan = build_plan(model, spec, max_batch=2, max_seq_len=128, fp16=not args.fp32)
        built = time.monotonic() - start
        trt_engine = TrtEngine(plan, spec, num_slots=2, max_seq_len=128)
    except (TensorRTUnavailable, EngineError) as exc:
        print(f"SKIPPED: {exc}", file=sys.stderr)
        return 2
    ort_engine = OrtEngine(model, spec, num_slots=2, max_seq_len=128)
    bos = spec.bos_token_id
    cases = {"batch-1": [[bos, 40, 41, 42]], "left-padded-batch-2": [[bos, 50, 60, 70, 80, 90], [bos, 300, 301]]}
    report = {"plan_build_s": round(built, 1), "plan_bytes": len(plan), "fp16": not args.fp32}
    ok = True
    for name, prompts in cases.items():
        ours = engine_greedy(trt_engine, prompts, args.tokens, spec.eos_token_id)
        ref = engine_greedy(ort_engine, prompts, args.tokens, spec.eos_token_id)
        report[name] = {"identical": ours == ref, "tensorrt": ours, "onnxruntime": ref}
        ok &= ours == ref
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
