"""What a single-slice box costs on a DICOMweb study: the first request on a series (download
from the PACS, conversion, one encoder pass, decoder), a box on another slice of it (encoder
pass), and the same box again (cached embedding). Orthanc and the server as `make pacs` runs
them, on fresh ports and folders; each step timed through MONAI Label's client, `runs` times
on fresh copies of the series (p50 / max).

    .venv/bin/python benchmarks/pacs.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))

import pacs  # noqa: E402
import samples  # noqa: E402
from server_util import free_port, running_server  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    samples_dir = samples.default_samples_dir()
    samples.fetch(samples_dir)
    liver = samples.structure_mask(samples_dir, "ct_dicom", "liver")
    root = Path(tempfile.mkdtemp(prefix="adaptsam-pacs-bench-"))
    port = free_port()
    orthanc = pacs.start_orthanc(root / "orthanc", port)
    dicomweb = f"http://127.0.0.1:{port}/dicom-web"
    files = list(samples.dicom_dir(samples_dir, "ct_dicom").iterdir())
    series = [pacs.store(dicomweb, pacs.prepared(files, f"bench{i}"))["series"] for i in range(args.runs)]
    times = {"first request (download + convert + encode + decode)": [], "another slice (encode + decode)": [],
             "same slice again (cached)": []}
    try:
        with running_server(dicomweb, conf={"auto_train_every": "0"}, log=root / "server.log",
                            env=pacs.server_env(dicomweb, root / "cache")) as url:
            for uid in series:
                for (name, k) in zip(times, (10, 12, 12)):
                    ii, jj = liver[:, :, k].nonzero()
                    roi = [int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), k, k]
                    t = time.perf_counter()
                    r = requests.post(f"{url}/infer/adaptsam", params={"image": uid, "output": "json"},
                                      data={"params": json.dumps({"roi": roi, "label": "liver", "mode": "slice"})}, timeout=600)
                    times[name].append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200, r.text
    finally:
        pacs.stop(orthanc)
    print(f"{os.cpu_count()} CPUs; {args.runs} series; ms per request, p50 / max")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.0f} | {max(values):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
