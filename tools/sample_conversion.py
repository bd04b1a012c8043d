"""Conversions for the sample builders: TotalSegmentator's label names, a DICOM series as a
volume in the voxel order MONAI Label clients use, and a label moved onto its image's grid."""

from __future__ import annotations

import ast
import io
import logging
import xml.etree.ElementTree as ET
from typing import Dict, Mapping, Optional, Tuple

import nibabel as nib
import numpy as np

from sample_files import SamplesError

logger = logging.getLogger(__name__)


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
