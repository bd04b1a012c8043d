"""The serving model of one adapter kind, following what is published in model_weights/.

Adapters are published as `adaptsam_<kind>_<backbone>_v<N>.pt` (written by rename, so a file
is either absent or complete). Each request asks `current()`; a new file (or a changed pinned
file) loads into a fresh model object which replaces the old one, so requests already running
keep a consistent model and none waits for a restart. With no adapter file the base model
serves (version 0): untrained adapters are the identity, so base embeddings are shared by
both kinds.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..model import adapter_io
from ..model.adapters import attach_adapters
from ..model.backbones import build_model
from ..model.sam import PromptableSam

logger = logging.getLogger(__name__)

CANDIDATES = "candidates"  # training results the publish gate kept back (training/gate.py)
PUBLISHED = re.compile(r"^adaptsam_(?P<kind>2d|3d)_(?P<backbone>[a-z0-9_]+)_v(?P<version>\d+)\.pt$")


def published_name(kind: str, backbone: str, version: int) -> str:
    return f"adaptsam_{kind}_{backbone}_v{version}.pt"


def published_versions(weights_dir: Path, kind: str, backbone: str) -> List[Tuple[int, Path]]:
    """(version, path) of the published adapters of `kind` on `backbone`, oldest first."""
    found = []
    for p in Path(weights_dir).glob(f"adaptsam_{kind}_{backbone}_v*.pt"):
        m = PUBLISHED.match(p.name)
        if m and m["kind"] == kind and m["backbone"] == backbone:
            found.append((int(m["version"]), p))
    return sorted(found)


GPU_BATCH_SLICES = 16


def encode_batch(num_slices: int, device) -> int:
    """Slices per encoder call: on a GPU several windows at once; on a CPU one window (2 cores
    encode a batch of 5 slices no faster per slice than one at a time, on torch or OpenVINO,
    and a request would wait for the whole batch)."""
    if torch.device(device).type == "cuda":
        return max(num_slices, (GPU_BATCH_SLICES // num_slices) * num_slices)
    return num_slices


def encoder_precision(engine: str, device: torch.device) -> str:
    """What the encoder computes in: torch on a GPU under bf16 autocast (tensor cores; the
    embedding cache keeps fp16 anyway), torch on a CPU in fp32 (bf16 moved masks more than the
    evaluation allows: encoder_engines.SERVE_BF16), OpenVINO as its engine name says."""
    if engine.startswith("openvino"):
        return engine.partition("-")[2] or "f32"
    return "bf16" if torch.device(device).type == "cuda" else "f32"


@dataclass
class ServingModel:
    model: PromptableSam
    kind: str
    version: int  # 0: base model, no adapter file
    num_slices: int  # slices encoded together (1 unless 3d adapters are trained)
    source: Optional[str] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    engine: str = "torch"  # what runs the image encoder (encoder_engines.py)
    encoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = field(default=None, repr=False)
    batch_slices: Optional[int] = None  # slices per encoder call; None: encode_batch()'s choice

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def precision(self) -> str:
        return encoder_precision(self.engine, self.device)

    @property
    def encode_batch(self) -> int:
        return self.batch_slices or encode_batch(self.num_slices, self.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, 256, h, w) float32 embeddings, on the serving engine."""
        with torch.inference_mode():
            if self.encoder is not None:
                return self.encoder(images)
            images = images.to(self.device)
            if self.precision == "bf16":  # torch on a GPU: the decoder stays fp32
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    return self.model.encode(images).float()
            return self.model.encode(images)

    @property
    def carries_logits(self) -> bool:
        """Whether a correction also gets the previous answer's logits as mask prompt: as the
        adapter file says it was trained (all are; files without the record too). The base
        model gets them as well."""
        return adapter_io.serving_mode(self.meta)["carry_logits"]

    @property
    def box_decoder(self) -> str:
        """What answers a box alone: "base", the base model's decoder on the adapted embedding,
        unless the publish gate measured this version's own decoder ("adapted") better at boxes on
        the site's labels and wrote so into its file (training/gate.py)."""
        return adapter_io.serving_mode(self.meta)["box_decoder"]

    @property
    def boxes_on_base_decoder(self) -> bool:
        return self.box_decoder == "base"

    @property
    def version_key(self) -> str:
        """Names the weights: what a session continues with (an engine change keeps it)."""
        return f"{self.model.backbone}/base" if self.version == 0 else f"{self.model.backbone}/{self.kind}/v{self.version}"

    @property
    def key(self) -> str:
        """Names the embeddings this model makes: version and engine (engines differ in rounding)."""
        return self.version_key if self.engine == "torch" else f"{self.version_key}+{self.engine}"


BASE = "base"  # the pin that serves the base model: no adapter file at all


class ModelHandle:
    CHECK_INTERVAL_S = 1.0

    def __init__(self, kind: str, backbone: str, weights_dir: Path, device: str, pinned: str = "",
                 engine: str = "torch", converted=None):
        """`engine`: torch or openvino; `converted`: the OpenVinoEncoders that convert for it."""
        self.engine = engine
        self.converted = converted
        self._engine_key: Tuple[Optional[int], str] = (None, "")
        self.kind = kind
        self.backbone = backbone
        self.weights_dir = Path(weights_dir)
        self.device = device
        self.pinned = pinned  # a file name/path or a version number: serve exactly that (rollback)
        self._lock = threading.Lock()
        self._current: Optional[ServingModel] = None
        self._source_state: Optional[Tuple] = None
        self._checked = 0.0
        self._base: Optional[PromptableSam] = None

    def pin(self, version: str) -> None:
        """Serve exactly this version from now on (rollback), a kept training candidate ("cN") or
        the base model without adapters ("base"); "" or "latest" follows new publications."""
        version = "" if str(version).lower() in ("", "latest") else str(version)
        if version and version != BASE:
            path = self._pinned_path(version)
            if not path.is_file():
                raise FileNotFoundError(f"no {self.kind} adapter {version} ({path.name})")
        with self._lock:
            self.pinned = version
            self._checked = 0.0

    def _pinned_path(self, version: str) -> Path:
        if version.isdigit():
            return self.weights_dir / published_name(self.kind, self.backbone, int(version))
        if version[:1] == "c" and version[1:].isdigit():
            return self.weights_dir / CANDIDATES / f"adaptsam_{self.kind}_{self.backbone}_{version}.pt"
        p = Path(version)
        return p if p.is_absolute() else self.weights_dir / p

    def status(self) -> Optional[Dict[str, Any]]:
        """What is being served (None before the first request loads a model)."""
        cur = self._current
        if cur is None:
            return None
        return {"version": cur.version, "model": cur.key, "source": cur.source, "pinned": self.pinned or "latest",
                "engine": cur.engine, "box_decoder": cur.box_decoder,
                "wanted_engine": self.converted.engine if self.engine != "torch" else "torch"}

    def _wanted(self) -> Optional[Path]:
        if self.pinned == BASE:
            return None
        if self.pinned:
            return self._pinned_path(self.pinned)
        versions = published_versions(self.weights_dir, self.kind, self.backbone)
        return versions[-1][1] if versions else None

    def current(self) -> ServingModel:
        now = time.monotonic()
        with self._lock:
            if self._current is not None and now - self._checked < self.CHECK_INTERVAL_S:
                return self._current
            self._checked = now
            path = self._wanted()
            state = None
            if path is not None:
                if not path.is_file():
                    raise FileNotFoundError(f"adapter file {path} (conf adapter_{self.kind}) does not exist")
                st = path.stat()
                state = (str(path), st.st_mtime_ns, st.st_size)
            if self._current is None or state != self._source_state:
                self._current = self._load(path)
                self._source_state = state
            if self.engine != "torch" and self._current.engine == "torch":
                self._current = self._with_converted(self._current)
            return self._current

    def _with_converted(self, serving: ServingModel) -> ServingModel:
        """The same model on the converted encoder once that is ready (conversion starts on the
        first call and runs in the background; until then torch serves)."""
        if self._engine_key[0] != id(serving):
            self._engine_key = (id(serving), self.converted.key(serving.model, serving.source, serving.num_slices))
        encoder = self.converted.get(self._engine_key[1], serving.model, serving.num_slices)
        return serving if encoder is None else replace(serving, engine=self.converted.engine, encoder=encoder)

    def _base_model(self) -> PromptableSam:
        if self._base is None:
            self._base = build_model(self.backbone, weights_dir=self.weights_dir).to(self.device)
        return self._base

    def _load(self, path: Optional[Path]) -> ServingModel:
        if path is None:
            logger.info("%s: no published adapter, serving the base %s", self.kind, self.backbone)
            return ServingModel(self._base_model(), self.kind, 0, 1)
        meta = adapter_io.read_adapter_meta(path)
        cfg = adapter_io.config_from_meta(meta)
        model = build_model(self.backbone, weights_dir=self.weights_dir)
        attach_adapters(model, cfg)
        adapter_io.load_adapters(path, model)
        model.to(self.device).eval()
        logger.info("%s: serving adapter %s (version %s)", self.kind, path.name, meta["version"])
        n = cfg.num_slices if cfg.kind == "3d" else 1
        return ServingModel(model, self.kind, int(meta["version"]), n, str(path), meta)
