"""Run an image encoder in two parts: frozen stem (cacheable) and the part adapters train.

Backpropagating through the whole encoder on a CPU costs seconds per slice. When only the
adapters of the later blocks train, everything before the first trainable block computes
the same activations every epoch (earlier adapters stay at their zero init), so the trainer
computes them once, caches them, and runs only the tail with gradients.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from .tiny_vit import TinyViT


def num_stages(encoder: nn.Module) -> int:
    """Split points: TinyViT layers, or ViT blocks."""
    return len(encoder.layers) if isinstance(encoder, TinyViT) else len(encoder.blocks)


def default_split(encoder: nn.Module) -> int:
    """Train the last TinyViT stage / the last quarter of ViT blocks."""
    n = num_stages(encoder)
    return n - 1 if isinstance(encoder, TinyViT) else n - max(1, n // 4)


def encode_head(encoder: nn.Module, x: torch.Tensor, split: int) -> torch.Tensor:
    """Normalised input -> activations entering stage/block `split`."""
    if isinstance(encoder, TinyViT):
        x = encoder.patch_embed(x)
        for layer in encoder.layers[:split]:
            x = layer(x)
        return x
    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for blk in encoder.blocks[:split]:
        x = blk(x)
    return x


def encode_tail(encoder: nn.Module, x: torch.Tensor, split: int) -> torch.Tensor:
    """Activations entering `split` -> image embedding (B, 256, h, w)."""
    if isinstance(encoder, TinyViT):
        for layer in encoder.layers[split:]:
            x = layer(x)
        b, _, c = x.shape
        r = encoder.out_resolution
        return encoder.neck(x.view(b, r, r, c).permute(0, 3, 1, 2))
    for blk in encoder.blocks[split:]:
        x = blk(x)
    return encoder.neck(x.permute(0, 3, 1, 2))


def tail_adapter_parameters(encoder: nn.Module, split: int) -> List[nn.Parameter]:
    """Adapter parameters living at or after `split` (the ones worth training)."""
    modules = encoder.layers[split:] if isinstance(encoder, TinyViT) else encoder.blocks[split:]
    return [p for m in modules for n, p in m.named_parameters() if any(s.startswith("adapter_") for s in n.split("."))]
