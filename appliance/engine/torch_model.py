"""Decoder-only transformers for the torch engine, built from a checkpoint's ``config.json`` and its
safetensors weights (gpt-fast's ``model.py`` in spirit: plain modules, a static KV cache written in
place at explicit positions).

Families: Qwen2 and Llama (grouped-query attention) and DeepSeek-V3 (MLA + MoE). DeepSeek's MLA
runs *absorbed*, as ``edge_models.export`` does: the cache holds the compressed latent and the
shared rotary key (``[rows, 1, positions, rank]`` and ``[rows, 1, positions, rope_dim]``), queries
are projected into the latent space and the output projected out of it.

Every forward takes ``rows`` (cache rows, one per sequence), ``positions`` (where each token goes)
and ``write`` (the column each token's key lands in: its position, or the scratch column for
padding), so rows of different lengths run in one batch and padding never touches a real entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import EngineError
from .torch_quant import int8_per_channel, make_linear

FAMILIES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
DEEPSEEK_KEYS = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "first_k_dense_replace",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "moe_intermediate_size",
    "n_shared_experts",
)


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    mlp_bias: bool
    # DeepSeek-V3 only
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    first_k_dense_replace: int = 0
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 0

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        """Read a transformers ``config.json``; refuse what this engine does not implement."""
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise EngineError(f"the torch engine runs {sorted(FAMILIES)} checkpoints, not {family!r}; use onnxruntime")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise EngineError(
                f"rope type {rope.get('rope_type')!r} is not implemented by the torch engine; use onnxruntime"
            )
        if cfg.get("use_sliding_window"):
            raise EngineError("sliding-window attention is not implemented by the torch engine; use onnxruntime")
        if cfg.get("hidden_act", "silu") != "silu":
            raise EngineError(f"activation {cfg['hidden_act']!r} is not implemented by the torch engine")
        heads = cfg["num_attention_heads"]
        common = dict(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            rms_norm_eps=cfg["rms_norm_eps"],
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )
        if family != "deepseek_v3":
            return cls(**common)
        return cls(
            **{**common, "head_dim": cfg["qk_rope_head_dim"]},
            rope_interleave=bool(cfg.get("rope_interleave", False)),
            **{k: cfg[k] for k in DEEPSEEK_KEYS},
        )

    def cache_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(heads, dim) of the cached key and value tensors, as ``decoder.json`` records them."""
        if self.family == "deepseek_v3":
            return (1, self.kv_lora_rank), (1, self.qk_rope_head_dim)
        return (self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim)


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight, requires_grad=False), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(dim: int, theta: float, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[length, dim]`` (frequencies repeated, as transformers lays them out), float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    freqs = torch.arange(length, dtype=torch.float, device=device)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """Rotary embedding of ``x [B,H,S,D]`` with ``cos/sin [B,S,D]``."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    if interleave:  # DeepSeek's pairs (x0,x1),(x2,x3)...: rotated by one frequency each
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


def write_cache(cache: torch.Tensor, rows: torch.Tensor, write: torch.Tensor, values: torch.Tensor) -> None:
    """``cache[rows[i], :, write[i, j]] = values[i, :, j]`` in place (``values [B,H,S,D]``)."""
    cache[rows[:, None], :, write] = values.transpose(1, 2)


def attend(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over key positions a query may see (``visible [B,1,S,L]``), in float32 as transformers does."""
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32)


class Attention(nn.Module):
    """Grouped-query attention (Qwen2, Llama)."""

    def __init__(self, cfg: ModelConfig, w: dict, quantize: str):
        super().__init__()
        self.cfg = cfg
        self.q_proj, self.k_proj, self.v_proj = (
            make_linear(w[f"{n}.weight"], w.get(f"{n}.bias"), quantize) for n in ("q_proj", "k_proj", "v_proj")
        )
        self.o_proj = make_linear(w["o_proj.weight"], None, quantize)

    def forward(self, x, cos, sin, rows, write, visible, cache):
        b, s, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(b, s, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        key_cache, value_cache = cache
        write_cache(key_cache, rows, write, k)
        write_cache(value_cache, rows, write, v)
        width = visible.shape[-1]
        keys, values = key_cache[rows, :, :width], value_cache[rows, :, :width]
        # SDPA (fused kernels on CUDA; grouped heads share their key/value head without a copy)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class LatentAttention(nn.Module):
    """DeepSeek MLA with ``kv_b_proj`` absorbed into the query and output (see ``edge_models.export``)."""

    def __init__(self, cfg: ModelConfig, w: dict, quantize: str):
        super().__init__()
        self.cfg = cfg
        if cfg.q_lora_rank is None:
            self.q_proj = make_linear(w["q_proj.weight"], None, quantize)
        else:
            self.q_a_proj = make_linear(w["q_a_proj.weight"], w.get("q_a_proj.bias"), quantize)
            self.q_a_layernorm = RMSNorm(w["q_a_layernorm.weight"], cfg.rms_norm_eps)
            self.q_b_proj = make_linear(w["q_b_proj.weight"], None, quantize)
        self.kv_a_proj_with_mqa = make_linear(
            w["kv_a_proj_with_mqa.weight"], w.get("kv_a_proj_with_mqa.bias"), quantize
        )
        self.kv_a_layernorm = RMSNorm(w["kv_a_layernorm.weight"], cfg.rms_norm_eps)
        # The up-projection stays a plain tensor: it is used per head on both sides of attention.
        wkv = w["kv_b_proj.weight"].view(cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        self.register_buffer("w_uk", wkv[:, : cfg.qk_nope_head_dim].contiguous())  # [H, dn, rank]
        self.register_buffer("w_uv_t", wkv[:, cfg.qk_nope_head_dim :].transpose(1, 2).contiguous())  # [H, rank, dv]
        self.o_proj = make_linear(w["o_proj.weight"], None, quantize)
        self.scaling = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5

    def forward(self, x, cos, sin, rows, write, visible, cache):
        b, s, _ = x.shape
        c = self.cfg
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, c.num_heads, -1).transpose(1, 2)
        q_pass, q_rot = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).view(b, 1, s, c.kv_lora_rank)
        q_rot = rotate(q_rot, cos, sin, c.rope_interleave)
        k_rot = rotate(k_rot.view(b, 1, s, c.qk_rope_head_dim), cos, sin, c.rope_interleave)
        latent_cache, rot_cache = cache
        write_cache(latent_cache, rows, write, latent)
        write_cache(rot_cache, rows, write, k_rot)
        width = visible.shape[-1]
        latents, rot_keys = latent_cache[rows, :, :width], rot_cache[rows, :, :width]
        q_lat = torch.matmul(q_pass, self.w_uk)  # [B, H, S, rank]
        scores = torch.matmul(q_lat, latents.transpose(2, 3)) + torch.matmul(q_rot, rot_keys.transpose(2, 3))
        probs = attend(scores * self.scaling, visible).to(q.dtype)
        out = torch.matmul(torch.matmul(probs, latents), self.w_uv_t)  # [B, H, S, dv]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, w: dict, quantize: str, prefix: str = ""):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = (
            make_linear(w[f"{prefix}{n}.weight"], w.get(f"{prefix}{n}.bias"), quantize)
            for n in ("gate_proj", "up_proj", "down_proj")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """DeepSeek-V3 routing (sigmoid scores, bias-corrected group top-k) over stacked expert weights.

    Two ways to run the routed experts: gather each token's experts (static shapes, capturable in a
    CUDA graph: decode) or loop over the experts actually hit (prefill, where tokens share experts).
    """

    def __init__(self, cfg: ModelConfig, w: dict, quantize: str):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("router", w["gate.weight"].float())
        self.register_buffer("bias", w["gate.e_score_correction_bias"].float())
        stacked = {n: self._stack(w, n, cfg.n_routed_experts) for n in ("gate_proj", "up_proj", "down_proj")}
        self.dtype = w["gate.weight"].dtype
        self.int8 = quantize in ("int8", "int4")  # int4 experts would need a grouped kernel: int8 instead
        for name, t in stacked.items():
            if self.int8:
                q, scales = int8_per_channel(t)
                self.register_buffer(name, q)
                self.register_buffer(f"{name}_scales", scales)
            else:
                self.register_buffer(name, t)
        self.shared = MLP(w, quantize, "shared_experts.")

    @staticmethod
    def _stack(w: dict, name: str, experts: int) -> torch.Tensor:
        fused = w.get(f"experts.{'gate_up_proj' if name != 'down_proj' else 'down_proj'}")
        if fused is not None:  # transformers' own stacked layout
            return fused.chunk(2, dim=1)[name == "up_proj"] if name != "down_proj" else fused
        return torch.stack([w[f"experts.{e}.{name}.weight"] for e in range(experts)])

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        scores = F.linear(x.float(), self.router).sigmoid()
        choice = scores + self.bias
        groups = choice.view(-1, c.n_group, c.n_routed_experts // c.n_group).topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(groups).scatter_(1, groups.topk(c.topk_group, dim=-1, sorted=False)[1], 1)
        keep = keep[:, :, None].expand(-1, -1, c.n_routed_experts // c.n_group).reshape(-1, c.n_routed_experts)
        idx = choice.masked_fill(keep == 0, float("-inf")).topk(c.num_experts_per_tok, dim=-1, sorted=False)[1]
        weights = scores.gather(1, idx)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return idx, weights * c.routed_scaling_factor

    def _weight(self, name: str, idx) -> torch.Tensor:
        w = getattr(self, name)[idx]
        return w.to(self.dtype) * getattr(self, f"{name}_scales")[idx][..., None] if self.int8 else w

    def forward(self, x: torch.Tensor, gather: bool) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weights = self.route(flat)
        weights = weights.to(x.dtype)
        if gather:
            gate, up, down = (self._weight(n, idx) for n in ("gate_proj", "up_proj", "down_proj"))  # [T, k, ...]
            h = F.silu(torch.einsum("th,tkih->tki", flat, gate)) * torch.einsum("th,tkih->tki", flat, up)
            routed = torch.einsum("tki,tkhi,tk->th", h, down, weights)
        else:
            routed = torch.zeros_like(flat)
            for e in idx.unique().tolist():
                tok, slot = torch.where(idx == e)
                gate, up, down = (self._weight(n, e) for n in ("gate_proj", "up_proj", "down_proj"))
                h = F.silu(flat[tok] @ gate.T) * (flat[tok] @ up.T)
                routed.index_add_(0, tok, (h @ down.T) * weights[tok, slot, None])
        return (routed + self.shared(flat)).view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, w: dict, layer: int, quantize: str):
        super().__init__()
        p = f"model.layers.{layer}."
        sub = lambda prefix: {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}  # noqa: E731
        self.input_layernorm = RMSNorm(w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        attn = LatentAttention if cfg.family == "deepseek_v3" else Attention
        self.self_attn = attn(cfg, sub(p + "self_attn."), quantize)
        moe = cfg.family == "deepseek_v3" and layer >= cfg.first_k_dense_replace
        self.mlp = MoE(cfg, sub(p + "mlp."), quantize) if moe else MLP(sub(p + "mlp."), quantize)

    def forward(self, x, cos, sin, rows, write, visible, cache, gather_experts: bool):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, rows, write, visible, cache)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, gather_experts) if isinstance(self.mlp, MoE) else self.mlp(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], max_positions: int, quantize: str = "none"):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Parameter(weights["model.embed_tokens.weight"], requires_grad=False)
        self.layers = nn.ModuleList(Block(cfg, weights, i, quantize) for i in range(cfg.num_layers))
        self.norm = RMSNorm(weights["model.norm.weight"], cfg.rms_norm_eps)
        head = weights["model.embed_tokens.weight"] if cfg.tie_word_embeddings else weights["lm_head.weight"]
        self.lm_head = make_linear(head, None, quantize)
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, max_positions + 1, self.embed_tokens.device)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, ids, rows, positions, write, width, caches, last=None, gather_experts=False):
        """Logits of each row's token at ``last`` (index into the new tokens), or of every token.

        ``ids, positions, write [B,S]``; ``rows [B]``; keys ``0..width-1`` are visible to a query at
        position ``p`` when ``key <= p``.
        """
        x = F.embedding(ids, self.embed_tokens)
        cos, sin = self.cos[positions], self.sin[positions]
        keys = torch.arange(width, device=ids.device)
        visible = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B,1,S,L]
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer(x, cos, sin, rows, write, visible, cache, gather_experts)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last][:, None]
        return self.lm_head(self.norm(x))


def active_weight_bytes(model: Transformer) -> int:
    """Bytes of weights one decode token reads: every dense weight, one embedding row, the routed
    experts a token uses (for bandwidth accounting, as in gpt-fast)."""
    total = 0
    routed = ("gate_proj", "up_proj", "down_proj", "gate_proj_scales", "up_proj_scales", "down_proj_scales")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        parts = name.split(".")
        if name in ("cos", "sin"):
            continue
        size = t.numel() * t.element_size()
        if name == "embed_tokens":
            size = t.shape[-1] * t.element_size()
        elif len(parts) >= 2 and parts[-2] == "mlp" and parts[-1] in routed:
            size = size * model.cfg.num_experts_per_tok // model.cfg.n_routed_experts
        total += size
    return total
