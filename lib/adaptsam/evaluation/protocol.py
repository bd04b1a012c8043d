"""The interactive 3D protocol, replayed through the server's own segmenter.

For each structure of a labelled volume, two sessions as a client would run them:
- *box*: the structure's 3D bounding box (volume mode: the middle slice's box, propagated and
  clipped to the box), then up to `corrections` clicks, each at the centre of the largest 3D
  error region (slice mode on the clicked slice, continuing from that slice's answer);
- *clicks*: one click at the structure's deepest voxel (volume mode, propagated), then
  corrections the same way, up to `max_clicks`.
Dice is measured on the whole volume after every step. Every request goes through
`InteractiveSegmenter.segment`, the code path `/infer` serves, or through a running server's
REST API (`Segment` is either).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from ..engine.interactive import InteractiveSegmenter
from ..engine.metrics import bounding_box
from ..engine.request import SegmentRequest
from .clicks import correction_voxel, interior_voxel
from .metrics import clicks_to, dice, dice_auc, normalised_surface_distance


# one request -> the label volume it answers; keyword arguments as SegmentRequest's fields
Segment = Callable[..., np.ndarray]


def in_process(segmenter: InteractiveSegmenter) -> Segment:
    return lambda **request: segmenter.segment(SegmentRequest(**request)).label


@dataclass(frozen=True)
class Protocol:
    corrections: int = 5  # after the box
    max_clicks: int = 10  # in the click session (clicks-to-Dice counts up to here)
    report_clicks: tuple = (1, 3, 5)
    thresholds: tuple = (0.85, 0.90)
    nsd_tolerance_mm: float = 2.0
    min_voxels: int = 50  # smaller structures are not evaluated (a few voxels of a label's edge)


def _session(segment: Segment, image_path: str, image_id: str, name: str, truth: np.ndarray, spacing,
             first: Dict, steps: int):
    """Answers of one session: `first` prompt (volume mode), then protocol corrections."""
    client = f"eval-{uuid.uuid4().hex[:12]}"
    base = dict(image_path=image_path, image_id=image_id, label=name, client_id=client)
    fg, bg = list(first.get("foreground", [])), []
    roi = first.get("roi")
    answer = segment(**base, foreground=fg, roi=roi, mode="volume", reset=True) > 0
    dices = [dice(answer, truth)]
    while len(dices) < steps:
        c = correction_voxel(answer, truth, spacing)
        if c is None:  # perfect: the remaining steps keep it
            dices += [1.0] * (steps - len(dices))
            break
        i, j, k, positive = c
        (fg if positive else bg).append([i, j, k])
        answer = segment(**base, foreground=fg, background=bg, roi=roi, mode="slice", slice_index=k) > 0
        dices.append(dice(answer, truth))
    return dices, answer


def evaluate_structure(segment: Segment, image_path: str, image_id: str, name: str, truth: np.ndarray,
                       spacing, protocol: Protocol = Protocol()) -> Dict:
    i0, j0, k0, i1, j1, k1 = bounding_box(truth)
    box_dices, box_answer = _session(segment, image_path, image_id, name, truth, spacing,
                                     {"roi": [i0, i1, j0, j1, k0, k1]}, 1 + protocol.corrections)
    click_dices, _ = _session(segment, image_path, image_id, name, truth, spacing,
                              {"foreground": [list(interior_voxel(truth, spacing))]}, protocol.max_clicks)
    out = {
        "structure": name, "image": image_id, "voxels": int(truth.sum()),
        "box": round(box_dices[0], 4),
        "box_steps": [round(d, 4) for d in box_dices],
        "box_final": round(box_dices[-1], 4),
        "box_auc": round(dice_auc(box_dices), 4),
        "box_final_nsd": round(normalised_surface_distance(box_answer, truth, spacing, protocol.nsd_tolerance_mm), 4),
        "click_steps": [round(d, 4) for d in click_dices],
        "click_auc": round(dice_auc(click_dices[: max(protocol.report_clicks)]), 4),
    }
    for n in protocol.report_clicks:
        out[f"click{n}"] = round(click_dices[min(n, len(click_dices)) - 1], 4)
    for t in protocol.thresholds:
        out[f"clicks_to_{int(round(t * 100))}"] = clicks_to(click_dices, t)
    return out


def structures(label: np.ndarray, names: Dict[int, str], min_voxels: int) -> List[tuple]:
    """(value, name) of every structure in a label map large enough to evaluate."""
    values, counts = np.unique(label[label > 0], return_counts=True)
    return [(int(v), names.get(int(v), f"label_{int(v)}")) for v, c in zip(values, counts) if c >= min_voxels]


def summarise(rows: List[Dict], protocol: Protocol = Protocol()) -> Dict:
    """Means over structures; clicks-to-Dice counts an unreached threshold as max_clicks + 1
    and reports how many structures reached it."""
    if not rows:
        return {}
    keys = ["box", "box_final", "box_auc", "box_final_nsd", "click_auc"] + [f"click{n}" for n in protocol.report_clicks]
    out = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys}
    for t in protocol.thresholds:
        key = f"clicks_to_{int(round(t * 100))}"
        values = [r[key] for r in rows]
        out[key] = round(float(np.mean([v if v is not None else protocol.max_clicks + 1 for v in values])), 3)
        out[f"{key}_reached"] = f"{sum(v is not None for v in values)}/{len(values)}"
    out["score"] = protocol_score(out)
    out["structures"] = len(rows)
    return out


def protocol_score(summary: Dict) -> float:
    """One number for the publish gate: the mean of the box session's and the click session's
    areas under Dice per interaction (both in [0, 1])."""
    return round((summary["box_auc"] + summary["click_auc"]) / 2, 4)


def evaluate_volume(segment: Segment, image_path: str, image_id: str, label: np.ndarray, spacing,
                    names: Dict[int, str], protocol: Protocol = Protocol(), log=None,
                    only: Optional[List[str]] = None) -> List[Dict]:
    rows = []
    for value, name in structures(label, names, protocol.min_voxels):
        if only and name not in only:
            continue
        row = evaluate_structure(segment, image_path, image_id, name, label == value, spacing, protocol)
        rows.append(row)
        if log:
            clicks = " / ".join(f"{row[f'click{n}']:.3f}" for n in protocol.report_clicks)
            log(f"  {image_id} {name:24s} box {row['box']:.3f} -> {row['box_final']:.3f}  "
                f"clicks {'/'.join(map(str, protocol.report_clicks))}: {clicks}")
    return rows
