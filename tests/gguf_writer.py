"""Write a GGUF file from a Hugging Face state dict and tokenizer the way llama.cpp's convert_hf_to_gguf.py does
(tensor names, Llama's Q/K row permutation, the byte-level BPE vocabulary with token types), with the ``gguf``
package — test checkpoints round-trip through ``edge_models.gguf_import`` with it."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rotary halves → interleaved pairs)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    return f"blk.{parts[2]}.{_PARTS['.'.join(parts[3:-1])]}.{parts[-1]}"


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_json: Path, pre: str, bos: str | None, eos: str, add_bos: bool):
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    vocab = dict(spec["model"]["vocab"])
    added = {a["content"]: a for a in spec["added_tokens"]}
    for a in spec["added_tokens"]:
        vocab[a["content"]] = a["id"]
    size = max(vocab.values()) + 1
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif text in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[text]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if bos is not None:
        writer.add_bos_token_id(vocab[bos])
    writer.add_eos_token_id(vocab[eos])
    writer.add_add_bos_token(add_bos)
    return size


def write_gguf(
    path: Path,
    config,
    state: dict[str, np.ndarray],
    tokenizer_json: Path,
    pre: str,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    chat_template: str | None = None,
    bos: str | None = None,
    eos: str = "<|im_end|>",
) -> Path:
    arch = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}[config.architectures[0]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta if hasattr(config, "rope_theta") else 10000.0)
    w.add_vocab_size(config.vocab_size)
    add_tokenizer(w, tokenizer_json, pre, bos, eos, add_bos=bos is not None)
    if chat_template:
        w.add_chat_template(chat_template)
    for name, value in state.items():
        value = np.ascontiguousarray(value, np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            value = permute(value, config.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            value = permute(value, config.num_key_value_heads)
        if value.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
