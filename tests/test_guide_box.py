"""The guide box sent with correction clicks (engine/guide_box.py): pure geometry."""

from __future__ import annotations

import numpy as np

from adaptsam.engine.guide_box import guide_box


def _mask(shape=(100, 120), r=(20, 59), c=(30, 69)):
    m = np.zeros(shape, bool)
    m[r[0] : r[1] + 1, c[0] : c[1] + 1] = True
    return m


def test_clicks_inside_the_answer_keep_its_box_round_after_round():
    m = _mask()
    box = guide_box(m, [(40, 50)])
    assert box == (20, 30, 59, 69)
    # the answer filling its box does not make the box grow
    r0, c0, r1, c1 = (int(v) for v in box)
    assert guide_box(_mask(r=(r0, r1), c=(c0, c1)), [(40, 50)]) == box


def test_a_positive_click_outside_widens_only_its_side_with_a_margin():
    m = _mask()  # 40 x 40 box
    r0, c0, r1, c1 = guide_box(m, [(40, 50), (40, 90)])
    assert (r0, c0, r1) == (20, 30, 59)
    assert c1 == 90 + 4  # 10% of the 40-pixel width
    # a small answer still gets a few pixels of room
    small = _mask(r=(50, 54), c=(50, 54))
    assert guide_box(small, [(60, 52)]) == (50, 49, 63, 55)


def test_without_positive_clicks_the_box_is_the_answers():
    # negative clicks are not its input: they only take away
    assert guide_box(_mask(), []) == (20, 30, 59, 69)


def test_no_previous_answer():
    empty = np.zeros((100, 120), bool)
    assert guide_box(empty, []) is None
    assert guide_box(empty, [(50, 60)]) == (47, 57, 53, 63)


def test_the_box_stays_on_the_image():
    m = _mask(r=(0, 9), c=(110, 119))
    assert guide_box(m, [(2, 118), (12, 119)]) == (0, 110, 15, 119)
