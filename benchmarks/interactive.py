#!/usr/bin/env python
"""Interactive latency benchmark on the sample CT `ct_dicom` (one run, by hand).

    .venv/bin/python benchmarks/interactive.py [--repeats N] [--out FILE]

Measures, on the liver of ct_dicom (512x512x20, prompts from the silver reference label):

  warm_click      end to end through REST: a real `monailabel start_server` on loopback, driven by
                  `monailabel.client.MONAILabelClient` (what the Slicer plugin uses); mode "slice",
                  box (roi) + one positive click on the largest liver slice, embedding already cached
  decoder         in process: SlicePredictor.predict on the cached (fp16) embedding, same prompts
  first_click     end to end through REST on a volume the server has never encoded (a fresh upload
                  of ct_dicom under a new id before each repeat, background encoder idle)
  encoder_pass    in process: SlicePredictor.embed of one slice
  volume_encode   in process: the background SliceEncoder of a fresh Runtime encoding all 20 slices
  propagation     end to end through REST: mode "volume", roi = the liver's 3D bounding box, warm
                  cache; with the Dice of the returned volume against the reference liver
  reencode        in process: what re-encoding on every click costs (stock MONAI Label SAM2 task):
                  model_input + embed + predict per click, no cache

and the three target ratios (warm/decoder <= 1.5, reencode/warm >= 8, first/encoder <= 1.3).
The two sides of a ratio are timed interleaved (a REST click, then a decoder pass; a first click,
then an encoder pass): on shared cores the machine's speed drifts by tens of percent over
minutes, and interleaving makes both sides see the same drift.
Results: a table on stdout and JSON (default benchmarks/results/interactive.json).
See benchmarks/README.md for what each number means.

Torch threads are left at torch's default in both processes (the server sets none either), so
the in-process numbers use the same thread count the server does; the JSON records it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # server_util: how tests start a real server
sys.path.insert(0, str(REPO / "tools"))  # samples: the sample studies
if str(REPO / "lib") not in sys.path:
    sys.path.insert(0, str(REPO / "lib"))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

import samples  # noqa: E402
from adaptsam.engine.allocator import keep_freed_memory  # noqa: E402
from adaptsam.engine.interactive import Runtime  # noqa: E402
from adaptsam.engine.metrics import bounding_box, dice, largest_slice  # noqa: E402
from adaptsam.engine.models import ModelHandle  # noqa: E402
from adaptsam.engine.predictor import SlicePredictor  # noqa: E402
from adaptsam.engine.preprocess import in_plane_axes, take_slice  # noqa: E402
from adaptsam.engine.volume import Volume  # noqa: E402

IMAGE = "ct_dicom"
ORGAN = "liver"
AXIS = 2  # axial
MODEL = "adaptsam"  # the 2D-adapter task; with no published adapter it serves the base model
CACHE_BYTES = 2 << 30  # the server's default embedding cache budget

DEFAULT_COUNTS = {
    "warm_click": 20,
    "decoder": 20,
    "first_click": 8,
    "encoder_pass": 10,
    "volume_encode": 2,
    "propagation": 3,
    "reencode": 10,
}
TARGETS = {
    # name: (numerator, denominator, comparison, bound)
    "warm_click / decoder": ("warm_click", "decoder", "<=", 1.5),
    "reencode / warm_click": ("reencode", "warm_click", ">=", 8.0),
    "first_click / encoder_pass": ("first_click", "encoder_pass", "<=", 1.3),
}


# ---------------------------------------------------------------------------------- helpers


def now() -> float:
    return time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(samples_ms: Sequence[float], **extra) -> Dict:
    a = np.asarray(samples_ms, dtype=float)
    out = {
        "n": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p95_ms": round(float(np.percentile(a, 95)), 2),
        "mean_ms": round(float(a.mean()), 2),
        "min_ms": round(float(a.min()), 2),
        "max_ms": round(float(a.max()), 2),
        "samples_ms": [round(float(x), 2) for x in a],
    }
    out.update(extra)
    return out


def server_timing_p50(results: List[Dict]) -> Dict[str, float]:
    """p50 of each `timings_ms` entry the server reported (load/encode/decode/propagate/total)."""
    keys = sorted({k for r in results for k in r.get("timings_ms", {})})
    return {k: round(float(np.median([r["timings_ms"][k] for r in results if k in r.get("timings_ms", {})])), 1) for k in keys}


def plane_to_voxel(axis: int, s: int, r: int, c: int) -> List[int]:
    row_axis, col_axis = in_plane_axes(axis)
    v = [0, 0, 0]
    v[axis], v[row_axis], v[col_axis] = int(s), int(r), int(c)
    return v


def machine_facts(device: torch.device) -> Dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    facts = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": cpu_model,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import monailabel

        facts["monailabel_version"] = monailabel.__version__
    except Exception:  # pragma: no cover - only informational
        pass
    return facts


# ------------------------------------------------------------------------------- the case


@dataclass
class Case:
    """ct_dicom's liver: the prompted slice, its box, positive clicks inside it, the 3D roi."""

    path: Path
    volume: Volume
    truth: np.ndarray  # (I, J, K) bool, the reference liver
    k: int  # the largest liver slice (axial)
    box: Tuple[int, int, int, int]  # (r0, c0, r1, c1) on slice k, inclusive
    clicks: List[Tuple[int, int]]  # (row, col) positive clicks inside the liver on slice k
    roi3d: List[int]  # [i0, i1, j0, j1, k0, k1] of the whole liver

    @property
    def truth_plane(self) -> np.ndarray:
        return take_slice(self.truth, AXIS, self.k)

    def slice_roi(self) -> List[int]:
        """The box as Slicer sends it: [i0, i1, j0, j1, k, k]."""
        r0, c0, r1, c1 = self.box
        a = plane_to_voxel(AXIS, self.k, r0, c0)
        b = plane_to_voxel(AXIS, self.k, r1, c1)
        return [a[0], b[0], a[1], b[1], a[2], b[2]]

    def click_voxel(self, i: int) -> List[int]:
        r, c = self.clicks[i % len(self.clicks)]
        return plane_to_voxel(AXIS, self.k, r, c)

    def click_plane(self, i: int) -> Tuple[int, int]:
        return self.clicks[i % len(self.clicks)]


def load_case(samples_dir: Path, n_clicks: int = 16) -> Case:
    from scipy.ndimage import distance_transform_edt

    path = samples.image_path(samples_dir, IMAGE)
    vol = Volume.load(path)
    truth = samples.structure_mask(samples_dir, IMAGE, ORGAN)
    k = largest_slice(truth, AXIS)
    plane = take_slice(truth, AXIS, k)
    box = bounding_box(plane)
    # Clicks well inside the organ (at least half the deepest point's distance from the border),
    # spread by a fixed seed so every run prompts the same way.
    depth = distance_transform_edt(plane)
    rows, cols = np.nonzero(depth >= 0.5 * depth.max())
    rng = np.random.default_rng(0)
    pick = rng.choice(rows.size, size=min(n_clicks, rows.size), replace=False)
    clicks = [(int(rows[p]), int(cols[p])) for p in pick]
    b3 = bounding_box(truth)  # (i0, j0, k0, i1, j1, k1)
    roi3d = [b3[0], b3[3], b3[1], b3[4], b3[2], b3[5]]
    return Case(path, vol, truth, k, box, clicks, roi3d)


# ------------------------------------------------------------------------------- REST part


def wait_encoder_idle(url: str, timeout: float = 900.0) -> Dict:
    """Poll GET /adaptsam/progress until every background job is "done"."""
    deadline = time.time() + timeout
    while True:
        status = requests.get(url + "/adaptsam/progress", timeout=30).json()
        jobs = status.get("encoding", [])
        if all(j.get("state") == "done" for j in jobs):
            return status
        if time.time() > deadline:
            raise TimeoutError(f"background encoding still running after {timeout:.0f} s: {jobs}")
        time.sleep(0.2)


class RestClient:
    """MONAILabelClient with a private result folder (the client names result files after the
    server's temp file; in a shared /tmp the server deletes that very path after answering)."""

    def __init__(self, url: str, client_id: str, result_extension: Optional[str]):
        from monailabel.client import MONAILabelClient

        self.tmpdir = tempfile.mkdtemp(prefix=f"adaptsam-bench-{client_id}-")
        self.client = MONAILabelClient(url, tmpdir=self.tmpdir, client_id=client_id)
        self.result_extension = result_extension

    def infer(self, image_id: str, params: Dict) -> Tuple[float, Optional[str], Dict]:
        """(wall ms around client.infer, result file, result JSON)."""
        params = dict(params)
        if self.result_extension:
            params["result_extension"] = self.result_extension
        t = now()
        path, result = self.client.infer(MODEL, image_id, params)
        ms = (now() - t) * 1000.0
        if isinstance(result, str):
            result = json.loads(result)
        return ms, path, result

    def close(self) -> None:
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def read_label(path: Optional[str]) -> np.ndarray:
    if not path:
        raise RuntimeError("the server returned no label file")
    arr = Volume.load(path, modality="MR").array > 0
    os.unlink(path)
    return arr


def click_params(case: Case, i: int, mode: str = "slice") -> Dict:
    return {"label": ORGAN, "mode": mode, "roi": case.slice_roi(), "foreground": [case.click_voxel(i)], "background": []}


def run_rest(case: Case, local: Local, samples_dir: Path, studies_root: Path, counts: Dict[str, int], conf: Dict[str, str],
             log: Path, result_extension: Optional[str]) -> Tuple[Dict, Dict]:
    from server_util import copy_studies, running_server

    studies = copy_studies(samples_dir, studies_root, image_ids={IMAGE})
    results: Dict[str, Dict] = {}
    info: Dict = {}
    t_start = now()
    with running_server(studies, conf=conf, log=log) as url:
        info["server_start_s"] = round(now() - t_start, 1)
        warm = RestClient(url, "bench-warm", result_extension)
        vol_client = RestClient(url, "bench-volume", result_extension)
        first = RestClient(url, "bench-first", result_extension)
        try:
            # -- warm-up: load the model, encode the prompted slice, let the background encoder
            # finish the volume, then a few untimed clicks and one propagation.
            t = now()
            _, path, res = warm.infer(IMAGE, click_params(case, 0))
            read_label(path)
            info["first_request_cold_server_ms"] = round((now() - t) * 1000.0, 1)
            info["served_model"] = res.get("model")
            info["adapter_version"] = res.get("adapter_version")
            status = wait_encoder_idle(url)
            info["server_device"] = status.get("device")
            info["backbone"] = status.get("backbone")
            for i in range(3):
                _, path, _ = warm.infer(IMAGE, click_params(case, i + 1))
                read_label(path)
            _, path, _ = vol_client.infer(IMAGE, {"label": ORGAN, "mode": "volume", "roi": case.roi3d})
            read_label(path)
            wait_encoder_idle(url)

            # -- (1) warm click, each followed by (2) the decoder alone with the same prompts
            ms, res_all, dices, not_cached, dec = [], [], [], 0, []
            for i in range(max(counts["warm_click"], counts["decoder"])):
                if i < counts["warm_click"]:
                    t_ms, path, res = warm.infer(IMAGE, click_params(case, i))
                    ms.append(t_ms)
                    res_all.append(res)
                    not_cached += not res.get("embedding_cached", False)
                    dices.append(dice(take_slice(read_label(path), AXIS, case.k), case.truth_plane))
                if i < counts["decoder"]:
                    dec.append(local.decode(i))
            results["warm_click"] = summary(
                ms, server_timings_p50_ms=server_timing_p50(res_all), slice_dice_mean=round(float(np.mean(dices)), 4),
                not_cached=not_cached,
            )
            results["decoder"] = summary([m for m, _ in dec], slice_dice_mean=round(float(np.mean([d for _, d in dec])), 4),
                                         interleaved_with="warm_click")

            # -- (6) propagation over the liver, warm cache
            ms, res_all, dices, n_slices = [], [], [], []
            wait_encoder_idle(url)
            for _ in range(counts["propagation"]):
                t_ms, path, res = vol_client.infer(IMAGE, {"label": ORGAN, "mode": "volume", "roi": case.roi3d})
                ms.append(t_ms)
                res_all.append(res)
                dices.append(dice(read_label(path), case.truth))
                n_slices.append(len(res.get("slice_iou", {})))
            results["propagation"] = summary(
                ms, server_timings_p50_ms=server_timing_p50(res_all), volume_dice=round(float(np.mean(dices)), 4),
                volume_dice_runs=[round(d, 4) for d in dices], slices_segmented=n_slices,
                liver_slices=int(case.truth.any(axis=(0, 1)).sum()), roi=case.roi3d,
            )

            # -- (3) first click on a never-encoded volume: a fresh upload under a new id each time
            # each followed, once the server is idle again, by (4) one in-process encoder pass
            ms, res_all, cached, enc = [], [], 0, []
            for i in range(max(counts["first_click"], counts["encoder_pass"])):
                if i < counts["first_click"]:
                    wait_encoder_idle(url)  # the previous copy's background encoding must not compete
                    image_id = f"bench_{i}"
                    first.client.upload_image(str(case.path), image_id=image_id)
                    t_ms, path, res = first.infer(image_id, click_params(case, i))
                    ms.append(t_ms)
                    res_all.append(res)
                    cached += bool(res.get("embedding_cached", True))
                    read_label(path)
                    wait_encoder_idle(url)
                if i < counts["encoder_pass"]:
                    enc.append(local.encode())
            results["first_click"] = summary(ms, server_timings_p50_ms=server_timing_p50(res_all), embedding_was_cached=cached)
            results["encoder_pass"] = summary(enc, interleaved_with="first_click")
        finally:
            for c in (warm, vol_client, first):
                c.close()
    return results, info


# ---------------------------------------------------------------------------- in-process part


class Local:
    """The in-process side of each ratio: the same model and prompts, no server. It is built
    before the REST part so the two sides of a ratio can be timed interleaved - one REST click,
    one decoder pass, and so on - and machine-speed drift (large on shared cores) hits both."""

    def __init__(self, case: Case, backbone: str, weights_dir: Path, device: torch.device):
        self.case, self.device = case, device
        handle = ModelHandle("2d", backbone, weights_dir, str(device))
        self.serving = serving = handle.current()
        self.info = {"served_model": serving.key, "adapter_version": serving.version}
        vol = case.volume
        self.window = vol.window(ORGAN)
        # A Runtime with nothing scheduled: its encoder computes and caches the prompted slice
        # exactly as a request does (fp16 on the CPU), and its background worker stays idle.
        runtime = Runtime(CACHE_BYTES)
        key = f"{IMAGE}@{vol.content_hash()}"
        runtime.encoder.embedding(serving, vol, key, AXIS, case.k, self.window)
        self.emb, cached = runtime.encoder.embedding(serving, vol, key, AXIS, case.k, self.window)
        assert cached, "the embedding should be cached by now"
        self.geom = runtime.encoder.geometry(serving, vol, AXIS)
        self.predictor = SlicePredictor(serving.model, device)
        self.plane = take_slice(vol.normalized(self.window), AXIS, case.k)
        self.x = self.predictor.model_input(self.plane, self.geom)[None]
        for i in range(3):  # warm-up
            self.predict(self.emb, i)
        self.predictor.embed(self.x)
        sync(device)

    def predict(self, e, i):
        return self.predictor.predict(e, self.geom, box=self.case.box, foreground=[self.case.click_plane(i)], multimask=False)

    def decode(self, i) -> Tuple[float, float]:
        """(ms, slice Dice) of one decoder pass on the cached embedding."""
        t = now()
        pred = self.predict(self.emb, i)
        ms = (now() - t) * 1000.0
        return ms, dice(pred.mask, self.case.truth_plane)

    def encode(self) -> float:
        t = now()
        self.predictor.embed(self.x)
        sync(self.device)
        return (now() - t) * 1000.0


def run_in_process(local: Local, counts: Dict[str, int], done: Dict[str, Dict]) -> Dict:
    """The in-process measures not already taken interleaved with the REST ones."""
    case, serving, predictor, geom, plane = local.case, local.serving, local.predictor, local.geom, local.plane
    vol, window, device = case.volume, local.window, local.device
    predict = local.predict
    results: Dict[str, Dict] = {}

    # -- (2) decoder alone (interleaved with the warm clicks when the REST part ran)
    if "decoder" not in done:
        runs = [local.decode(i) for i in range(counts["decoder"])]
        results["decoder"] = summary([m for m, _ in runs], slice_dice_mean=round(float(np.mean([d for _, d in runs])), 4))

    # -- (4) one encoder pass (interleaved with the first clicks when the REST part ran)
    if "encoder_pass" not in done:
        results["encoder_pass"] = summary([local.encode() for _ in range(counts["encoder_pass"])])

    # -- (7) re-encode on every click (no cache)
    ms = []
    for i in range(counts["reencode"]):
        t = now()
        e = predictor.embed(predictor.model_input(plane, geom)[None])
        predict(e, i)
        ms.append((now() - t) * 1000.0)
    results["reencode"] = summary(ms)

    # -- (5) whole-volume background encoding: fresh Runtime and Volume each run
    depth = vol.shape[AXIS]
    ms = []
    for _ in range(counts["volume_encode"]):
        rt = Runtime(CACHE_BYTES)
        fresh = Volume.load(case.path)
        key = f"{IMAGE}@{fresh.content_hash()}"
        t = now()
        rt.encoder.schedule(serving, fresh, key, AXIS, window, case.k)
        # Timed by polling the cache (5 ms) rather than wait_idle (which polls every 100 ms);
        # wait_idle must then agree that nothing is left.
        while rt.cache.count_where(lambda kk: kk.image == key and kk.axis == AXIS) < depth:
            time.sleep(0.005)
        sync(device)
        ms.append((now() - t) * 1000.0)
        if not rt.encoder.wait_idle(600):
            raise RuntimeError("background encoder did not become idle")
        del rt, fresh
    whole = np.asarray(ms)
    results["volume_encode"] = summary(
        ms, slices=depth, slices_per_s_p50=round(float(depth / (np.median(whole) / 1000.0)), 2),
        ms_per_slice_p50=round(float(np.median(whole) / depth), 2),
    )
    return results


# --------------------------------------------------------------------------------- report


def ratios(results: Dict) -> Dict:
    out = {}
    for name, (num, den, op, bound) in TARGETS.items():
        if num not in results or den not in results:
            continue
        value = results[num]["p50_ms"] / results[den]["p50_ms"]
        met = value <= bound if op == "<=" else value >= bound
        out[name] = {"value": round(value, 3), "target": f"{op} {bound}", "met": bool(met)}
    return out


LABELS = {
    "warm_click": "(1) warm click, REST end to end",
    "decoder": "(2) decoder alone, cached embedding",
    "first_click": "(3) first click, unseen volume, REST",
    "encoder_pass": "(4) one encoder pass (1 slice)",
    "volume_encode": "(5) whole-volume background encode",
    "propagation": "(6) 3D propagation over the liver, REST",
    "reencode": "(7) re-encode every click (embed+predict)",
}


def print_report(report: Dict) -> None:
    res = report["results"]
    print()
    print(f"{'measure':44s} {'n':>3s} {'p50 ms':>10s} {'p95 ms':>10s}  notes")
    print("-" * 96)
    for name in LABELS:
        if name not in res:
            continue
        r = res[name]
        note = ""
        if name == "volume_encode":
            note = f"{r['slices_per_s_p50']} slices/s, {r['ms_per_slice_p50']} ms/slice ({r['slices']} slices)"
        elif name == "propagation":
            note = f"volume Dice {r['volume_dice']}, {r['slices_segmented']} slices"
        elif name in ("warm_click", "decoder"):
            note = f"slice Dice {r['slice_dice_mean']}"
        if "server_timings_p50_ms" in r:
            note += ("; " if note else "") + "server " + ", ".join(f"{k} {v}" for k, v in r["server_timings_p50_ms"].items())
        print(f"{LABELS[name]:44s} {r['n']:3d} {r['p50_ms']:10.1f} {r['p95_ms']:10.1f}  {note}")
    print()
    for name, r in report["ratios"].items():
        print(f"{name:30s} {r['value']:8.3f}   target {r['target']:7s} {'MET' if r['met'] else 'NOT MET'}")
    warnings = report.get("warnings") or []
    for w in warnings:
        print(f"warning: {w}")
    m = report["machine"]
    print(f"\n{m['cpu_count']} CPUs ({m['cpus_usable']} usable, {m['cpu_model']}), torch {m['torch_version']} "
          f"with {m['torch_threads']} threads, device {m['device']}; load average before/after "
          f"{report['load_average']['before']} / {report['load_average']['after']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, help="use this many repeats for every measure (default: per measure, "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_COUNTS.items()) + ")")
    for name, n in DEFAULT_COUNTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name, help=f"repeats of {name} (default {n})")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "interactive.json")
    p.add_argument("--samples", type=Path, default=None, help="samples dir (default $ADAPTSAM_SAMPLES or .data/samples)")
    p.add_argument("--backbone", default="litemedsam")
    p.add_argument("--weights-dir", type=Path, default=REPO / "model_weights",
                   help="adapters/checkpoints folder, for the server and the in-process model alike")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    p.add_argument("--result-extension", default=".nrrd",
                   help="label format asked of the server (default .nrrd, what the Slicer plugin always sends)")
    p.add_argument("--skip-rest", action="store_true", help="in-process measures only (no server)")
    args = p.parse_args(argv)
    keep_freed_memory()  # before the model loads, as the server does (engine/allocator.py)

    counts = {k: (getattr(args, k) or args.repeats or v) for k, v in DEFAULT_COUNTS.items()}
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    samples_dir = Path(args.samples) if args.samples else samples.default_samples_dir()
    samples.fetch(samples_dir)  # no-op (and no network) when the samples are complete
    args.out.parent.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    t_all = now()

    case = load_case(samples_dir)
    print(f"{IMAGE}: shape {case.volume.shape}, {ORGAN} largest on slice {case.k}, box (r0,c0,r1,c1) {case.box}, "
          f"3D roi {case.roi3d}, {len(case.clicks)} click positions; repeats {counts}", flush=True)

    results: Dict[str, Dict] = {}
    rest_info: Dict = {}
    conf = {"backbone": args.backbone, "weights_dir": str(Path(args.weights_dir).resolve()),
            "device": "cuda" if device.type == "cuda" else "cpu"}
    workdir = Path(tempfile.mkdtemp(prefix="adaptsam-bench-"))
    log = args.out.with_suffix(".server.log")
    try:
        local = Local(case, args.backbone, Path(args.weights_dir), device)
        local_info = local.info
        if not args.skip_rest:
            print("REST measures (server on loopback), interleaved with their in-process counterparts ...", flush=True)
            rest, rest_info = run_rest(case, local, samples_dir, workdir / "studies", counts, conf, log, args.result_extension)
            results.update(rest)
        print("in-process measures ...", flush=True)
        results.update(run_in_process(local, counts, results))
    except Exception:
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-40:]
            print("---- server log tail ----\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    warnings = []
    if results.get("warm_click", {}).get("not_cached"):
        warnings.append(f"{results['warm_click']['not_cached']} warm clicks found no cached embedding")
    if results.get("first_click", {}).get("embedding_was_cached"):
        warnings.append(f"{results['first_click']['embedding_was_cached']} first clicks hit a cached embedding")
    if rest_info.get("served_model") and rest_info["served_model"] != local_info["served_model"]:
        warnings.append(f"server served {rest_info['served_model']}, in-process model is {local_info['served_model']}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load_before[0] > 0.5 * cpus:
        warnings.append(f"1-minute load average was {load_before[0]} on {cpus} CPUs before the run: other processes "
                        "were using the cores, so these timings are noisy")
    if "torchvision" in sys.modules or "timm" in sys.modules:
        warnings.append("torchvision/timm got imported")

    report = {
        "benchmark": "interactive",
        "image": IMAGE,
        "organ": ORGAN,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(now() - t_all, 1),
        "repeats": counts,
        "machine": machine_facts(device),
        "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "prompts": {"slice": case.k, "box_r0c0r1c1": list(case.box), "roi_slice": case.slice_roi(),
                    "roi_3d": case.roi3d, "clicks_ijk": [case.click_voxel(i) for i in range(len(case.clicks))]},
        "server": rest_info,
        "in_process": local_info,
        "results": results,
        "ratios": ratios(results),
        "warnings": warnings,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"\nwrote {args.out} ({report['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
