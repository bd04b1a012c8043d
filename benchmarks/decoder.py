#!/usr/bin/env python
"""The mask decoder's arithmetic: SAM's own code against the folded one the server runs
(model/mask_decoder.py), in one process, on the served paths that wait for the decoder,
interleaved request by request so that machine drift hits both.

    .venv/bin/python benchmarks/decoder.py [--repeats 20] [--out benchmarks/results/decoder.json]

On the liver of ct_dicom (512x512x20), its slice and clicks as in interactive.py, with the served
2D adapter, every slice's embedding cached:
  decoder_pass  one decoder pass: a positive click on the liver's largest slice
  lone_click    the served lone first click (engine/first_click.py: the click, then boxes
                as one batched decoder call); lone_click_one_by_one: the boxes one at a time
  correction    a second click with the first answer's logits (what a warm correction decodes)
  propagation   the liver's 3D box through InteractiveSegmenter (volume mode): 20 slices decoded
Each row: p50 / p95 ms per arithmetic, the ratio, and the mask agreement (Dice, min) between them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import samples  # noqa: E402
from interactive import AXIS, IMAGE, ORGAN, load_case  # noqa: E402  (benchmarks/interactive.py)
from adaptsam.engine.first_click import answer_lone_click  # noqa: E402
from adaptsam.engine.interactive import InteractiveSegmenter, Runtime  # noqa: E402
from adaptsam.engine.metrics import dice  # noqa: E402
from adaptsam.engine.models import ModelHandle  # noqa: E402
from adaptsam.engine.predictor import SlicePredictor  # noqa: E402
from adaptsam.engine.request import SegmentRequest  # noqa: E402
from adaptsam.model.mask_decoder import computing_as_sam  # noqa: E402


def pct(values: List[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "decoder.json")
    args = ap.parse_args(argv)

    samples_dir = Path(os.environ.get("ADAPTSAM_SAMPLES") or samples.default_samples_dir())
    samples.fetch(samples_dir)
    case = load_case(samples_dir, n_clicks=2)  # the same liver, slice and clicks as interactive.py
    k, roi = case.k, case.roi3d
    click, correction = case.clicks

    runtime = Runtime(1 << 30)
    handle = ModelHandle("2d", "litemedsam", REPO / "model_weights", "cpu")
    serving = runtime.serving(handle)
    image_path = str(samples.image_path(samples_dir, IMAGE))
    vol, key = runtime.volumes.get(image_path, IMAGE)
    window = vol.window(ORGAN)
    for s in range(vol.shape[AXIS]):  # every slice cached: the decoder is what is measured
        runtime.encoder.embedding(serving, vol, key, AXIS, s, window)
    emb, cached = runtime.encoder.embedding(serving, vol, key, AXIS, k, window)
    assert cached
    geom = runtime.encoder.geometry(serving, vol, AXIS)
    predictor = SlicePredictor(serving.model)
    segmenter = InteractiveSegmenter(runtime, handle)

    def decoder_pass():
        return predictor.predict(emb, geom, foreground=[click]).mask

    def lone_click():
        return answer_lone_click(predictor, emb, geom, click).mask

    def lone_click_one_by_one():
        return answer_lone_click(predictor, emb, geom, click, batched=False).mask

    first = predictor.predict(emb, geom, foreground=[click])

    def correction_pass():
        return predictor.predict(emb, geom, foreground=[click, correction], mask_input=first.low_res_logits).mask

    calls = {"n": 0}

    def propagation():
        calls["n"] += 1
        req = SegmentRequest(image_path=image_path, image_id=IMAGE, label=ORGAN, roi=roi, mode="volume",
                             client_id=f"bench-{calls['n']}", reset=True)
        return segmenter.segment(req).label > 0

    measures: Dict[str, Callable[[], np.ndarray]] = {"decoder_pass": decoder_pass, "lone_click": lone_click,
                                                     "lone_click_one_by_one": lone_click_one_by_one,
                                                     "correction": correction_pass, "propagation": propagation}
    times = {m: {"sam": [], "folded": []} for m in measures}
    agreement = {m: [] for m in measures}
    for name, fn in measures.items():
        for _ in range(2):  # warm-up, both ways
            fn()
            with computing_as_sam(serving.model.mask_decoder):
                fn()
        for i in range(args.repeats if name != "propagation" else max(3, args.repeats // 4)):
            answers = {}
            for way in (("sam", "folded") if i % 2 else ("folded", "sam")):
                with computing_as_sam(serving.model.mask_decoder) if way == "sam" else torch.no_grad():
                    t = time.perf_counter()
                    answers[way] = fn()
                    times[name][way].append((time.perf_counter() - t) * 1000)
            agreement[name].append(dice(answers["folded"], answers["sam"]) if answers["sam"].any() else float(not answers["folded"].any()))
    runtime.stop()

    rows = {m: {w: {"p50": pct(v, 50), "p95": pct(v, 95)} for w, v in t.items()} for m, t in times.items()}
    for m, r in rows.items():
        r["speedup_p50"] = round(r["sam"]["p50"] / r["folded"]["p50"], 2)
        r["agreement_dice"] = {"mean": round(float(np.mean(agreement[m])), 5), "min": round(float(np.min(agreement[m])), 5)}
    dec = rows["decoder_pass"]
    ratios = {f"{m} / decoder_pass": {w: round(rows[m][w]["p50"] / dec[w]["p50"], 2) for w in ("sam", "folded")}
              for m in ("lone_click", "lone_click_one_by_one", "correction")}
    report = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "served": serving.key, "rows": rows, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("| measure | SAM's code p50 / p95 ms | folded p50 / p95 ms | speed-up | masks agree (Dice mean / min) |")
    print("|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['sam']['p50']} / {r['sam']['p95']} | {r['folded']['p50']} / {r['folded']['p95']} | "
              f"{r['speedup_p50']} x | {r['agreement_dice']['mean']} / {r['agreement_dice']['min']} |")
    print("ratios to one decoder pass:", json.dumps(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
