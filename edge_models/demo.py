"""Build the embedded demo model in two cached stages.

1. **Teacher**: corpus → tokenizer → DeepSeek-V3 teacher → ``teacher/`` (+ ``teacher-onnx/``, its fused
   export, checked token for token against transformers).
2. **Student** (the model the appliance serves): ``edge_models.compress`` — prune the teacher to
   about half its non-embedding parameters, distil, evaluate, export, quantize 4-bit — then
   ``onnx/`` receives the variant to serve: 4-bit where it measured no slower and within the drift
   limit of fp32, fp32 otherwise.

Each stage records the recipe it was built with (``teacher.json``, ``report.json``); a later call
with the same recipe reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ExportError
from .teacher import DEMO, TeacherShape
from .train import DEFAULT_TRAIN, TrainConfig

log = logging.getLogger("edge_models.demo")
PROBE_PROMPTS = ["Return the", "How do I reset the conveyor?"]
MAX_SERVED_DRIFT = 0.02  # a quantized variant may cost at most 2% held-out perplexity to be served


@dataclass(frozen=True)
class StudentRecipe:
    target: float = 0.5  # fraction of the teacher's non-embedding parameters
    steps: int = 150  # distillation steps (bench/compression.py: 300 steps reach 0.89x the teacher's perplexity)
    batch_size: int = 8
    eval_every: int = 50
    quantize: str = "q4"
    serve: str = "auto"  # "auto" (quantized where it wins), "fp32" or the quantized mode


DEMO_STUDENT = StudentRecipe()
# The test suite's: seconds to build, and it always serves the 4-bit variant so tests cover MatMulNBits.
TINY_STUDENT = StudentRecipe(steps=8, batch_size=8, eval_every=4, serve="q4")


def recipe_hash(*parts) -> str:
    blob = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_demo(
    out: Path,
    shape: TeacherShape = DEMO,
    train: TrainConfig = DEFAULT_TRAIN,
    vocab_size: int = 4096,
    force: bool = False,
    student: StudentRecipe = DEMO_STUDENT,
) -> dict:
    """Build (or reuse) the demo under ``out``; returns the report. ``out/onnx`` is what gets sealed."""
    from .export import EXPORT_REVISION

    out = Path(out)
    recipe = recipe_hash(shape, train, vocab_size, student, EXPORT_REVISION)
    report_path = out / "report.json"
    cached = None if force else _cached(report_path, recipe)
    if cached is not None:
        return cached
    started = time.monotonic()
    teacher = build_teacher(out, shape, train, vocab_size, force)
    student_report = build_student(out, student)
    report = {
        "recipe": recipe,
        **student_report,
        "teacher": teacher,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    report_path.write_text(json.dumps(report, indent=2))
    log.info(
        "demo student: %d non-embedding parameters (%.0f%% of the teacher), held-out perplexity %.2f, serving %s",
        report["non_embedding_parameters"],
        100 * report["non_embedding_fraction"],
        report["heldout_perplexity"],
        report["served"],
    )
    return report


def _cached(report_path: Path, recipe: str) -> dict | None:
    """The report of a finished stage built with ``recipe``, or None when it must be (re)built."""
    if not report_path.exists():
        return None
    report = json.loads(report_path.read_text())
    if report.get("recipe") != recipe:
        return None
    log.info("%s: cached (recipe %s)", report_path, recipe)
    return report


def build_student(out: Path, recipe: StudentRecipe) -> dict:
    """Compress ``out/teacher`` and place the variant to serve in ``out/onnx``."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from .compress import compress
    from .distill import DistillConfig

    work = out / "student"
    shutil.rmtree(work, ignore_errors=True)
    cfg = DistillConfig(
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        eval_every=recipe.eval_every,
        warmup=min(20, recipe.steps // 5),
    )
    c = compress(out / "teacher", work, target=recipe.target, distill_cfg=cfg, quantize_modes=(recipe.quantize,))
    served = _choose_served(c, recipe)
    shutil.rmtree(out / "onnx", ignore_errors=True)
    shutil.copytree(work / "onnx" if served == "fp32" else work / "quantized" / served, out / "onnx")
    tok = Tokenizer.from_file(str(out / "teacher" / "tokenizer.json"))
    bos = tok.token_to_id("<|bos|>")
    model = AutoModelForCausalLM.from_pretrained(work / "student", local_files_only=True).eval()
    parity = check_parity(
        model, work / "onnx", [[bos, *tok.encode(p).ids] for p in PROBE_PROMPTS], tok.token_to_id("<|eos|>")
    )
    with torch.no_grad():
        ids = model.generate(
            input_ids=torch.tensor([[bos, *tok.encode(PROBE_PROMPTS[0]).ids]]), max_new_tokens=24, do_sample=False
        )[0].tolist()
    s = c["student"]
    return {
        "architecture": model.config.architectures[0],
        "parameters": s["parameters"],
        "non_embedding_parameters": s["non_embedding_parameters"],
        "non_embedding_fraction": round(s["non_embedding_fraction"], 4),
        "heldout_perplexity": round(s["perplexity"], 2),
        "perplexity_ratio": round(s["perplexity_ratio"], 4),
        "shape": c["student"]["shape"],
        "prune_target": c["prune_target"],
        "served": served,
        "quantized": c.get("quantized", {}),
        "onnx_bytes": (out / "onnx" / "model.onnx").stat().st_size,
        "parity": parity,
        "sample": {"prompt": PROBE_PROMPTS[0], "greedy": tok.decode(ids)},
        "student_recipe": asdict(recipe),
        "compress_seconds": c["seconds"],
    }


def _choose_served(report: dict, recipe: StudentRecipe) -> str:
    if recipe.serve != "auto":
        return recipe.serve
    q = report.get("quantized", {}).get(recipe.quantize)
    if q and q["perplexity_drift"] <= MAX_SERVED_DRIFT and q["speedup"] >= 1.0:
        return recipe.quantize
    return "fp32"


def build_teacher(out: Path, shape: TeacherShape, train: TrainConfig, vocab_size: int, force: bool) -> dict:
    """Train the teacher into ``out/teacher`` (cached by its own recipe); returns its report."""
    import torch

    from .corpus import build_corpus
    from .export import export_decoder
    from .teacher import build_model, deepseek_v3_config
    from .tokenizer import copy_tokenizer_files, save_tokenizer, special_ids, train_tokenizer
    from .train import pack_windows, perplexity, train_causal_lm

    recipe = recipe_hash(shape, train, vocab_size, "tokenizer-adds-bos")  # tokenizer_config.json says add_bos_token
    report_path = out / "teacher.json"
    cached = None if force else _cached(report_path, recipe)
    if cached is not None:
        return cached
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.monotonic()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    corpus = build_corpus()
    tok = train_tokenizer(corpus.train, vocab_size)
    special = special_ids(tok)
    bos, eos = special["bos_token_id"], special["eos_token_id"]

    def encode(docs: list[str]) -> list[list[int]]:
        return [[bos, *e.ids, eos] for e in tok.encode_batch(docs)]

    train_windows = pack_windows(encode(corpus.train), train.seq_len)
    heldout_windows = pack_windows(encode(corpus.heldout), train.seq_len)
    model = build_model(deepseek_v3_config(shape, tok.get_vocab_size(), special), train.seed)
    losses = train_causal_lm(model, train_windows, train, desc="train demo teacher")
    ppl = perplexity(model, heldout_windows)
    teacher_dir = out / "teacher"
    model.save_pretrained(teacher_dir)
    save_tokenizer(tok, teacher_dir)

    onnx_dir = out / "teacher-onnx"
    # Fused, like the student: the fused builder writes the graph from the weights and never traces transformers'
    # modeling code, so a new transformers release cannot break the newcomer's path. The traced exporter (families
    # the fused builder does not cover) is checked against transformers by the test suite (tests/test_export_parity.py).
    spec = export_decoder(model, onnx_dir)
    copy_tokenizer_files(teacher_dir, onnx_dir)
    parity = check_parity(model, onnx_dir, [[bos, *tok.encode(p).ids] for p in PROBE_PROMPTS], spec.eos_token_id)
    with torch.no_grad():
        sample_ids = model.generate(
            input_ids=torch.tensor([[bos, *tok.encode(PROBE_PROMPTS[0]).ids]]), max_new_tokens=24, do_sample=False
        )[0].tolist()
    report = {
        "recipe": recipe,
        "architecture": spec.architecture,
        "parameters": sum(p.numel() for p in model.parameters()),
        "non_embedding_parameters": sum(
            p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n
        ),
        "onnx_bytes": (onnx_dir / "model.onnx").stat().st_size,
        "heldout_perplexity": round(ppl, 2),
        "final_train_loss": round(sum(losses[-20:]) / 20, 4),
        "corpus": corpus.stats(),
        "train_tokens_seen": train.steps * train.batch_size * train.seq_len,
        "build_seconds": round(time.monotonic() - started, 1),
        "parity": parity,
        "sample": {"prompt": PROBE_PROMPTS[0], "greedy": tok.decode(sample_ids)},
        "shape": asdict(shape),
        "train": asdict(train),
    }
    report_path.write_text(json.dumps(report, indent=2))
    log.info("demo teacher: %d parameters, held-out perplexity %.2f", report["parameters"], ppl)
    return report


def check_parity(model, onnx_dir: Path, prompts: list[list[int]], eos_id: int, new_tokens: int = 16) -> dict:
    """Greedy tokens from ONNX Runtime (the appliance engine) vs transformers, batch of 2 left-padded."""
    from appliance.engine import DecoderSpec, create_engine

    from .parity import engine_greedy, hf_greedy

    spec = DecoderSpec.from_json((onnx_dir / "decoder.json").read_text())
    graph = (onnx_dir / "model.onnx").read_bytes()
    engine = create_engine("onnxruntime", graph, spec, num_slots=len(prompts), max_seq_len=256)
    ours = engine_greedy(engine, prompts, new_tokens, eos_id)
    theirs = hf_greedy(model, prompts, new_tokens, spec.pad_token_id)
    if ours != theirs:
        raise ExportError(f"ONNX export does not match transformers: {ours} != {theirs}")
    return {"prompts": len(prompts), "new_tokens": new_tokens, "identical": True}
