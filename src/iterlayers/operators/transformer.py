"""A Picard-iterated transformer block (Zappala et al., arXiv 2310.01618, Sec. 5.2).

The paper iterates a transformer as an operator with relaxed Picard steps and finds lower error than the
same network applied once. Here one pre-LayerNorm block B (self-attention + MLP, both residual) is the
operator, with the embedded input u injected at every step:

    u       = Embed(x) + P                           (token embedding + learned positions)
    T(z, u) = B(z + u)                               (form="residual")
    T(z, u) = u + F(z),   F(z) = B(z) - z            (form="injected": the block's two branches, no skip on z)
    z_0 = 0,   z_{n+1} = a z_n + (1 - a) T(z_n, u),  n = 0..N-1
    y       = Head(LN(z_N))

With N = 1 and a = 0 the residual form is exactly the non-iterated one-block transformer y = Head(LN(B(u))):
the baseline shares every parameter with the iterated model, so any gain comes from the iteration alone.

Why two forms (derived): the residual form's Jacobian in z is I + J_F(z + u), whose norm is about 1 for a
small F, so the relaxed iteration cannot contract much (observed rate about 0.98); it behaves as a weight-tied
unrolled net. The injected form's Jacobian is J_F(z) alone, which a Jacobian penalty (or a small F) can keep
below 1: then T is a contraction, its fixed point z*(u) is unique and depends on the input through u, and
iterating past the training count converges instead of drifting.

``PatchTransformer`` applies this to 2-D fields (the paper's ViT on Navier-Stokes, Sec. 5.3 per the issue):
the n x n field is cut into (n / p)^2 patches of p x p values, each patch is a token, and the head maps every
token back to its patch.
"""
from __future__ import annotations

import torch
from torch import nn

from iterlayers import _validate as V
from iterlayers.errors import ShapeMismatchError, ValidationError

from .picard import PicardIteration

__all__ = ["TransformerBlock", "TransformerOperator", "PicardTransformer", "PatchTransformer", "FORMS"]

FORMS = ("residual", "injected")


class TransformerBlock(nn.Module):
    """Pre-LN block: h + Attn(LN(h)), then + MLP(LN(.))."""

    def __init__(self, d_model: int, *, num_heads: int = 2, mlp_ratio: int = 2, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValidationError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
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
    """One transformer block B as an operator on the token states z given the input u:
    T(z, u) = B(z + u) (``form="residual"``) or T(z, u) = u + B(z) - z (``form="injected"``)."""

    def __init__(self, d_model: int, *, num_heads: int = 2, mlp_ratio: int = 2, form: str = "residual"):
        super().__init__()
        self.form = V.choice(form, "form", FORMS, where="TransformerOperator")
        self.block = TransformerBlock(d_model, num_heads=num_heads, mlp_ratio=mlp_ratio)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.form == "residual":
            return self.block(z + u)
        return u + self.block(z) - z

    def extra_repr(self) -> str:
        return "T(z, u) = block(z + u)" if self.form == "residual" else "T(z, u) = u + block(z) - z"


class PicardTransformer(nn.Module):
    """Sequence-to-sequence transformer whose single block is iterated with relaxed Picard steps."""

    def __init__(self, in_features: int, d_model: int, out_features: int, *, seq_len: int, num_heads: int = 2,
                 max_iter: int = 4, alpha: float = 0.5, learnable_alpha: bool = False,
                 eval_max_iter: int | None = None, form: str = "residual", backward: str = "unrolled",
                 tol: float | None = None, solver: str = "picard"):
        super().__init__()
        for name, v in (("in_features", in_features), ("d_model", d_model), ("out_features", out_features),
                        ("seq_len", seq_len)):
            if not isinstance(v, int) or v < 1:
                raise ValidationError(f"{name} must be a positive int, got {v!r}")
        self.seq_len = seq_len
        self.embed = nn.Linear(in_features, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, seq_len, d_model))
        self.operator = TransformerOperator(d_model, num_heads=num_heads, form=form)
        self.picard = PicardIteration(self.operator, alpha=alpha, learnable_alpha=learnable_alpha,
                                      max_iter=max_iter, eval_max_iter=eval_max_iter, backward=backward, tol=tol,
                                      solver=solver)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, out_features)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        """u = Embed(x) + P, the input every step sees."""
        if x.dim() != 3 or x.shape[1] != self.seq_len:
            raise ShapeMismatchError(f"x must be [B, seq_len={self.seq_len}, F], got {tuple(x.shape)}")
        return self.embed(x) + self.pos

    def start(self, u: torch.Tensor) -> torch.Tensor:
        """z_0 = 0."""
        return torch.zeros_like(u)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """y = Head(LN(z))."""
        return self.head(self.norm(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.inject(x)
        return self.decode(self.picard(u, z0=self.start(u)))

    def extra_repr(self) -> str:
        return f"seq_len={self.seq_len}"


class PatchTransformer(nn.Module):
    """A Picard-iterated transformer on n x n fields: p x p patches as tokens (``PicardTransformer`` inside).

    ``x``: [B, n, n] -> [B, n, n]. Options as :class:`PicardTransformer` (``form``, ``max_iter``, ``alpha``,
    ``eval_max_iter``); ``grid`` = n must be a multiple of ``patch`` = p.
    """

    def __init__(self, *, grid: int = 32, patch: int = 4, d_model: int = 32, num_heads: int = 2, max_iter: int = 4,
                 alpha: float = 0.5, eval_max_iter: int | None = None, form: str = "residual",
                 backward: str = "unrolled", tol: float | None = None, solver: str = "picard"):
        super().__init__()
        grid, patch = V.positive_int(grid, "grid"), V.positive_int(patch, "patch")
        if grid % patch:
            raise ValidationError(f"PatchTransformer: grid ({grid}) must be a multiple of patch ({patch})")
        self.grid, self.patch = grid, patch
        self.net = PicardTransformer(patch * patch, d_model, patch * patch, seq_len=(grid // patch) ** 2,
                                     num_heads=num_heads, max_iter=max_iter, alpha=alpha,
                                     eval_max_iter=eval_max_iter, form=form, backward=backward, tol=tol,
                                     solver=solver)
        self.picard, self.operator = self.net.picard, self.net.operator

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n, n] -> [B, (n/p)^2, p^2] (row-major patches)."""
        if x.dim() != 3 or x.shape[1:] != (self.grid, self.grid):
            raise ShapeMismatchError(f"x must be [B, {self.grid}, {self.grid}], got {tuple(x.shape)}")
        b, q, p = x.shape[0], self.grid // self.patch, self.patch
        return x.reshape(b, q, p, q, p).permute(0, 1, 3, 2, 4).reshape(b, q * q, p * p)

    def field(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`tokens`."""
        b, q, p = t.shape[0], self.grid // self.patch, self.patch
        return t.reshape(b, q, q, p, p).permute(0, 1, 3, 2, 4).reshape(b, self.grid, self.grid)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.inject(self.tokens(x))

    def start(self, u: torch.Tensor) -> torch.Tensor:
        return self.net.start(u)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.field(self.net.decode(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.field(self.net(self.tokens(x)))

    def extra_repr(self) -> str:
        return f"grid={self.grid}, patch={self.patch}"
