"""The app's `--conf` options. MONAI Label passes every value as a string; unknown keys are
refused with the list of valid ones, so a typo never silently changes nothing."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Tuple

from ..engine.encoder_engines import ENGINES
from ..engine.request import parse_bool
from ..model.backbones import BACKBONES
from ..training.options import TrainOptions

# Target names offered to viewers (TotalSegmentator's names, so the sample labels match).
# Requests may name any other structure too.
DEFAULT_LABELS = (
    "liver", "spleen", "kidney_right", "kidney_left", "pancreas", "stomach", "gallbladder",
    "aorta", "inferior_vena_cava", "urinary_bladder", "heart", "lung", "tumor",
)

# MONAI Label's own keys, read by its core or sample-app conventions: accepted, not ours.
MONAI_LABEL_KEYS = ("preload", "auth_token", "zoo_source", "zoo_repo", "skip_trainers", "skip_strategies", "skip_scoring", "models")

HELP = {
    "backbone": f"base model: one of {sorted(BACKBONES)}",
    "device": "auto (cuda when present, else cpu) or a torch device",
    "engine": "image encoder engine: auto (openvino on a CPU, torch on a GPU), torch, or openvino (CPU; each "
              "served model converted once in the background and kept on disk, torch answers meanwhile)",
    "weights_dir": "folder with base checkpoints and published adapters",
    "cache_gb": "embedding cache budget (GiB)",
    "session_gb": "memory for per-client sessions (GiB; least recently used go first)",
    "propagate": "false: requests default to mode 'slice' instead of 'volume'",
    "adapter_2d": "adapter version number, file or `base` (no adapters) for `adaptsam` (default: newest published)",
    "adapter_3d": "... for `adaptsam_3d`",
    "labels": "comma-separated structure names offered to viewers",
    "auto_train_every": "final labels saved between automatic retrains (0: off)",
    "auto_train_models": "comma-separated models retrained automatically",
    "cors_origins": "comma-separated web origins allowed to call the server from a browser "
                    "(default: none, only pages the server serves itself, such as /ohif/)",
    "max_upload_mb": "largest request body (an image, label or mask upload) in MiB",
    "train_<option>": f"default of a training option; options: {', '.join(TrainOptions.option_names())}",
}


class ConfError(ValueError):
    pass


@dataclass(frozen=True)
class AppConfig:
    weights_dir: str
    backbone: str = "litemedsam"
    device: str = "auto"
    engine: str = "auto"
    cache_bytes: int = 2 << 30
    session_bytes: int = 1 << 30
    propagate: bool = True
    adapter_2d: str = ""
    adapter_3d: str = ""
    labels: Tuple[str, ...] = DEFAULT_LABELS
    auto_train_every: int = 1
    auto_train_models: Tuple[str, ...] = ("adaptsam",)
    train_defaults: Tuple[Tuple[str, str], ...] = ()
    cors_origins: Tuple[str, ...] = ()
    max_upload_bytes: int = 1 << 30

    @classmethod
    def from_conf(cls, conf: Dict[str, str], default_weights_dir: str) -> "AppConfig":
        c = dict(conf or {})
        unknown = sorted(k for k in c if k not in HELP and k not in MONAI_LABEL_KEYS and not k.startswith("train_"))
        # the kind is the model's (adaptsam: 2d, adaptsam_3d: 3d), not a default
        bad_train = sorted(k for k in c if k.startswith("train_") and k[len("train_"):] not in TrainOptions.option_names()
                           or k == "train_kind")
        if unknown or bad_train:
            raise ConfError(f"unknown --conf key(s) {unknown + bad_train}; valid keys: "
                            + "; ".join(f"{k} ({v})" for k, v in HELP.items()))
        kw = {"weights_dir": str(Path(c.get("weights_dir") or default_weights_dir).resolve())}
        try:
            if "backbone" in c:
                if c["backbone"] not in BACKBONES:
                    raise ConfError(f"--conf backbone must be one of {sorted(BACKBONES)}, got {c['backbone']!r}")
                kw["backbone"] = c["backbone"]
            if "engine" in c:
                if c["engine"] not in ENGINES:
                    raise ConfError(f"--conf engine must be one of {list(ENGINES)}, got {c['engine']!r}")
                kw["engine"] = c["engine"]
            for key in ("device", "adapter_2d", "adapter_3d"):
                if key in c:
                    kw[key] = c[key]
            if "cache_gb" in c:
                kw["cache_bytes"] = int(float(c["cache_gb"]) * (1 << 30))
            if "session_gb" in c:
                kw["session_bytes"] = int(float(c["session_gb"]) * (1 << 30))
            if "propagate" in c:
                kw["propagate"] = parse_bool(c["propagate"], "--conf propagate")
            if "labels" in c:
                kw["labels"] = tuple(x.strip() for x in c["labels"].split(",") if x.strip())
            if "auto_train_every" in c:
                kw["auto_train_every"] = int(c["auto_train_every"])
            if "cors_origins" in c:
                kw["cors_origins"] = tuple(x.strip().rstrip("/") for x in c["cors_origins"].split(",") if x.strip())
                bad = [o for o in kw["cors_origins"] if not o.startswith(("http://", "https://")) or o.count("/") > 2]
                if bad:
                    raise ConfError(f"--conf cors_origins: {bad} are not origins (scheme://host[:port])")
            if "max_upload_mb" in c:
                kw["max_upload_bytes"] = int(float(c["max_upload_mb"]) * (1 << 20))
                if kw["max_upload_bytes"] <= 0:
                    raise ConfError("--conf max_upload_mb must be positive")
            if "auto_train_models" in c:
                kw["auto_train_models"] = tuple(x.strip() for x in c["auto_train_models"].split(",") if x.strip())
        except ValueError as e:
            raise ConfError(f"--conf: {e}") from e
        train = {k[len("train_"):]: v for k, v in c.items() if k.startswith("train_")}
        try:
            TrainOptions.from_request(train, "2d")  # refuse a bad value now, not at the first run
        except ValueError as e:
            raise ConfError(f"--conf train_*: {e}") from e
        kw["train_defaults"] = tuple(sorted(train.items()))
        return cls(**kw)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def to_dict(self) -> Dict:
        return asdict(self)

