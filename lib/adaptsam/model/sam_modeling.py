"""Access to `segment_anything.modeling` without running `segment_anything/__init__.py`.

Why: the package `__init__` imports `SamPredictor`, which imports torchvision. torchvision 0.28
cannot load next to the CPU build of torch 2.13 (its C extension needs CUDA libraries), so a
plain `import segment_anything` fails here. The `modeling` subpackage itself only needs torch,
so we load it from the installed files under its real dotted name, leaving the parent package
unimported. Every module of this project takes the SAM classes from here.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

_NAME = "segment_anything.modeling"


def _load_modeling() -> ModuleType:
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    # find_spec on a top-level name locates the package without executing it.
    parent = importlib.util.find_spec("segment_anything")
    if parent is None or not parent.submodule_search_locations:
        raise ImportError("segment-anything is not installed (pip install segment-anything==1.0)")
    location = list(parent.submodule_search_locations)[0]
    spec = importlib.util.spec_from_file_location(
        _NAME, f"{location}/modeling/__init__.py", submodule_search_locations=[f"{location}/modeling"]
    )
    module = importlib.util.module_from_spec(spec)
    # Registered before exec so the subpackage's relative imports resolve against it,
    # never against the (unimported) parent.
    sys.modules[_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(_NAME, None)
        raise
    return module


_modeling = _load_modeling()

Sam = _modeling.Sam
ImageEncoderViT = _modeling.ImageEncoderViT
PromptEncoder = _modeling.PromptEncoder
MaskDecoder = _modeling.MaskDecoder
TwoWayTransformer = _modeling.TwoWayTransformer
LayerNorm2d = sys.modules[f"{_NAME}.common"].LayerNorm2d
ViTBlock = sys.modules[f"{_NAME}.image_encoder"].Block
TwoWayAttentionBlock = sys.modules[f"{_NAME}.transformer"].TwoWayAttentionBlock
Attention = sys.modules[f"{_NAME}.transformer"].Attention
window_partition = sys.modules[f"{_NAME}.image_encoder"].window_partition
window_unpartition = sys.modules[f"{_NAME}.image_encoder"].window_unpartition

__all__ = [
    "Sam",
    "ImageEncoderViT",
    "PromptEncoder",
    "MaskDecoder",
    "TwoWayTransformer",
    "LayerNorm2d",
    "ViTBlock",
    "TwoWayAttentionBlock",
    "Attention",
    "window_partition",
    "window_unpartition",
]
