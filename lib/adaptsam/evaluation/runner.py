"""Several model versions side by side on the same labelled volumes, each through its own
serving runtime (so no version is ever answered from another's embeddings)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..engine.encoder_engines import OpenVinoEncoders
from ..engine.interactive import InteractiveSegmenter, Runtime
from ..engine.models import BASE, ModelHandle, published_versions
from ..engine.prompts import PromptPolicy
from ..engine.volume import Volume
from .protocol import Protocol, evaluate_volume, in_process, summarise

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One labelled volume: each label value one structure, named by `names` where known."""

    image_id: str
    image_path: str
    label_path: str
    names: Dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """A version to evaluate: `pinned` is a version number or file ("" = the newest published;
    with no adapter file at all the handle serves the base model)."""

    kind: str
    weights_dir: str
    pinned: str = ""
    backbone: str = "litemedsam"
    engine: str = "torch"  # or openvino / openvino-bf16: the encoder engine, as the server names it
    boxes_on_base_decoder: Optional[bool] = None  # None: as the file says (the publish gate measures both)


def base_spec(backbone: str = "litemedsam") -> ModelSpec:
    """The base model: a handle pinned to no adapter at all."""
    return ModelSpec("2d", "", BASE, backbone)


def published_specs(weights_dir: str, kind: str, backbone: str = "litemedsam", last: int = 0) -> Dict[str, ModelSpec]:
    versions = published_versions(Path(weights_dir), kind, backbone)
    if last:
        versions = versions[-last:]
    return {f"{kind}_v{v}": ModelSpec(kind, weights_dir, str(v), backbone) for v, _ in versions}


def load_case(case: Case):
    image = Volume.load(case.image_path)
    label = np.rint(Volume.load(case.label_path, modality="MR").array).astype(np.int32)
    if label.shape != image.shape:
        raise ValueError(f"{case.image_id}: label shape {label.shape} is not the image's {image.shape}")
    return image, label


def engine_handle(spec: ModelSpec, device: str, log: Callable[[str], None]) -> ModelHandle:
    """A handle serving `spec` on its engine, the conversion done before the first request (an
    evaluation measures one engine, not torch's answers while the converted one is prepared)."""
    if spec.engine == "torch":
        return ModelHandle(spec.kind, spec.backbone, spec.weights_dir, device, pinned=spec.pinned)
    engine, _, precision = spec.engine.partition("-")
    if engine != "openvino":
        raise ValueError(f"unknown engine {spec.engine!r}: torch, openvino or openvino-bf16")
    converted = OpenVinoEncoders(precision=precision or "f32")
    handle = ModelHandle(spec.kind, spec.backbone, spec.weights_dir, device, pinned=spec.pinned, engine=engine, converted=converted)
    serving = handle.current()
    if converted.wait(serving.model, serving.source, serving.num_slices) is None:
        raise RuntimeError(f"OpenVINO conversion failed: {converted.status()}")
    time.sleep(ModelHandle.CHECK_INTERVAL_S)
    log(f"{spec.engine} encoder ready for {serving.key}")
    return handle


def evaluate_models(models: Dict[str, ModelSpec], cases: Sequence[Case], protocol: Protocol = Protocol(),
                    device: str = "cpu", log: Optional[Callable[[str], None]] = None, cache_bytes: int = 2 << 30,
                    only: Optional[List[str]] = None, runtime: Optional[Runtime] = None) -> Dict:
    """{"protocol": ..., "models": {name: {"summary": ..., "structures": [...], "seconds": ...}}}

    Each model gets a runtime of its own, unless the caller passes one for all: only for specs of
    one adapter file (ways of prompting it), which then share its embeddings."""
    log = log or logger.info
    loaded = [(case, *load_case(case)) for case in cases]
    report = {"protocol": protocol.__dict__, "cases": [c.image_id for c in cases], "models": {}}
    for name, spec in models.items():
        t0 = time.time()
        model_runtime = runtime or Runtime(cache_bytes)
        try:
            handle = engine_handle(spec, device, log)
            segmenter = InteractiveSegmenter(model_runtime, handle, PromptPolicy(boxes_on_base_decoder=spec.boxes_on_base_decoder))
            serving = model_runtime.serving(handle)
            log(f"{name}: {serving.key}")
            rows = []
            for case, image, label in loaded:
                rows += evaluate_volume(in_process(segmenter), case.image_path, case.image_id, label, tuple(image.spacing), case.names,
                                        protocol, log, only)
        finally:
            if runtime is None:
                model_runtime.stop()
        report["models"][name] = {"model": serving.key, "summary": summarise(rows, protocol), "structures": rows,
                                  "seconds": round(time.time() - t0, 1)}
        log(f"{name}: {report['models'][name]['summary']}")
    return report
