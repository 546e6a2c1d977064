"""Weight-only quantization for the torch engine, as gpt-fast does it (``quantize.py`` there).

- **int8**: one scale per output channel; ``linear(x, w.to(x.dtype)) * scales``. On CUDA inside a
  captured graph the dequantization is read at int8 width, so a decode step reads half the bytes.
- **int4**: groups of ``groupsize`` input channels, asymmetric (scale and zero per group), packed
  by ATen's int4 kernels: ``_weight_int4pack_mm`` on CUDA (bf16 activations), the ``_for_cpu``
  variant on CPU (float32). A layer whose input width the kernel cannot tile keeps its float
  weights (gpt-fast does the same without padding).

Quantization happens at load, from the decrypted weights, so a bundle carries one checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUPS = (128, 64, 32)  # first that divides the input width is used
INT4_INNER_K_TILES = 8


class Linear(nn.Module):
    """A linear layer over given tensors (no random initialisation of weights about to be replaced)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        w, scales = int8_per_channel(weight)
        self.register_buffer("weight", w)
        self.register_buffer("scales", scales)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return out if self.bias is None else out + self.bias


class Int4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, groupsize: int):
        super().__init__()
        self.out_features, self.groupsize = weight.shape[0], groupsize
        self.cuda_kernel = weight.is_cuda
        q, scales_and_zeros = int4_groupwise(weight.float(), groupsize)
        if self.cuda_kernel:  # the CUDA kernel takes two 4-bit values per byte
            packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack(packed, INT4_INNER_K_TILES))
            scales_and_zeros = scales_and_zeros.to(torch.bfloat16)
        else:
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES))
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(weight.device))
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.cuda_kernel:
            out = torch.ops.aten._weight_int4pack_mm(x, self.weight, self.groupsize, self.scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.groupsize, self.scales_and_zeros)
        out = out.reshape(*shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last axis: ``weight ≈ q * scales[..., None]``."""
    scales = weight.float().abs().amax(dim=-1).clamp(min=1e-8) / 127
    q = torch.round(weight.float() / scales[..., None]).clamp(-128, 127).to(torch.int8)
    return q, scales.to(weight.dtype)


def int4_groupwise(weight: torch.Tensor, groupsize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-fast's ``group_quantize_tensor``: values 0..15 per group, ``w ≈ (q - 8) * scale + zero``."""
    n, k = weight.shape
    groups = weight.reshape(-1, groupsize)
    lo, hi = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    scales = (hi - lo).clamp(min=1e-6) / 15
    zeros = lo + scales * 8
    q = groups.sub(lo).div(scales).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    scales_and_zeros = torch.cat([scales.reshape(n, -1, 1), zeros.reshape(n, -1, 1)], 2).transpose(0, 1).contiguous()
    return q, scales_and_zeros


def int4_groupsize(in_features: int) -> int | None:
    """The group size the int4 kernels can use for this input width, or None (keep float)."""
    for g in INT4_GROUPS:
        if in_features % g == 0 and in_features % (INT4_INNER_K_TILES * 16) == 0:
            return g
    return None


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, quantize: str) -> nn.Module:
    """The linear layer for ``quantize`` in {"none", "int8", "int4"}."""
    if quantize == "int8":
        return Int8Linear(weight, bias)
    if quantize == "int4" and (group := int4_groupsize(weight.shape[1])) is not None:
        return Int4Linear(weight, bias, group)
    return Linear(weight, bias)
