"""A deep-equilibrium transformer for sequences: a character-level causal language model.

Model (after the DEQ transformer of Bai, Kolter & Koltun 2019, arXiv 1909.01377, with a pre-normalised
block)::

    u   = E[x_t] + P[t]                                  (injection: token and learned position embeddings)
    h   = LN_1(u + Attn(z))                              (causal multi-head self-attention over the state)
    z*  = LN_2(h + FFN(h)),  z* = f(z*, u)               (one weight-tied block, solved to its fixed point)
    y_t = H z*_t                                         (next-token logits)

The cell is one transformer block whose weights are shared across "depth": the equilibrium is the state an
infinitely deep weight-tied stack would reach. The injection ``u`` enters the block at every iteration, so
the fixed point depends on the input. Attention is causal (position t sees positions <= t), so the logit at
t never depends on the characters after t and the model is a language model; positions are a learned table
``P`` (at most ``max_len`` positions).

The state enters the block only through the attention, not through an identity residual: a cell
``z + g(z)`` has a Jacobian ``I + g'`` with eigenvalues near 1, so neither the fixed-point iteration nor the
adjoint solve would contract (measured: adjoint solves stalled at their iteration limit with a pre-norm
residual block). Nothing makes this block a contraction either (attention is not globally Lipschitz):
convergence is observed, not proved, and reported per batch by the layer's statistics (``fwd_converged``,
``bwd_residual`` in the training metrics). The attention's output projection starts small (``init_scale``),
so the initial map depends weakly on ``z`` and the solves are short.

A batch is ``[B, T]`` int64 token ids; the output ``[B, T, vocab]``. The training loop's loss for such
outputs is the per-token cross-entropy (:func:`iterlayers.training.sample_loss`), so ``exp(test_loss)`` is
the validation perplexity.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .._validate import in_range, positive_int
from ..errors import ShapeMismatchError, ValidationError
from ..implicit import DEQOptions
from .deq_mlp import DEQClassifier
from ..layers import DEQ

__all__ = ["TransformerCell", "DEQTransformer", "TRANSFORMER_DEQ_OPTIONS"]

#: Sequence states are large and need no more than a loose relative tolerance for a language model.
TRANSFORMER_DEQ_OPTIONS = DEQOptions(atol=1e-3, rtol=1e-3, max_iter=30, on_failure="ignore")


class TransformerCell(nn.Module):
    """``f(z, u) = LN_2(h + FFN(h))``, ``h = LN_1(u + Attn(z))`` with causal multi-head attention.

    Args:
        width: model dimension d (divisible by ``heads``).
        heads: attention heads.
        ffn: hidden size of the feed-forward network.
        init_scale: multiplier of the attention's output projection at initialisation.
    """

    def __init__(self, width: int, *, heads: int = 2, ffn: int | None = None, init_scale: float = 0.1):
        super().__init__()
        self.width, self.heads = positive_int(width, "width"), positive_int(heads, "heads")
        if self.width % self.heads:
            raise ValidationError(f"width={width} must be divisible by heads={heads}")
        self.ffn = positive_int(2 * width if ffn is None else ffn, "ffn")
        self.init_scale = in_range(init_scale, "init_scale", low=0.0)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, self.ffn), nn.Linear(self.ffn, width)
        with torch.no_grad():
            self.proj.weight.mul_(self.init_scale)
            self.proj.bias.zero_()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, T, d / heads]
        return self.proj(out.transpose(1, 2).reshape(B, T, d))

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        h = self.ln1(u + self.attention(z))
        return self.ln2(h + self.fc2(F.gelu(self.fc1(h))))

    def extra_repr(self) -> str:
        return f"width={self.width}, heads={self.heads}, ffn={self.ffn}, init_scale={self.init_scale:g}"


class DEQTransformer(DEQClassifier):
    """Token + position embedding -> :class:`iterlayers.DEQ` over a :class:`TransformerCell` -> logits per token.

    Args:
        in_features: the sequence length T of the training windows (``max_len`` defaults to it).
        num_classes: the vocabulary size.
        width, heads, ffn, init_scale: see :class:`TransformerCell`.
        max_len: the number of learned positions (sequences may be shorter).
        **deq_options: fields of :class:`iterlayers.DEQOptions` overriding :data:`TRANSFORMER_DEQ_OPTIONS`.
    """

    def __init__(self, in_features: int, num_classes: int, *, width: int = 32, heads: int = 2,
                 ffn: int | None = None, init_scale: float = 0.1, max_len: int | None = None, **deq_options):
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.vocab = positive_int(num_classes, "num_classes")
        self.max_len = positive_int(self.in_features if max_len is None else max_len, "max_len")
        cell = TransformerCell(width, heads=heads, ffn=ffn, init_scale=init_scale)
        self.embed = nn.Embedding(self.vocab, cell.width)
        self.pos = nn.Parameter(torch.randn(self.max_len, cell.width) / math.sqrt(cell.width))
        self.deq = DEQ(cell, TRANSFORMER_DEQ_OPTIONS, **deq_options)
        self.head = nn.Linear(cell.width, self.vocab)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        """``u = E[x] + P[:T]``, after checking the tokens."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.is_floating_point():
            raise ShapeMismatchError(f"deq_transformer: a batch is an integer tensor [B, T] of token ids, got "
                                     f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        if x.shape[1] > self.max_len:
            raise ShapeMismatchError(f"deq_transformer: sequences of length {x.shape[1]} exceed max_len={self.max_len}")
        if x.numel() and not bool(((x >= 0) & (x < self.vocab)).all()):
            raise ValidationError(f"deq_transformer: token ids outside [0, {self.vocab})")
        return self.embed(x) + self.pos[: x.shape[1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.inject(x)))

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, max_len={self.max_len}"
