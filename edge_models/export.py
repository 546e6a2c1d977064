"""ONNX export of a causal decoder with its KV cache as plain tensors.

One graph serves prefill (empty past) and decode (one new token per row). Inputs:
``input_ids [B,S]``, ``attention_mask [B,P+S]``, ``position_ids [B,S]`` and, per layer ``i``,
``past.i.key`` / ``past.i.value`` ``[B,H,P,D]``. Outputs: ``logits [B,S,V]`` and ``present.i.key`` /
``present.i.value`` ``[B,H,P+S,D]``. For DeepSeek (MLA) the cached "key" is the compressed latent
and the "value" the shared rotary key, so the cache is a few hundred floats per token.

The layout is recorded in ``decoder.json`` (``appliance.engine.spec``) next to the graph; the
runtime reads it from there and never needs torch or transformers.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

from appliance.engine.spec import DecoderSpec, input_names, output_names

from .errors import ExportError
from .tokenizer import special_token_ids


def cache_keyword(module) -> str:
    """The keyword that passes the KV cache to ``module.forward``: transformers 5.24 renamed ``past_key_values``
    to ``cache`` (the old name is deprecated until 5.40); both are handled, whichever the installed release takes."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def output_cache(out):
    """The cache a model returned, under either name (``cache`` from transformers 5.24 on)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_shapes(model) -> tuple[tuple[int, int], tuple[int, int]]:
    """Run one token through the model and read the per-layer cache tensor shapes."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
    layer = output_cache(out).layers[0]
    return (
        tuple(layer.keys.shape[1:2]) + tuple(layer.keys.shape[3:4]),
        tuple(layer.values.shape[1:2]) + tuple(layer.values.shape[3:4]),
    )


def decoder_spec(model) -> DecoderSpec:
    cfg = model.config
    key_shape, value_shape = _cache_shapes(model)
    return DecoderSpec(
        architecture=cfg.architectures[0] if cfg.architectures else type(model).__name__,
        num_layers=cfg.num_hidden_layers,
        key_shape=key_shape,
        value_shape=value_shape,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
        **special_token_ids(cfg.to_dict(), _generation_config(model), _source_dir(model)),
        weight_bytes=_active_weight_bytes(model),
    )


def _generation_config(model) -> dict | None:
    generation = getattr(model, "generation_config", None)
    return generation.to_dict() if generation is not None else None


def _source_dir(model) -> Path | None:
    """The checkpoint directory the model was loaded from (its tokenizer decides the BOS), if any."""
    path = Path(getattr(model, "name_or_path", "") or "")
    return path if str(path) and path.is_dir() else None


def _active_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: all dense weights, only the routed experts a token uses."""
    cfg = model.config
    total = 0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if ".experts." in name and getattr(cfg, "n_routed_experts", None):
            size = size * cfg.num_experts_per_tok // cfg.n_routed_experts
        if name.endswith("embed_tokens.weight"):
            size = param.shape[-1] * param.element_size()  # a lookup reads one row
        total += size
    return total


def _wrapper(model, num_layers: int):
    import torch
    from transformers import DynamicCache

    keyword = cache_keyword(model)

    class FlatCacheDecoder(torch.nn.Module):
        """Takes and returns the KV cache as flat tensors so the ONNX graph has plain inputs."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.model.config)
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{keyword: cache},
            )
            present = []
            for layer in output_cache(out).layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return FlatCacheDecoder().eval()


def _sample_inputs(spec: DecoderSpec):
    """Batch 2 with a left-padded row (else attention_mask is folded away) and a non-empty past."""
    import torch

    batch, seq, past = 2, 5, 3
    ids = torch.randint(3, spec.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    cache = []
    for _ in range(spec.num_layers):
        cache += [
            torch.randn(batch, spec.key_shape[0], past, spec.key_shape[1]),
            torch.randn(batch, spec.value_shape[0], past, spec.value_shape[1]),
        ]
    return (ids, mask, positions, *cache)


@contextlib.contextmanager
def _real_valued_rope(model):
    """DeepSeek-V2 computes rotary embeddings with complex tensors, which ONNX cannot express. While
    exporting, swap in the same rotation written with real (cos, sin) pairs; other families untouched."""
    if type(model).__name__ != "DeepseekV2ForCausalLM":
        yield
        return
    import torch
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2

    rotary = model.model.rotary_emb

    def rope_forward(x, position_ids):
        freqs = position_ids[..., None].float() * rotary.inv_freq.to(device=x.device, dtype=torch.float)
        return torch.stack([freqs.cos(), freqs.sin()], -1) * rotary.attention_scaling

    def apply_rotary_emb(xq, xk, rope):
        cos, sin = rope[..., 0].unsqueeze(1), rope[..., 1].unsqueeze(1)

        def rotate(x):
            pairs = x.float().reshape(*x.shape[:-1], -1, 2)
            re, im = pairs[..., 0], pairs[..., 1]
            return torch.stack([re * cos - im * sin, re * sin + im * cos], -1).flatten(3).type_as(x)

        return rotate(xq), rotate(xk)

    original = v2.apply_rotary_emb
    rotary.forward, v2.apply_rotary_emb = rope_forward, apply_rotary_emb
    try:
        yield
    finally:
        del rotary.forward
        v2.apply_rotary_emb = original


@contextlib.contextmanager
def _absorbed_mla(model):
    """DeepSeek-V3 MLA with the latent up-projection absorbed (as DeepSeek's own inference code does).

    The cache holds the compressed latent ``c`` (after ``kv_a_layernorm``) and the rotary key. HF's
    attention re-expands every cached position through ``kv_b_proj`` into per-head keys and values
    at every step — work proportional to batch × context (half of a decode step on the demo). The
    same attention without that expansion: with ``kv_b_proj`` split per head into ``W_uk`` (keys)
    and ``W_uv`` (values), ``q·(W_uk c) = (W_ukᵀ q)·c`` and ``Σ p·(W_uv c) = W_uv (Σ p·c)``, so
    queries are projected into the latent space once and the output projected out once. Same
    cache layout, same results up to float rounding (the parity checks compare greedy tokens).
    """
    if type(model).__name__ != "DeepseekV3ForCausalLM":
        yield
        return
    import torch
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values  # the keyword's name depends on the release
        bsz, seq = hidden_states.shape[:-1]
        heads, dn, dv, rank = self.num_heads, self.qk_nope_head_dim, self.v_head_dim, self.kv_lora_rank
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(bsz, seq, heads, self.qk_head_dim).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [dn, self.qk_rope_head_dim], dim=-1)
        kv_nope, k_rot = torch.split(self.kv_a_proj_with_mqa(hidden_states), [rank, self.qk_rope_head_dim], dim=-1)
        kv_nope = self.kv_a_layernorm(kv_nope).view(bsz, 1, seq, rank)
        k_rot = k_rot.view(bsz, 1, seq, self.qk_rope_head_dim)
        cos, sin = position_embeddings
        rope = v3.apply_rotary_pos_emb_interleave if self.config.rope_interleave else v3.apply_rotary_pos_emb
        q_rot, k_rot = rope(q_rot, k_rot, cos, sin)
        if cache is not None:
            kv_nope, k_rot = cache.update(kv_nope, k_rot, self.layer_idx)
        w = self.kv_b_proj.weight.view(heads, dn + dv, rank)
        q_lat = torch.matmul(q_pass, w[:, :dn, :])  # [B, H, S, rank]
        scores = torch.matmul(q_lat, kv_nope.transpose(2, 3)) + torch.matmul(q_rot, k_rot.transpose(2, 3))
        scores = scores * self.scaling
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(torch.matmul(probs, kv_nope), w[:, dn:, :].transpose(1, 2))  # [B, H, S, dv]
        out = out.transpose(1, 2).reshape(bsz, seq, heads * dv)
        return self.o_proj(out), None

    original = v3.DeepseekV3Attention.forward
    v3.DeepseekV3Attention.forward = forward
    try:
        yield
    finally:
        v3.DeepseekV3Attention.forward = original


EXTERNAL_DATA = "model.onnx.data"
# Bumped when the exported graph changes for the same checkpoint (builds keyed on it are redone).
# 2: MLA with the latent up-projection absorbed; 3: DeepSeek exports fused; 4: BOS only where the tokenizer adds it,
# asymmetric calibrated 4-bit with an 8-bit head, tied tables stored once
EXPORT_REVISION = 4
PROTOBUF_LIMIT = 2_000_000_000  # a single ONNX protobuf cannot exceed 2 GB


def export_decoder(
    model, out_dir: Path, external_data: bool | None = None, quant: str | None = None, traced: bool = False
) -> DecoderSpec:
    """Export ``model`` to ``out_dir/model.onnx`` and write ``decoder.json``; returns the spec.

    Qwen2, Llama and DeepSeek-V2/V3 get the fused static-cache graph (``fused_graph``), quantized while it is
    written when ``quant`` is ``"q4"``/``"q8"``; other families (and ``traced=True``) are traced through
    ``torch.onnx`` (quantize those afterwards with ``quantize.py``). Weights go to ``model.onnx.data``
    beside the graph when ``external_data`` is True, or when left as None and the weights would
    exceed the 2 GB protobuf limit (any 7B model).
    """
    from edge_models import fused_graph

    if not traced:
        try:
            fused_graph.check_supported(model.config)
        except fused_graph.UnsupportedModel:
            pass
        else:
            weights = fused_graph.Weights.from_module(model)
            special = special_token_ids(model.config.to_dict(), _generation_config(model), _source_dir(model))
            return fused_graph.build_fused_decoder(model.config, weights, out_dir, quant, external_data, special)
    if quant is not None:
        raise ExportError(f"{type(model).__name__} is exported traced; quantize it afterwards (edge-models quantize)")
    import torch
    from transformers.exporters import exporter_onnx

    model = model.eval()
    spec = decoder_spec(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    batch, seq, past, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past", "total"))
    cache_dims = tuple({0: batch, 2: past} for _ in range(2 * spec.num_layers))
    # DeepSeek MoE experts run through a grouped matmul that has no stock ONNX translation.
    translations = {
        torch.ops.transformers.grouped_mm_fallback.default: exporter_onnx._aten_grouped_mm,
        torch.ops.aten._grouped_mm.default: exporter_onnx._aten_grouped_mm,
    }
    with _real_valued_rope(model), _absorbed_mla(model):
        program = torch.onnx.export(
            _wrapper(model, spec.num_layers),
            _sample_inputs(spec),
            input_names=input_names(spec.num_layers),
            output_names=output_names(spec.num_layers),
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, cache_dims),
            dynamo=True,
            custom_translation_table=translations,
            optimize=True,
            verbose=False,
        )
    if external_data is None:
        external_data = sum(p.numel() * p.element_size() for p in model.parameters()) > PROTOBUF_LIMIT
    program.save(str(out_dir / "model.onnx"), external_data=external_data)
    if external_data and not (out_dir / EXTERNAL_DATA).exists():
        raise ExportError(f"exporter did not write {EXTERNAL_DATA}; the runtime expects that name")
    (out_dir / "decoder.json").write_text(spec.to_json())
    return spec
