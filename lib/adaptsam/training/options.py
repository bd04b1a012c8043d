"""Training options: one dataclass, read from MONAI Label train requests, from `--conf
train_<option>` defaults and from the command line, whose flags are generated from it."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Dict

from ..engine.request import parse_bool

KINDS = ("2d", "3d")
PUBLISH = ("gate", "always")


def _opt(default, help: str, cli: bool = True):
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass
class TrainOptions:
    kind: str = _opt("2d", "adapter kind: 2d (Medical SAM Adapter) or 3d (MA-SAM)")
    max_epochs: int = _opt(10, "epochs (the first half on cached embeddings, see decoder_epochs)")
    learning_rate: float = _opt(1e-3, "AdamW learning rate")
    val_split: float = _opt(0.2, "share of images held out for validation (whole images)")
    train_batch_size: int = _opt(4, "slices (2d) or windows of num_slices (3d) per step")
    seed: int = _opt(0, "random seed of prompt simulation and the split")
    corrections: int = _opt(3, "simulated correction rounds after the first prompt")
    # the rest of the simulated clicks are drawn uniformly in the object / error region
    protocol_clicks: float = _opt(0.5, "share of simulated clicks placed as a user places them (deepest point, "
                                       "then the centre of the largest error)")
    min_area: int = _opt(24, "smallest object cross-section trained on, in low-res decoder pixels")
    min_area_fraction: float = _opt(0.0, "... and at least this share of the object's largest cross-section")
    val_pairs: int = _opt(40, "validation slice/object pairs per epoch")
    max_minutes: float = _opt(0.0, "time budget in minutes (0: none); checked every step")
    iou_weight: float = _opt(0.1, "weight of the IoU head's error in the loss")
    num_slices: int = _opt(5, "3d: adjacent slices encoded together")
    resume: bool = _opt(True, "start from the newest published adapter of this kind")
    steps_per_epoch: int = _opt(0, "steps per epoch (0: one pass over the training slices)")
    decoder_epochs: int = _opt(-1, "leading epochs training only the decoder adapter on cached embeddings (-1: half)")
    decoder_blocks: int = _opt(0, "decoder two-way blocks with adapters (0: as the adapter this run starts from, else 1)")
    carve_clicks: bool = _opt(False, "correction rounds carve the clicks into the carried logits, as served")
    publish: str = _opt("gate", "gate: publish only a candidate the interactive protocol measures better than the served "
                                "version on the validation images (and not worse than the base model at boxes); "
                                "always: publish the best epoch unmeasured (logged)")

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.publish not in PUBLISH:
            raise ValueError(f"publish must be one of {PUBLISH}, got {self.publish!r}")

    @classmethod
    def option_names(cls):
        return [f.name for f in fields(cls)]

    @classmethod
    def from_request(cls, request: Dict[str, Any], kind: str) -> "TrainOptions":
        """Options from a train request; keys that are not options (MONAI Label's own) are left
        alone, a value of the wrong type is refused."""
        kw: Dict[str, Any] = {"kind": kind}
        for f in fields(cls):
            if f.name == "kind" or f.name not in request:
                continue
            value = request[f.name]
            if value is None or value == "":
                continue
            kw[f.name] = _convert(f.name, type(f.default), value)
        return cls(**kw)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _convert(name: str, typ, value):
    if typ is bool:
        return parse_bool(value, name)
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"training option {name} must be a {typ.__name__}, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """One `--flag` per option (`max_epochs` -> `--max-epochs`), help and default from the dataclass."""
    for f in fields(TrainOptions):
        if not f.metadata.get("cli", True):
            continue
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        elif f.name in ("kind", "publish"):
            parser.add_argument(flag, choices=KINDS if f.name == "kind" else PUBLISH, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=default, help=f.metadata["help"])


def from_args(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(**{name: getattr(args, name) for name in TrainOptions.option_names()})
