"""Clicks painted into the carried mask prompt (engine/click_carving.py): pure geometry."""

from __future__ import annotations

import numpy as np
import torch

from adaptsam.engine.click_carving import CARVED_LOGIT, MAX_RADIUS, MIN_RADIUS, carve_clicks
from adaptsam.engine.preprocess import SliceGeometry

L = 256
IDENTITY = SliceGeometry.fit(L, L, L)  # slice pixels = model pixels = low-res pixels (LiteMedSAM)


def _logits(r=(100, 159), c=(100, 159)) -> torch.Tensor:
    """A previous answer: +5 on a square, -5 elsewhere."""
    x = torch.full((1, 1, L, L), -5.0)
    x[0, 0, r[0] : r[1] + 1, c[0] : c[1] + 1] = 5.0
    return x


def _changed(before, after):
    return (before != after)[0, 0].numpy()


def test_a_negative_click_deep_inside_clears_a_disc_of_the_largest_radius():
    prev = _logits()
    out = carve_clicks(prev, IDENTITY, background=[(130, 130)])
    assert out[0, 0, 130, 130] == -CARVED_LOGIT
    assert out[0, 0, 130, 130 + int(MAX_RADIUS)] == -CARVED_LOGIT
    assert out[0, 0, 130, 130 + int(MAX_RADIUS) + 1] == 5.0  # beyond the disc: untouched
    assert _changed(prev, out).sum() == sum(
        1 for i in range(L) for j in range(L) if (i - 130) ** 2 + (j - 130) ** 2 <= MAX_RADIUS**2
    )
    assert prev[0, 0, 130, 130] == 5.0  # the input is left as it was


def test_the_radius_is_the_distance_to_the_answers_boundary():
    # 7 pixels below the top edge: the nearest outside pixel is row 99, 7 away
    out = carve_clicks(_logits(), IDENTITY, background=[(106, 130)])
    assert out[0, 0, 113, 130] == -CARVED_LOGIT
    assert out[0, 0, 114, 130] == 5.0
    assert out[0, 0, 99, 130] == -CARVED_LOGIT  # the disc reaches the boundary, no further
    assert out[0, 0, 98, 130] == -5.0
    # a positive click outside: its distance to the answer
    out = carve_clicks(_logits(), IDENTITY, foreground=[(130, 170)])  # 11 pixels right of column 159
    assert out[0, 0, 130, 159] == CARVED_LOGIT and out[0, 0, 130, 158] == 5.0
    assert out[0, 0, 130, 181] == CARVED_LOGIT and out[0, 0, 130, 182] == -5.0


def test_the_radius_never_falls_under_the_minimum():
    out = carve_clicks(_logits(), IDENTITY, background=[(100, 130)])  # on the edge: distance 1
    assert out[0, 0, 100 + int(MIN_RADIUS), 130] == -CARVED_LOGIT
    assert out[0, 0, 100 + int(MIN_RADIUS) + 1, 130] == 5.0


def test_a_positive_click_wins_where_both_reach():
    out = carve_clicks(_logits(), IDENTITY, foreground=[(130, 128)], background=[(130, 132)])
    assert out[0, 0, 130, 130] == CARVED_LOGIT
    assert out[0, 0, 130, 146] == -CARVED_LOGIT  # only the negative reaches it (14 vs 18 away)


def test_clicks_map_through_the_slice_geometry():
    # a 512 x 512 slice into LiteMedSAM's 256 input: slice pixel (261, 261) is low-res (130, 130)
    geom = SliceGeometry.fit(512, 512, L)
    out = carve_clicks(_logits(), geom, background=[(261, 261)])
    changed = np.argwhere(_changed(_logits(), out))
    centre = changed.mean(axis=0)
    assert np.allclose(centre, (130.25, 130.25), atol=0.5)


def test_without_clicks_or_with_an_empty_answer():
    prev = _logits()
    assert torch.equal(carve_clicks(prev, IDENTITY), prev)
    empty = torch.full((1, 1, L, L), -5.0)  # nothing to measure a distance to: the largest disc
    out = carve_clicks(empty, IDENTITY, foreground=[(50, 50)])
    assert out[0, 0, 50, 50 + int(MAX_RADIUS)] == CARVED_LOGIT
    assert out[0, 0, 50, 50 + int(MAX_RADIUS) + 1] == -5.0
