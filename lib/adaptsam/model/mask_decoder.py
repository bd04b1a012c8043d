"""SAM's mask decoder, able to decode a batch of *different* images in one pass, in fewer operations.

`segment_anything`'s `MaskDecoder.predict_masks` assumes one image and many prompts: it repeats
the image embedding once per prompt. Training (and 3D propagation) decode B slices with B
prompts; repeating there would build B*B pairs. This subclass pairs embedding i with prompt i
when the batch sizes match and otherwise keeps SAM's behaviour. Parameter names are unchanged.
The pass is split in two public halves (attend, then masks).

The arithmetic is SAM's, arranged for a CPU (a decoder pass is what every click waits for):
- the image tokens stay one contiguous (B, h*w, C) array through the transformer (SAM's
  permuted view made every add and projection over them copy first);
- the cross-attentions fold their image-side projections into the few prompt tokens
  (`decoder_attention.py`);
- the output upscaling's two 2x2-stride-2 transposed convolutions are one matrix product per
  input pixel each, channels last, and only the mask tokens asked for are made.
Outputs agree with SAM's to float rounding (tests/test_decoder_arithmetic.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
import torch.nn.functional as F

from .decoder_attention import ImageToTokenAttention, TokenToImageAttention
from .sam_modeling import Attention, MaskDecoder


class BatchedMaskDecoder(MaskDecoder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for block in self.transformer.layers:
            TokenToImageAttention.adopt(block.cross_attn_token_to_image)
            ImageToTokenAttention.adopt(block.cross_attn_image_to_token)
        TokenToImageAttention.adopt(self.transformer.final_attn_token_to_image)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM's forward: the first mask token's answer, or the multimask tokens' answers."""
        state = self.attend(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        tokens = slice(1, None) if multimask_output else slice(0, 1)
        return self.masks_of(state, tokens=tokens), self.iou_of(state)[:, tokens]

    def predict_masks(self, image_embeddings, image_pe, sparse_prompt_embeddings,
                      dense_prompt_embeddings) -> Tuple[torch.Tensor, torch.Tensor]:
        state = self.attend(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        return self.masks_of(state), self.iou_of(state)

    # The two halves of predict_masks, for callers that rank answers by the IoU head before
    # paying for the output upscaling of the ones they keep (engine/first_click.py).

    def attend(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings) -> "Attended":
        """The two-way transformer over image and prompt tokens (most of a decoder pass):
        `TwoWayTransformer.forward` with the image tokens contiguous."""
        n_prompts = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(n_prompts, -1, -1), sparse_prompt_embeddings), dim=1)

        b, c, h, w = image_embeddings.shape
        # image tokens (B, h*w, C): transposed once per image; SAM's case (one image, several
        # prompts) broadcasts it in the add of the dense prompts
        keys = tokens_of(image_embeddings)
        if b != n_prompts:
            keys = keys.expand(n_prompts, -1, -1) if b == 1 else torch.repeat_interleave(keys, n_prompts, dim=0)
        keys = keys + dense_prompt_embeddings.flatten(2).transpose(1, 2)
        shape = torch.Size((n_prompts, c, h, w))
        key_pe = self._pe_tokens(image_pe).expand(n_prompts, -1, -1)

        transformer = self.transformer
        queries = tokens
        for layer in transformer.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
        attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        hs = transformer.norm_final_attn(queries + attn_out)
        return Attended(hs, keys, shape)

    def _pe_tokens(self, image_pe: torch.Tensor) -> torch.Tensor:
        """`image_pe` (1, C, h, w) as tokens (1, h*w, C), kept while the same tensor is passed
        (PromptableSam.dense_pe makes it once)."""
        key = (image_pe.data_ptr(), image_pe._version, image_pe.shape, image_pe.device)
        cached = self.__dict__.get("_pe_cache")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # also usable by training in this process
                cached = (key, tokens_of(image_pe))
            self.__dict__["_pe_cache"] = cached
        return cached[1]

    def iou_of(self, state: "Attended") -> torch.Tensor:
        """(B, 1 + num_mask_tokens - 1) predicted IoU of every mask token."""
        return self.iou_prediction_head(state.hs[:, 0, :])

    def masks_of(self, state: "Attended", rows: slice = slice(None), tokens: slice = slice(None)) -> torch.Tensor:
        """(b, mask tokens, 4h, 4w) logits of the prompts in `rows` for the mask tokens in `tokens`."""
        _, c, h, w = state.shape
        hs, src = state.hs[rows], state.src[rows]
        n = hs.shape[0]
        conv1, norm, act1, conv2, act2 = self.output_upscaling
        # A transposed convolution with kernel 2 and stride 2 maps each input pixel to its own
        # 2x2 outputs: one product with the weight as (C_in, 2*2*C_out), rows in pixel order.
        c1, c2 = conv1.out_channels, conv2.out_channels
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)
        up = torch.addmm(conv1.bias.repeat(4), src.reshape(-1, c), w1).view(n, -1, c1)
        up = act1(F.layer_norm(up, (c1,), norm.weight, norm.bias, norm.eps))  # LayerNorm2d, channels last
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        up = act2(torch.addmm(conv2.bias.repeat(4), up.reshape(-1, c1), w2)).view(n, -1, c2)

        picked = range(self.num_mask_tokens)[tokens]
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in picked], dim=2)
        masks = torch.bmm(up, hyper_in)  # (n, h*w*16, tokens), rows ordered (i, j, a1, b1, a2, b2)
        # output pixel (4i + 2*a1 + a2, 4j + 2*b1 + b2)
        masks = masks.view(n, h, w, 2, 2, 2, 2, len(picked)).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return masks.reshape(n, len(picked), 4 * h, 4 * w)


def tokens_of(grid: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> contiguous (B, h*w, C)."""
    return grid.flatten(2).transpose(1, 2).contiguous()


@dataclass
class Attended:
    hs: torch.Tensor  # (B, tokens, C) prompt-side output
    src: torch.Tensor  # (B, h*w, C) image-side output
    shape: torch.Size  # (B, C, h, w) of the image side


@contextlib.contextmanager
def computing_as_sam(decoder: BatchedMaskDecoder) -> Iterator[None]:
    """Inside: every BatchedMaskDecoder computes with `segment_anything`'s own `predict_masks`,
    `forward` and `Attention` (the reference the tests and benchmarks/decoder.py compare with).
    Not for serving: it changes the class for every model in the process."""
    folded = [m for m in decoder.modules() if isinstance(m, (TokenToImageAttention, ImageToTokenAttention))]
    classes = [type(m) for m in folded]
    own = BatchedMaskDecoder.predict_masks, BatchedMaskDecoder.forward
    try:
        for m in folded:
            m.__class__ = Attention
        BatchedMaskDecoder.predict_masks, BatchedMaskDecoder.forward = MaskDecoder.predict_masks, MaskDecoder.forward
        yield
    finally:
        for m, cls in zip(folded, classes):
            m.__class__ = cls
        BatchedMaskDecoder.predict_masks, BatchedMaskDecoder.forward = own
