"""Segmentation quality on held-out sample volumes: base LiteMedSAM vs the shipped adapters.

    .venv/bin/python benchmarks/quality.py [--images ct_dicom] [--out benchmarks/results/quality.json]

For every object of the reference (silver) label with a large enough largest slice:
- on that slice: Dice for a box (the object's bounding box), and for 1, 3 and 5 clicks of the
  standard protocol (first click farthest from the boundary, each next one in the largest
  error region; the previous logits as mask prompt where the server gives them, i.e. unless the
  adapter was trained without; --carry-logits / --no-carry-logits force it; the clicks carved
  into those logits, engine/click_carving.py, unless --no-carve-clicks; each correction with the
  server's guide box, engine/guide_box.py, unless --no-guide-corrections; an adapter's first
  click answered through boxes around it, engine/first_click.py, unless --no-first-click-boxes),
  through the serving code path;
- volume Dice after propagation from that slice's box (the server's `volume` mode).
Models: the base model, the newest shipped 2D adapter and the newest shipped 3D adapter in
model_weights/ (or --weights). The shipped adapters were trained on ct_3mm and mr_3mm only,
so ct_dicom is a held-out volume; so is the part of ct_body_3mm below ct_3mm
(`--images "ct_body_3mm[:82]"`, a development set for choices, same patient as ct_3mm).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from adaptsam import samples
from adaptsam.engine.allocator import keep_freed_memory
from adaptsam.engine.interactive import InteractiveSegmenter, Runtime, SegmentRequest
from adaptsam.engine.metrics import bounding_box, dice, largest_slice
from adaptsam.engine.models import ModelHandle, published_versions
from adaptsam.engine.predictor import SlicePredictor
from adaptsam.model.backbones import default_weights_dir
from adaptsam.trainers.loop import evaluate_prompts

MIN_AREA = 150  # pixels on the object's largest slice (original grid)


def models(weights: Path, backbone: str):
    # an empty weights dir: no adapter published, so the handle serves the base model
    out = {"base": ModelHandle("2d", backbone, Path(tempfile.mkdtemp()), "cpu")}
    for kind in ("2d", "3d"):
        versions = published_versions(weights, kind, backbone)
        if versions:
            out[f"adapter_{kind}_v{versions[-1][0]}"] = ModelHandle(kind, backbone, weights, "cpu", pinned=str(versions[-1][1]))
    return out


def parse_image(spec: str) -> Tuple[str, slice]:
    """"ct_dicom", or "ct_body_3mm[:82]": only axial slices 0-81 count (a part no adapter trained on)."""
    if "[" not in spec:
        return spec, slice(None)
    image_id, rng = spec[:-1].split("[")
    lo, hi = (int(x) if x else None for x in rng.split(":"))
    return image_id, slice(lo, hi)


def evaluate(spec: str, samples_dir: Path, handle: ModelHandle, runtime: Runtime, log, carry_logits: Optional[bool] = None,
             guide: bool = True, carve: bool = True, first_boxes: bool = True) -> list:
    image_id, part = parse_image(spec)
    label, _, names = samples.load_reference(samples_dir, image_id)
    inside = np.zeros(label.shape[2], dtype=bool)
    inside[part] = True
    label = np.where(inside[None, None, :], label, 0)
    path = str(samples.image_path(samples_dir, image_id))
    seg = InteractiveSegmenter(runtime, handle, carry_logits=carry_logits, guide_corrections=guide, carve_clicks=carve,
                               first_click_boxes=first_boxes)
    serving = runtime.serving(handle)
    vol, key = runtime.volumes.get(path, image_id)
    rows = []
    for value, name in sorted(names.items()):
        truth3d = label == value
        if not truth3d.any():
            continue
        k = largest_slice(truth3d)
        truth = truth3d[:, :, k].T  # the slice as take_slice shows it (rows = j)
        if truth.sum() < MIN_AREA:
            continue
        window = vol.window(name)
        emb, _ = runtime.encoder.embedding(serving, vol, key, 2, k, window)
        geom = runtime.encoder.geometry(serving, vol, 2)
        scores = evaluate_prompts(SlicePredictor(serving.model), emb, geom, truth, clicks=5, carry_logits=seg.carries_logits(serving),
                                  guide=seg.guide_corrections, carve=seg.carve_clicks,
                                  first_boxes=seg.first_click_boxes and serving.version > 0)
        r0, c0, r1, c1 = bounding_box(truth3d[:, :, k])
        res = seg.segment(SegmentRequest(path, image_id, label=name, roi=[r0, r1, c0, c1, k, k], mode="volume", client_id=f"q-{name}"))
        scores["volume_box"] = dice(res.label[:, :, inside] > 0, truth3d[:, :, inside])
        rows.append({"image": image_id, "object": name, "slice": k, **{k2: round(v, 4) for k2, v in scores.items()}})
        log(f"  {name:28s} " + " ".join(f"{k2}={v:.3f}" for k2, v in scores.items()))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="ct_dicom")
    ap.add_argument("--weights", default=str(default_weights_dir()))
    ap.add_argument("--backbone", default="litemedsam")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.json"))
    ap.add_argument("--carry-logits", action=argparse.BooleanOptionalAction, default=None,
                    help="corrections also get the previous logits as mask prompt (default: as the server, per model)")
    ap.add_argument("--guide-corrections", action=argparse.BooleanOptionalAction, default=True,
                    help="corrections also send the server's guide box (as the server does by default)")
    ap.add_argument("--carve-clicks", action=argparse.BooleanOptionalAction, default=True,
                    help="the clicks are painted into the carried logits (as the server does by default)")
    ap.add_argument("--first-click-boxes", action=argparse.BooleanOptionalAction, default=True,
                    help="an adapter's first click is answered through boxes around it (as the server does by default)")
    ap.add_argument("--no-base", action="store_true", help="skip the base model (no box check)")
    args = ap.parse_args(argv)
    keep_freed_memory()  # before the model loads (engine/allocator.py)
    root = samples.default_samples_dir()
    samples.fetch(root)
    results = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__, "cpus": torch.get_num_threads(), "platform": platform.platform()}, "models": {}}
    t0 = time.time()
    for name, handle in models(Path(args.weights).resolve(), args.backbone).items():
        if name == "base" and args.no_base:
            continue
        runtime = Runtime(4 << 30)
        print(f"{name}:")
        rows = [r for image in args.images.split(",") for r in evaluate(image, root, handle, runtime, print, args.carry_logits, args.guide_corrections,
                                                                      args.carve_clicks, args.first_click_boxes)]
        keys = [k for k in rows[0] if k not in ("image", "object", "slice")]
        summary = {k: round(float(np.mean([r[k] for r in rows if k in r])), 4) for k in keys}
        results["models"][name] = {"summary": summary, "objects": rows}
        print(f"  mean over {len(rows)} objects: {summary}")
    results["carry_logits"] = args.carry_logits
    results["guide_corrections"] = args.guide_corrections
    results["carve_clicks"] = args.carve_clicks
    results["first_click_boxes"] = args.first_click_boxes
    base = results["models"].get("base", {}).get("summary")
    checks = {}
    for name, r in results["models"].items():
        if name == "base":
            continue
        s = r["summary"]
        checks[name] = {
            "click1>=0.75": s["click1"] >= 0.75,
            "click3>=0.85": s["click3"] >= 0.85,
        }
        if base:
            checks[name]["box within 0.01 of base"] = s["box"] >= base["box"] - 0.01
    names = list(results["models"])
    a2 = [n for n in names if n.startswith("adapter_2d")]
    a3 = [n for n in names if n.startswith("adapter_3d")]
    if a2 and a3:
        checks["3d volume Dice >= 2d"] = results["models"][a3[0]]["summary"]["volume_box"] >= results["models"][a2[0]]["summary"]["volume_box"]
    results["checks"] = checks
    results["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps({n: r["summary"] for n, r in results["models"].items()}, indent=1))
    print(json.dumps(checks, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
