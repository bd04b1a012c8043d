"""Evaluate model versions with the interactive protocol on a datastore's final labels.

    python -m adaptsam.evaluate --studies DIR|URL [--models base,2d,3d] [--out DIR]

--studies is what the server is started with: a studies folder, or a DICOMweb URL (the PACS's
SEG series are the final labels, named by their segment labels). Every structure of every image
with a `final` label is segmented through the server's own code
path: a 3D box then up to 5 correction clicks, and 1..10 clicks without a box, each correction
at the centre of the largest 3D error (evaluation/protocol.py). Models: `base` (no adapter),
`2d` / `3d` (the newest published of that kind in --weights), `2d:N` (version N), or
`NAME=PATH` (an adapter file, e.g. a training candidate), each with an optional `+openvino` or
`+openvino-bf16` to run its encoder on that engine. Writes evaluation.json,
evaluation.md (a table) and two plots into --out.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, Tuple

from .evaluation.protocol import Protocol
from .evaluation.report import table, write
from .evaluation.runner import ModelSpec, base_spec, evaluate_models
from .server.datalist import labelled_cases, open_datastore


def parse_models(spec: str, weights: str, backbone: str) -> Dict[str, ModelSpec]:
    """`base,2d,3d:4,NAME=FILE.pt`, each optionally `+openvino` / `+openvino-bf16` (the encoder
    engine; torch when absent)."""
    out: Dict[str, ModelSpec] = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        model, _, engine = item.partition("+")
        name, found = _model(model, weights, backbone)
        out[name + (f"+{engine}" if engine else "")] = replace(found, engine=engine or "torch")
    return out


def _model(item: str, weights: str, backbone: str) -> Tuple[str, ModelSpec]:
    if item == "base":
        return "base", base_spec(backbone)
    if "=" in item:
        from .model.adapter_io import read_adapter_meta

        name, path = item.split("=", 1)
        return name, ModelSpec(read_adapter_meta(path)["kind"], str(Path(path).parent), str(Path(path).resolve()), backbone)
    kind, _, version = item.partition(":")
    if kind not in ("2d", "3d"):
        raise SystemExit(f"unknown model {item!r}: use base, 2d, 3d, 2d:N, 3d:N or NAME=PATH")
    return item, ModelSpec(kind, weights, version.lstrip("v"), backbone)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaptsam.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", required=True, help="a studies folder or a DICOMweb URL (http://host/dicom-web)")
    ap.add_argument("--cache", default=None, help="where a DICOMweb datastore's series are downloaded (default: MONAI Label's)")
    ap.add_argument("--weights", default="model_weights", help="published adapters (default: ./model_weights)")
    ap.add_argument("--models", default="base,2d,3d")
    ap.add_argument("--images", default="", help="comma-separated image ids (default: every image with a final label)")
    ap.add_argument("--structures", default="", help="comma-separated structure names (default: all)")
    ap.add_argument("--backbone", default="litemedsam")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="evaluation")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cases = labelled_cases(open_datastore(args.studies, args.cache), [s for s in args.images.split(",") if s] or None)
    if not cases:
        raise SystemExit(f"no image with a final label in {args.studies}")
    models = parse_models(args.models, args.weights, args.backbone)
    report = evaluate_models(models, cases, Protocol(), args.device, log=print,
                             only=[s for s in args.structures.split(",") if s] or None)
    paths = write(report, Path(args.out))
    print(table(report))
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
