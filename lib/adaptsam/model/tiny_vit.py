"""TinyViT image encoder in the LiteMedSAM configuration.

LiteMedSAM distils SAM's ViT into a TinyViT (Wu et al., ECCV 2022) that keeps full 256x256
resolution in its stem (1x1 convolutions instead of two stride-2 convolutions) and merges
patches only twice, so a 256 px input yields the same 64x64x256 embedding SAM's mask decoder
expects. Parameter and buffer names follow the published checkpoint so it loads strictly.

Blocks expose their attention, local-convolution and MLP branches separately: the adapter
wrappers in `adapters.py` recombine exactly these pieces, which keeps an untrained adapter
bit-identical to the base block.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .sam_modeling import LayerNorm2d


class Conv2dBN(nn.Sequential):
    """Convolution without bias followed by BatchNorm (children named `c` and `bn`)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, pad: int = 0, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_ch, out_ch, kernel, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_ch))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2), nn.GELU(), Conv2dBN(embed_dim // 2, embed_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (expand 1x1, depthwise 3x3, project 1x1)."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Channel change plus optional 2x spatial reduction; returns tokens (B, L, C)."""

    def __init__(self, resolution: Tuple[int, int], dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window with learned relative-position biases."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # One bias per head and per absolute (dy, dx) offset; offsets enumerate row-major,
        # so the offset (dy, dx) has index dy * window + dx.
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        delta = (coords[:, :, None] - coords[:, None, :]).abs()
        self.register_buffer("attention_bias_idxs", delta[0] * window + delta[1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        # The checkpoint lays q, k, v out per head: (head, [q | k | v]).
        q, k, v = self.qkv(x).view(b, n, self.num_heads, 3 * self.head_dim).permute(0, 2, 1, 3).chunk(3, dim=-1)
        bias = self.attention_biases[:, self.attention_bias_idxs]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention -> depthwise local conv -> MLP, on tokens (B, H*W, C)."""

    def __init__(self, dim: int, resolution: Tuple[int, int], num_heads: int, window: int, mlp_ratio: float, local_conv: int):
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv, 1, local_conv // 2, groups=dim)

    def attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        """Attention over non-overlapping windows (zero-padded to whole windows); no residual."""
        b, n, c = x.shape
        h, w = self.resolution
        ws = self.window
        if h == ws and w == ws:
            return self.attn(x)
        x = x.view(b, h, w, c)
        pad_h, pad_w = (-h) % ws, (-w) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        nh, nw = hp // ws, wp // ws
        windows = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        windows = self.attn(windows)
        x = windows.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        return x[:, :h, :w].reshape(b, n, c)

    def local_conv_branch(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, w = self.resolution
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w))
        return x.view(b, c, n).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention_branch(x)
        x = self.local_conv_branch(x)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class AttentionStage(nn.Module):
    def __init__(self, blocks: Sequence[TinyViTBlock], downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT encoder returning SAM's (B, 256, img_size/4, img_size/4) image embedding."""

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        res = img_size
        self.layers = nn.ModuleList()
        for i, dim in enumerate(embed_dims):
            last = i == len(embed_dims) - 1
            down = None
            if not last:
                down = PatchMerging((res, res), dim, embed_dims[i + 1], merge_strides[i])
            if i == 0:
                stage = ConvStage(dim, depths[i], mbconv_expand_ratio, down)
            else:
                blocks = [
                    TinyViTBlock(dim, (res, res), num_heads[i], window_sizes[i], mlp_ratio, local_conv_size)
                    for _ in range(depths[i])
                ]
                stage = AttentionStage(blocks, down)
            self.layers.append(stage)
            if not last:
                res //= merge_strides[i]
        self.out_resolution = res
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        r = self.out_resolution
        return self.neck(x.view(b, r, r, c).permute(0, 3, 1, 2))

    def attention_blocks(self) -> list[TinyViTBlock]:
        return [blk for layer in self.layers if isinstance(layer, AttentionStage) for blk in layer.blocks]
