"""Parameter-efficient adapters for the SAM image encoder (and, optionally, its decoder).

Two kinds, chosen per model:
- ``2d`` (Medical SAM Adapter, Wu et al. 2023): per transformer block a bottleneck adapter on
  the attention output before the residual add, and one beside the MLP whose output is scaled
  by ``mlp_scale``.
- ``3d`` (MA-SAM, Chen et al. 2024): per block one adapter before and one after attention,
  each LayerNorm -> Linear down -> Conv3d (3,1,1) across the slice axis -> GELU -> Linear up,
  added residually. The encoder then takes ``num_slices`` adjacent slices folded into the batch
  dimension, and the Conv3d is where neighbouring slices exchange information.
- Optional decoder adapters (MSA) in the first `decoder_blocks` two-way blocks of the mask
  decoder (the shipped 3D adapter has them in both): after the token-to-image cross
  attention, a bottleneck on the tokens whose down-projection is modulated per sample by the
  prompt embedding ("hyper-prompting": the same adapter reacts differently to boxes and
  clicks), and a plain bottleneck beside the block's MLP. LiteMedSAM's decoder only ever saw
  boxes; these are what learn to read clicks.

Every up-projection starts at zero, so a freshly attached adapter leaves the network output
bit-identical to the base model. Wrappers adopt the wrapped block's children under their
original names, so base parameter names (and therefore checkpoints) are unchanged; adapter
parameters all live in modules named ``adapter_*``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterator, Tuple

import torch
from torch import nn

from .sam import PromptableSam
from .sam_modeling import TwoWayAttentionBlock, ViTBlock, window_partition, window_unpartition
from .tiny_vit import TinyViT, TinyViTBlock

ADAPTER_PREFIX = "adapter_"
KINDS = ("2d", "3d")


@dataclass(frozen=True)
class AdapterConfig:
    kind: str = "2d"
    bottleneck_ratio: float = 0.125  # hidden width = ratio * block width
    mlp_scale: float = 0.5  # MSA's s for the adapter beside the MLP
    num_slices: int = 5  # 3d: adjacent slices folded into the batch
    decoder: bool = True  # MSA decoder adapters in the decoder's two-way blocks
    decoder_hidden: int = 128
    decoder_blocks: int = 1  # how many two-way blocks get them, from the first

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "3d" and self.num_slices < 1:
            raise ValueError("num_slices must be >= 1")

    def to_dict(self) -> Dict:
        return asdict(self)


def _hidden(dim: int, ratio: float) -> int:
    return max(8, int(round(dim * ratio)))


def _zero(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class Bottleneck(nn.Module):
    """down -> GELU -> up (up starts at zero). Returns only the adapter branch."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = _zero(nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class SliceConvAdapter(nn.Module):
    """MA-SAM 3D adapter: x + up(GELU(Conv3d_(3,1,1)(down(LN(x))))) across adjacent slices."""

    def __init__(self, dim: int, hidden: int, num_slices: int):
        super().__init__()
        self.num_slices = num_slices
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv3d(hidden, hidden, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.act = nn.GELU()
        self.up = _zero(nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """x: (B*N, H, W, C) or (B*N, H*W, C) with N = num_slices consecutive slices per volume."""
        bn = x.shape[0]
        n = self.num_slices
        if bn % n:
            raise ValueError(f"3d adapter expects stacks of {n} slices, got a batch of {bn}")
        y = self.down(self.norm(x))
        r = y.shape[-1]
        h, w = hw
        y = y.reshape(bn // n, n, h, w, r).permute(0, 4, 1, 2, 3)  # (B, r, N, H, W)
        y = self.act(self.conv(y))
        y = y.permute(0, 2, 3, 4, 1).reshape(x.shape[:-1] + (r,))
        return x + self.up(y)


class PromptConditionedAdapter(nn.Module):
    """MSA hyper-prompting adapter: the down-projection is scaled per sample by g(prompt)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.condition = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = _zero(nn.Linear(hidden, dim))

    def forward(self, tokens: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        gain = 1.0 + torch.tanh(self.condition(prompt)).unsqueeze(1)
        return tokens + self.up(self.act(self.down(tokens) * gain))


def _adopt(wrapper: nn.Module, block: nn.Module) -> None:
    """Register `block`'s children on `wrapper` under the same names (keeps parameter names)."""
    for name, child in block.named_children():
        wrapper.add_module(name, child)
    object.__setattr__(wrapper, "base", block)  # not a submodule: no second copy of the names


class AdaptedTinyViTBlock(nn.Module):
    def __init__(self, block: TinyViTBlock, cfg: AdapterConfig):
        super().__init__()
        _adopt(self, block)
        self.kind = cfg.kind
        self.mlp_scale = cfg.mlp_scale
        dim = block.attn.qkv.in_features
        if cfg.kind == "2d":
            hidden = _hidden(dim, cfg.bottleneck_ratio)
            self.adapter_attn = Bottleneck(dim, hidden)
            self.adapter_mlp = Bottleneck(dim, hidden)
        else:
            hidden = _hidden(dim, cfg.bottleneck_ratio)
            self.adapter_pre = SliceConvAdapter(dim, hidden, cfg.num_slices)
            self.adapter_post = SliceConvAdapter(dim, hidden, cfg.num_slices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if self.kind == "2d":
            a = base.attention_branch(x)
            x = x + (a + self.adapter_attn(a))
            x = base.local_conv_branch(x)
            return x + self.mlp(x) + self.mlp_scale * self.adapter_mlp(self.mlp.norm(x))
        x = self.adapter_pre(x, base.resolution)
        x = x + base.attention_branch(x)
        x = self.adapter_post(x, base.resolution)
        x = base.local_conv_branch(x)
        return x + self.mlp(x)


class AdaptedViTBlock(nn.Module):
    """segment_anything's ViT `Block` (tokens (B, H, W, C)) with adapters."""

    def __init__(self, block: ViTBlock, cfg: AdapterConfig):
        super().__init__()
        _adopt(self, block)
        self.window_size = block.window_size
        self.kind = cfg.kind
        self.mlp_scale = cfg.mlp_scale
        dim = block.norm1.normalized_shape[0]
        hidden = _hidden(dim, cfg.bottleneck_ratio)
        if cfg.kind == "2d":
            self.adapter_attn = Bottleneck(dim, hidden)
            self.adapter_mlp = Bottleneck(dim, hidden)
        else:
            self.adapter_pre = SliceConvAdapter(dim, hidden, cfg.num_slices)
            self.adapter_post = SliceConvAdapter(dim, hidden, cfg.num_slices)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = self.attn(x)
            return window_unpartition(x, self.window_size, pad_hw, (h, w))
        return self.attn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hw = (x.shape[1], x.shape[2])
        if self.kind == "2d":
            a = self._attention(x)
            x = x + (a + self.adapter_attn(a))
            xn = self.norm2(x)
            return x + self.mlp(xn) + self.mlp_scale * self.adapter_mlp(xn)
        x = self.adapter_pre(x, hw)
        x = x + self._attention(x)
        x = self.adapter_post(x, hw)
        return x + self.mlp(self.norm2(x))


class AdaptedTwoWayBlock(nn.Module):
    """A two-way decoder block with the prompt-conditioned adapter on the tokens."""

    def __init__(self, block: TwoWayAttentionBlock, cfg: AdapterConfig, num_output_tokens: int):
        super().__init__()
        _adopt(self, block)
        self.skip_first_layer_pe = block.skip_first_layer_pe
        self.num_output_tokens = num_output_tokens
        dim = block.norm1.normalized_shape[0]
        self.adapter_prompt = PromptConditionedAdapter(dim, cfg.decoder_hidden)
        self.adapter_mlp = Bottleneck(dim, cfg.decoder_hidden)

    def forward(self, queries, keys, query_pe, key_pe):
        # Same sequence of operations as TwoWayAttentionBlock.forward, plus the adapter.
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe  # also the image side's queries below: keys do not change until then
        queries = queries + self.cross_attn_token_to_image(q=q, k=k, v=keys)
        # query_pe holds the untouched prompt tokens after the output tokens.
        prompt = query_pe[:, self.num_output_tokens :].mean(dim=1)
        queries = self.norm2(self.adapter_prompt(queries, prompt))

        queries = self.norm3(queries + self.mlp(queries) + self.adapter_mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(q=k, k=q, v=queries))
        return queries, keys


def _encoder_blocks(encoder: nn.Module) -> Iterator[Tuple[nn.ModuleList, int, nn.Module]]:
    if isinstance(encoder, TinyViT):
        for layer in encoder.layers:
            if hasattr(layer, "blocks") and layer.blocks and isinstance(layer.blocks[0], TinyViTBlock):
                for i, blk in enumerate(layer.blocks):
                    yield layer.blocks, i, blk
    else:
        for i, blk in enumerate(encoder.blocks):
            yield encoder.blocks, i, blk


def attach_adapters(model: PromptableSam, cfg: AdapterConfig) -> PromptableSam:
    """Wrap the encoder blocks (and the first decoder blocks) in place; freeze everything else."""
    if getattr(model, "adapter_config", None) is not None:
        raise RuntimeError("adapters are already attached to this model")
    for p in model.parameters():
        p.requires_grad_(False)
    for container, i, blk in _encoder_blocks(model.image_encoder):
        wrapper = AdaptedTinyViTBlock if isinstance(blk, TinyViTBlock) else AdaptedViTBlock
        container[i] = wrapper(blk, cfg)
    if cfg.decoder:
        layers = model.mask_decoder.transformer.layers
        for i in range(min(cfg.decoder_blocks, len(layers))):
            layers[i] = AdaptedTwoWayBlock(layers[i], cfg, 1 + model.mask_decoder.num_mask_tokens)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_name(name))
    model.adapter_config = cfg
    return model


def is_adapter_name(name: str) -> bool:
    return any(part.startswith(ADAPTER_PREFIX) for part in name.split("."))


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_adapter_name(k)}


def base_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not is_adapter_name(k)}


def parameter_counts(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def set_adapter_training_mode(model: nn.Module) -> nn.Module:
    """Train mode for adapters only.

    The base stays in eval mode: TinyViT's BatchNorm layers would otherwise update their
    running statistics during training and the "frozen" base would drift.
    """
    model.eval()
    for name, module in model.named_modules():
        if name.split(".")[-1].startswith(ADAPTER_PREFIX):
            module.train()
    return model
