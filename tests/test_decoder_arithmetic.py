"""The mask decoder's cheaper arithmetic (model/mask_decoder.py, model/decoder_attention.py) gives
SAM's answers: against `segment_anything`'s own `MaskDecoder.predict_masks` and `Attention`, on
real embeddings of the sample CT, through the base model and the shipped 2D adapter, for every
prompt shape the server and the trainer send, and with the same gradients for training.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

import samples
from adaptsam.model import adapter_io
from adaptsam.model.adapters import attach_adapters
from adaptsam.model.backbones import build_model
from adaptsam.model.decoder_attention import ImageToTokenAttention, TokenToImageAttention
from adaptsam.model.mask_decoder import computing_as_sam
from adaptsam.engine.preprocess import intensity_window, normalize_volume, take_slice
from adaptsam.engine.predictor import SlicePredictor
from server_util import WEIGHTS

ADAPTER = WEIGHTS / "adaptsam_2d_litemedsam_v5.pt"


def sams_own_arithmetic(model):
    """SAM's `MaskDecoder.predict_masks` and `Attention`, unchanged, on the same module."""
    assert sum(isinstance(m, (TokenToImageAttention, ImageToTokenAttention)) for m in model.mask_decoder.modules()) == 5
    return computing_as_sam(model.mask_decoder)


@pytest.fixture(scope="module")
def models():
    adapted = build_model("litemedsam")
    attach_adapters(adapted, adapter_io.config_from_meta(adapter_io.read_adapter_meta(ADAPTER)))
    adapter_io.load_adapters(ADAPTER, adapted)
    return {"base": build_model("litemedsam"), "2d": adapted.eval()}


@pytest.fixture(scope="module")
def embeddings(models, samples_dir):
    """Three real slices of the sample CT through the shipped 2D adapter's encoder."""
    volume = np.asarray(nib.load(str(samples.image_path(samples_dir, "ct_dicom"))).dataobj, dtype=np.float32)
    u8 = normalize_volume(volume, intensity_window(volume, "CT"))
    predictor = SlicePredictor(models["2d"])
    planes = [take_slice(u8, 2, int(k)) for k in np.linspace(0.3, 0.7, 3) * (u8.shape[2] - 1)]
    geom = predictor.geometry(planes[0])
    return predictor.embed(torch.stack([predictor.model_input(p, geom) for p in planes]))


def prompts(n_clicks: int, batch: int = 1, box: bool = True, mask: bool = False):
    g = torch.Generator().manual_seed(n_clicks + 10 * batch)
    points = None
    if n_clicks:
        points = (torch.rand(batch, n_clicks, 2, generator=g) * 200 + 28, (torch.rand(batch, n_clicks, generator=g) > 0.4).float())
    boxes = torch.tensor([[60.0, 70.0, 190.0, 200.0]]).repeat(batch, 1) if box else None
    mask_input = torch.randn(batch, 1, 256, 256, generator=g) * 4 if mask else None
    return dict(points=points, boxes=boxes, masks=mask_input)


CASES = {
    "box": (0, True, False),  # the trainer's and the server's box
    "one click": (1, False, False),  # SAM pads it with a point: 7 tokens
    "box and clicks": (3, True, False),
    "clicks and the previous answer": (4, False, True),  # a correction carrying logits
    "twenty clicks": (20, True, False),  # more tokens than folding pays for: SAM's order
}


@pytest.mark.parametrize("kind", ["base", "2d"])
@pytest.mark.parametrize("case", list(CASES))
def test_decoder_answers_as_sams_own_code(models, embeddings, kind, case):
    model = models[kind]
    n_clicks, box, mask = CASES[case]
    for emb, batch in ((embeddings[1:2], 1), (embeddings, 3), (embeddings[:1], 4)):
        # one slice one prompt; three slices three prompts (training, propagation); one slice
        # four prompts (SAM's repeat)
        p = prompts(n_clicks, batch, box, mask)
        with torch.inference_mode():
            sparse, dense = model.prompt_encoder(**p)
            args = (emb, model.dense_pe(), sparse, dense)
            ours = [model.mask_decoder(*args, multimask_output=m) for m in (False, True)]
            ranked_iou, logits_of = model.decode_ranked(emb, points=p["points"], boxes=p["boxes"]) if not mask else (None, None)
            with sams_own_arithmetic(model):  # prompt by prompt: SAM repeats one image per prompt
                pairs = [(emb[i if len(emb) == batch else 0][None], sparse[i : i + 1], dense[i : i + 1]) for i in range(batch)]
                theirs = [[torch.cat(t) for t in zip(*(model.mask_decoder(e, args[1], s, d, multimask_output=m) for e, s, d in pairs))]
                          for m in (False, True)]
        for (logits, iou), (ref_logits, ref_iou) in zip(ours, theirs):
            assert logits.shape == ref_logits.shape and iou.shape == ref_iou.shape
            assert torch.allclose(logits, ref_logits, atol=2e-3, rtol=0), (logits - ref_logits).abs().max()
            assert torch.allclose(iou, ref_iou, atol=1e-4)
            # the masks the server sends: at most a pixel in 10^4 on the zero line may differ
            assert ((logits > 0) != (ref_logits > 0)).float().mean() < 1e-4
        if ranked_iou is not None and batch == 4:
            assert torch.allclose(ranked_iou, theirs[0][1][:, 0], atol=1e-4)
            with torch.inference_mode():  # as the predictor asks for it
                assert torch.allclose(logits_of(2), theirs[0][0][2:3], atol=2e-3, rtol=0)


def test_training_gradients_are_sams(models, embeddings):
    """The adapted decoder trains to the same gradients through the folded attention."""
    model = models["2d"]
    params = [p for n, p in model.mask_decoder.named_parameters() if "adapter" in n]
    assert params

    p = prompts(2, 3, True, True)

    def grads(paired: bool):
        # paired: three slices with three prompts in one call (the trainer's batch); SAM's code
        # takes them one at a time
        model.zero_grad(set_to_none=True)
        calls = [slice(None)] if paired else [slice(i, i + 1) for i in range(3)]
        for rows in calls:
            logits, iou = model.decode(embeddings[rows].detach(), points=(p["points"][0][rows], p["points"][1][rows]),
                                       boxes=p["boxes"][rows], mask_input=p["masks"][rows])
            (logits.sigmoid().mean(dim=(1, 2, 3)).sum() + iou.sum()).backward()
        return [q.grad.clone() for q in params]

    ours = grads(True)
    with sams_own_arithmetic(model):
        theirs = grads(False)
    model.zero_grad(set_to_none=True)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3), (a - b).abs().max()
    assert any(a.abs().sum() > 0 for a in ours)
