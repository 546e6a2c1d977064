"""The torch engine (CPU, float32) against transformers, token for token, for each family it runs.

Each test builds a tiny random checkpoint with transformers, saves it as safetensors and hands the
engine the file's *bytes* (as the loader does with decrypted payloads).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from appliance.engine import EngineError  # noqa: E402
from appliance.engine.torch_engine import TorchEngine  # noqa: E402
from edge_models.export import decoder_spec  # noqa: E402
from edge_models.parity import engine_greedy, hf_greedy  # noqa: E402

SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, max_position_embeddings=256, initializer_range=0.1)


def qwen2():
    return transformers.Qwen2Config(
        **COMMON, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, **SPECIAL
    )


def llama():
    return transformers.LlamaConfig(
        **COMMON, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1, **SPECIAL
    )


def deepseek_v3():
    return transformers.DeepseekV3Config(
        **COMMON,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        rope_interleave=True,
        tie_word_embeddings=False,
        **SPECIAL,
    )


FAMILIES = {"qwen2": qwen2, "llama": llama, "deepseek_v3": deepseek_v3}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    """(transformers model, safetensors bytes, config.json bytes, decoder spec) of one family."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[request.param]()).eval()
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    weights = (out / "model.safetensors").read_bytes()
    return model, weights, (out / "config.json").read_bytes(), decoder_spec(model)


def make(checkpoint, slots: int = 4, **kw) -> TorchEngine:
    _, weights, config, spec = checkpoint
    return TorchEngine(weights, config, spec, num_slots=slots, max_seq_len=128, **kw)


PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 300, 301], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]


def test_batch_of_one_matches_transformers(checkpoint):
    model, _, _, spec = checkpoint
    for prompt in PROMPTS:
        assert engine_greedy(make(checkpoint), [prompt], 12, spec.eos_token_id) == hf_greedy(
            model, [prompt], 12, spec.pad_token_id
        )


def test_ragged_batch_matches_transformers(checkpoint):
    model, _, _, spec = checkpoint
    assert engine_greedy(make(checkpoint), PROMPTS, 12, spec.eos_token_id) == hf_greedy(
        model, PROMPTS, 12, spec.pad_token_id
    )


def argmax(logits: np.ndarray, eos: int) -> int:
    logits = logits.copy()
    logits[eos] = -np.inf
    return int(np.argmax(logits))


def test_joining_and_leaving_mid_decode_match_running_alone(checkpoint):
    _, _, _, spec = checkpoint
    alone = [engine_greedy(make(checkpoint), [p], 14, spec.eos_token_id)[0] for p in PROMPTS]
    eng = make(checkpoint)
    outs: dict[int, list[int]] = {}
    slot_of = {0: 3, 1: 0, 2: 2}  # slots need not follow arrival order

    def join(i: int) -> None:
        outs[i] = [argmax(eng.prefill([(slot_of[i], PROMPTS[i])])[0], spec.eos_token_id)]

    join(0)
    for step in range(40):
        if step == 3:
            join(1)
        if step == 6:
            join(2)
        active = [i for i in outs if len(outs[i]) < 14]
        for i in set(outs) - set(active):
            if eng.length(slot_of[i]):
                eng.release(slot_of[i])  # a finished row leaves while the others go on
        if not active:
            break
        logits = eng.decode([(slot_of[i], outs[i][-1]) for i in active])
        for row, i in enumerate(active):
            outs[i].append(argmax(logits[row], spec.eos_token_id))
    assert [outs[i] for i in range(3)] == alone


def test_chunked_prefill_equals_one_shot(checkpoint):
    prompt = [1, *range(40, 77)]
    whole = make(checkpoint).prefill([(0, prompt)])
    chunked = make(checkpoint)
    for start in range(0, len(prompt), 8):
        last = chunked.prefill([(1, prompt[start : start + 8])])
    assert chunked.length(1) == len(prompt)
    np.testing.assert_allclose(last, whole, rtol=1e-4, atol=1e-4)


def test_session_save_and_load_continue_exactly(checkpoint):
    _, _, _, spec = checkpoint
    eng = make(checkpoint)
    first = [argmax(eng.prefill([(0, PROMPTS[2])])[0], spec.eos_token_id)]
    for _ in range(4):
        first.append(argmax(eng.decode([(0, first[-1])])[0], spec.eos_token_id))
    saved = eng.save(0)
    eng.release(0)
    eng.prefill([(0, [1, 5, 6, 7])])  # another sequence reuses the row before the session comes back
    eng.load(2, saved)
    assert eng.length(2) == len(PROMPTS[2]) + 4
    cont = eng.prefill([(2, [first[-1]])])
    ref = make(checkpoint).prefill([(0, PROMPTS[2] + first)])
    np.testing.assert_allclose(cont, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_weight_only_quantization_stays_close(checkpoint, quantize):
    """int8/int4 change logits a little, not the model (the tiny widths keep int4 layers float where
    the kernel cannot tile them; tests/test_torch_engine.py::test_int4_kernel_* covers the kernel)."""
    full = make(checkpoint).prefill([(0, PROMPTS[2])])
    q = make(checkpoint, quantize=quantize).prefill([(0, PROMPTS[2])])
    assert np.corrcoef(full[0], q[0])[0, 1] > 0.99


def test_int4_kernel_matches_its_dequantized_reference():
    from appliance.engine.torch_quant import Int4Linear, int4_groupwise

    torch.manual_seed(0)
    weight, x = torch.randn(96, 256), torch.randn(3, 256)
    q, sz = int4_groupwise(weight, 128)
    scales, zeros = sz[:, :, 0].T, sz[:, :, 1].T  # [out, groups]
    dequant = ((q.reshape(96, 2, 128).float() - 8) * scales[..., None] + zeros[..., None]).reshape(96, 256)
    assert (dequant - weight).abs().max() < 0.3  # 4 bits per weight: coarse, but the same matrix
    torch.testing.assert_close(Int4Linear(weight, None, 128)(x), x @ dequant.T, rtol=1e-4, atol=1e-4)


def test_checkpoint_of_an_unsupported_family_is_refused(checkpoint):
    _, weights, config, spec = checkpoint
    cfg = json.loads(config)
    cfg["model_type"] = "mamba"
    with pytest.raises(EngineError, match="onnxruntime"):
        TorchEngine(weights, cfg, spec, num_slots=1, max_seq_len=64)


def test_garbage_weights_are_a_clear_error(checkpoint):
    _, _, config, spec = checkpoint
    with pytest.raises(EngineError, match="safetensors"):
        TorchEngine(b"not safetensors", config, spec, num_slots=1, max_seq_len=64)
