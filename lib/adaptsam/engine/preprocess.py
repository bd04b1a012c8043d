"""Intensity handling and the slice <-> model-input geometry.

Intensities: CT is clipped to a HU window (default [-500, 1000], or a preset chosen by the
target label's name: abdominal organs get the soft-tissue window, where their contrast is),
MR to its 0.5-99.5 percentiles of non-zero voxels; both are scaled to 0..255 and kept
as uint8, the same quantisation MedSAM/LiteMedSAM were trained on (and 4x less memory than
float32 for a cached volume).

Geometry: a 2D slice is first turned to the radiological display orientation (flips only; see
`display_flips`), then resized so its longest physical side fills the model input (aspect
ratio kept, using the in-plane spacing), padded bottom/right, repeated to 3 channels. The
per-axis scales are the *realised* ones (new_size / old_size after rounding), and the same
numbers map prompts forward and logits back, so the two directions are exact inverses.

Why the flips: the model sees anatomy, not voxel order. A NIfTI stored RAS (as converters often
write it) shows an axial slice with the spine at the top and the patient's left on the left;
DICOM's LPS order shows it as radiologists read it. A model trained on one and served the
other loses at the first click. Turning every slice to one display orientation before the
model makes what it learns independent of how the file was stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

CT_DEFAULT_WINDOW = (-500.0, 1000.0)
# Per-label CT windows (HU): the target's contrast matters more than the whole range.
CT_WINDOW_PRESETS = {
    "soft_tissue": (-160.0, 240.0),  # abdominal W400/L40
    "lung": (-1000.0, 200.0),
    "bone": (-500.0, 1300.0),
    "brain": (-20.0, 100.0),
}
_PRESET_KEYWORDS = {
    "soft_tissue": (
        "liver", "spleen", "kidney", "pancrea", "stomach", "gallbladder", "duoden", "bowel", "colon",
        "adrenal", "bladder", "esophag", "prostate", "heart", "aorta", "vena", "portal", "muscle", "tumor",
    ),
    "lung": ("lung", "trachea", "airway", "bronch"),
    "bone": ("vertebra", "rib", "femur", "humerus", "scapula", "clavicula", "sternum", "sacrum", "hip", "skull", "bone"),
    "brain": ("brain",),
}
MR_PERCENTILES = (0.5, 99.5)


def ct_window_for(label: Optional[str]) -> Tuple[float, float]:
    name = (label or "").lower()
    for preset, words in _PRESET_KEYWORDS.items():
        if any(w in name for w in words):
            return CT_WINDOW_PRESETS[preset]
    return CT_DEFAULT_WINDOW


def guess_modality(volume: np.ndarray) -> str:
    """CT volumes hold air at about -1000 HU; MR intensities are non-negative."""
    return "CT" if float(np.min(volume)) < -500 else "MR"


def intensity_window(volume: np.ndarray, modality: str, label: Optional[str] = None) -> Tuple[float, float]:
    if modality.upper() == "CT":
        return ct_window_for(label)
    foreground = volume[volume > 0]
    values = foreground if foreground.size else volume.ravel()
    lo, hi = np.percentile(values, MR_PERCENTILES)
    return float(lo), float(hi)


def normalize_volume(volume: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    """Clip to `window` and scale to uint8 0..255."""
    lo, hi = window
    scale = 255.0 / max(hi - lo, 1e-6)
    out = (np.clip(volume.astype(np.float32), lo, hi) - lo) * scale
    return np.rint(out).astype(np.uint8)


# ---- slicing --------------------------------------------------------------------------------

def in_plane_axes(axis: int) -> Tuple[int, int]:
    """(row axis, column axis) of a slice normal to `axis`.

    Rows follow the *later* remaining volume axis, columns the earlier one, so an axial slice
    of an (i, j, k) array shows i across and j down, as viewers display it.
    """
    a, b = [d for d in range(3) if d != axis]
    return b, a


def plane_shape(shape: Sequence[int], axis: int) -> Tuple[int, int]:
    """(rows, cols) of the slices normal to `axis` of a volume of `shape`."""
    r, c = in_plane_axes(axis)
    return int(shape[r]), int(shape[c])


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice (rows, cols) of `volume` normal to `axis` at `index`: a view, copy before writing.

    Basic indexing, not np.take: np.take copies element by element (21 ms for one 512x512 slice
    of a Fortran-ordered CT, a fifth of a first click's overhead); an axial slice of a NIfTI
    array is contiguous and costs nothing.
    """
    idx = [slice(None)] * 3
    idx[axis] = index
    return volume[tuple(idx)].T


def put_slice(volume: np.ndarray, axis: int, index: int, plane: np.ndarray) -> None:
    """Inverse of `take_slice`: write a (rows, cols) plane back into `volume`."""
    idx = [slice(None)] * 3
    idx[axis] = index
    volume[tuple(idx)] = plane.T


# the direction rows and columns run in, per world axis (LPS: x to the patient's left, y to
# the back, z up): left to the right of the screen, back at the bottom, feet at the bottom
DISPLAY_SIGN_LPS = (1.0, 1.0, -1.0)


def display_flips(affine: np.ndarray, axis: int) -> Tuple[bool, bool]:
    """(flip rows, flip cols) that turn `take_slice`'s plane normal to `axis` into the
    radiological display orientation: an axial slice with the patient's front at the top and
    left on the right (as DICOM's LPS order stores it), a coronal or sagittal one head up.
    `affine` maps voxels to RAS (NIfTI's convention). Oblique axes follow the world axis they
    run closest to."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)[:3, :3]
    out = []
    for voxel_axis in in_plane_axes(axis):
        direction = lps[:, voxel_axis]
        world = int(np.argmax(np.abs(direction)))
        out.append(bool(np.sign(direction[world]) != DISPLAY_SIGN_LPS[world]))
    return out[0], out[1]


def voxel_to_plane(voxel: Sequence[int], axis: int) -> Tuple[int, int, int]:
    """Voxel [i, j, k] -> (slice index, row, col) for slices normal to `axis`."""
    row_axis, col_axis = in_plane_axes(axis)
    return int(voxel[axis]), int(voxel[row_axis]), int(voxel[col_axis])


# ---- model-input geometry ---------------------------------------------------------------------

@dataclass(frozen=True)
class SliceGeometry:
    """How one (rows, cols) slice maps into a square model input of side `size`."""

    rows: int
    cols: int
    size: int
    new_rows: int
    new_cols: int
    flip_rows: bool = False  # the slice is shown upside down before resizing (display_flips)
    flip_cols: bool = False

    @classmethod
    def fit(cls, rows: int, cols: int, size: int, spacing: Tuple[float, float] = (1.0, 1.0),
            flips: Tuple[bool, bool] = (False, False), min_field: float = 0.0) -> "SliceGeometry":
        """`min_field`: the model input's side stands for at least this physical extent (the
        trainer renders small fields of view as a larger one would show them; 0: the slice's own)."""
        extent_r, extent_c = rows * float(spacing[0]), cols * float(spacing[1])
        s = size / max(extent_r, extent_c, float(min_field))
        new_r = min(size, max(1, int(round(extent_r * s))))
        new_c = min(size, max(1, int(round(extent_c * s))))
        return cls(rows, cols, size, new_r, new_c, bool(flips[0]), bool(flips[1]))

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        """Flip the last two dims of `x` (a plane or its logits) to or from display orientation."""
        dims = [d for d, f in ((-2, self.flip_rows), (-1, self.flip_cols)) if f]
        return torch.flip(x, dims) if dims else x

    @property
    def scale_rows(self) -> float:
        return self.new_rows / self.rows

    @property
    def scale_cols(self) -> float:
        return self.new_cols / self.cols

    def image_to_model(self, plane01: torch.Tensor) -> torch.Tensor:
        """(rows, cols) float in [0, 1] -> (3, size, size)."""
        x = self._flip(plane01[None, None].float())
        if (self.new_rows, self.new_cols) != (self.rows, self.cols):
            x = F.interpolate(x, (self.new_rows, self.new_cols), mode="bilinear", align_corners=False, antialias=True)
        x = F.pad(x, (0, self.size - self.new_cols, 0, self.size - self.new_rows))
        return x[0].expand(3, -1, -1).contiguous()

    def points_to_model(self, rows_cols: np.ndarray) -> np.ndarray:
        """Pixel indices (N, 2) as (row, col) -> model pixel coordinates (N, 2) as (x, y).

        Pixel centres map to pixel centres: index i has centre i + 0.5 in continuous
        coordinates, and SAM's prompt encoder adds the 0.5 back.
        """
        rc = np.asarray(rows_cols, dtype=np.float64).reshape(-1, 2)
        if self.flip_rows or self.flip_cols:
            rc = np.stack([self.rows - 1 - rc[:, 0] if self.flip_rows else rc[:, 0],
                           self.cols - 1 - rc[:, 1] if self.flip_cols else rc[:, 1]], axis=1)
        y = (rc[:, 0] + 0.5) * self.scale_rows - 0.5
        x = (rc[:, 1] + 0.5) * self.scale_cols - 0.5
        return np.stack([x, y], axis=1).astype(np.float32)

    def box_to_model(self, r0: float, c0: float, r1: float, c1: float) -> np.ndarray:
        """Inclusive pixel box -> (x0, y0, x1, y1) in model pixels (MedSAM scales corners)."""
        if self.flip_rows:
            r0, r1 = self.rows - 1 - r1, self.rows - 1 - r0
        if self.flip_cols:
            c0, c1 = self.cols - 1 - c1, self.cols - 1 - c0
        return np.array(
            [c0 * self.scale_cols, r0 * self.scale_rows, c1 * self.scale_cols, r1 * self.scale_rows], dtype=np.float32
        )

    def logits_to_plane(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits (..., L, L) covering the padded model input -> (..., rows, cols)."""
        lead = low_res.shape[:-2]
        x = low_res.reshape((-1, 1) + tuple(low_res.shape[-2:])).float()
        if x.shape[-1] != self.size:
            x = F.interpolate(x, (self.size, self.size), mode="bilinear", align_corners=False)
        x = x[..., : self.new_rows, : self.new_cols]
        if (self.new_rows, self.new_cols) != (self.rows, self.cols):
            x = F.interpolate(x, (self.rows, self.cols), mode="bilinear", align_corners=False)
        return self._flip(x).reshape(lead + (self.rows, self.cols))

    def mask_to_model(self, plane_mask: torch.Tensor, out: int) -> torch.Tensor:
        """(rows, cols) mask or logits -> (1, 1, out, out) on the low-res grid (mask prompt)."""
        x = self._flip(plane_mask[None, None].float())
        r = max(1, int(round(self.new_rows * out / self.size)))
        c = max(1, int(round(self.new_cols * out / self.size)))
        x = F.interpolate(x, (r, c), mode="bilinear", align_corners=False)
        return F.pad(x, (0, out - c, 0, out - r))
