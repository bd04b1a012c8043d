"""One interactive request as the engine takes it, and the checks that turn client values into it.

Everything a client sends is checked here, before any work: a bad request costs nothing and
changes nothing. Values arrive as JSON (numbers, strings, lists) from Slicer, OHIF or REST.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .errors import RequestError

AXES = {"axial": 2, "coronal": 1, "sagittal": 0}
MODES = ("volume", "slice")
# A request is a handful of clicks; more is a client bug or an attack on memory (each click
# costs a decoder token). Sessions keep at most MAX_SESSION_CLICKS (sessions.py).
MAX_REQUEST_CLICKS = 64

Click = Tuple[int, int, int]


def parse_bool(value, name: str = "value") -> bool:
    """The one true/false parser: JSON booleans, 0/1, and the usual words."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise RequestError(f"{name} must be true or false, got {value!r}")


def _finite_int(x, what: str) -> int:
    try:
        f = float(x)
    except (TypeError, ValueError):
        raise RequestError(f"{what}: {x!r} is not a number")
    if not math.isfinite(f) or abs(f) > 1e9:
        raise RequestError(f"{what}: {x!r} is not a finite index")
    return int(round(f))


def parse_clicks(name: str, clicks, shape) -> List[Click]:
    if clicks is None or clicks == "":
        return []
    if not isinstance(clicks, (list, tuple)):
        raise RequestError(f"{name} must be a list of [i, j, k] voxel indices")
    if len(clicks) > MAX_REQUEST_CLICKS:
        raise RequestError(f"{name}: {len(clicks)} clicks in one request; at most {MAX_REQUEST_CLICKS}", status_code=413)
    out = []
    for c in clicks:
        if not isinstance(c, (list, tuple)) or len(c) != 3:
            raise RequestError(f"{name} click {c!r} must be three indices [i, j, k]")
        v = tuple(_finite_int(x, f"{name} click") for x in c)
        if any(x < 0 or x >= s for x, s in zip(v, shape)):
            raise RequestError(f"{name} click {list(v)} is outside the image (shape {list(shape)})")
        out.append(v)
    return out


def parse_roi(roi, shape) -> Optional[List[Tuple[int, int]]]:
    """Slicer's [i0, i1, j0, j1, k0, k1] -> per-axis inclusive (lo, hi), clipped to the image.

    Each pair may come in either order: Slicer derives it from the ROI's RAS corners, so on
    LPS-stored volumes i0 > i1 is normal. Degenerate or outside boxes are refused.
    """
    if roi is None or (isinstance(roi, (list, tuple)) and len(roi) == 0):
        return None
    if not isinstance(roi, (list, tuple)) or len(roi) != 6:
        raise RequestError(f"roi {roi!r} must be six numbers [i0, i1, j0, j1, k0, k1]")
    vals = [_finite_int(x, "roi") for x in roi]
    ranges = []
    for axis in range(3):
        lo, hi = sorted(vals[2 * axis : 2 * axis + 2])
        if hi < 0 or lo >= shape[axis]:
            raise RequestError(f"roi {vals} lies outside the image (shape {list(shape)})")
        ranges.append((max(lo, 0), min(hi, shape[axis] - 1)))
    return ranges


def parse_axis(value) -> int:
    if value is None or value == "" or isinstance(value, list):  # a client echoing the option list
        return 2
    if isinstance(value, str) and value.lower() in AXES:
        return AXES[value.lower()]
    if isinstance(value, (int, str)) and str(value).strip() in ("0", "1", "2"):
        return int(value)
    raise RequestError(f"axis must be 0, 1, 2 or axial/coronal/sagittal, got {value!r}")


def parse_mode(value, default: str) -> str:
    if isinstance(value, list) and value:  # a client echoing the option list back
        value = value[0]
    if value is None or value == "":
        return default
    if not isinstance(value, str) or value not in MODES:
        raise RequestError(f"mode must be 'slice' or 'volume', got {value!r}")
    return value


def parse_slice(value, depth: int, axis: int) -> Optional[int]:
    if value is None or value == "":
        return None
    k = _finite_int(value, "slice")
    if not 0 <= k < depth:
        raise RequestError(f"slice {k} is outside the image ({depth} slices along axis {axis})")
    return k


@dataclass
class SegmentRequest:
    """What the client asked for; voxel indices of the image as stored (ITK/Slicer IJK)."""

    image_path: str
    image_id: str
    label: Optional[str] = None
    foreground: Sequence = ()
    background: Sequence = ()
    roi: Optional[Sequence] = None
    mask_path: Optional[str] = None
    mode: str = "volume"
    axis: int = 2
    slice_index: Optional[int] = None
    client_id: str = "default"
    reset: bool = False
