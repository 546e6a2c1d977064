"""Structured pruning from calibration activations (Minitron-style importance, one shot).

Importance is measured on a small calibration set with forward hooks:
- MLP channels: mean |activation| entering ``down_proj`` (dense MLPs);
- attention heads: L2 norm of each head's output entering ``o_proj`` (MLA: per head; GQA: per
  key/value group, so grouped-query structure survives);
- routed experts (DeepSeek MoE): total routing weight the router gives each expert;
- layers: block importance, 1 − cos(hidden in, hidden out) of each decoder layer;
- hidden (embedding) channels: mean |activation| leaving every RMSNorm of hidden width (each
  layer's two norms and the final norm), summed — Minitron's embedding-channel importance.
The least important units are removed by slicing weights, and the config is updated so the result
is an ordinary checkpoint that ``from_pretrained`` loads and the ONNX exporter exports.

Not pruned here: the routed experts' own intermediate width and the shared experts' width (both
tied to ``moe_intermediate_size``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np

from .errors import EdgeModelsError


class PruneError(EdgeModelsError):
    """A pruning target the model's shape cannot take."""


@dataclass(frozen=True)
class PruneTarget:
    """Units to keep; None keeps the current count."""

    ffn: int | None = None  # dense MLP intermediate size
    heads: int | None = None  # attention heads (GQA: a multiple of the group size)
    experts: int | None = None  # routed experts per MoE layer
    layers: int | None = None  # decoder layers
    hidden: int | None = None  # hidden (embedding) width


@dataclass
class Importance:
    ffn: dict[int, np.ndarray]
    heads: dict[int, np.ndarray]
    experts: dict[int, np.ndarray]
    layers: np.ndarray
    hidden: np.ndarray | None = None


def _attn_dims(cfg) -> tuple[int, int, int]:
    """(heads, kv groups, value dim per head)."""
    heads = cfg.num_attention_heads
    if hasattr(cfg, "kv_lora_rank"):
        return heads, heads, cfg.v_head_dim
    kv = cfg.num_key_value_heads
    return heads, kv, getattr(cfg, "head_dim", None) or cfg.hidden_size // heads


def measure_importance(model, batches) -> Importance:
    """Run calibration ``batches`` (LongTensor [B, T]) through ``model`` with hooks; no weights change."""
    import torch

    cfg = model.config
    heads, groups, vdim = _attn_dims(cfg)
    ffn, head, experts = {}, {}, {}
    cos_sum = np.zeros(cfg.num_hidden_layers)
    hidden = {}
    n_batches = 0
    hooks = []
    for norm in _hidden_norms(model):
        hooks.append(
            norm.register_forward_hook(lambda _m, _a, out: add(hidden, 0, out.abs().reshape(-1, out.shape[-1]).mean(0)))
        )

    def add(store, i, value):
        store[i] = store.get(i, 0) + value.detach().double().cpu().numpy()

    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if hasattr(mlp, "down_proj"):
            hooks.append(
                mlp.down_proj.register_forward_pre_hook(
                    lambda _m, args, i=i: add(ffn, i, args[0].abs().reshape(-1, args[0].shape[-1]).mean(0))
                )
            )
        if hasattr(mlp, "gate") and hasattr(mlp, "experts"):

            def on_router(_m, _args, out, i=i, n=mlp.experts.num_experts):
                _, weights, idx = out
                add(
                    experts,
                    i,
                    torch.zeros(n, dtype=torch.float64).index_add_(0, idx.reshape(-1), weights.reshape(-1).double()),
                )

            hooks.append(mlp.gate.register_forward_hook(on_router))

        def on_o_proj(_m, args, i=i):
            x = args[0].reshape(-1, heads, vdim).norm(dim=-1).mean(0)
            add(head, i, x.reshape(groups, heads // groups).sum(-1))

        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj))

        def on_layer(_m, args, out, i=i):
            h_in, h_out = args[0], out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(
                h_in.reshape(-1, h_in.shape[-1]).double(), h_out.reshape(-1, h_out.shape[-1]).double(), dim=-1
            )
            cos_sum[i] += float(cos.mean())

        hooks.append(layer.register_forward_hook(on_layer))
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch)
                n_batches += 1
    finally:
        for h in hooks:
            h.remove()
    return Importance(
        ffn=ffn, heads=head, experts=experts, layers=1.0 - cos_sum / max(n_batches, 1), hidden=hidden.get(0)
    )


def _hidden_norms(model) -> list:
    layers = model.model.layers
    return [model.model.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]


def _top(scores: np.ndarray, keep: int) -> list[int]:
    return sorted(int(i) for i in np.argsort(-scores, kind="stable")[:keep])


def _slice_linear(linear, rows=None, cols=None):
    import torch

    w = linear.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    linear.weight = torch.nn.Parameter(w.contiguous())
    if linear.bias is not None and rows is not None:
        linear.bias = torch.nn.Parameter(linear.bias.data[rows].contiguous())
    linear.out_features, linear.in_features = linear.weight.shape


def _per_head_rows(index: list[int], per_head: int) -> list[int]:
    return [h * per_head + j for h in index for j in range(per_head)]


def _prune_heads(layer, cfg, keep_groups: list[int]) -> None:
    attn = layer.self_attn
    heads, groups, vdim = _attn_dims(cfg)
    per_group = heads // groups
    keep_heads = [g * per_group + j for g in keep_groups for j in range(per_group)]
    if hasattr(cfg, "kv_lora_rank"):  # MLA: queries and the up-projection of the latent are per head
        q = attn.q_b_proj if getattr(attn, "q_b_proj", None) is not None else attn.q_proj
        _slice_linear(q, rows=_per_head_rows(keep_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim))
        _slice_linear(attn.kv_b_proj, rows=_per_head_rows(keep_heads, cfg.qk_nope_head_dim + cfg.v_head_dim))
        attn.num_heads = len(keep_heads)
    else:  # GQA: whole key/value groups with their query heads
        _slice_linear(attn.q_proj, rows=_per_head_rows(keep_heads, vdim))
        _slice_linear(attn.k_proj, rows=_per_head_rows(keep_groups, vdim))
        _slice_linear(attn.v_proj, rows=_per_head_rows(keep_groups, vdim))
    _slice_linear(attn.o_proj, cols=_per_head_rows(keep_heads, vdim))


def _prune_experts(mlp, keep: list[int]) -> None:
    import torch

    idx = torch.tensor(keep)
    mlp.experts.gate_up_proj = torch.nn.Parameter(mlp.experts.gate_up_proj.data[idx].contiguous())
    mlp.experts.down_proj = torch.nn.Parameter(mlp.experts.down_proj.data[idx].contiguous())
    mlp.experts.num_experts = len(keep)
    mlp.gate.weight = torch.nn.Parameter(mlp.gate.weight.data[idx].contiguous())
    if getattr(mlp.gate, "e_score_correction_bias", None) is not None:  # DeepSeek-V3 only
        mlp.gate.e_score_correction_bias = mlp.gate.e_score_correction_bias[idx].clone()
    mlp.gate.num_experts = len(keep)


def _prune_hidden(model, keep: list[int]) -> None:
    """Keep hidden channels ``keep`` everywhere the residual stream is read or written."""
    import torch

    idx = torch.tensor(keep)
    cfg = model.config
    emb = model.model.embed_tokens
    emb.weight = torch.nn.Parameter(emb.weight.data[:, idx].contiguous())
    emb.embedding_dim = len(keep)
    head = model.lm_head
    if head.weight is not emb.weight:
        _slice_linear(head, cols=keep)
    for norm in _hidden_norms(model):
        norm.weight = torch.nn.Parameter(norm.weight.data[idx].contiguous())
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in ("q_proj", "q_a_proj", "k_proj", "v_proj", "kv_a_proj_with_mqa"):
            if getattr(attn, name, None) is not None:
                _slice_linear(getattr(attn, name), cols=keep)
        _slice_linear(attn.o_proj, rows=keep)
        if hasattr(attn, "hidden_size"):
            attn.hidden_size = len(keep)
        mlp = layer.mlp
        for dense in (mlp, getattr(mlp, "shared_experts", None)):
            if dense is not None and hasattr(dense, "down_proj") and isinstance(dense.down_proj, torch.nn.Linear):
                _slice_linear(dense.gate_proj, cols=keep)
                _slice_linear(dense.up_proj, cols=keep)
                _slice_linear(dense.down_proj, rows=keep)
        if hasattr(mlp, "experts"):  # [E, 2I, H] and [E, H, I]
            mlp.experts.gate_up_proj = torch.nn.Parameter(mlp.experts.gate_up_proj.data[:, :, idx].contiguous())
            mlp.experts.down_proj = torch.nn.Parameter(mlp.experts.down_proj.data[:, idx, :].contiguous())
            mlp.experts.hidden_dim = len(keep)
            mlp.gate.weight = torch.nn.Parameter(mlp.gate.weight.data[:, idx].contiguous())
            mlp.gate.hidden_dim = len(keep)
    cfg.hidden_size = len(keep)


def prune(model, importance: Importance, target: PruneTarget):
    """Return a pruned deep copy of ``model`` (config updated); ``model`` itself is not modified."""
    import torch

    model = copy.deepcopy(model)
    cfg = model.config
    heads, groups, head_dim = _attn_dims(cfg)
    if not hasattr(cfg, "kv_lora_rank"):  # GQA derives head_dim from hidden/heads unless it is explicit
        cfg.head_dim = head_dim
    if target.heads is not None and target.heads % (heads // groups):
        raise PruneError(f"--heads {target.heads} must be a multiple of the query group size {heads // groups}")
    moe = hasattr(cfg, "n_routed_experts") and target.experts is not None
    if moe and (target.experts < cfg.num_experts_per_tok or target.experts % (cfg.n_group or 1)):
        raise PruneError(
            f"--experts {target.experts} must be >= num_experts_per_tok ({cfg.num_experts_per_tok}) "
            f"and a multiple of n_group ({cfg.n_group})"
        )
    if target.hidden is not None and importance.hidden is None:
        raise PruneError("--hidden needs hidden-channel importance (measure it with this version)")
    for i, layer in enumerate(model.model.layers):
        if target.heads is not None and target.heads < heads:
            _prune_heads(layer, cfg, _top(importance.heads[i], target.heads // (heads // groups)))
        mlp = layer.mlp
        if target.ffn is not None and hasattr(mlp, "down_proj") and target.ffn < mlp.down_proj.in_features:
            keep = _top(importance.ffn[i], target.ffn)
            _slice_linear(mlp.gate_proj, rows=keep)
            _slice_linear(mlp.up_proj, rows=keep)
            _slice_linear(mlp.down_proj, cols=keep)
        if target.experts is not None and hasattr(mlp, "experts") and target.experts < mlp.experts.num_experts:
            _prune_experts(mlp, _top(importance.experts[i], target.experts))
    if target.heads is not None and target.heads < heads:
        cfg.num_attention_heads = target.heads
        cfg.num_key_value_heads = target.heads if hasattr(cfg, "kv_lora_rank") else target.heads // (heads // groups)
    if target.ffn is not None:
        cfg.intermediate_size = min(cfg.intermediate_size, target.ffn)
    if target.experts is not None and hasattr(cfg, "n_routed_experts"):
        cfg.n_routed_experts = min(cfg.n_routed_experts, target.experts)
    if target.layers is not None and target.layers < cfg.num_hidden_layers:
        keep = _top(importance.layers, target.layers)
        if hasattr(cfg, "first_k_dense_replace"):
            cfg.first_k_dense_replace = sum(1 for i in keep if i < cfg.first_k_dense_replace)
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = [cfg.layer_types[i] for i in keep]
        model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
        for new, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = new
        cfg.num_hidden_layers = len(keep)
    if target.hidden is not None and target.hidden < cfg.hidden_size:
        _prune_hidden(model, _top(importance.hidden, target.hidden))
    return model


def non_embedding_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def shape_of(model) -> dict:
    cfg = model.config
    shape = {
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "ffn": cfg.intermediate_size,
        "hidden": cfg.hidden_size,
    }
    if hasattr(cfg, "n_routed_experts"):
        shape["experts"] = cfg.n_routed_experts
    return shape


def target_for_budget(model, fraction: float) -> PruneTarget:
    """A shape keeping about ``fraction`` of the non-embedding parameters: width first (MLP channels and
    experts shrink together), then heads, depth last — the order Minitron found to hurt least."""
    cfg = model.config
    total = non_embedding_parameters(model)
    heads, groups, _ = _attn_dims(cfg)
    group = heads // groups
    best = PruneTarget()
    for head_keep in range(heads, 0, -group):
        for r in np.linspace(1.0, 0.1, 46):
            t = PruneTarget(ffn=max(8, int(cfg.intermediate_size * r)), heads=head_keep, experts=_expert_count(cfg, r))
            if _estimate(model, t) <= fraction * total:
                return t
            best = t
    return best


def _expert_count(cfg, r: float) -> int | None:
    if not hasattr(cfg, "n_routed_experts"):
        return None
    k = max(cfg.num_experts_per_tok, int(round(cfg.n_routed_experts * r)))
    group = cfg.n_group or 1
    return k - k % group if k % group else k


def _estimate(model, target: PruneTarget) -> int:
    """Non-embedding parameters of the pruned shape, counted on the meta device (no memory used)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    heads, groups, _ = _attn_dims(cfg)
    if target.heads:
        cfg.num_attention_heads = target.heads
        cfg.num_key_value_heads = target.heads if hasattr(cfg, "kv_lora_rank") else target.heads // (heads // groups)
    if target.ffn:
        cfg.intermediate_size = target.ffn
    if target.experts:
        cfg.n_routed_experts = target.experts
    if target.hidden:
        if not hasattr(cfg, "kv_lora_rank"):
            cfg.head_dim = _attn_dims(model.config)[2]
        cfg.hidden_size = target.hidden
    with torch.device("meta"):
        return non_embedding_parameters(AutoModelForCausalLM.from_config(cfg))


def describe(target: PruneTarget) -> dict:
    return {k: v for k, v in asdict(target).items() if v is not None}
