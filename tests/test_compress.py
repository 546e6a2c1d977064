"""Compression pipeline: pruning keeps valid, exportable checkpoints (DeepSeek MLA+MoE and Qwen2 GQA),
distillation trains and resumes deterministically, data never leaks across the split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from appliance.engine import DecoderSpec, create_engine
from edge_models.data import DataError, build_dataset, clean, read_documents
from edge_models.distill import DistillConfig, distill, heldout_loss
from edge_models.export import export_decoder
from edge_models.parity import engine_greedy, hf_greedy
from edge_models.prune import (
    Importance,
    PruneError,
    PruneTarget,
    measure_importance,
    non_embedding_parameters,
    prune,
    target_for_budget,
)


def batches(vocab: int, n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (4, 32), generator=g) for _ in range(n)]


def exports_and_matches(model, tmp_path) -> None:
    """The pruned model exports, and ONNX Runtime greedy equals transformers (batch 1 and padded 2)."""
    spec = export_decoder(model, tmp_path / "onnx")  # fused static-cache graph for Qwen2/Llama, traced otherwise
    engine = create_engine(
        "onnxruntime", (tmp_path / "onnx" / "model.onnx").read_bytes(), spec, num_slots=2, max_seq_len=128
    )
    head = [] if spec.bos_token_id is None else [spec.bos_token_id]
    prompts = [[*head, 40, 41, 42, 43, 44], [*head, 300, 301]]
    assert engine_greedy(engine, prompts, 10, spec.eos_token_id) == hf_greedy(model, prompts, 10, spec.pad_token_id)


def save_and_reload(model, tmp_path):
    """``save_pretrained`` then ``from_pretrained``: a pruned checkpoint must load as an ordinary one."""
    model.save_pretrained(tmp_path / "ckpt")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", local_files_only=True).eval()


@pytest.fixture(scope="module")
def teacher(tiny_build):
    return AutoModelForCausalLM.from_pretrained(tiny_build / "teacher", local_files_only=True).eval()


def test_prune_deepseek_mla_heads_experts_and_ffn(teacher, tmp_path):
    imp = measure_importance(teacher, batches(teacher.config.vocab_size))
    student = prune(teacher, imp, PruneTarget(heads=2, experts=2, ffn=64))
    cfg = student.config
    assert (cfg.num_attention_heads, cfg.n_routed_experts, cfg.intermediate_size) == (2, 2, 64)
    assert teacher.config.num_attention_heads == 4  # the teacher is untouched
    assert non_embedding_parameters(student) < 0.7 * non_embedding_parameters(teacher)
    reloaded = save_and_reload(student, tmp_path)
    ids = batches(cfg.vocab_size, 1)[0]
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, student(input_ids=ids).logits, atol=1e-5)
    exports_and_matches(reloaded, tmp_path)


def test_prune_layers_updates_dense_prefix(teacher):
    imp = measure_importance(teacher, batches(teacher.config.vocab_size))
    student = prune(teacher, imp, PruneTarget(layers=1))
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    kept_dense = int(np.argmax(imp.layers)) == 0
    assert student.config.first_k_dense_replace == (1 if kept_dense else 0)
    with torch.no_grad():
        student(input_ids=batches(teacher.config.vocab_size, 1)[0])


def qwen2(tmp_path):
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_prune_qwen2_respects_gqa_groups_and_exports(tmp_path):
    model = qwen2(tmp_path)
    imp = measure_importance(model, batches(512))
    assert imp.heads[0].shape == (2,)  # scored per key/value group
    student = prune(model, imp, PruneTarget(heads=2, layers=2, ffn=64))
    cfg = student.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (2, 1, 2)
    exports_and_matches(student, tmp_path)
    with pytest.raises(PruneError, match="multiple of the query group size"):
        prune(model, imp, PruneTarget(heads=3))


def test_pruning_keeps_the_most_important_channels(teacher):
    n = teacher.config.intermediate_size
    scores = np.zeros(n)
    scores[[5, 17, 60]] = 1.0
    imp = Importance(ffn={0: scores}, heads={}, experts={}, layers=np.zeros(2))
    student = prune(teacher, imp, PruneTarget(ffn=3))
    kept = student.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(kept, teacher.model.layers[0].mlp.gate_proj.weight[[5, 17, 60]])


def test_budget_target_lands_under_the_fraction(teacher):
    target = target_for_budget(teacher, 0.5)
    imp = measure_importance(teacher, batches(teacher.config.vocab_size))
    student = prune(teacher, imp, target)
    assert non_embedding_parameters(student) <= 0.5 * non_embedding_parameters(teacher)


def test_distillation_improves_and_resumes_exactly(teacher, tiny_build, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_build / "teacher" / "tokenizer.json"))
    ds = build_dataset(tok, seq_len=32, stride=32)
    imp = measure_importance(teacher, batches(teacher.config.vocab_size))
    cfg = DistillConfig(steps=12, batch_size=4, eval_every=6, save_every=6, patience=10, warmup=2)
    straight = prune(teacher, imp, PruneTarget(ffn=32, experts=2))
    untrained = heldout_loss(straight, ds.heldout[:8], "cpu")
    hist = distill(straight, teacher, ds.train, ds.heldout[:8], cfg)
    assert [e["step"] for e in hist["evals"]] == [6, 12]
    assert hist["best_heldout_loss"] < untrained  # better than the pruned student it started from
    assert heldout_loss(straight, ds.heldout[:8], "cpu") == pytest.approx(hist["best_heldout_loss"])  # best kept
    interrupted = prune(teacher, imp, PruneTarget(ffn=32, experts=2))
    first = distill(interrupted, teacher, ds.train, ds.heldout[:8], cfg, out_dir=tmp_path / "run", run_steps=6)
    assert first["stopped"] == "paused after step 6"
    resumed = prune(teacher, imp, PruneTarget(ffn=32, experts=2))
    distill(resumed, teacher, ds.train, ds.heldout[:8], cfg, out_dir=tmp_path / "run", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_plain_finetuning_arm_needs_no_teacher(teacher, tiny_build):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_build / "teacher" / "tokenizer.json"))
    ds = build_dataset(tok, seq_len=32, stride=32)
    student = prune(teacher, measure_importance(teacher, batches(teacher.config.vocab_size)), PruneTarget(ffn=32))
    hist = distill(
        student, None, ds.train, ds.heldout[:8], DistillConfig(steps=4, batch_size=4, eval_every=2, alpha=0.0)
    )
    assert len(hist["evals"]) == 2


def test_data_files_are_cleaned_deduplicated_and_split_without_leaks(tmp_path, tiny_build):

    from tokenizers import Tokenizer

    rng = np.random.default_rng(0)  # random text: any shared window could only come from a leaked document
    docs = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz  "), 90)) for _ in range(200)]
    (tmp_path / "manual.jsonl").write_text(
        "\n".join(json.dumps({"text": d}) for d in docs + docs[:20])
        + "\n"
        + json.dumps({"input_text": "Q: reset?", "target_text": "A: hold reset for five seconds."})
        + "\n"
    )
    (tmp_path / "sop.txt").write_text("Short.\n\n\nA longer standard operating procedure paragraph here.\x07")
    raw = read_documents([tmp_path])
    cleaned = clean(raw)
    assert len(raw) == 223 and len(cleaned) == 202  # 20 repeats and one too-short section dropped
    assert all("\x07" not in d for d in cleaned)
    tok = Tokenizer.from_file(str(tiny_build / "teacher" / "tokenizer.json"))
    ds = build_dataset(tok, [tmp_path], seq_len=16, stride=8)
    assert ds.stats["train_docs"] + ds.stats["heldout_docs"] == 202 and ds.stats["heldout_docs"] > 0
    train_set = {tuple(w) for w in ds.train}
    assert not any(tuple(w) in train_set for w in ds.heldout)
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_documents([tmp_path / "bad.jsonl"])


def test_compress_command_end_to_end(tiny_build, tmp_path):
    from tests.conftest import run_cli

    out = run_cli(
        "edge-models",
        "compress",
        "--teacher",
        str(tiny_build / "teacher"),
        "--out",
        str(tmp_path / "c"),
        "--target",
        "0.6",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--eval-every",
        "3",
        "--seq-len",
        "32",
        "--stride",
        "32",
    ).stdout
    assert "pruned + distilled" in out
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["student"]["non_embedding_fraction"] <= 0.6
    assert abs(report["quantized"]["q4"]["perplexity_drift"]) < 0.2 and (tmp_path / "c" / "quantized" / "q4").is_dir()
    spec = DecoderSpec.from_json((tmp_path / "c" / "onnx" / "decoder.json").read_text())
    assert spec.architecture == "DeepseekV3ForCausalLM" and (tmp_path / "c" / "onnx" / "tokenizer.json").exists()


@pytest.mark.parametrize("mode", ["q4", "q8", "int8"])
def test_quantized_graphs_run_in_the_engine_with_small_drift(traced_teacher, tmp_path, mode):
    from tokenizers import Tokenizer

    from edge_models.quantize import onnx_perplexity, quantize

    out = quantize(traced_teacher, tmp_path / mode, mode)
    tok = Tokenizer.from_file(str(traced_teacher / "tokenizer.json"))
    windows = build_dataset(tok, seq_len=32, stride=32).heldout
    base, quant = onnx_perplexity(traced_teacher, windows, 16), onnx_perplexity(out, windows, 16)
    assert abs(quant / base - 1) < 0.15, (base, quant)
    spec = DecoderSpec.from_json((out / "decoder.json").read_text())
    engine = create_engine("onnxruntime", (out / "model.onnx").read_bytes(), spec, num_slots=2, max_seq_len=64)
    outputs = engine_greedy(engine, [[spec.bos_token_id, 40, 41], [spec.bos_token_id, 50]], 8, spec.eos_token_id)
    assert all(len(o) == 8 for o in outputs)


def test_pruning_to_the_full_shape_is_the_identity(teacher):
    cfg = teacher.config
    imp = measure_importance(teacher, batches(cfg.vocab_size))
    same = prune(
        teacher,
        imp,
        PruneTarget(
            ffn=cfg.intermediate_size,
            heads=cfg.num_attention_heads,
            experts=cfg.n_routed_experts,
            layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
        ),
    )
    ids = batches(cfg.vocab_size, 1)[0]
    with torch.no_grad():
        assert torch.equal(same(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_prune_llama_loads_and_exports(tmp_path):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    ).eval()
    student = prune(model, measure_importance(model, batches(512)), PruneTarget(heads=2, ffn=48, layers=2))
    reloaded = save_and_reload(student, tmp_path)
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.config.num_key_value_heads == 1
    exports_and_matches(reloaded, tmp_path)


def test_distillation_lowers_kl_to_the_teacher(teacher, tiny_build):
    from tokenizers import Tokenizer

    from edge_models.evaluate import compare

    tok = Tokenizer.from_file(str(tiny_build / "teacher" / "tokenizer.json"))
    ds = build_dataset(tok, seq_len=32, stride=32)
    student = prune(
        teacher,
        measure_importance(teacher, batches(teacher.config.vocab_size)),
        PruneTarget(ffn=32, experts=2, heads=2),
    )
    before = compare(student, teacher, ds.heldout[:16])["kl_teacher_student"]
    distill(
        student,
        teacher,
        ds.train,
        ds.heldout[:8],
        DistillConfig(steps=20, batch_size=4, eval_every=10, warmup=2, alpha=1.0),
    )
    after = compare(student, teacher, ds.heldout[:16])["kl_teacher_student"]
    assert after < before, (before, after)


def test_prune_hidden_width_of_deepseek_v3_reloads_and_exports(teacher, tmp_path):
    imp = measure_importance(teacher, batches(teacher.config.vocab_size))
    assert imp.hidden.shape == (teacher.config.hidden_size,)
    student = prune(teacher, imp, PruneTarget(hidden=48, experts=2))
    reloaded = save_and_reload(student, tmp_path)
    assert reloaded.config.hidden_size == 48 and reloaded.model.embed_tokens.weight.shape[1] == 48
    assert non_embedding_parameters(reloaded) < non_embedding_parameters(teacher)
    exports_and_matches(reloaded, tmp_path)


def test_hidden_pruning_keeps_the_most_active_channels(teacher):
    n = teacher.config.hidden_size
    scores = np.zeros(n)
    scores[[3, 9, 40, 41]] = 1.0
    imp = Importance(ffn={}, heads={}, experts={}, layers=np.zeros(2), hidden=scores)
    student = prune(teacher, imp, PruneTarget(hidden=4))
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, [3, 9, 40, 41]])
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight[[3, 9, 40, 41]])


def test_prune_qwen2_hidden_width_with_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Qwen2Config(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
        )
    ).eval()
    student = prune(model, measure_importance(model, batches(512)), PruneTarget(hidden=40, heads=2))
    reloaded = save_and_reload(student, tmp_path)
    # head_dim stays 16 (it is written explicitly) although hidden/heads is now 20
    assert (reloaded.config.hidden_size, reloaded.config.head_dim, reloaded.config.num_attention_heads) == (40, 16, 2)
    exports_and_matches(reloaded, tmp_path)


def test_prune_deepseek_v2_mla_moe_and_export(tmp_path):
    """DeepSeek-V2 (greedy router, no score-correction bias, complex-valued RoPE) prunes and exports."""
    from transformers import DeepseekV2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        DeepseekV2Config(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()
    imp = measure_importance(model, batches(512))
    student = prune(model, imp, PruneTarget(heads=2, ffn=64, experts=2, hidden=48))
    reloaded = save_and_reload(student, tmp_path)
    assert type(reloaded).__name__ == "DeepseekV2ForCausalLM"
    assert (reloaded.config.n_routed_experts, reloaded.config.hidden_size) == (2, 48)
    exports_and_matches(reloaded, tmp_path)
