"""One prompt recipe: the evaluation's slice protocol and a client's session through the server's
segmenter give the same masks, for the base model and the shipped 2D adapter; sessions undo a
dropped click exactly; the session store stays within its memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samples
from adaptsam.engine.interactive import InteractiveSegmenter, Runtime
from adaptsam.engine.metrics import largest_slice
from adaptsam.engine.models import ModelHandle
from adaptsam.engine.preprocess import take_slice
from adaptsam.engine.request import SegmentRequest
from adaptsam.engine.sessions import SessionStore
from adaptsam.evaluation.clicks import correction_click, interior_point
from adaptsam.evaluation.slice_protocol import click_session
from server_util import WEIGHTS

IMAGE = "ct_dicom"
ORGANS = ("liver", "spleen", "aorta")


@pytest.fixture(scope="module")
def runtime():
    rt = Runtime(1 << 30)
    yield rt
    rt.stop()


def _served_session(seg, path, name, k, truth, clicks):
    """The protocol's clicks sent as a client sends them (the whole list each time, slice mode)."""
    base = dict(image_path=path, image_id=IMAGE, label=name, mode="slice", client_id=f"proto-{name}")
    r, c = interior_point(truth)
    fg, bg, masks = [[c, r, k]], [], []  # plane (row, col) is voxel (j, i) on an axial slice
    reset = True
    for _ in range(clicks):
        plane = take_slice(seg.segment(SegmentRequest(**base, foreground=fg, background=bg, reset=reset)).label, 2, k) > 0
        reset = False
        masks.append(plane)
        c = correction_click(plane, truth)
        if c is None:
            break
        (fg if c[2] else bg).append([c[1], c[0], k])
    return masks


@pytest.mark.parametrize("weights", ["base", "shipped"])
def test_evaluation_and_server_give_the_same_masks(runtime, samples_dir, tmp_path, weights):
    handle = ModelHandle("2d", "litemedsam", tmp_path if weights == "base" else WEIGHTS, "cpu")
    seg = InteractiveSegmenter(runtime, handle, propagate=False)
    serving = runtime.serving(handle)
    path = str(samples.image_path(samples_dir, IMAGE))
    vol, key = runtime.volumes.get(path, IMAGE)
    label, _, _ = samples.load_reference(samples_dir, IMAGE)
    geom = runtime.encoder.geometry(serving, vol, 2)
    for name in ORGANS:
        truth3d = label == samples.label_value(samples_dir, IMAGE, name)
        k = largest_slice(truth3d)
        truth = take_slice(truth3d, 2, k)
        emb, _ = runtime.encoder.embedding(serving, vol, key, 2, k, vol.window(name))
        evaluated = [p.mask for p in click_session(serving, emb, geom, truth, 4)]
        served = _served_session(seg, path, name, k, truth, 4)
        assert len(evaluated) == len(served) >= 2
        for n, (a, b) in enumerate(zip(evaluated, served), 1):
            assert np.array_equal(a, b), f"{weights} {name}: click {n} differs"


def test_dropping_the_last_click_gives_back_the_answer_before_it(runtime, samples_dir):
    handle = ModelHandle("2d", "litemedsam", WEIGHTS, "cpu")
    seg = InteractiveSegmenter(runtime, handle, propagate=False)
    path = str(samples.image_path(samples_dir, IMAGE))
    truth3d = samples.structure_mask(samples_dir, IMAGE, "liver")
    k = largest_slice(truth3d)
    r, c = interior_point(take_slice(truth3d, 2, k))
    fg = [[c, r, k]]
    base = dict(image_path=path, image_id=IMAGE, label="liver", mode="slice", client_id="undo")
    one = seg.segment(SegmentRequest(**base, foreground=fg, reset=True)).label.copy()
    inside = np.argwhere(one[:, :, k] > 0)  # a negative click on the answer, far from the first click
    far = inside[np.argmax(((inside - [c, r]) ** 2).sum(1))]
    extra = [[int(far[0]), int(far[1]), k]]
    two = seg.segment(SegmentRequest(**base, foreground=fg, background=extra)).label.copy()
    back = seg.segment(SegmentRequest(**base, foreground=fg)).label
    assert not np.array_equal(one, two)
    assert np.array_equal(back, one)  # undo, not a new correction pass from the two-click answer
    session = runtime.sessions.get("undo", IMAGE, "liver", runtime.serving(handle).key)
    assert session.foreground == [tuple(fg[0])] and session.background == [] and len(session.history) == 1


def test_session_store_evicts_the_least_recently_used_to_stay_within_its_bytes():
    store = SessionStore(max_bytes=3 * (1 << 20) + 4096)
    volume = lambda: np.zeros((1 << 20,), np.uint8)  # 1 MiB results
    sessions = []
    for i in range(5):
        s = store.get(f"c{i}", "img", "liver", "m")
        s.record([(1, 1, 1)], [], None, {(2, 1): torch.zeros(1, 1, 8, 8)}, volume(), {"i": i}, replaces_all=True)
        store.commit(s)
        sessions.append(s)
    assert store.stats()["bytes"] <= 3 * (1 << 20) + 4096
    assert len(store) == 3
    assert store.latest("c4", "img") is sessions[4] and store.latest("c0", "img") is None
