"""The promptable segmenter: SAM's container with an encode/decode split.

Serving needs the two halves apart: the image encoder runs once per slice (and is cached),
the prompt encoder + mask decoder run once per click. `segment_anything.modeling.Sam` keeps the
parameter names of every official checkpoint; we only add the two halves and remember which
backbone and checkpoint the weights came from (adapter files are tied to both).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .sam_modeling import Sam


class PromptableSam(Sam):
    backbone: str = ""
    checkpoint_sha256: str = ""

    @property
    def input_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def embedding_size(self) -> Tuple[int, int]:
        return tuple(self.prompt_encoder.image_embedding_size)

    @property
    def mask_input_size(self) -> Tuple[int, int]:
        return tuple(self.prompt_encoder.mask_input_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], shape (B, 3, S, S) -> the encoder's expected input."""
        return (images * 255.0 - self.pixel_mean) / self.pixel_std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> image embeddings (B, 256, h, w)."""
        return self.image_encoder(self.normalize(images))

    def decode(
        self,
        embeddings: torch.Tensor,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask: bool = False,
        adapted_decoder: bool = True,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts in model-input pixel coordinates -> (low-res logits (B, M, 4h, 4w), IoU (B, M)).

        points: (coords (B, N, 2) as x, y; labels (B, N): 1 positive, 0 negative, -1 padding).
        boxes: (B, 4) as x0, y0, x1, y1. mask_input: (B, 1, 4h, 4w) logits of an earlier mask.
        adapted_decoder=False: the base model's decoder (see `decoder`), on these embeddings.
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        return self.decoder(adapted_decoder)(
            image_embeddings=embeddings,
            image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )

    def dense_pe(self) -> torch.Tensor:
        """The prompt encoder's positional encoding of the image grid, made once: it depends only
        on a fixed random buffer (remade if that buffer is loaded anew or moved)."""
        gaussian = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (gaussian.device, gaussian.data_ptr(), gaussian._version)
        cached = self.__dict__.get("_dense_pe")
        if cached is None or cached[0] != key:
            # a normal tensor even when first asked for inside inference_mode: training in the
            # same process may use it
            with torch.inference_mode(False), torch.no_grad():
                cached = (key, self.prompt_encoder.get_dense_pe())
            self.__dict__["_dense_pe"] = cached
        return cached[1]

    def decoder(self, adapted: bool = True) -> nn.Module:
        """The mask decoder; adapted=False: the same decoder with each adapter-wrapped block
        swapped back for the base block it wraps (a wrapper keeps it as `base`). The two share
        every weight, so this costs no memory, and it is a separate module, not a switch, so
        requests decoding at the same time cannot see each other's choice."""
        layers = self.mask_decoder.transformer.layers
        if adapted or not any(hasattr(layer, "base") for layer in layers):
            return self.mask_decoder
        # built once: adapters are attached once (attach_adapters refuses a second time)
        view = self.__dict__.get("_base_decoder")
        if view is None:
            view, transformer = copy.copy(self.mask_decoder), copy.copy(self.mask_decoder.transformer)
            view._modules, transformer._modules = dict(view._modules), dict(transformer._modules)
            transformer.layers = nn.ModuleList([getattr(layer, "base", layer) for layer in layers])
            view.transformer = transformer
            self.__dict__["_base_decoder"] = view  # not a submodule: no second set of names
        return view

    def decode_ranked(
        self, embeddings: torch.Tensor, points: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Callable[[int], torch.Tensor]]:
        """`decode` (single mask, no mask prompt) split for ranking: the predicted IoU (B,) of every
        prompt's answer now, and a function giving prompt i's low-res logits (1, 1, 4h, 4w) when
        asked: answers never looked at skip the output upscaling. Same operations as `decode`."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        decoder = self.mask_decoder
        state = decoder.attend(embeddings, self.dense_pe(), sparse, dense)
        return decoder.iou_of(state)[:, 0], lambda i: decoder.masks_of(state, slice(i, i + 1), tokens=slice(0, 1))
