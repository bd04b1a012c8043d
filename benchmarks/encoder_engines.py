"""Encoder engines side by side on the sample CT: torch eager against OpenVINO fp32 and bf16,
the served 2D and 3D adapters, slices interleaved (one slice on each engine in turn), and the
masks decoded from each engine's embeddings with box prompts on every labelled object's largest
slice.

    .venv/bin/python benchmarks/encoder_engines.py [--slices 20]

Prints ms per slice (p50 / p95) per engine and model, the ratio to torch, and mask agreement
(Dice of each engine's masks against torch's: mean / min, and how many are identical). bf16 is
measured only where the CPU has it. End-to-end numbers of the served engine: engines.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import samples  # noqa: E402
from adaptsam.engine.encoder_engines import OpenVinoEncoders, cpu_has_bf16  # noqa: E402
from adaptsam.engine.encoder import window_group  # noqa: E402
from adaptsam.engine.metrics import bounding_box, dice, largest_slice  # noqa: E402
from adaptsam.engine.models import ModelHandle  # noqa: E402
from adaptsam.engine.predictor import SlicePredictor  # noqa: E402
from adaptsam.engine.preprocess import SliceGeometry  # noqa: E402
from adaptsam.engine.volume import Volume  # noqa: E402

IMAGE = "ct_dicom"


def percentile(values, q):
    return float(np.percentile(values, q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=20)
    args = ap.parse_args()
    samples_dir = samples.default_samples_dir()
    samples.fetch(samples_dir)
    vol = Volume.load(samples.image_path(samples_dir, IMAGE))
    label, _, names = samples.load_reference(samples_dir, IMAGE)
    window = vol.window("liver")
    engines = {"openvino": OpenVinoEncoders()}
    if cpu_has_bf16():
        engines["openvino-bf16"] = OpenVinoEncoders(precision="bf16")
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; {IMAGE} {vol.shape}")
    for kind in ("2d", "3d"):
        serving = ModelHandle(kind, "litemedsam", REPO / "model_weights", "cpu").current()
        encoders = {"torch": serving.encode}
        for name, converted in engines.items():
            t0 = time.time()
            encoders[name] = converted.wait(serving.model, serving.source, serving.num_slices)
            print(f"{serving.key}: {name} encoder ready in {time.time() - t0:.1f} s (conversion, or read from the disk cache)")
        predictor = SlicePredictor(serving.model)
        geom = SliceGeometry.fit(vol.shape[0], vol.shape[1], serving.model.input_size, vol.plane_spacing(2), vol.display_flips(2))
        times = {name: [] for name in encoders}
        embeddings = {name: {} for name in encoders}
        for start in range(0, min(args.slices, vol.shape[2]), serving.num_slices):
            group, _ = window_group(start, serving.num_slices, vol.shape[2])
            inputs = torch.stack([predictor.model_input(vol.normalized_slice(window, 2, s), geom) for s in group])
            for name, encode in encoders.items():
                t = time.perf_counter()
                with torch.inference_mode():
                    out = encode(inputs)
                times[name].append((time.perf_counter() - t) * 1000 / len(group))
                for pos, s in enumerate(group):
                    embeddings[name][s] = out[pos]
        dices = {name: [] for name in engines}
        for value in sorted(names):
            truth = label == value
            if truth.sum() < 50:
                continue
            k = largest_slice(truth)
            if k not in embeddings["torch"]:
                continue
            r0, c0, r1, c1 = bounding_box(truth[:, :, k])
            masks = {name: predictor.predict(embeddings[name][k][None], geom, box=(r0, c0, r1, c1)).mask for name in encoders}
            for name in engines:
                both_empty = not masks["torch"].any() and not masks[name].any()
                dices[name].append(1.0 if both_empty else dice(masks[name], masks["torch"]))
        t = times["torch"]
        print(f"| {serving.key} | torch | {statistics.median(t):.0f} / {percentile(t, 95):.0f} ms | x1 | |")
        for name in engines:
            o, d = times[name], dices[name]
            print(f"| {serving.key} | {name} | {statistics.median(o):.0f} / {percentile(o, 95):.0f} ms | "
                  f"x{statistics.median(t) / statistics.median(o):.2f} | masks Dice vs torch {np.mean(d):.4f} / {np.min(d):.4f}, "
                  f"identical {sum(v == 1.0 for v in d)}/{len(d)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
