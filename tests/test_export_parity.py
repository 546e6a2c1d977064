"""ONNX export with KV cache: ONNX Runtime greedy tokens identical to transformers' generate."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from appliance.engine import DecoderSpec
from appliance.engine.ort_engine import OrtEngine
from edge_models.parity import engine_greedy, hf_greedy


@pytest.fixture(scope="module")
def pair(tiny_build, traced_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_build / "teacher", local_files_only=True).eval()
    spec = DecoderSpec.from_json((traced_teacher / "decoder.json").read_text())
    engine = OrtEngine((traced_teacher / "model.onnx").read_bytes(), spec, num_slots=2, max_seq_len=256)
    return model, engine, spec


def test_batch_of_one_matches_transformers(pair):
    model, engine, spec = pair
    prompts = [[spec.bos_token_id, 40, 41, 42, 43, 44]]
    assert engine_greedy(engine, prompts, 20, spec.eos_token_id) == hf_greedy(model, prompts, 20, spec.pad_token_id)


def test_left_padded_batch_of_two_matches_transformers(pair):
    model, engine, spec = pair
    prompts = [[spec.bos_token_id, 50, 60, 70, 80, 90, 100, 110], [spec.bos_token_id, 300, 301]]
    assert engine_greedy(engine, prompts, 20, spec.eos_token_id) == hf_greedy(model, prompts, 20, spec.pad_token_id)


def test_decoder_spec_describes_mla_latent_cache(pair):
    model, _, spec = pair
    cfg = model.config
    assert spec.architecture == "DeepseekV3ForCausalLM"
    assert spec.key_shape == (1, cfg.kv_lora_rank) and spec.value_shape == (1, cfg.qk_rope_head_dim)
    assert spec.weight_bytes > 0


def test_demo_report_records_quality_and_parity(tiny_build):
    import json

    report = json.loads((tiny_build / "report.json").read_text())
    assert report["parity"]["identical"] is True and report["teacher"]["parity"]["identical"] is True
    assert report["heldout_perplexity"] > 1 and report["teacher"]["heldout_perplexity"] > 1
    assert report["teacher"]["corpus"]["heldout_docs"] > 0


def test_demo_serves_the_pruned_distilled_quantized_student(tiny_build):
    """What `make run` seals is the compressed student, not the teacher."""
    import json

    report = json.loads((tiny_build / "report.json").read_text())
    spec = DecoderSpec.from_json((tiny_build / "onnx" / "decoder.json").read_text())
    assert report["served"] == "q4" and b"MatMulNBits" in (tiny_build / "onnx" / "model.onnx").read_bytes()
    assert report["non_embedding_parameters"] < 0.6 * report["teacher"]["non_embedding_parameters"]
    assert spec.architecture == "DeepseekV3ForCausalLM" and spec.weight_bytes > 0


def test_external_data_model_loads_from_memory_and_matches(tiny_build, tmp_path):
    """The >2 GB path (weights in model.onnx.data), forced on the tiny model: same tokens, no temp file."""
    from edge_models.export import export_decoder

    model = AutoModelForCausalLM.from_pretrained(tiny_build / "teacher", local_files_only=True).eval()
    spec = export_decoder(model, tmp_path, external_data=True, traced=True)
    graph = (tmp_path / "model.onnx").read_bytes()
    weights = bytearray((tmp_path / "model.onnx.data").read_bytes())
    assert len(weights) > 100_000  # the large weight tensors live outside the graph
    (tmp_path / "model.onnx.data").unlink()  # prove nothing is read from disk
    engine = OrtEngine(graph, spec, num_slots=1, max_seq_len=128, external={"model.onnx.data": weights})
    prompts = [[spec.bos_token_id, 40, 41, 42]]
    assert engine_greedy(engine, prompts, 12, spec.eos_token_id) == hf_greedy(model, prompts, 12, spec.pad_token_id)


def test_wipe_zeroes_buffers():
    from provisioning.keys import wipe

    buf = bytearray(b"secret" * 1000)
    wipe(buf)
    assert buf == bytearray(6000)
