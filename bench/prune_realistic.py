"""Prune + short distillation + ONNX export + parity at realistic shapes (random weights).

Proves the pipeline handles the real architectures' structure at size, not just tiny test models:
a Qwen2 of DeepSeek-R1-Distill-Qwen-like small shape (hidden 1024, 12 layers, 16 heads / 4 KV heads,
FFN 2816, vocab 32000) and a DeepSeek-V3 MoE with MLA (hidden 1024, 8 layers, 16 heads, 16 routed
experts, top-4). Speed and quality do not depend on weight values here; structure does.
Writes bench/results/prune_realistic.json.

    .venv/bin/python bench/prune_realistic.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def models():
    from transformers import DeepseekV3Config, Qwen2Config

    common = dict(
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, max_position_embeddings=2048
    )
    yield (
        "qwen2-1024x12",
        Qwen2Config(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=4,
            **common,
        ),
    )
    yield (
        "deepseek-v3-moe-1024x8",
        DeepseekV3Config(
            vocab_size=32000,
            hidden_size=1024,
            intermediate_size=2816,
            moe_intermediate_size=512,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=16,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            q_lora_rank=384,
            kv_lora_rank=256,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            rope_interleave=False,
            **common,
        ),
    )


def run(name, config, workdir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from appliance.engine import create_engine
    from edge_models.distill import DistillConfig, distill
    from edge_models.export import export_decoder
    from edge_models.parity import engine_greedy, hf_greedy
    from edge_models.prune import measure_importance, non_embedding_parameters, prune, target_for_budget

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(3, config.vocab_size, (2, 64), generator=gen) for _ in range(2)]
    windows = torch.randint(3, config.vocab_size, (16, 65), generator=gen).numpy()
    t = time.monotonic()
    target = target_for_budget(teacher, 0.5)
    student = prune(teacher, measure_importance(teacher, calib), target)
    prune_s = time.monotonic() - t
    t = time.monotonic()
    hist = distill(
        student,
        teacher,
        windows,
        windows[:4],
        DistillConfig(steps=4, batch_size=2, eval_every=2, warmup=1),
        desc=f"distill {name}",
    )
    distill_s = time.monotonic() - t
    t = time.monotonic()
    spec = export_decoder(student, workdir / name)
    export_s = time.monotonic() - t
    graph = (workdir / name / "model.onnx").read_bytes()
    engine = create_engine("onnxruntime", graph, spec, num_slots=2, max_seq_len=256)
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 300, 301]]
    identical = engine_greedy(engine, prompts, 8, spec.eos_token_id) == hf_greedy(student, prompts, 8, 0)
    return {
        "teacher_non_embedding": non_embedding_parameters(teacher),
        "student_non_embedding": non_embedding_parameters(student),
        "fraction": non_embedding_parameters(student) / non_embedding_parameters(teacher),
        "target": {k: v for k, v in target.__dict__.items() if v is not None},
        "distill_losses": hist["train_loss"],
        "onnx_parity_identical": identical,
        "seconds": {"prune": round(prune_s, 1), "distill_4_steps": round(distill_s, 1), "export": round(export_s, 1)},
    }


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in models():
            results[name] = run(name, config, Path(tmp))
            r = results[name]
            parity = "identical" if r["onnx_parity_identical"] else "DIFFERS"
            print(
                f"{name}: {r['teacher_non_embedding']:,} → {r['student_non_embedding']:,} non-embedding params "
                f"({r['fraction']:.2f}), {r['target']}, ONNX parity {parity}"
            )
    out = Path("bench/results/prune_realistic.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["onnx_parity_identical"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
