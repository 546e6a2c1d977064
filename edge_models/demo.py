"""Build the embedded demo model: corpus → tokenizer → DeepSeek-V3 teacher → ONNX → parity check.

The result is cached: a finished build leaves ``report.json`` recording the recipe it was built
with; a later call with the same recipe returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .teacher import DEMO, TeacherShape
from .train import DEFAULT_TRAIN, TrainConfig

log = logging.getLogger("edge_models.demo")
PROBE_PROMPTS = ["Return the", "How do I reset the conveyor?"]


def recipe_hash(shape: TeacherShape, train: TrainConfig, vocab_size: int) -> str:
    blob = json.dumps({"shape": asdict(shape), "train": asdict(train), "vocab": vocab_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_demo(out: Path, shape: TeacherShape = DEMO, train: TrainConfig = DEFAULT_TRAIN,
               vocab_size: int = 4096, force: bool = False) -> dict:
    """Build (or reuse) the demo under ``out``; returns the report. ``out/onnx`` is what gets sealed."""
    import torch

    from .corpus import build_corpus
    from .export import export_decoder
    from .teacher import build_model, deepseek_v3_config
    from .tokenizer import save_tokenizer, special_ids, train_tokenizer
    from .train import pack_windows, perplexity, train_causal_lm

    out = Path(out)
    recipe = recipe_hash(shape, train, vocab_size)
    report_path = out / "report.json"
    if report_path.exists() and not force:
        report = json.loads(report_path.read_text())
        if report.get("recipe") == recipe:
            log.info("demo model cached in %s (recipe %s)", out, recipe)
            return report
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

    onnx_dir = out / "onnx"
    spec = export_decoder(model, onnx_dir)
    shutil.copy(teacher_dir / "tokenizer.json", onnx_dir / "tokenizer.json")
    parity = check_parity(model, onnx_dir, [[bos, *tok.encode(p).ids] for p in PROBE_PROMPTS], spec.eos_token_id)
    with torch.no_grad():
        sample_ids = model.generate(input_ids=torch.tensor([[bos, *tok.encode(PROBE_PROMPTS[0]).ids]]),
                                    max_new_tokens=24, do_sample=False)[0].tolist()
    report = {
        "recipe": recipe, "architecture": spec.architecture,
        "parameters": sum(p.numel() for p in model.parameters()),
        "non_embedding_parameters": sum(p.numel() for n, p in model.named_parameters()
                                        if "embed_tokens" not in n and "lm_head" not in n),
        "onnx_bytes": (onnx_dir / "model.onnx").stat().st_size,
        "heldout_perplexity": round(ppl, 2), "final_train_loss": round(sum(losses[-20:]) / 20, 4),
        "corpus": corpus.stats(), "train_tokens_seen": train.steps * train.batch_size * train.seq_len,
        "build_seconds": round(time.monotonic() - started, 1), "parity": parity,
        "sample": {"prompt": PROBE_PROMPTS[0], "greedy": tok.decode(sample_ids)},
        "shape": asdict(shape), "train": asdict(train),
    }
    report_path.write_text(json.dumps(report, indent=2))
    log.info("demo teacher: %d parameters, held-out perplexity %.2f", report["parameters"], ppl)
    return report


def check_parity(model, onnx_dir: Path, prompts: list[list[int]], eos_id: int, new_tokens: int = 16) -> dict:
    """Greedy tokens from ONNX Runtime (the appliance engine) vs transformers, batch of 2 left-padded."""
    from appliance.engine import DecoderSpec
    from appliance.engine.ort_engine import OrtEngine

    from .parity import engine_greedy, hf_greedy

    spec = DecoderSpec.from_json((onnx_dir / "decoder.json").read_text())
    engine = OrtEngine((onnx_dir / "model.onnx").read_bytes(), spec, num_slots=len(prompts), max_seq_len=256)
    ours = engine_greedy(engine, prompts, new_tokens, eos_id)
    theirs = hf_greedy(model, prompts, new_tokens, spec.pad_token_id)
    if ours != theirs:
        raise RuntimeError(f"ONNX export does not match transformers: {ours} != {theirs}")
    return {"prompts": len(prompts), "new_tokens": new_tokens, "identical": True}
