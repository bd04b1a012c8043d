#!/usr/bin/env python
"""The shipped adapters against the base model on every modality and region the project can
measure, with the built-in evaluation (lib/adaptsam/evaluation/).

    .venv/bin/python benchmarks/modalities.py [--models base,2d,3d] [--sets ct_abdomen,...] [--out DIR]

Sets (silver labels; see tools/samples.py and tools/sites.py):
  ct_abdomen   ct_dicom, the 1 mm upper-abdominal CT no adapter trained on
  ct_chest     the held-out slabs of the ct_chest site (CT angiography: heart, aorta, ...)
  mr_abdomen   mr_3mm: the shipped adapters TRAINED on it (reported, not a held-out measure)
  mr_brain     the held-out slabs of the mr_brain site (MNI152 T1: grey and white matter)
Each set is written as a MONAI Label studies folder with the silver labels saved as `final`,
exactly what `python -m adaptsam.evaluate --studies <folder>` reads; results per set and a
table of all in --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import samples  # noqa: E402
import sites  # noqa: E402

from adaptsam.evaluate import parse_models  # noqa: E402
from adaptsam.evaluation.protocol import Protocol  # noqa: E402
from adaptsam.evaluation.report import table, write  # noqa: E402
from adaptsam.evaluation.runner import evaluate_models  # noqa: E402
from adaptsam.server.datalist import labelled_cases, open_datastore  # noqa: E402


def studies_for(name: str, work: Path) -> Path:
    """A studies folder for set `name` with its silver labels saved as final labels."""
    from monailabel.datastore.local import LocalDatastore

    sample_root = samples.default_samples_dir()
    site_root = sites.build()
    if name == "ct_abdomen":
        items = [("ct_dicom", samples.image_path(sample_root, "ct_dicom"), samples.reference_path(sample_root, "ct_dicom"))]
    elif name == "mr_abdomen":
        items = [("mr_3mm", samples.image_path(sample_root, "mr_3mm"), samples.reference_path(sample_root, "mr_3mm"))]
    else:
        meta = sites.load_site(site_root, name)
        items = [(i, site_root / name / "studies" / f"{i}.nii.gz", site_root / name / "reference" / f"{i}.nii.gz") for i in meta["test"]]
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for image_id, image, _ in items:
        shutil.copy2(image, folder / f"{image_id}.nii.gz")
    ds = LocalDatastore(str(folder), auto_reload=False)
    for image_id, _, label in items:
        names = json.loads(label.with_suffix("").with_suffix(".json").read_text())["labels"]
        ds.save_label(image_id, str(label), "final", {"label_info": [{"name": n, "idx": int(v)} for v, n in names.items()]})
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="base,2d,3d")
    ap.add_argument("--weights", default=str(REPO / "model_weights"))
    ap.add_argument("--sets", default="ct_abdomen,ct_chest,mr_abdomen,mr_brain")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "modalities"))
    args = ap.parse_args(argv)
    samples.fetch(samples.default_samples_dir())
    out = Path(args.out)
    summary = {}
    for name in args.sets.split(","):
        t0 = time.time()
        folder = studies_for(name, out / "studies")
        report = evaluate_models(parse_models(args.models, args.weights, "litemedsam"), labelled_cases(open_datastore(str(folder))),
                                 Protocol(), log=print)
        write(report, out / name)
        summary[name] = {m: e["summary"] for m, e in report["models"].items()}
        print(f"== {name} ({time.time() - t0:.0f} s)\n{table(report)}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
