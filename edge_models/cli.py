"""``edge-models``: build the demo model, export checkpoints to ONNX."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from pathlib import Path

import numpy as np


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_STUDENT, TINY_STUDENT, build_demo
    from .teacher import TINY, TeacherShape
    from .train import TrainConfig

    shape = TINY if args.tiny else TeacherShape()
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed)
    student = TINY_STUDENT if args.tiny else DEMO_STUDENT
    report = build_demo(Path(args.out), shape, train, vocab_size=args.vocab_size, force=args.force, student=student)
    print(
        json.dumps(
            {
                k: report[k]
                for k in (
                    "parameters",
                    "non_embedding_fraction",
                    "heldout_perplexity",
                    "perplexity_ratio",
                    "served",
                    "build_seconds",
                    "parity",
                    "sample",
                )
            },
            indent=2,
        )
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import fused_graph
    from .errors import EdgeModelsError
    from .export import export_decoder
    from .tokenizer import checkpoint_special_ids, copy_tokenizer_files

    if (args.model is None) == (args.gguf is None):
        raise EdgeModelsError("give one source: --model CHECKPOINT_DIR or --gguf FILE")
    out = Path(args.out)
    if args.gguf is not None:  # a GGUF file: weights, tokenizer and template rebuilt from its own metadata
        from .gguf_import import GgufCheckpoint

        source = GgufCheckpoint(Path(args.gguf))
        print(f"{Path(args.gguf).name}: {source.describe()}", file=sys.stderr)
        config, weights, special = source.config, source.weights(), source.special
        fused_graph.check_supported(config)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        if not (Path(args.model) / "config.json").is_file():
            raise EdgeModelsError(f"no checkpoint at {args.model} (no config.json); give a local checkpoint directory")
        config = AutoConfig.from_pretrained(args.model, local_files_only=True)
        try:
            fused_graph.check_supported(config)
            fused = not args.traced and any(Path(args.model).glob("*.safetensors"))
        except fused_graph.UnsupportedModel:
            fused = False
        if not fused:
            import torch

            # bf16/fp16 checkpoints (as they ship) load as fp32: the graph's cache inputs are fp32
            model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype=torch.float32)
            spec = export_decoder(model, out, quant=args.quantize, traced=args.traced)
            copied = copy_tokenizer_files(Path(args.model), out)
            _exported(spec, out, copied)
            return 0
        # straight from the safetensors, one tensor at a time: the model is never loaded whole
        weights = fused_graph.Weights.from_safetensors(Path(args.model))
        special = checkpoint_special_ids(Path(args.model))
    importance = None
    if args.quantize and args.method.startswith("mse") and args.calibration_windows > 0:
        importance = _calibrate(args, config, weights, special, source if args.gguf else Path(args.model))
    spec = fused_graph.build_fused_decoder(
        config,
        weights,
        out,
        args.quantize,
        special=special,
        method=args.method,
        head_bits=args.head_bits,
        importance=importance,
    )
    copied = source.save_tokenizer(out) if args.gguf else copy_tokenizer_files(Path(args.model), out)
    _exported(spec, out, copied)
    return 0


def _exported(spec, out: Path, copied: list[str]) -> None:
    print(
        f"exported {spec.architecture} ({spec.num_layers} layers, {spec.cache} cache) to {out}; "
        f"tokenizer files: {', '.join(copied) or 'none'}"
    )


def _calibrate(args: argparse.Namespace, config, weights, special: dict, source) -> dict | None:
    """Activation importance from ``--data`` (the user's own corpus) or the standard library's docstrings."""
    from tokenizers import Tokenizer

    from .calibrate import activation_importance, model_from_weights
    from .data import build_dataset

    if isinstance(source, Path):
        if not (source / "tokenizer.json").is_file():
            print(f"{source} has no tokenizer.json: quantizing uncalibrated", file=sys.stderr)
            return None
        tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    else:
        tok = source.tokenizer()
    ds = build_dataset(
        tok,
        [Path(p) for p in args.data] if args.data else None,
        seq_len=256,
        stride=256,
        bos_id=special["bos_token_id"],
        eos_id=special["eos_token_id"],
    )
    rng = np.random.default_rng(0)
    windows = ds.train[rng.choice(len(ds.train), min(args.calibration_windows, len(ds.train)), replace=False)]
    print(f"calibrating on {windows.size:,} tokens ({len(windows)} windows)", file=sys.stderr)
    return activation_importance(model_from_weights(config, weights), windows)


def _shape(args: argparse.Namespace):
    from .prune import PruneTarget

    if any(v is not None for v in (args.heads, args.ffn, args.experts, args.layers, args.hidden)):
        return PruneTarget(ffn=args.ffn, heads=args.heads, experts=args.experts, layers=args.layers, hidden=args.hidden)
    return None


def _distill_cfg(args: argparse.Namespace):
    from .distill import DistillConfig

    return DistillConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        temperature=args.temperature,
        alpha=args.alpha,
        eval_every=args.eval_every,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
    )


def cmd_compress(args: argparse.Namespace) -> int:
    from .compress import compress, summary_table

    report = compress(
        Path(args.teacher),
        Path(args.out),
        target=args.target,
        shape=_shape(args),
        data=[Path(p) for p in args.data] if args.data else None,
        seq_len=args.seq_len,
        stride=args.stride,
        distill_cfg=_distill_cfg(args),
        export=not args.no_export,
        quantize_modes=tuple(args.quantize),
    )
    print(summary_table(report))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .compress import calibration_batches, load_checkpoint, save_checkpoint
    from .prune import describe, measure_importance, non_embedding_parameters, prune, target_for_budget

    teacher, tok = load_checkpoint(Path(args.model))
    ds = _dataset(args, tok, Path(args.model))
    target = _shape(args) or target_for_budget(teacher, args.target or 0.5)
    student = prune(teacher, measure_importance(teacher, calibration_batches(ds.train)), target)
    save_checkpoint(student, Path(args.model), Path(args.out))
    print(
        f"pruned to {describe(target)}: {non_embedding_parameters(student):,} of "
        f"{non_embedding_parameters(teacher):,} non-embedding parameters → {args.out}"
    )
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .compress import load_checkpoint, save_checkpoint
    from .distill import distill

    teacher, tok = load_checkpoint(Path(args.teacher))
    student, _ = load_checkpoint(Path(args.student))
    ds = _dataset(args, tok, Path(args.teacher))
    history = distill(
        student,
        teacher,
        ds.train,
        ds.heldout,
        _distill_cfg(args),
        out_dir=Path(args.out),
        resume=args.resume,
        run_steps=args.run_steps,
    )
    save_checkpoint(student, Path(args.student), Path(args.out))
    print(
        f"distilled: best held-out perplexity {math.exp(history['best_heldout_loss']):.2f} "
        f"({history['stopped']}) → {args.out}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.onnx is not None:
        return _eval_onnx(args)
    if args.model is None:
        from .errors import EdgeModelsError

        raise EdgeModelsError("give what to score: --model CHECKPOINT_DIR or --onnx EXPORTED_DIR")
    from .compress import encode_prompts, load_checkpoint
    from .data import corpus_windows
    from .evaluate import evaluate
    from .tokenizer import checkpoint_special_ids

    model, tok = load_checkpoint(Path(args.model))
    teacher = load_checkpoint(Path(args.teacher))[0] if args.teacher else None
    special = checkpoint_special_ids(Path(args.model))
    bos, eos = special["bos_token_id"], special["eos_token_id"]
    if args.data:  # the user's own corpus: all of it, not a held-out slice
        windows, corpus_tokens = corpus_windows(tok, [Path(p) for p in args.data], args.seq_len, bos, eos)
        scored = {"corpus_tokens": corpus_tokens, "scored": "whole corpus"}
    else:
        windows, scored = _dataset(args, tok, Path(args.model)).heldout, {"scored": "held-out split (5%)"}
    report = evaluate(model, teacher, windows, encode_prompts(tok, bos), Path(args.model))
    report.update(scored)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def _eval_onnx(args: argparse.Namespace) -> int:
    """Perplexity of an exported (or quantized) graph through the appliance's own engine, on the same windows a
    checkpoint is scored on: the operator's check of the model they are about to seal, on their own text."""
    from tokenizers import Tokenizer

    from appliance.engine.spec import DecoderSpec

    from .errors import EdgeModelsError
    from .quantize import onnx_perplexity

    root = Path(args.onnx)
    if not (root / "decoder.json").is_file() or not (root / "tokenizer.json").is_file():
        raise EdgeModelsError(f"{root} is not an exported model (needs model.onnx, decoder.json, tokenizer.json)")
    spec = DecoderSpec.from_json((root / "decoder.json").read_text())
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    if args.data:  # the operator's own text: all of it
        from .data import corpus_windows

        windows, _ = corpus_windows(
            tok, [Path(p) for p in args.data], args.seq_len, spec.bos_token_id, spec.eos_token_id
        )
    else:
        windows = _dataset(args, tok, bos_id=spec.bos_token_id, eos_id=spec.eos_token_id).heldout
    scored = int(len(windows) * (windows.shape[1] - 1))
    report = {
        "model": str(root),
        "perplexity": onnx_perplexity(root, windows, limit=len(windows)),
        "windows": len(windows),
        "tokens_scored": scored,
        "scored": "whole corpus" if args.data else "held-out split (5%) of the standard library's docstrings",
        "bytes": sum(f.stat().st_size for f in root.glob("model.onnx*")),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from appliance.engine.spec import DecoderSpec

    from .quantize import MODES, compare_modes

    tok = Tokenizer.from_file(str(Path(args.onnx) / "tokenizer.json"))
    spec = DecoderSpec.from_json((Path(args.onnx) / "decoder.json").read_text())
    ds = _dataset(args, tok, bos_id=spec.bos_token_id, eos_id=spec.eos_token_id)
    modes = MODES if args.mode == "all" else (args.mode,)
    report = compare_modes(Path(args.onnx), Path(args.out), ds.heldout, modes)
    (Path(args.out) / "quantize-report.json").write_text(json.dumps(report, indent=2))
    print(f"{'variant':8} {'MB':>7} {'perplexity':>10} {'drift':>7} {'tok/s':>7} {'speed-up':>8}")
    for name, r in report.items():
        print(
            f"{name:8} {r['bytes'] / 1e6:7.1f} {r['perplexity']:10.2f} {r['perplexity_drift']:+7.1%} "
            f"{r['tokens_per_s']:7.1f} {r['speedup']:8.2f}"
        )
    return 0


def _dataset(
    args: argparse.Namespace,
    tokenizer,
    checkpoint: Path | None = None,
    bos_id: int | None = None,
    eos_id: int | None = None,
):
    """Train/held-out windows framed by the checkpoint's own special ids (or the ones given)."""
    from .data import build_dataset
    from .tokenizer import checkpoint_special_ids

    if checkpoint is not None:
        special = checkpoint_special_ids(checkpoint)
        bos_id, eos_id = special["bos_token_id"], special["eos_token_id"]
    return build_dataset(
        tokenizer,
        [Path(p) for p in args.data] if args.data else None,
        seq_len=args.seq_len,
        stride=args.stride,
        bos_id=bos_id,
        eos_id=eos_id,
    )


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        nargs="+",
        help="text/markdown/JSONL files or directories (default: the Python standard library's docstrings)",
    )
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: 128)")
    p.add_argument("--stride", type=int, default=64, help="tokens between training windows (default: 64)")


def _shape_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=float, help="fraction of non-embedding parameters to keep (default 0.5)")
    p.add_argument("--heads", type=int, help="attention heads to keep (GQA: multiple of the group size)")
    p.add_argument("--ffn", type=int, help="dense MLP channels to keep")
    p.add_argument("--experts", type=int, help="routed experts to keep per MoE layer")
    p.add_argument("--layers", type=int, help="decoder layers to keep")
    p.add_argument(
        "--hidden",
        type=int,
        help="hidden (embedding) channels to keep; shrinks the embedding, every "
        "projection reading or writing the residual stream, and the norms",
    )


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per micro-batch (default: 16)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: 1)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T (default: 1)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term; 0 = plain fine-tuning (0.5)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations (default: 50)")
    p.add_argument("--patience", type=int, default=4, help="evaluations without improvement before stopping (4)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")


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
    e = sub.add_parser("export", help="export a local checkpoint directory or GGUF file to ONNX with KV cache")
    e.add_argument("--model", help="checkpoint directory (config.json + weights; never a hub id)")
    e.add_argument("--gguf", help="a GGUF file (llama, qwen2): weights, tokenizer and chat template from its metadata")
    e.add_argument("--out", required=True, help="output directory for model.onnx and decoder.json")
    e.add_argument(
        "--quantize",
        choices=("q4", "q8"),
        help="fused graphs (Qwen2/Llama/DeepSeek): projections, experts and LM head in 4 or 8 bits (default: fp32)",
    )
    e.add_argument("--traced", action="store_true", help="trace through torch.onnx instead of writing the fused graph")
    e.add_argument(
        "--method",
        choices=("mse", "mse-sym", "rtn"),
        default="mse",
        help="mse: asymmetric blocks, error-minimising scales, calibrated (default); mse-sym: the same search on a "
        "symmetric grid (no zero points); rtn: symmetric round-to-nearest",
    )
    e.add_argument("--head-bits", type=int, choices=(4, 8), help="bits of the LM head and embedding (default: 8)")
    e.add_argument(
        "--calibration-windows",
        type=int,
        default=64,
        help="256-token windows of calibration text for --method mse (default: 64; 0 = uncalibrated)",
    )
    e.add_argument(
        "--data", nargs="+", help="calibration text: your own files or directories (default: stdlib docstrings)"
    )
    e.set_defaults(func=cmd_export)
    c = sub.add_parser("compress", help="prune → distill → evaluate → export, with a summary table")
    c.add_argument("--teacher", required=True, help="teacher checkpoint directory (local; never a hub id)")
    c.add_argument("--out", required=True, help="output directory (pruned/, student/, onnx/, report.json)")
    c.add_argument("--no-export", action="store_true", help="skip the ONNX export (and quantization)")
    c.add_argument(
        "--quantize",
        nargs="*",
        default=["q4"],
        choices=["q4", "q8", "int8"],
        help="quantized variants to build and measure after export (default: q4; none: --quantize)",
    )
    _shape_flags(c)
    _data_flags(c)
    _train_flags(c)
    c.set_defaults(func=cmd_compress)
    pr = sub.add_parser("prune", help="structured pruning from calibration activations")
    pr.add_argument("--model", required=True, help="checkpoint directory to prune")
    pr.add_argument("--out", required=True, help="directory for the pruned checkpoint")
    _shape_flags(pr)
    _data_flags(pr)
    pr.set_defaults(func=cmd_prune)
    di = sub.add_parser("distill", help="train a student on the teacher's distributions (KL + CE)")
    di.add_argument("--teacher", required=True, help="teacher checkpoint directory")
    di.add_argument("--student", required=True, help="student checkpoint directory (e.g. from prune)")
    di.add_argument("--out", required=True, help="directory for the distilled checkpoint and its checkpoints")
    di.add_argument("--resume", action="store_true", help="continue from OUT/distill-checkpoint.pt")
    di.add_argument("--run-steps", type=int, help="pause (checkpointed) after this many steps; --resume continues")
    _data_flags(di)
    _train_flags(di)
    di.set_defaults(func=cmd_distill)
    ev = sub.add_parser(
        "eval",
        help="perplexity, agreement/KL with a teacher, distinct-n, size (JSON); with --data, over the whole corpus",
    )
    ev.add_argument("--model", help="checkpoint directory to evaluate")
    ev.add_argument("--onnx", help="an exported or quantized model directory, scored through the appliance engine")
    ev.add_argument("--teacher", help="teacher checkpoint to compare with")
    ev.add_argument("--out", help="write the JSON report here too")
    _data_flags(ev)
    ev.set_defaults(func=cmd_eval)
    q = sub.add_parser("quantize", help="weight-only 4/8-bit (MatMulNBits) or dynamic int8, with drift and speed")
    q.add_argument("--onnx", required=True, help="exported decoder directory (model.onnx + decoder.json + tokenizer)")
    q.add_argument("--out", required=True, help="directory for one subdirectory per variant and the report")
    q.add_argument("--mode", default="all", choices=["q4", "q8", "int8", "all"], help="variant(s) to build (all)")
    _data_flags(q)
    q.set_defaults(func=cmd_quantize)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript"):  # one line per rewritten node otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    args = build_parser().parse_args(argv)
    from appliance.errors import ApplianceError
    from provisioning.errors import run_command

    from .errors import EdgeModelsError

    # ApplianceError: the engine the export is checked against
    return run_command("edge-models", lambda: args.func(args), (EdgeModelsError, ApplianceError))


if __name__ == "__main__":
    sys.exit(main())
