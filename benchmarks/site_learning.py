#!/usr/bin/env python
"""Site simulation: does learning from a site's saved labels help that site, and never hurt it?

    .venv/bin/python benchmarks/site_learning.py [--site ct_chest] [--out DIR]

A site (tools/sites.py) is a set of labelled volumes of a modality or region the shipped
adapters never trained on. A real `monailabel start_server` runs on the site's studies with the
shipped adapters and the server's defaults (retrain after every saved label, 15-minute runs,
the publish gate). The volumes to annotate are annotated in order through REST as a user
would (MONAILabelClient, the Slicer client): the box protocol on each structure, then the silver
label is saved as the final label, which starts a retrain; the next volume waits for it. After
each save, every version the server has published is evaluated on the site's held-out volumes
(the unseen part) with the built-in protocol, the base model as the floor; at the end, so is
every run's result the gate kept back (was the gate, which sees only saved labels, right?).
Writes site_learning.json, a Markdown table and learning_curve.png into --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import nibabel as nib
import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))

import sites  # noqa: E402
from server_util import running_server  # noqa: E402

from adaptsam.engine.models import published_versions  # noqa: E402
from adaptsam.evaluation.protocol import Protocol, evaluate_volume, summarise  # noqa: E402
from adaptsam.evaluation.runner import Case, ModelSpec, base_spec, evaluate_models  # noqa: E402


def rest_segment(client, url):
    """The protocol's requests sent to the server as Slicer sends them; the label volume back."""

    def segment(image_path, image_id, label, client_id, foreground=(), background=(), roi=None, mode="volume",
                slice_index=None, reset=False):
        params = {"label": label, "client_id": client_id, "foreground": list(foreground), "background": list(background),
                  "mode": mode, "reset_state": reset, "result_extension": ".nii.gz"}
        if roi is not None:
            params["roi"] = roi
        if slice_index is not None:
            params["slice"] = slice_index
        path, _ = client.infer("adaptsam", image_id, params)
        return np.asanyarray(nib.load(path).dataobj)

    return segment


def train_tasks(url: str) -> List[Dict]:
    r = requests.get(f"{url}/train/", params={"all": "true"}, timeout=30)
    return r.json() if r.status_code == 200 else []


def wait_for_training(url: str, before: int, timeout: float = 3600) -> Dict:
    """The train stats once the run started after `before` tasks has ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        tasks = train_tasks(url)
        if len(tasks) > before and tasks[-1].get("status") in ("DONE", "ERROR", "STOPPED"):
            return requests.get(f"{url}/info/", timeout=30).json().get("train_stats", {}).get("adaptsam", {})
        time.sleep(5)
    raise TimeoutError("training did not finish")


def main(argv=None) -> int:
    from monailabel.client import MONAILabelClient

    ap = argparse.ArgumentParser()
    ap.add_argument("--site", default="ct_chest")
    ap.add_argument("--weights", default=str(REPO / "model_weights"), help="shipped adapters to start from")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    root = sites.build()
    meta = sites.load_site(root, args.site)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"site_{args.site}")
    work = Path(tempfile.mkdtemp(prefix=f"site-{args.site}-"))
    studies, weights = work / "studies", work / "weights"
    studies.mkdir()
    weights.mkdir()
    for image_id in meta["annotate"] + meta["test"]:
        shutil.copy2(root / args.site / "studies" / f"{image_id}.nii.gz", studies)
    for _, path in published_versions(Path(args.weights), "2d", "litemedsam")[-1:]:
        shutil.copy2(path, weights)
    (work / "empty").mkdir()
    reference = lambda i: root / args.site / "reference" / f"{i}.nii.gz"
    names = lambda i: {int(v): n for v, n in json.loads(reference(i).with_suffix("").with_suffix(".json").read_text())["labels"].items()}
    test = [Case(i, str(studies / f"{i}.nii.gz"), str(reference(i)), names(i)) for i in meta["test"]]
    protocol = Protocol()
    evaluated: Dict[str, Dict] = {}  # version name -> summary on the test volumes

    def evaluate_new_versions():
        specs = {} if "base" in evaluated else {"base": base_spec()}
        for v, _ in published_versions(weights, "2d", "litemedsam"):
            if f"v{v}" not in evaluated:
                specs[f"v{v}"] = ModelSpec("2d", str(weights), str(v))
        if specs:
            report = evaluate_models(specs, test, protocol, log=print)
            evaluated.update({n: e["summary"] for n, e in report["models"].items()})

    curve: List[Dict] = []
    t_start = time.time()
    with running_server(studies, conf={"weights_dir": str(weights), "engine": "auto"}, log=work / "server.log", timeout=600) as url:
        client = MONAILabelClient(url, tmpdir=tempfile.mkdtemp(prefix="site-client-"), client_id="radiologist")
        evaluate_new_versions()
        served = published_versions(weights, "2d", "litemedsam")[-1][0]
        curve.append({"saved": 0, "served": f"v{served}", "test": evaluated[f"v{served}"]})
        segment = rest_segment(client, url)
        for n, image_id in enumerate(meta["annotate"], 1):
            t0 = time.time()
            label = np.rint(np.asanyarray(nib.load(str(reference(image_id))).dataobj)).astype(np.int32)
            spacing = tuple(float(s) for s in nib.load(str(reference(image_id))).header.get_zooms()[:3])
            rows = evaluate_volume(segment, str(studies / f"{image_id}.nii.gz"), image_id, label, spacing, names(image_id), protocol, print)
            before = len(train_tasks(url))
            saved = client.save_label(image_id, str(reference(image_id)),
                                      params={"label_info": [{"name": s, "idx": v} for v, s in names(image_id).items()]})
            stats = wait_for_training(url, before) if str(saved.get("auto_train", "")).startswith("started") else {}
            evaluate_new_versions()
            versions = published_versions(weights, "2d", "litemedsam")
            served = versions[-1][0]
            point = {"saved": n, "image": image_id, "annotated_with": summarise(rows, protocol), "save": saved,
                     "gate": stats.get("gate"), "candidate": stats.get("candidate"), "train_seconds": stats.get("total_time"), "served": f"v{served}",
                     "test": evaluated[f"v{served}"], "seconds": round(time.time() - t0, 1)}
            curve.append(point)
            print(json.dumps({k: point[k] for k in ("saved", "served", "train_seconds")}), point["gate"] and point["gate"].get("reason"))
    candidates = evaluate_candidates(weights, test, protocol)
    result = {"site": args.site, "meta": meta, "curve": curve, "versions": evaluated, "candidates": candidates,
              "seconds": round(time.time() - t_start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "site_learning.json").write_text(json.dumps(result, indent=1))
    write_table_and_plot(result, out)
    shutil.copy2(work / "server.log", out / "server.log")
    return 0


def evaluate_candidates(weights: Path, test: List[Case], protocol: Protocol) -> Dict[str, Dict]:
    """Every run's result the gate kept back, measured on the unseen volumes after the fact: was
    the gate, which sees only the saved labels, right to keep it back?"""
    found = sorted((weights / "candidates").glob("*_c*.pt"), key=lambda p: int(p.stem.rsplit("_c", 1)[1]))
    specs = {f"c{p.stem.rsplit('_c', 1)[1]}": ModelSpec("2d", str(p.parent), str(p)) for p in found}
    if not specs:
        return {}
    report = evaluate_models(specs, test, protocol, log=print)
    return {name: entry["summary"] for name, entry in report["models"].items()}


def kept_back(result: Dict):
    """(candidate name, curve point) of each run whose result the gate did not publish."""
    for p in result["curve"]:
        name = (p.get("candidate") or "").rsplit("_", 1)[-1]
        if p.get("gate") and not p["gate"].get("publish") and name in result.get("candidates", {}):
            yield name, p


def write_table_and_plot(result: Dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["versions"]["base"]
    rows = ["| saved labels | served | box | 1 click | 3 clicks | clicks to 0.85 | gate |", "|---|---|---|---|---|---|---|"]
    for p in result["curve"]:
        t = p["test"]
        gate = (p.get("gate") or {}).get("reason", "") if p["saved"] else "shipped adapter"
        rows.append(f"| {p['saved']} | {p['served']} | {t['box']:.3f} | {t['click1']:.3f} | {t['click3']:.3f} | "
                    f"{t['clicks_to_85']} ({t['clicks_to_85_reached']}) | {gate} |")
    rows.append(f"| base model | - | {base['box']:.3f} | {base['click1']:.3f} | {base['click3']:.3f} | "
                f"{base['clicks_to_85']} ({base['clicks_to_85_reached']}) | |")
    for name, p in kept_back(result):
        t = result["candidates"][name]
        rows.append(f"| {p['saved']} | {name} (kept back) | {t['box']:.3f} | {t['click1']:.3f} | {t['click3']:.3f} | "
                    f"{t['clicks_to_85']} ({t['clicks_to_85_reached']}) | not served |")
    (out / "site_learning.md").write_text("\n".join(rows) + "\n")
    x = [p["saved"] for p in result["curve"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("click1", "clicks_to_85", "box"), ("1-click Dice", "clicks to Dice 0.85", "box Dice")):
        ax.plot(x, [p["test"][key] for p in result["curve"]], marker="o", label="served version")
        kept = [(p["saved"], result["candidates"][name][key]) for name, p in kept_back(result)]
        if kept:
            ax.plot(*zip(*kept), marker="x", linestyle=":", label="run's result (kept back)")
        ax.axhline(base[key], color="grey", linestyle="--", label="base model")
        ax.set(title=f"{title} ({result['site']}, unseen volumes)", xlabel="saved labels")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
