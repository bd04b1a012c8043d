"""SAM's mask decoder, able to decode a batch of *different* images in one pass.

`segment_anything`'s `MaskDecoder.predict_masks` assumes one image and many prompts: it repeats
the image embedding once per prompt. Training (and 3D propagation) decode B slices with B
prompts; repeating there would build B*B pairs. This subclass pairs embedding i with prompt i
when the batch sizes match and otherwise keeps SAM's behaviour. Parameter names are unchanged.
"""

from __future__ import annotations

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
        n_prompts = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(n_prompts, -1, -1), sparse_prompt_embeddings), dim=1)

        if image_embeddings.shape[0] == n_prompts:
            src = image_embeddings
        else:  # SAM's case: one image, several prompts
            src = torch.repeat_interleave(image_embeddings, n_prompts, dim=0)
        src = src + dense_prompt_embeddings
        pos_src = image_pe.expand(n_prompts, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
