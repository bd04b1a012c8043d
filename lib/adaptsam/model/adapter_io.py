"""Saving and loading adapter weights on their own (a few MB, not the whole model).

An adapter file is only meaningful on the exact base weights and adapter layout it was trained
with, so it carries that identity (backbone name, base checkpoint SHA-256, adapter kind and
config) and loading onto anything else is refused. Files are written to a temporary name and
renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch

from .adapters import AdapterConfig, adapter_state_dict, is_adapter_name
from .sam import PromptableSam

FORMAT = "adaptsam-adapter/1"


class AdapterMismatch(ValueError):
    """The adapter file does not belong to this base model or adapter layout."""


def adapter_metadata(model: PromptableSam, version: int, **extra: Any) -> Dict[str, Any]:
    cfg: AdapterConfig = model.adapter_config
    return {
        "format": FORMAT,
        "backbone": model.backbone,
        "base_sha256": model.checkpoint_sha256,
        "kind": cfg.kind,
        "config": cfg.to_dict(),
        "version": int(version),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def save_adapters(path: Path | str, model: PromptableSam, version: int, **extra: Any) -> Dict[str, Any]:
    """Atomically write the model's adapter tensors and metadata to `path`."""
    if getattr(model, "adapter_config", None) is None:
        raise ValueError("model has no adapters attached")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = adapter_metadata(model, version, **extra)
    write_adapter_file(path, {"meta": meta, "state_dict": {k: v.cpu() for k, v in adapter_state_dict(model).items()}})
    return meta


def write_adapter_file(path: Path | str, payload: Dict[str, Any]) -> None:
    """Write a payload as `read_adapter_file` returns it, by rename: readers see the old file or
    the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from a server run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_adapter_file(path: Path | str) -> Dict[str, Any]:
    """{'meta': ..., 'state_dict': ...}; only tensors and plain data are unpickled."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("meta", {}).get("format") != FORMAT:
        raise AdapterMismatch(f"{path} is not an AdaptSAM adapter file")
    return payload


def images_seen(meta: Optional[Dict[str, Any]]) -> Set[str]:
    """Every image a file's weights learnt from: its own run's training images and, through the
    version it started from, its ancestors'. Files written before that record name only their own."""
    if not meta:
        return set()
    return set(meta.get("images_seen") or meta.get("training_images") or [])


def read_adapter_meta(path: Path | str) -> Dict[str, Any]:
    return read_adapter_file(path)["meta"]


def check_compatible(meta: Dict[str, Any], model: PromptableSam, source: str = "adapter") -> None:
    cfg = _check_base(meta, model, source)
    # through the dataclass, so files written before a config field existed get its default
    if meta["kind"] != cfg.kind or config_from_meta(meta).to_dict() != cfg.to_dict():
        raise AdapterMismatch(
            f"{source} is a {meta['kind']} adapter with config {meta['config']}, "
            f"the model has a {cfg.kind} adapter with config {cfg.to_dict()}"
        )


def _check_base(meta: Dict[str, Any], model: PromptableSam, source: str) -> AdapterConfig:
    """The model has adapters and the base weights the file was trained on; its adapter config."""
    cfg: Optional[AdapterConfig] = getattr(model, "adapter_config", None)
    if cfg is None:
        raise AdapterMismatch("attach adapters to the model before loading adapter weights")
    if meta["backbone"] != model.backbone:
        raise AdapterMismatch(f"{source} was trained on backbone {meta['backbone']!r}, not {model.backbone!r}")
    if meta["base_sha256"] != model.checkpoint_sha256:
        raise AdapterMismatch(
            f"{source} was trained on base checkpoint sha256 {meta['base_sha256'][:12]}…, "
            f"this model's is {model.checkpoint_sha256[:12]}…"
        )
    return cfg


def load_adapters(path: Path | str, model: PromptableSam) -> Dict[str, Any]:
    """Load adapter weights into `model` (adapters attached) after checking identity."""
    payload = read_adapter_file(path)
    return load_adapter_state(payload["meta"], payload["state_dict"], model, source=str(path))


def load_adapter_state(meta: Dict[str, Any], state: Dict[str, torch.Tensor], model: PromptableSam,
                       source: str = "adapter") -> Dict[str, Any]:
    """Load adapter tensors described by `meta` into `model` after checking identity and that
    the tensors are exactly the model's adapter tensors."""
    check_compatible(meta, model, source=source)
    expected = {k for k in model.state_dict() if is_adapter_name(k)}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise AdapterMismatch(f"{source}: adapter tensors differ (missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(state, strict=False)
    return meta


def config_from_meta(meta: Dict[str, Any]) -> AdapterConfig:
    config = dict(meta["config"])
    if config.pop("decoder_lora_rank", 0):  # an experiment's field, only ever shipped at 0
        raise AdapterMismatch("the adapter has decoder LoRA, which this version no longer supports")
    return AdapterConfig(**config)


def warm_start(path: Path | str, model: PromptableSam) -> Dict[str, Any]:
    """Start a training run from an adapter file whose layout is a subset of `model`'s (say,
    decoder adapters in one two-way block where the model has them in two): every tensor the
    file has goes in, the model's extra adapters keep their zero init, so the run starts from
    exactly the file's network. Refused across kinds or base checkpoints."""
    payload = read_adapter_file(path)
    meta = payload["meta"]
    cfg = _check_base(meta, model, str(path))
    if meta["kind"] != cfg.kind:
        raise AdapterMismatch(f"{path} is a {meta['kind']} adapter, the model has a {cfg.kind} adapter")
    own = model.state_dict()
    bad = [k for k, v in payload["state_dict"].items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise AdapterMismatch(f"{path}: tensors the model does not have in that shape: {bad[:3]}")
    model.load_state_dict(payload["state_dict"], strict=False)
    return meta


BOX_DECODERS = ("base", "adapted")  # what answers a box alone: the base model's decoder, or the adapted one


def serving_mode(meta: Dict[str, Any]) -> Dict[str, Any]:
    """What the server takes from a file besides its tensors: whether corrections get the
    previous logits as mask prompt (recorded by the trainer; files from before: yes), and which
    decoder answers a box alone (chosen by the publish gate; files it did not measure: the base
    model's)."""
    return {"carry_logits": bool(meta.get("options", {}).get("carry_logits", True)),
            "box_decoder": meta.get("box_decoder") if meta.get("box_decoder") in BOX_DECODERS else "base"}


def average_adapter_files(paths: Sequence[Path | str]) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, Any]]]:
    """The uniform average of adapter files: (state dict, each file's metadata).

    Runs that warm-start from one adapter and differ in options or seed end in one basin of the
    loss, where the average of their weights tends to generalise better than each of them (a
    "model soup", Wortsman et al. 2022; see docs/experiments.md).
    Only files with one base checkpoint, kind, layout and carry_logits can be averaged; anything
    else is refused."""
    if len(paths) < 2:
        raise ValueError("averaging needs at least two adapter files")
    payloads = [read_adapter_file(p) for p in paths]
    first = payloads[0]["meta"]
    shapes = {k: v.shape for k, v in payloads[0]["state_dict"].items()}
    for path, payload in zip(paths[1:], payloads[1:]):
        meta = payload["meta"]
        for what, a, b in (("backbone", first["backbone"], meta["backbone"]),
                           ("base checkpoint", first["base_sha256"], meta["base_sha256"]),
                           ("kind", first["kind"], meta["kind"]),
                           ("layout", config_from_meta(first).to_dict(), config_from_meta(meta).to_dict()),
                           ("carry_logits", serving_mode(first)["carry_logits"], serving_mode(meta)["carry_logits"]),
                           ("tensors", shapes, {k: v.shape for k, v in payload["state_dict"].items()})):
            if a != b:
                raise AdapterMismatch(f"{path} differs from {paths[0]} in its {what}: {b} vs {a}")
    state = {k: torch.stack([p["state_dict"][k].double() for p in payloads]).mean(0).to(v.dtype)
             for k, v in payloads[0]["state_dict"].items()}
    return state, [p["meta"] for p in payloads]
