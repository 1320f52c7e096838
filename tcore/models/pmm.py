"""The Patch Matching Module (PMM, the reference's "auxiliary decoder"), METHOD.md section 4.

Per block, for query tokens q (student patch tokens of the masked current crop) and memory m
(patch tokens of the past or future crop)::

    h1 = LN1(attn_mul * CrossAttn(q, m, m) + q)
    h2 = LN2(SelfAttn(h1) + h1)
    out = LN3(Linear(h2) + h2)

Attention runs through fused kernels; attention weights are only computed when asked for.
"""
from __future__ import annotations

import torch
from torch import nn

from tcore.models.attention import MultiheadAttention, ResolvesAttentionOnMove, set_attention_backend


class PatchMatchingBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_mul: float, attention: str = "auto") -> None:
        super().__init__()
        self.attn_mul = attn_mul
        self.cross_attn = MultiheadAttention(dim, num_heads, backend=attention)
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = MultiheadAttention(dim, num_heads, backend=attention)
        self.norm2 = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, memory: torch.Tensor, query: torch.Tensor, return_attention: bool = False):
        cross = self.cross_attn(query, memory, memory, return_attention=return_attention)
        cross, weights = cross if return_attention else (cross, None)
        h1 = self.norm1(self.attn_mul * cross + query)
        h2 = self.norm2(self.self_attn(h1, h1, h1) + h1)
        out = self.norm3(self.linear(h2) + h2)
        return out, weights


class PatchMatchingModule(ResolvesAttentionOnMove, nn.Module):
    """``forward(memory, query, return_attention=False)`` -> out [B, Nq, D]
    (and, when asked, the last block's cross-attention weights averaged over heads [B, Nq, Nm])."""

    def __init__(self, dim: int, num_heads: int = 16, attn_mul: float = 4.0, depth: int = 1,
                 attention: str = "auto") -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"PMM depth must be >= 1, got {depth}")
        self.dim, self.num_heads, self.attn_mul, self.depth = dim, num_heads, attn_mul, depth
        self.blocks = nn.ModuleList(
            PatchMatchingBlock(dim, num_heads, attn_mul, attention) for _ in range(depth))
        set_attention_backend(self, attention)

    def set_attention_backend(self, backend: str) -> None:
        set_attention_backend(self, backend)

    def forward(self, memory: torch.Tensor, query: torch.Tensor, return_attention: bool = False):
        weights = None
        for block in self.blocks:
            query, weights = block(memory, query, return_attention)
        return (query, weights) if return_attention else query
