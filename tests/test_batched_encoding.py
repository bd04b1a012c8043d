"""Cold volumes: the slices a request needs are encoded in batches (serving.encode_batch), before
decoding for a 3D box and in the direction of travel for a propagation, and a batch gives the
embeddings that slice-by-slice encoding gives. Batches here are forced to 4 slices: a CPU's own
choice is one window per call (engine/models.py, encode_batch)."""

from __future__ import annotations

from dataclasses import replace

import torch

import samples
from adaptsam.engine.cache import EmbeddingCache
from adaptsam.engine.encoder import SliceEncoder
from adaptsam.engine.interactive import InteractiveSegmenter, Runtime
from adaptsam.engine.metrics import bounding_box, largest_slice
from adaptsam.engine.models import ModelHandle, encode_batch, encoder_precision
from adaptsam.engine.request import SegmentRequest
from adaptsam.engine.volume import Volume
from server_util import WEIGHTS

IMAGE = "ct_dicom"


def test_batch_size_and_precision_follow_the_device():
    assert encode_batch(1, "cpu") == 1 and encode_batch(5, "cpu") == 5  # one window on a CPU
    assert encode_batch(1, "cuda") == 16 and encode_batch(5, "cuda:0") == 15  # whole windows on a GPU
    assert encoder_precision("torch", "cpu") == "f32" and encoder_precision("torch", "cuda") == "bf16"
    assert encoder_precision("openvino", "cpu") == "f32" and encoder_precision("openvino-bf16", "cpu") == "bf16"


def _counting(serving, calls, batch):
    def encode(images):
        calls.append(images.shape[0])
        return serving.model.encode(images)

    return replace(serving, encoder=encode, batch_slices=batch)


def test_prefetch_encodes_what_is_missing_in_batches_equal_to_single_slices(samples_dir):
    serving = ModelHandle("2d", "litemedsam", WEIGHTS, "cpu").current()
    vol = Volume.load(samples.image_path(samples_dir, IMAGE))
    window = vol.window("liver")
    calls = []
    batched = _counting(serving, calls, 4)
    encoder = SliceEncoder(EmbeddingCache(1 << 30))
    try:
        encoder.embedding(batched, vol, IMAGE, 2, 5, window)  # one slice, no direction: one slice
        assert calls == [1]
        got = encoder.prefetch(batched, vol, IMAGE, 2, [3, 4, 5, 6, 7, 8], window)
        assert calls == [1, 4, 1] and sorted(got) == [3, 4, 6, 7, 8]  # slice 5 was cached already
        emb, cached = encoder.embedding(batched, vol, IMAGE, 2, 15, window, ahead=-1)  # a propagation walking down
        assert not cached and calls[-1] == 4
        assert all(encoder.key(IMAGE, 2, s, batched, window) in encoder.cache for s in (15, 14, 13, 12))
        assert encoder.key(IMAGE, 2, 16, batched, window) not in encoder.cache
        encoder.embedding(batched, vol, IMAGE, 2, 10, window, ahead=-1)
        assert calls[-1] == 2  # 10 and 9: 8 and 7 are cached
    finally:
        encoder.stop()
    single = SliceEncoder(EmbeddingCache(1 << 30))
    try:
        for s in (3, 8):
            one, _ = single.embedding(serving, vol, IMAGE, 2, s, window)
            assert torch.allclose(one[0], got[s], atol=2e-3), s  # both through the fp16 cache
    finally:
        single.stop()


def test_a_3d_box_on_a_cold_volume_encodes_its_slices_before_decoding(samples_dir):
    truth = samples.structure_mask(samples_dir, IMAGE, "liver")
    k = largest_slice(truth)
    r0, c0, r1, c1 = bounding_box(truth[:, :, k])
    roi = [r0, r1, c0, c1, k - 2, k + 2]
    handle = ModelHandle("2d", "litemedsam", WEIGHTS, "cpu")
    calls = []
    runtime = Runtime(1 << 30, 1 << 28)
    runtime.encoder.stop()  # no background work: every encoder call here is the request's
    handle.current = lambda serving=_counting(handle.current(), calls, 4): serving
    try:
        result = InteractiveSegmenter(runtime, handle).segment(
            SegmentRequest(str(samples.image_path(samples_dir, IMAGE)), IMAGE, label="liver", roi=roi, mode="volume", client_id="c"))
    finally:
        runtime.stop()
    assert calls == [1, 4]  # the prompted slice, then the box's other four in one batch
    assert sorted(result.slice_iou) == list(range(k - 2, k + 3))
    assert result.timings["encode"] > 0 and all(result.label[:, :, s].any() for s in range(k - 2, k + 3))


def test_a_slice_another_request_encoded_meanwhile_comes_from_the_cache(samples_dir):
    serving = ModelHandle("2d", "litemedsam", WEIGHTS, "cpu").current()
    vol = Volume.load(samples.image_path(samples_dir, IMAGE))
    window = vol.window("liver")
    encoder = SliceEncoder(EmbeddingCache(1 << 30))
    other = SliceEncoder(encoder.cache)  # a second request on the same cache
    own = encoder.prefetch

    def raced(*args, **kwargs):  # the other request encodes the slice between lookup and prefetch
        other.prefetch(*args, **kwargs)
        return own(*args, **kwargs)  # finds it cached: encodes nothing

    encoder.prefetch = raced
    try:
        emb, cached = encoder.embedding(serving, vol, IMAGE, 2, 7, window)
        assert torch.equal(emb[0], encoder.cache.get(encoder.key(IMAGE, 2, 7, serving, window)))
    finally:
        encoder.stop()
        other.stop()
