"""Labelled "sites" for the site-learning benchmark and the cross-modality evaluation.

    python tools/sites.py build [DIR]        (default .data/sites)

A site is a set of labelled volumes of one modality and body region that the shipped adapters
never trained on (they trained on ct_3mm and mr_3mm, upper abdomen):

``ct_chest``
    The CT angiography of the ``totalsegmentator==2.18.0`` sdist (``aorta_report/example_ct``,
    233x167x191 at 1.5 mm, chest and upper abdomen) with TotalSegmentator's silver masks of the
    heart, aorta, pulmonary artery, brachiocephalic trunk and T12 vertebra, placed by their
    affines.
``mr_brain``
    The MNI ICBM152 2009 T1 template shipped in nilearn's wheel (``nilearn==0.14.1``, 1 mm),
    every second axial slice (2 mm), with grey and white matter from its probability maps
    (the larger one where it is at least one half).

Each site's volume is cut along z into consecutive slabs; each slab is one "volume" of the site
(a series a clinician would annotate). Slabs of one scan are not independent patients: they
show different anatomy levels of one person, the closest to a site these registries offer.
``site.json`` names the slabs to annotate, in order, and the slabs held out for testing.

Layout: ``DIR/<site>/studies/<id>.nii.gz`` (images only: a MONAI Label datastore),
``DIR/<site>/reference/<id>.nii.gz`` + ``.json`` (silver labels and names), ``DIR/<site>/site.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import nibabel as nib
import numpy as np

import sample_files as files
import samples

logger = logging.getLogger(__name__)

NILEARN_VERSION = "0.14.1"
NILEARN_WHEEL = f"nilearn-{NILEARN_VERSION}-py3-none-any.whl"
NILEARN_SHA256 = "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"
MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
CTA = samples.REFERENCE_FILES + "aorta_report/example_ct.nii.gz"
CTA_MASKS = {  # value -> (name, file in the sdist)
    1: ("heart", samples.REFERENCE_FILES + "pulmonary_report/models/heart.nii.gz"),
    2: ("aorta", samples.REFERENCE_FILES + "aorta_report/test_result/models/aorta.nii.gz"),
    3: ("pulmonary_artery", samples.REFERENCE_FILES + "pulmonary_report/models/pulmonary_artery.nii.gz"),
    4: ("brachiocephalic_trunk", samples.REFERENCE_FILES + "aorta_report/test_result/models/brachiocephalic_trunk.nii.gz"),
    5: ("vertebrae_T12", samples.REFERENCE_FILES + "aorta_report/test_result/models/vertebrae_T12.nii.gz"),
}
SLABS = 7
TEST_SLABS = (2, 5)  # held out from annotation: the site's unseen part
FORMAT = "adaptsam-sites/1"


def default_sites_dir() -> Path:
    return samples.default_samples_dir().parent / "sites"


def _pip_download_nilearn(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", f"nilearn=={NILEARN_VERSION}", "-d", str(tmp)]
    return files.run_download(cmd, tmp, NILEARN_WHEEL, "The MR brain site comes from that PyPI package: PyPI", 600)


def _place(mask_img: nib.Nifti1Image, shape, affine) -> np.ndarray:
    """A mask on a crop of the image grid (same spacing and orientation), placed on the grid."""
    offset = np.rint(np.linalg.inv(affine) @ mask_img.affine @ [0, 0, 0, 1]).astype(int)[:3]
    mask = np.asanyarray(mask_img.dataobj) > 0
    out = np.zeros(shape, bool)
    lo = np.maximum(offset, 0)
    hi = np.minimum(offset + mask.shape, shape)
    src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offset))
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = mask[src]
    return out


def ct_chest(totalseg_members: Dict[str, bytes]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Dict[int, str]]:
    image = files.load_nifti_bytes(totalseg_members[CTA])
    array = np.asanyarray(image.dataobj).astype(np.int16)
    label = np.zeros(array.shape, np.uint8)
    for value, (_, member) in CTA_MASKS.items():  # later (smaller) structures win where they touch
        label[_place(files.load_nifti_bytes(totalseg_members[member]), array.shape, image.affine)] = value
    return array, image.affine, label, {v: n for v, (n, _) in CTA_MASKS.items()}


def mr_brain(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        read = lambda kind: files.load_nifti_bytes(z.read(MNI.format(kind)))
        t1, gm, wm = read("t1"), read("gm"), read("wm")
    step = 2  # every second axial slice: a 2 mm series
    affine = t1.affine @ np.diag([1.0, 1.0, step, 1.0])
    array = np.asanyarray(t1.dataobj)[:, :, ::step].astype(np.int16)
    g = np.asanyarray(gm.dataobj)[:, :, ::step].astype(np.int16)
    w = np.asanyarray(wm.dataobj)[:, :, ::step].astype(np.int16)
    label = np.zeros(array.shape, np.uint8)
    label[(w >= 128) & (w >= g)] = 1
    label[(g >= 128) & (g > w)] = 2
    return array, affine, label, {1: "white_matter", 2: "grey_matter"}


def slabs(label: np.ndarray, n: int) -> List[Tuple[int, int]]:
    """`n` consecutive z ranges [a, b) covering the slices that hold any structure."""
    z = np.nonzero(label.any(axis=(0, 1)))[0]
    edges = np.linspace(z.min(), z.max() + 1, n + 1).round().astype(int)
    return list(zip(edges[:-1], edges[1:]))


def write_site(root: Path, site: str, array: np.ndarray, affine: np.ndarray, label: np.ndarray, names: Dict[int, str], source: str) -> Dict:
    ids = []
    for i, (a, b) in enumerate(slabs(label, SLABS)):
        image_id = f"{site}_{i}"
        shifted = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, a], [0, 0, 0, 1]], dtype=float)
        files.write_nifti(root / site / "studies" / f"{image_id}.nii.gz", files.nifti(np.ascontiguousarray(array[:, :, a:b]), shifted))
        part = np.ascontiguousarray(label[:, :, a:b])
        files.write_nifti(root / site / "reference" / f"{image_id}.nii.gz", files.nifti(part, shifted))
        present = {int(v): names[int(v)] for v in np.unique(part) if v}
        files.write_json(root / site / "reference" / f"{image_id}.json",
                         {"shape": list(part.shape), "affine": shifted.tolist(), "labels": present, "quality": samples.SILVER})
        ids.append(image_id)
    meta = {"format": FORMAT, "site": site, "source": source, "structures": names,
            "annotate": [ids[i] for i in range(len(ids)) if i not in TEST_SLABS], "test": [ids[i] for i in TEST_SLABS]}
    files.write_json(root / site / "site.json", meta)
    return meta


def build(root=None, cache_dir=None) -> Path:
    root = Path(root) if root else default_sites_dir()
    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == FORMAT:
        return root
    cache = Path(cache_dir) if cache_dir else samples.default_cache_dir()
    totalseg = files.cached(cache, samples.TOTALSEG_SDIST, samples.TOTALSEG_SHA256, samples.download_totalsegmentator)
    wheel = files.cached(cache, NILEARN_WHEEL, NILEARN_SHA256, _pip_download_nilearn)
    wanted = {CTA} | {m for _, m in CTA_MASKS.values()}
    members = files.read_members(totalseg, lambda n: n in wanted)
    marker.unlink(missing_ok=True)
    write_site(root, "ct_chest", *ct_chest(members), f"totalsegmentator=={samples.TOTALSEG_VERSION} {CTA} (silver)")
    write_site(root, "mr_brain", *mr_brain(wheel), f"nilearn=={NILEARN_VERSION} MNI ICBM152 2009 (probability maps >= 0.5)")
    files.write_bytes(marker, (FORMAT + "\n").encode())
    return root


def load_site(root: Path, site: str) -> Dict:
    return json.loads((Path(root) / site / "site.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/sites.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("dir", nargs="?", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build(args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
