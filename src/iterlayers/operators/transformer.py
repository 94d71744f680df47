"""A Picard-iterated transformer block (Zappala et al., arXiv 2310.01618, Sec. 5.2).

The paper iterates a transformer as an operator with relaxed Picard steps and finds lower error than the
same network applied once. Here one pre-LayerNorm block B (self-attention + MLP, both residual) is the
operator, with the embedded input u injected at every step:

    u       = Embed(x) + P                           (token embedding + learned positions)
    T(z, u) = B(z + u)
    z_0 = 0,   z_{n+1} = a z_n + (1 - a) T(z_n, u),  n = 0..N-1
    y       = Head(LN(z_N))

With N = 1 and a = 0 this is exactly the non-iterated one-block transformer y = Head(LN(B(u))): the
baseline shares every parameter with the iterated model, so any gain comes from the iteration alone.
"""
from __future__ import annotations

import torch
from torch import nn

from .picard import PicardIteration

__all__ = ["TransformerBlock", "TransformerOperator", "PicardTransformer"]


class TransformerBlock(nn.Module):
    """Pre-LN block: h + Attn(LN(h)), then + MLP(LN(.))."""

    def __init__(self, d_model: int, *, num_heads: int = 2, mlp_ratio: int = 2, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))

    def extra_repr(self) -> str:
        return f"d_model={self.ln1.normalized_shape[0]}, num_heads={self.attn.num_heads}"


class TransformerOperator(nn.Module):
    """T(z, u) = B(z + u): one transformer block as an operator on the token states z given the input u."""

    def __init__(self, d_model: int, *, num_heads: int = 2, mlp_ratio: int = 2):
        super().__init__()
        self.block = TransformerBlock(d_model, num_heads=num_heads, mlp_ratio=mlp_ratio)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.block(z + u)

    def extra_repr(self) -> str:
        return "T(z, u) = block(z + u)"


class PicardTransformer(nn.Module):
    """Sequence-to-sequence transformer whose single block is iterated with relaxed Picard steps."""

    def __init__(self, in_features: int, d_model: int, out_features: int, *, seq_len: int, num_heads: int = 2,
                 max_iter: int = 4, alpha: float = 0.5, learnable_alpha: bool = False,
                 eval_max_iter: int | None = None):
        super().__init__()
        for name, v in (("in_features", in_features), ("d_model", d_model), ("out_features", out_features),
                        ("seq_len", seq_len)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.seq_len = seq_len
        self.embed = nn.Linear(in_features, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, seq_len, d_model))
        self.operator = TransformerOperator(d_model, num_heads=num_heads)
        self.picard = PicardIteration(self.operator, alpha=alpha, learnable_alpha=learnable_alpha,
                                      max_iter=max_iter, eval_max_iter=eval_max_iter)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.seq_len:
            raise ValueError(f"x must be [B, seq_len={self.seq_len}, F], got {tuple(x.shape)}")
        u = self.embed(x) + self.pos
        z = self.picard(u, z0=torch.zeros_like(u))
        return self.head(self.norm(z))

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}"
