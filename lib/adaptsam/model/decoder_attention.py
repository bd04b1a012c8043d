"""The mask decoder's cross-attentions, computed in the cheaper order.

In SAM's two-way transformer a handful of prompt tokens (5 output tokens plus one per click or box
corner: T, usually under 16) attend to the 64x64 image tokens (N = 4096) and back. SAM projects
every image token to queries, keys or values and every attention output back through `out_proj`:
four N x 256 x 128 products per block, most of a decoder pass on a CPU. Because one side is only
T tokens, the same numbers come from folding the projection into the token side first:

- tokens -> image: scores = (q_h Wk_h) . image (the key bias adds the same amount to every score
  of a row, so softmax ignores it) and values = (A_h image) Wv_h^T + bv_h (each row of A sums to 1);
- image -> tokens: scores = image . (Wq_h^T k_h) + bq_h . k_h and the output
  sum_h A_h (v_h Wo_h^T) + bo, never forming the N x 128 queries or attention output.

Each image-sized product then has H*T columns (8 heads) instead of 128. With more tokens than
that pays for, the layer computes as SAM does. Parameters, names and results are SAM's
(`segment_anything.modeling.transformer.Attention`); only the order of the sums differs, so
outputs agree to float rounding (tests/test_decoder_arithmetic.py).
"""

from __future__ import annotations

import math

import torch

from .sam_modeling import Attention


def _heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(internal, C) projection weight -> (H, d, C), head h's rows."""
    return weight.view(num_heads, weight.shape[0] // num_heads, weight.shape[1])


class _FoldedAttention(Attention):
    """SAM's Attention with the same parameters; subclasses fold the image-side projections."""

    @classmethod
    def adopt(cls, layer: Attention) -> "_FoldedAttention":
        """`layer` itself, computing in the folded order from now on (no state is added)."""
        if not isinstance(layer, Attention):
            raise TypeError(f"expected SAM's Attention, got {type(layer).__name__}")
        layer.__class__ = cls
        return layer

    def _folds(self, tokens: int) -> bool:
        # the folded products have H*T columns where SAM's have `internal_dim`
        return tokens * self.num_heads < self.internal_dim


class TokenToImageAttention(_FoldedAttention):
    """Queries are the prompt tokens (few), keys and values the image tokens (many)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t, _ = q.shape
        if not self._folds(t):
            return super().forward(q, k, v)
        h = self.num_heads
        d = self.internal_dim // h
        q = self.q_proj(q).view(b, t, h, d).transpose(1, 2)  # (b, h, t, d)
        qk = torch.einsum("bhtd,hdc->bhtc", q, _heads(self.k_proj.weight, h)).reshape(b, h * t, -1)
        attn = torch.softmax(torch.bmm(qk, k.transpose(1, 2)) / math.sqrt(d), dim=-1)  # (b, h*t, n)
        pooled = torch.bmm(attn, v).view(b, h, t, -1)  # attention-weighted image tokens
        out = torch.einsum("bhtc,hdc->bhtd", pooled, _heads(self.v_proj.weight, h))
        out = out + self.v_proj.bias.view(h, 1, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, h * d))


class ImageToTokenAttention(_FoldedAttention):
    """Queries are the image tokens (many), keys and values the prompt tokens (few)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t, _ = k.shape
        if not self._folds(t):
            return super().forward(q, k, v)
        h = self.num_heads
        d = self.internal_dim // h
        k = self.k_proj(k).view(b, t, h, d).transpose(1, 2)  # (b, h, t, d)
        v = self.v_proj(v).view(b, t, h, d).transpose(1, 2)
        wq = _heads(self.q_proj.weight, h)
        keys = torch.einsum("hdc,bhtd->bhtc", wq, k).reshape(b, h * t, -1) / math.sqrt(d)
        bias = torch.einsum("hd,bhtd->bht", self.q_proj.bias.view(h, d), k).reshape(b, h * t, 1) / math.sqrt(d)
        # scores as (b, h, t, n): softmax over the t tokens runs along a long inner axis
        scores = torch.baddbmm(bias, keys, q.transpose(1, 2)).view(b, h, t, -1)
        attn = torch.softmax(scores, dim=2).view(b, h * t, -1)
        wo = self.out_proj.weight.view(-1, h, d)  # (C, h, d)
        values = torch.einsum("bhtd,chd->bhtc", v, wo).reshape(b, h * t, -1)  # each token through out_proj
        return torch.baddbmm(self.out_proj.bias.view(1, 1, -1), attn.transpose(1, 2), values)
