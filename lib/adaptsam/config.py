"""The app's `--conf` options (MONAI Label passes every value as a string)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from .model.backbones import BACKBONES, default_weights_dir


# Target names offered to viewers (TotalSegmentator's names, so the sample labels match).
DEFAULT_LABELS = (
    "liver", "spleen", "kidney_right", "kidney_left", "pancreas", "stomach", "gallbladder",
    "aorta", "inferior_vena_cava", "urinary_bladder", "heart", "lung", "tumor",
)


def _bool(value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


@dataclass(frozen=True)
class AppConfig:
    backbone: str = "litemedsam"
    device: str = "auto"  # auto: cuda when present, else cpu
    weights_dir: str = str(default_weights_dir())
    cache_bytes: int = 2 << 30  # embedding cache budget
    propagate: bool = True  # default request mode "volume" propagates through slices
    carry_logits: Optional[bool] = None  # corrections also get the previous logits as mask prompt; None: as trained
    guide_corrections: bool = True  # a correction click also sends the guide box (engine/guide_box.py)
    carve_clicks: bool = True  # ... and its clicks are painted into the carried logits (engine/click_carving.py)
    first_click_boxes: bool = True  # a lone first click is answered through boxes around it (engine/first_click.py)
    adapter_2d: str = ""  # adapter file for `adaptsam`; empty: newest published
    adapter_3d: str = ""  # adapter file for `adaptsam_3d`
    num_slices: int = 5
    labels: Tuple[str, ...] = DEFAULT_LABELS
    auto_train_every: int = 5  # final labels since the last run that start a new one (0: off)
    auto_train_models: Tuple[str, ...] = ("adaptsam",)
    train_defaults: Tuple[Tuple[str, str], ...] = ()  # conf train_<option> <value>

    @classmethod
    def from_conf(cls, conf: Dict[str, str]) -> "AppConfig":
        c = {k: v for k, v in conf.items()}
        kw = {}
        if "backbone" in c:
            if c["backbone"] not in BACKBONES:
                raise ValueError(f"--conf backbone must be one of {sorted(BACKBONES)}, got {c['backbone']!r}")
            kw["backbone"] = c["backbone"]
        if "device" in c:
            kw["device"] = c["device"]
        if "weights_dir" in c:
            kw["weights_dir"] = str(Path(c["weights_dir"]).resolve())
        if "cache_gb" in c:
            kw["cache_bytes"] = int(float(c["cache_gb"]) * (1 << 30))
        if "propagate" in c:
            kw["propagate"] = _bool(c["propagate"])
        if "carry_logits" in c:
            kw["carry_logits"] = None if c["carry_logits"].strip().lower() == "auto" else _bool(c["carry_logits"])
        if "guide_corrections" in c:
            kw["guide_corrections"] = _bool(c["guide_corrections"])
        if "carve_clicks" in c:
            kw["carve_clicks"] = _bool(c["carve_clicks"])
        if "first_click_boxes" in c:
            kw["first_click_boxes"] = _bool(c["first_click_boxes"])
        if "adapter_2d" in c:
            kw["adapter_2d"] = c["adapter_2d"]
        if "adapter_3d" in c:
            kw["adapter_3d"] = c["adapter_3d"]
        if "labels" in c:
            kw["labels"] = tuple(x.strip() for x in c["labels"].split(",") if x.strip())
        if "auto_train_every" in c:
            kw["auto_train_every"] = int(c["auto_train_every"])
        if "auto_train_models" in c:
            kw["auto_train_models"] = tuple(x.strip() for x in c["auto_train_models"].split(",") if x.strip())
        kw["train_defaults"] = tuple(sorted((k[len("train_"):], v) for k, v in c.items() if k.startswith("train_")))
        if "num_slices" in c:
            kw["num_slices"] = int(c["num_slices"])
        return cls(**kw)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> Dict:
        return asdict(self)
