#!/usr/bin/env python
"""Encoder engines side by side, end to end: torch eager against the engine `--conf engine auto`
picks on this machine (OpenVINO on a CPU), two real servers on loopback driven by MONAI Label's
client, requests interleaved (one on each server in turn; each waits until the other's background
encoding is done, so they never share the cores).

    .venv/bin/python benchmarks/engines.py [--repeats 5] [--out benchmarks/results/engines.json]

Per engine, on the liver of ct_dicom (512x512x20) with the served 2D adapter:
  encoder       in process: ms per slice, both engines on the same slices, interleaved
  decoder       in process: one decoder pass on a cached embedding (torch for every engine)
  lone_click    REST: one positive click, a new session, on a slice whose embedding is cached
  correction    REST: a second click in that session (a warm correction)
  first_unseen  REST: a lone click on a volume never encoded (a fresh upload)
  cold_3d_box   REST: the liver's 3D box (volume mode) on a fresh upload, nothing cached
  precompute    the server's background encoding of a fresh volume after one click: slices/s
  peak_rss      of each server process (VmHWM)
  agreement     Dice between the two servers' answers to the same requests
Targets (issue 21): lone_click <= 2 x decoder, correction <= 1.3 x decoder, cold_3d_box <= 5 s,
precompute >= 4 x torch's. Results: a table on stdout, JSON in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # server_util: how tests start a real server
sys.path.insert(0, str(REPO / "tools"))

import samples  # noqa: E402
from adaptsam.engine.allocator import keep_freed_memory  # noqa: E402
from adaptsam.engine.encoder_engines import OpenVinoEncoders, cpu_has_bf16, default_precision, resolve  # noqa: E402
from adaptsam.engine.metrics import bounding_box, dice, largest_slice  # noqa: E402
from adaptsam.engine.models import ModelHandle  # noqa: E402
from adaptsam.engine.predictor import SlicePredictor  # noqa: E402
from adaptsam.engine.preprocess import SliceGeometry  # noqa: E402
from adaptsam.engine.volume import Volume  # noqa: E402
from adaptsam.evaluation.clicks import interior_point  # noqa: E402
from server_util import copy_studies, server_process, shipped  # noqa: E402

IMAGE, ORGAN, MODEL = "ct_dicom", "liver", "adaptsam"


def p50(values) -> float:
    return round(float(np.percentile(values, 50)), 1)


def p95(values) -> float:
    return round(float(np.percentile(values, 95)), 1)


class Server:
    """One running server and a MONAI Label client on it (a private result folder)."""

    def __init__(self, url: str, proc, engine: str):
        from monailabel.client import MONAILabelClient

        self.url, self.proc, self.engine = url, proc, engine
        self.tmp = tempfile.mkdtemp(prefix=f"adaptsam-engines-{engine}-")
        self.client = MONAILabelClient(url, tmpdir=self.tmp)

    def infer(self, image: str, params: Dict, client: str):
        t = time.perf_counter()
        path, result = self.client.infer(MODEL, image, {**params, "client_id": client, "result_extension": ".nrrd"})
        ms = (time.perf_counter() - t) * 1000
        label = Volume.load(path, modality="MR").array > 0
        os.unlink(path)
        return ms, label, json.loads(result) if isinstance(result, str) else result

    def status(self) -> Dict:
        return requests.get(self.url + "/adaptsam/progress", timeout=30).json()

    def wait_idle(self, timeout: float = 900) -> List[Dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = self.status()["encoding"]
            if all(j["state"] == "done" for j in jobs):
                return jobs
            time.sleep(0.2)
        raise TimeoutError(f"{self.engine}: background encoding still running")

    def wait_engine(self, timeout: float = 900) -> None:
        """Until the converted encoder serves (a request after it is ready says so)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            conversions = self.status()["engine_conversions"]
            if any(v.startswith("failed") for v in conversions.values()):
                raise RuntimeError(f"conversion failed: {conversions}")
            if conversions and all(v == "ready" for v in conversions.values()):
                return
            time.sleep(1)
        raise TimeoutError("conversion did not finish")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def in_process(case_vol: Volume, k: int, engine: str, repeats: int) -> Dict:
    """Encoder ms/slice on both engines (interleaved) and one torch decoder pass."""
    serving = ModelHandle("2d", "litemedsam", REPO / "model_weights", "cpu").current()
    converted = OpenVinoEncoders(precision=engine.partition("-")[2] or "f32")
    fast = converted.wait(serving.model, serving.source, 1)
    geom = SliceGeometry.fit(case_vol.shape[0], case_vol.shape[1], serving.model.input_size, case_vol.plane_spacing(2),
                             case_vol.display_flips(2))
    predictor = SlicePredictor(serving.model)
    window = case_vol.window(ORGAN)
    times = {"torch": [], engine: []}
    for s in range(repeats * 2):
        x = predictor.model_input(case_vol.normalized_slice(window, 2, s % case_vol.shape[2]), geom)[None]
        for name, encode in (("torch", serving.encode), (engine, fast)):
            t = time.perf_counter()
            with torch.inference_mode():
                emb = encode(x)
            times[name].append((time.perf_counter() - t) * 1000)
    decoder = []
    click = (geom.rows // 2, geom.cols // 2)
    for _ in range(repeats * 4):
        t = time.perf_counter()
        predictor.predict(emb, geom, foreground=[click])
        decoder.append((time.perf_counter() - t) * 1000)
    return {"encoder_ms_per_slice": {n: {"p50": p50(v), "p95": p95(v)} for n, v in times.items()},
            "decoder_ms": {"p50": p50(decoder), "p95": p95(decoder)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "engines.json")
    args = ap.parse_args(argv)
    keep_freed_memory()  # before the model loads, as the server does (engine/allocator.py)
    samples_dir = samples.default_samples_dir()
    samples.fetch(samples_dir)
    vol = Volume.load(samples.image_path(samples_dir, IMAGE))
    truth = samples.structure_mask(samples_dir, IMAGE, ORGAN)
    k = largest_slice(truth)
    click = [*interior_point(truth[:, :, k]), k]
    correction = [int(v) for v in np.argwhere(truth[:, :, k])[len(np.argwhere(truth[:, :, k])) // 5]] + [k]
    b = bounding_box(truth)
    roi3d = [b[0], b[3], b[1], b[4], b[2], b[5]]
    served_version = shipped()[0]  # the torch server answers with it
    fast = "openvino-bf16" if default_precision() == "bf16" else "openvino"
    assert resolve("auto", "cpu") == "openvino", "auto picks torch here: nothing to compare"
    print(f"{os.cpu_count()} CPUs, bf16 {'yes' if cpu_has_bf16() else 'no'}; torch against {fast}; liver slice {k}, roi {roi3d}")

    local = in_process(vol, k, fast, args.repeats)
    work = Path(tempfile.mkdtemp(prefix="adaptsam-engines-"))
    rows = {e: {"lone_click": [], "correction": [], "first_unseen": [], "cold_3d_box": [], "precompute_slices_per_s": []}
            for e in ("torch", fast)}
    server_ms = {e: {"lone_click": [], "correction": [], "cold_3d_box": []} for e in rows}  # the server's own timings_ms
    agreement: Dict[str, List[float]] = {"lone_click": [], "correction": [], "cold_3d_box": []}
    with contextlib.ExitStack() as stack:
        servers = []
        for engine in ("torch", "auto"):
            studies = copy_studies(samples_dir, work / engine / "studies", image_ids={IMAGE})
            url, proc = stack.enter_context(server_process(studies, {"engine": engine}, log=work / f"{engine}.log"))
            servers.append(Server(url, proc, "torch" if engine == "torch" else fast))
        servers[1].wait_engine()
        for server in servers:  # warm: the model loaded, the liver's volume encoded
            server.infer(IMAGE, {"label": ORGAN, "mode": "slice", "foreground": [click]}, "warmup")
            server.wait_idle()
            server.infer(IMAGE, {"label": ORGAN, "mode": "slice", "foreground": [click]}, "warmup2")
        for i in range(args.repeats):
            answers = {}
            for server in servers:
                r = rows[server.engine]
                ms, first, res = server.infer(IMAGE, {"label": ORGAN, "mode": "slice", "foreground": [click]}, f"lone-{i}")
                assert res["embedding_cached"] and res["model"].endswith(server.engine if server.engine != "torch" else f"/v{served_version}"), res
                r["lone_click"].append(ms)
                server_ms[server.engine]["lone_click"].append(res["timings_ms"])
                ms, second, res = server.infer(IMAGE, {"label": ORGAN, "mode": "slice", "foreground": [click, correction]}, f"lone-{i}")
                r["correction"].append(ms)
                server_ms[server.engine]["correction"].append(res["timings_ms"])
                fresh = f"cold_{i}"
                server.client.upload_image(str(samples.image_path(samples_dir, IMAGE)), image_id=fresh)
                ms, box, res = server.infer(fresh, {"label": ORGAN, "mode": "volume", "roi": roi3d}, f"box-{i}")
                r["cold_3d_box"].append(ms)
                server_ms[server.engine]["cold_3d_box"].append(res["timings_ms"])
                server.wait_idle()
                fresh = f"unseen_{i}"
                server.client.upload_image(str(samples.image_path(samples_dir, IMAGE)), image_id=fresh)
                ms, _, _ = server.infer(fresh, {"label": ORGAN, "mode": "slice", "foreground": [click]}, f"unseen-{i}")
                r["first_unseen"].append(ms)
                job = [j for j in server.wait_idle() if j["image"].startswith(fresh)][0]
                r["precompute_slices_per_s"].append(job["total"] / max(job["seconds"], 1e-3))
                answers[server.engine] = (first[:, :, k], second[:, :, k], box)
            (t1, t2, t3), (o1, o2, o3) = answers["torch"], answers[fast]
            agreement["lone_click"].append(dice(o1, t1))
            agreement["correction"].append(dice(o2, t2))
            agreement["cold_3d_box"].append(dice(o3, t3))
            print(f"repeat {i + 1}/{args.repeats}: " + ", ".join(f"{e} lone {rows[e]['lone_click'][-1]:.0f} ms, box {rows[e]['cold_3d_box'][-1]:.0f} ms"
                                                          for e in rows), flush=True)
        peak = {s.engine: s.peak_rss_mb() for s in servers}
        for s in servers:
            s.close()
    shutil.rmtree(work, ignore_errors=True)

    dec = local["decoder_ms"]["p50"]
    report = {"machine": {"cpus": os.cpu_count(), "bf16": cpu_has_bf16(), "torch_threads": torch.get_num_threads()},
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "in_process": local, "peak_rss_mb": peak,
              "rest": {e: {m: {"p50": p50(v), "p95": p95(v)} for m, v in r.items()} for e, r in rows.items()},
              "server_timings_p50_ms": {e: {m: {k: p50([t[k] for t in v]) for k in v[0]} for m, v in r.items()} for e, r in server_ms.items()},
              "agreement_dice": {m: {"mean": round(float(np.mean(v)), 4), "min": round(float(np.min(v)), 4)} for m, v in agreement.items()}}
    rest = report["rest"]
    report["targets"] = {
        "lone_click <= 2 x decoder": {e: round(rest[e]["lone_click"]["p50"] / dec, 2) for e in rest},
        "correction <= 1.3 x decoder": {e: round(rest[e]["correction"]["p50"] / dec, 2) for e in rest},
        "cold_3d_box <= 5000 ms": {e: rest[e]["cold_3d_box"]["p50"] for e in rest},
        "precompute >= 4 x torch": round(rest[fast]["precompute_slices_per_s"]["p50"] / rest["torch"]["precompute_slices_per_s"]["p50"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    enc = local["encoder_ms_per_slice"]
    print(f"\n| measure | torch | {fast} |\n|---|---|---|")
    print(f"| encoder, ms/slice p50 / p95 (in process) | {enc['torch']['p50']} / {enc['torch']['p95']} | {enc[fast]['p50']} / {enc[fast]['p95']} |")
    for m in rows["torch"]:
        print(f"| {m} p50 / p95 | {rest['torch'][m]['p50']} / {rest['torch'][m]['p95']} | {rest[fast][m]['p50']} / {rest[fast][m]['p95']} |")
    print(f"| server peak RSS, MB | {peak['torch']} | {peak[fast]} |")
    print(f"decoder pass {dec} ms (torch, in process); agreement (Dice {fast} vs torch): {report['agreement_dice']}")
    for e, r in report["server_timings_p50_ms"].items():
        print(f"server timings p50, {e}: " + "; ".join(f"{m} " + ", ".join(f"{k} {v}" for k, v in t.items()) for m, t in r.items()))
    print(f"targets: {json.dumps(report['targets'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
