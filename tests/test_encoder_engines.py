"""The encoder engine: which one is chosen, the OpenVINO conversion (in the background, kept on
disk, one per served model, falling back to torch), and that its masks are torch's."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

import samples
from adaptsam.engine.encoder_engines import OpenVinoEncoders, default_precision, openvino_available, resolve
from adaptsam.engine.interactive import InteractiveSegmenter, Runtime
from adaptsam.engine.metrics import bounding_box, largest_slice
from adaptsam.engine.models import ModelHandle
from adaptsam.engine.request import SegmentRequest
from server_util import WEIGHTS, shipped

IMAGE = "ct_dicom"
SERVED = f"litemedsam/2d/v{shipped()[0]}"  # the served shipped 2D adapter, as answers name it


def test_the_engine_choice():
    assert openvino_available()  # pinned: `auto` means OpenVINO on a CPU
    assert resolve("auto", "cpu") == "openvino"
    assert resolve("auto", "cuda") == "torch" and resolve("auto", "cuda:1") == "torch"
    assert resolve("torch", "cpu") == "torch" and resolve("openvino", "cpu") == "openvino"
    with pytest.raises(ValueError, match="CPU"):
        resolve("openvino", "cuda")
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve("tensorrt", "cpu")


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


def _boxes(samples_dir):
    label, _, names = samples.load_reference(samples_dir, IMAGE)
    out = []
    for value, name in sorted(names.items())[:6]:
        truth = label == value
        if truth.sum() < 200:
            continue
        k = largest_slice(truth)
        r0, c0, r1, c1 = bounding_box(truth[:, :, k])
        out.append((name, [r0, r1, c0, c1, k, k]))
    return out


def _masks(handle, samples_dir, boxes):
    runtime = Runtime(1 << 30, 1 << 28)
    seg = InteractiveSegmenter(runtime, handle, propagate=False)
    path = str(samples.image_path(samples_dir, IMAGE))
    out = {}
    for name, roi in boxes:
        result = seg.segment(SegmentRequest(path, IMAGE, label=name, roi=roi, mode="slice", client_id=f"t-{name}"))
        out[name] = (result.label[:, :, roi[4]].copy(), result.model)
    runtime.stop()
    return out


def test_openvino_converts_in_the_background_and_answers_with_torchs_masks(samples_dir, ov_cache, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy2(shipped()[1], weights)
    converted = OpenVinoEncoders(ov_cache)
    handle = ModelHandle("2d", "litemedsam", weights, "cpu", engine="openvino", converted=converted)
    first = handle.current()
    assert first.engine == "torch" and first.key == SERVED  # torch answers while it converts
    assert converted.wait(first.model, first.source, 1) is not None, converted.status()
    time.sleep(ModelHandle.CHECK_INTERVAL_S)
    served = handle.current()
    assert served.engine == "openvino" and served.key == SERVED + "+openvino"
    x = torch.rand(1, 3, served.model.input_size, served.model.input_size)
    assert torch.allclose(served.encode(x), first.encode(x), atol=1e-4)
    boxes = _boxes(samples_dir)
    ov = _masks(handle, samples_dir, boxes)
    eager = _masks(ModelHandle("2d", "litemedsam", weights, "cpu"), samples_dir, boxes)
    for name, _ in boxes:
        assert ov[name][1].endswith("+openvino") and not eager[name][1].endswith("+openvino")
        assert np.array_equal(ov[name][0], eager[name][0]), name
    assert len(list(ov_cache.glob("*.xml"))) == 1


def test_a_restart_reuses_the_conversion_and_another_version_gets_its_own(samples_dir, ov_cache, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy2(shipped()[1], weights)
    before = {p.name: p.stat().st_mtime_ns for p in ov_cache.glob("*.xml")}
    assert before, "run after the conversion test"
    converted = OpenVinoEncoders(ov_cache)  # a new server process
    handle = ModelHandle("2d", "litemedsam", weights, "cpu", engine="openvino", converted=converted)
    serving = handle.current()
    t0 = time.time()
    assert converted.wait(serving.model, serving.source, 1) is not None
    assert time.time() - t0 < 20  # read from disk, not converted again
    assert {p.name: p.stat().st_mtime_ns for p in ov_cache.glob("*.xml")} == before
    # another adapter version (the rollback file) is another encoder: never served from this one's conversion
    other = converted.key(serving.model, str(shipped(rollback=True)[1]), 1)
    assert other not in {p.stem for p in ov_cache.glob("*.xml")}
    assert other != converted.key(serving.model, serving.source, 1) != converted.key(serving.model, None, 1)


def test_a_new_version_is_served_at_once_and_converted_behind(samples_dir, ov_cache, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy2(shipped()[1], weights)
    slow = []

    def slow_convert(key, model, batch):
        slow.append(key)
        time.sleep(3)
        return OpenVinoEncoders(ov_cache)._convert(key, model, batch)

    converted = OpenVinoEncoders(ov_cache, convert=slow_convert)
    handle = ModelHandle("2d", "litemedsam", weights, "cpu", engine="openvino", converted=converted)
    first = handle.current()
    converted.wait(first.model, first.source, 1)
    time.sleep(ModelHandle.CHECK_INTERVAL_S)
    assert handle.current().engine == "openvino"
    # a publication (other weights: the shipped rollback file's, as the next version's file)
    name = f"adaptsam_2d_litemedsam_v{shipped()[0] + 1}.pt"
    shutil.copy2(shipped(rollback=True)[1], weights / name)
    time.sleep(ModelHandle.CHECK_INTERVAL_S)
    new = handle.current()
    key = converted.key(new.model, new.source, 1)
    # served on torch while its conversion is still running: no click waits for it
    assert new.source.endswith(name) and new.engine == "torch" and converted.status()[key] == "converting"
    assert len(slow) == 2
    assert converted.wait(new.model, new.source, 1) is not None
    time.sleep(ModelHandle.CHECK_INTERVAL_S)
    assert handle.current().source.endswith(name) and handle.current().engine == "openvino"


def test_a_failed_conversion_leaves_torch_serving(samples_dir, tmp_path):
    def broken(key, model, batch):
        raise RuntimeError("conversion exploded")

    converted = OpenVinoEncoders(tmp_path / "cache", convert=broken)
    handle = ModelHandle("2d", "litemedsam", WEIGHTS, "cpu", engine="openvino", converted=converted)
    serving = handle.current()
    assert converted.wait(serving.model, serving.source, 1, timeout=30) is None
    assert any(v.startswith("failed: RuntimeError: conversion exploded") for v in converted.status().values())
    time.sleep(ModelHandle.CHECK_INTERVAL_S)
    assert handle.current().engine == "torch"
    boxes = _boxes(samples_dir)[:1]
    assert _masks(handle, samples_dir, boxes)[boxes[0][0]][0].sum() > 0


def test_a_session_goes_on_when_the_converted_encoder_takes_over(samples_dir, ov_cache, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy2(shipped()[1], weights)

    def slow_convert(key, model, batch):
        time.sleep(2)
        return OpenVinoEncoders(ov_cache)._convert(key, model, batch)

    converted = OpenVinoEncoders(ov_cache, convert=slow_convert)
    handle = ModelHandle("2d", "litemedsam", weights, "cpu", engine="openvino", converted=converted)
    runtime = Runtime(1 << 30, 1 << 28)
    seg = InteractiveSegmenter(runtime, handle, propagate=False)
    truth = samples.structure_mask(samples_dir, IMAGE, "liver")
    k = largest_slice(truth)
    inside = np.argwhere(truth[:, :, k])
    clicks = [[*inside[len(inside) // 2], k], [*inside[len(inside) // 7], k]]
    request = dict(image_path=str(samples.image_path(samples_dir, IMAGE)), image_id=IMAGE, label="liver", mode="slice",
                   client_id="reader")
    try:
        first = seg.segment(SegmentRequest(**request, foreground=[[int(v) for v in c] for c in clicks[:1]]))
        assert first.model == SERVED  # torch, while converting
        converted.wait(handle.current().model, handle.current().source, 1)
        time.sleep(ModelHandle.CHECK_INTERVAL_S)
        second = seg.segment(SegmentRequest(**request, foreground=[[int(v) for v in c] for c in clicks]))
        assert second.model == SERVED + "+openvino" and not second.embedding_cached  # torch's are not reused
        session = runtime.sessions.get("reader", IMAGE, "liver", SERVED)
        assert len(session.history) == 2 and len(session.foreground) == 2  # the correction continued the session
    finally:
        runtime.stop()


def test_a_server_on_auto_serves_the_converted_encoder(samples_dir, tmp_path):
    from server_util import copy_studies, server_process
    import requests

    studies = copy_studies(samples_dir, tmp_path / "studies", image_ids={IMAGE})
    engine = "openvino-bf16" if default_precision() == "bf16" else "openvino"
    with server_process(studies, {"engine": "auto"}, log=tmp_path / "server.log") as (url, _):
        deadline = time.time() + 900  # a first conversion on 2 cores: up to a few minutes per model
        while time.time() < deadline:  # the app converts the served encoders at start
            conversions = requests.get(url + "/adaptsam/progress", timeout=30).json()["engine_conversions"]
            if len(conversions) == 2 and all(v == "ready" for v in conversions.values()):
                break
            time.sleep(1)
        assert all(v == "ready" for v in conversions.values()), conversions
        time.sleep(ModelHandle.CHECK_INTERVAL_S)
        boxes = _boxes(samples_dir)[:1]
        r = requests.post(f"{url}/infer/adaptsam?image={IMAGE}&output=json", timeout=120,
                          data={"params": json.dumps({"label": boxes[0][0], "roi": [int(v) for v in boxes[0][1]], "mode": "slice"})})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == f"{SERVED}+{engine}"
        served = requests.get(url + "/adaptsam/progress", timeout=30).json()["served"]["2d"]
        assert served["engine"] == served["wanted_engine"] == engine
