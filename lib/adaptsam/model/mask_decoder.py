"""SAM's mask decoder, able to decode a batch of *different* images in one pass.

`segment_anything`'s `MaskDecoder.predict_masks` assumes one image and many prompts: it repeats
the image embedding once per prompt. Training (and 3D propagation) decode B slices with B
prompts; repeating there would build B*B pairs. This subclass pairs embedding i with prompt i
when the batch sizes match and otherwise keeps SAM's behaviour. Parameter names are unchanged.
The pass is split in two public halves (attend, then masks) with the same operations in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .sam_modeling import MaskDecoder


class BatchedMaskDecoder(MaskDecoder):
    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        state = self.attend(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        return self.masks_of(state), self.iou_of(state)

    # The two halves of predict_masks, for callers that rank answers by the IoU head before
    # paying for the output upscaling of the ones they keep (engine/first_click.py).

    def attend(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings) -> "Attended":
        """The two-way transformer over image and prompt tokens (most of a decoder pass)."""
        n_prompts = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(n_prompts, -1, -1), sparse_prompt_embeddings), dim=1)

        if image_embeddings.shape[0] == n_prompts:
            src = image_embeddings
        else:  # SAM's case: one image, several prompts
            src = torch.repeat_interleave(image_embeddings, n_prompts, dim=0)
        src = src + dense_prompt_embeddings
        pos_src = image_pe.expand(n_prompts, -1, -1, -1)
        shape = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        return Attended(hs, src, shape)

    def iou_of(self, state: "Attended") -> torch.Tensor:
        """(B, 1 + num_mask_tokens - 1) predicted IoU of every mask token."""
        return self.iou_prediction_head(state.hs[:, 0, :])

    def masks_of(self, state: "Attended", rows: slice = slice(None)) -> torch.Tensor:
        """(b, num_mask_tokens, 4h, 4w) logits of the prompts in `rows`."""
        b, c, h, w = state.shape
        hs, src = state.hs[rows], state.src[rows]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(hs.shape[0], c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        n, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.view(n, c, h * w)).view(n, -1, h, w)


@dataclass
class Attended:
    hs: torch.Tensor  # (B, tokens, C) prompt-side output
    src: torch.Tensor  # (B, h*w, C) image-side output
    shape: torch.Size  # (B, C, h, w) of the image side
