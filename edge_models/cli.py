"""``edge-models``: build the demo model, export checkpoints to ONNX."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import build_demo
    from .teacher import TINY, TeacherShape
    from .train import TrainConfig

    shape = TINY if args.tiny else TeacherShape()
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    report = build_demo(Path(args.out), shape, train, vocab_size=args.vocab_size, force=args.force)
    print(json.dumps({k: report[k] for k in ("parameters", "heldout_perplexity", "build_seconds", "parity",
                                              "sample")}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shutil

    from transformers import AutoModelForCausalLM

    from .export import export_decoder

    model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    spec = export_decoder(model, Path(args.out))
    tok = Path(args.model) / "tokenizer.json"
    if tok.exists():
        shutil.copy(tok, Path(args.out) / "tokenizer.json")
    print(f"exported {spec.architecture} ({spec.num_layers} layers) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-models", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="build (or reuse) the embedded demo model and its ONNX export")
    d.add_argument("--out", default="build/demo", help="build directory (default: build/demo)")
    d.add_argument("--steps", type=int, default=600, help="training steps (default: 600, ~5 min on 2 cores)")
    d.add_argument("--batch-size", type=int, default=16, help="windows per step (default: 16)")
    d.add_argument("--seq-len", type=int, default=128, help="tokens per training window (default: 128)")
    d.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: 4096)")
    d.add_argument("--seed", type=int, default=0, help="seed for initialisation and batch order (default: 0)")
    d.add_argument("--tiny", action="store_true", help="a much smaller shape, for tests (seconds)")
    d.add_argument("--force", action="store_true", help="rebuild even if a cached build matches")
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser("export", help="export a local Hugging Face checkpoint directory to ONNX with KV cache")
    e.add_argument("--model", required=True, help="checkpoint directory (config.json + weights; never a hub id)")
    e.add_argument("--out", required=True, help="output directory for model.onnx and decoder.json")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one line per deduplicated initializer otherwise
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"edge-models: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
