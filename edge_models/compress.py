"""The whole recipe in one call: calibrate → prune → distill → evaluate → export → quantize.

Each stage writes into ``out``: ``pruned/`` (checkpoint before training), ``student/`` (after
distillation), ``onnx/`` (sealable export), ``quantized/<mode>/`` (sealable too) and
``report.json`` with the summary table.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

from .data import build_dataset
from .distill import DistillConfig, distill
from .evaluate import evaluate
from .prune import PruneTarget, describe, measure_importance, prune, shape_of, target_for_budget
from .tokenizer import checkpoint_special_ids, copy_tokenizer_files

log = logging.getLogger("edge_models.compress")
PROMPTS = ["Return the", "Raise ValueError if", "The socket module"]


def encode_prompts(tokenizer, bos_id: int | None) -> list[list[int]]:
    head = [] if bos_id is None else [bos_id]
    return [[*head, *tokenizer.encode(p, add_special_tokens=False).ids] for p in PROMPTS]


def load_checkpoint(path: Path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return model, Tokenizer.from_file(str(Path(path) / "tokenizer.json"))


def save_checkpoint(model, tokenizer_dir: Path, out: Path) -> None:
    model.save_pretrained(out)
    copy_tokenizer_files(tokenizer_dir, out)


def calibration_batches(windows, count: int = 8, batch: int = 8):
    import torch

    n = min(count, len(windows) // batch)
    return [torch.from_numpy(windows[i * batch : (i + 1) * batch, :-1]) for i in range(n)]


def compress(
    teacher_dir: Path,
    out: Path,
    *,
    target: float | None = None,
    shape: PruneTarget | None = None,
    data: list[Path] | None = None,
    seq_len: int = 128,
    stride: int = 64,
    distill_cfg: DistillConfig = DistillConfig(),  # noqa: B008 - frozen dataclass
    export: bool = True,
    quantize_modes: tuple[str, ...] = ("q4",),
) -> dict:
    from .export import export_decoder

    started = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tok = load_checkpoint(teacher_dir)
    special = checkpoint_special_ids(teacher_dir)
    bos, eos = special["bos_token_id"], special["eos_token_id"]
    ds = build_dataset(tok, data, seq_len=seq_len, stride=stride, bos_id=bos, eos_id=eos)
    prompts = encode_prompts(tok, bos)
    importance = measure_importance(teacher, calibration_batches(ds.train))
    chosen = shape or target_for_budget(teacher, target or 0.5)
    student = prune(teacher, importance, chosen)
    save_checkpoint(student, Path(teacher_dir), out / "pruned")
    before = evaluate(student, teacher, ds.heldout, prompts, out / "pruned")
    history = distill(student, teacher, ds.train, ds.heldout, distill_cfg, out_dir=out / "distill")
    save_checkpoint(student, Path(teacher_dir), out / "student")
    after = evaluate(student, teacher, ds.heldout, prompts, out / "student")
    teacher_eval = evaluate(teacher, None, ds.heldout, prompts, Path(teacher_dir))
    if export:
        spec = export_decoder(student, out / "onnx")
        copy_tokenizer_files(Path(teacher_dir), out / "onnx")
    report = {
        "teacher": {**teacher_eval, "shape": shape_of(teacher)},
        "pruned": {**before, "shape": shape_of(student)},
        "student": {**after, "shape": shape_of(student)},
        "prune_target": describe(chosen),
        "data": ds.stats,
        "distill": asdict(distill_cfg),
        "distill_stopped": history["stopped"],
    }
    if export and quantize_modes:
        from .quantize import compare_modes

        def build(mode: str, out_dir: Path) -> None:  # fused graphs: quantized while written from the weights
            export_decoder(student, out_dir, quant=mode)

        fused = spec.cache == "static"
        report["quantized"] = compare_modes(
            out / "onnx", out / "quantized", ds.heldout, quantize_modes, build if fused else None
        )
    report["seconds"] = round(time.monotonic() - started, 1)
    report["student"]["non_embedding_fraction"] = (
        after["non_embedding_parameters"] / teacher_eval["non_embedding_parameters"]
    )
    report["student"]["perplexity_ratio"] = after["perplexity"] / teacher_eval["perplexity"]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def summary_table(report: dict) -> str:
    rows = [
        ("teacher", report["teacher"]),
        ("pruned, untrained", report["pruned"]),
        ("pruned + distilled", report["student"]),
    ]
    lines = [f"{'model':20} {'non-emb params':>14} {'perplexity':>10} {'top-1 agree':>11} {'KL':>7} {'distinct-2':>10}"]
    for name, r in rows:
        agree = f"{r['top1_agreement']:.3f}" if "top1_agreement" in r else "-"
        kl = f"{r['kl_teacher_student']:.3f}" if "kl_teacher_student" in r else "-"
        lines.append(
            f"{name:20} {r['non_embedding_parameters']:>14,} {r['perplexity']:>10.2f} {agree:>11} {kl:>7} "
            f"{r['distinct_2']:>10.3f}"
        )
    for mode, q in report.get("quantized", {}).items():
        lines.append(
            f"{'student ' + mode:20} {'':>14} {q['perplexity']:>10.2f} (ONNX, drift "
            f"{q['perplexity_drift']:+.1%}, {q['tokens_per_s']:.0f} tok/s, {q['bytes'] / 1e6:.1f} MB)"
        )
    s = report["student"]
    lines.append(
        f"student keeps {s['non_embedding_fraction']:.1%} of the teacher's non-embedding parameters at "
        f"{s['perplexity_ratio']:.2f}x its perplexity ({report['distill_stopped']})"
    )
    return "\n".join(lines)
