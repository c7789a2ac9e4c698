"""SAM-Mix's model building blocks: the class activation map and its boxes on maps with
known answers, the slice classifier, the binary focal loss against its formula, and LoRA
on the image encoders (identity when fresh, merging, parameter counts, frozen weights,
adapter files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from desam_server.modeling import get_spec
from desam_server.modeling.cam import CamBox, cam_boxes, class_activation_map
from desam_server.modeling.checkpoint import CheckpointError
from desam_server.modeling.focal_loss import binary_focal_loss
from desam_server.modeling.lora import (
    add_lora,
    load_lora,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    lora_target_names,
    merge_lora,
    save_lora,
)
from desam_server.modeling.lora_linear import LoRALinear
from desam_server.modeling.slice_classifier import SliceClassifier
from desam_server.modeling.tiny_vit import TinyViT

# ---------------------------------------------------------------- CAM and boxes


def two_blob_map() -> np.ndarray:
    """60 x 80 map: blob A (value 1.0) on rows 10-19, columns 30-49; blob B (0.8) on rows
    40-44, columns 5-9; a small noise floor of 0.01 elsewhere."""
    g = np.full((60, 80), 0.01)
    g[10:20, 30:50] = 1.0
    g[40:45, 5:10] = 0.8
    return g


def test_two_blobs_give_two_boxes_on_their_pixel_edges():
    boxes = cam_boxes(two_blob_map(), 0.5)
    # x0 = first column, x1 = last column + 1 (SAM's pixel-boundary box), largest first.
    assert boxes == [CamBox(30, 10, 50, 20, area=200, peak=1.0), CamBox(5, 40, 10, 45, area=25, peak=0.8)]
    assert boxes[0].xyxy() == (30, 10, 50, 20)
    assert cam_boxes(torch.from_numpy(two_blob_map()).float(), 0.5)[1].xyxy() == (5, 40, 10, 45)


def test_largest_only_min_area_and_omega():
    g = two_blob_map()
    assert [b.xyxy() for b in cam_boxes(g, largest_only=True)] == [(30, 10, 50, 20)]
    assert [b.xyxy() for b in cam_boxes(g, min_area=26)] == [(30, 10, 50, 20)]
    # omega is a fraction of the map's maximum (1.0): B's 0.8 falls below 0.9, not below 0.8.
    assert [b.xyxy() for b in cam_boxes(g, 0.9)] == [(30, 10, 50, 20)]
    assert len(cam_boxes(g, 0.8)) == 2
    # omega 0.005 lets the 0.01 floor in: one region, the whole slice.
    assert [b.xyxy() for b in cam_boxes(g, 0.005)] == [(0, 0, 80, 60)]
    with pytest.raises(ValueError, match="omega"):
        cam_boxes(g, 0.0)
    with pytest.raises(ValueError, match="min_area"):
        cam_boxes(g, min_area=0)
    with pytest.raises(ValueError, match="one H x W"):
        cam_boxes(g[None])


def test_regions_are_eight_connected():
    g = np.zeros((10, 10))
    g[2, 2] = g[3, 3] = 1.0  # touch at a corner: one region
    g[7, 7] = 0.9
    assert [b.xyxy() for b in cam_boxes(g)] == [(2, 2, 4, 4), (7, 7, 8, 8)]
    # equal areas: the higher peak first.
    g[7, 8] = 0.9
    g[3, 3] = 0.0
    assert [(b.xyxy(), b.peak) for b in cam_boxes(g)] == [((7, 7, 9, 8), 0.9), ((2, 2, 3, 3), 1.0)]


def test_no_box_from_a_flat_nonpositive_or_nonfinite_map():
    assert cam_boxes(np.zeros((8, 8))) == []
    assert cam_boxes(np.full((8, 8), 3.0)) == []           # flat: the box would be the slice
    assert cam_boxes(-1.0 - np.random.default_rng(0).random((8, 8))) == []  # nothing positive
    g = two_blob_map()
    g[0, 0] = np.nan
    assert cam_boxes(g) == []


def test_cam_is_the_weighted_channel_sum_and_upsamples_to_cell_blocks():
    # 8 x 10 feature grid: channel 0 blob on cells rows 2-3, cols 3-4; channel 1 blob on
    # rows 5-6, cols 7-8; channel 2 (weight -1) blob on rows 6-7, cols 0-1.
    f = torch.zeros(1, 3, 8, 10)
    f[0, 0, 2:4, 3:5] = 1.0
    f[0, 1, 5:7, 7:9] = 1.0
    f[0, 2, 6:8, 0:2] = 1.0
    w = torch.tensor([1.0, 1.0, -1.0])
    low = class_activation_map(f, w)
    assert low.shape == (1, 8, 10)
    torch.testing.assert_close(low, f[:, 0] + f[:, 1] - f[:, 2], rtol=0, atol=0)
    torch.testing.assert_close(class_activation_map(f, w[None]), low)  # the head's 1 x C weight
    # x4 bilinear (align_corners=False): a cell of value 1 beside 0 crosses 0.5 halfway
    # between their centres, i.e. on the cells' shared edge, so omega 0.5 gives back the
    # cells' pixel blocks: cols 3-4 -> x [12, 20), rows 2-3 -> y [8, 16); B likewise.
    up = class_activation_map(f, w, size=(32, 40))
    assert up.shape == (1, 32, 40)
    boxes = cam_boxes(up[0], 0.5)
    assert sorted(b.xyxy() for b in boxes) == [(12, 8, 20, 16), (28, 20, 36, 28)]
    # x10/3: the centre cell of a 3 x 3 grid is the block [3.33, 6.67) in pixels; the
    # pixels whose centres (x + 0.5) lie in it are 3..6.
    centre = torch.zeros(1, 1, 3, 3)
    centre[0, 0, 1, 1] = 1.0
    assert [b.xyxy() for b in cam_boxes(class_activation_map(centre, torch.ones(1), size=(10, 10))[0])] == [
        (3, 3, 7, 7)]
    with pytest.raises(ValueError, match="entries"):
        class_activation_map(f, torch.ones(2))


# ---------------------------------------------------------------- slice classifier


def test_classifier_shapes_and_options():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 64, 64)
    small = SliceClassifier(depth=18)
    out = small(x)
    assert out.logits.shape == (2,) and out.features.shape == (2, 512, 2, 2)  # stride 32
    deep = SliceClassifier()  # ResNet-50 at output stride 8 by default
    assert (deep.depth, deep.output_stride, deep.in_chans) == (50, 8, 1)
    assert deep(x).features.shape == (2, 2048, 8, 8)
    assert SliceClassifier(depth=18, in_chans=3)(torch.rand(1, 3, 64, 64)).logits.shape == (1,)
    assert (deep.fc.in_features, deep.fc.out_features) == (2048, 1)
    with pytest.raises(ValueError, match="output stride 32 only"):
        SliceClassifier(depth=34, output_stride=8)
    with pytest.raises(ValueError, match="depth"):
        SliceClassifier(depth=38)
    with pytest.raises(ValueError, match="B x 1 x H x W"):
        small(torch.rand(2, 3, 64, 64))


def test_classifier_cam_is_the_manual_sum_and_the_logit_its_mean():
    torch.manual_seed(1)
    model = SliceClassifier(depth=18).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 1, 96, 80))
        g = model.class_activation_map(out.features)
        manual = (model.fc.weight[0][None, :, None, None] * out.features).sum(dim=1)
        torch.testing.assert_close(g, manual, rtol=1e-5, atol=1e-5)
        # pooling then one linear unit: logit = mean over the map of g, plus the bias.
        torch.testing.assert_close(out.logits, g.mean(dim=(1, 2)) + model.fc.bias, rtol=1e-5, atol=1e-5)
        assert model.class_activation_map(out.features, size=(96, 80)).shape == (3, 96, 80)


# ---------------------------------------------------------------- focal loss


@pytest.mark.parametrize("alpha", [0.25, 0.8, None])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.5])
def test_focal_loss_is_the_formula(alpha, gamma):
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(40, generator=g)
    targets = (torch.rand(40, generator=g) > 0.4).float()
    p = torch.sigmoid(logits.double())
    p_t = torch.where(targets > 0, p, 1 - p)
    alpha_t = 1.0 if alpha is None else torch.where(targets > 0, alpha, 1 - alpha).double()
    direct = -alpha_t * (1 - p_t) ** gamma * torch.log(p_t)
    terms = binary_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    torch.testing.assert_close(terms.double(), direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(binary_focal_loss(logits, targets, alpha=alpha, gamma=gamma).double(),
                               direct.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(binary_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum").double(),
                               direct.sum(), rtol=1e-5, atol=1e-5)


def test_focal_loss_rejects_bad_arguments():
    x, t = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="both be B"):
        binary_focal_loss(x[:, None], t[:, None])
    with pytest.raises(ValueError, match="alpha"):
        binary_focal_loss(x, t, alpha=1.5)
    with pytest.raises(ValueError, match="reduction"):
        binary_focal_loss(x, t, reduction="max")


# ---------------------------------------------------------------- LoRA


def small_tiny_vit() -> TinyViT:
    """A narrow TinyViT of MobileSAM's structure (attention stages 1-3 of depths 2, 2, 1)."""
    torch.manual_seed(5)
    return TinyViT(img_size=224, embed_dims=(16, 32, 40, 80), depths=(1, 2, 2, 1), out_chans=32).eval()


def outputs(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """An encoder's outputs as a list: SAM's ViT gives the embedding; ours (embedding, taps)."""
    with torch.no_grad():
        out = encoder(x)
    if isinstance(out, torch.Tensor):
        return [out]
    embedding, taps = out
    return [embedding, *taps]


def randomise_adapters(encoder: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(encoder):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def encoders(tiny_sam_checkpoint):
    """name -> (a random encoder in eval mode, an input for it): segment_anything's own
    ViT (the 'tiny' checkpoint's), our tapped ViT of the 'tiny' entry, a small TinyViT."""
    _, sam = tiny_sam_checkpoint
    torch.manual_seed(2)
    tapped = get_spec("tiny").make_encoder().eval()
    g = torch.Generator().manual_seed(4)
    return {
        "sam_vit": (sam.image_encoder, torch.randn(1, 3, 256, 256, generator=g)),
        "tapped_vit": (tapped, torch.randn(1, 3, 256, 256, generator=g)),
        "tiny_vit": (small_tiny_vit(), torch.randn(1, 3, 224, 224, generator=g)),
    }


@pytest.mark.parametrize("name", ["sam_vit", "tapped_vit", "tiny_vit"])
def test_a_fresh_adapter_changes_nothing(encoders, name):
    encoder, x = encoders[name]
    keys = list(encoder.state_dict())
    adapted = add_lora(encoder).eval()
    assert list(encoder.state_dict()) == keys and not lora_modules(encoder)  # the original is untouched
    for ours, theirs in zip(outputs(adapted, x), outputs(encoder, x), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("name", ["sam_vit", "tapped_vit", "tiny_vit"])
@pytest.mark.parametrize("include_proj", [False, True])
def test_the_merged_encoder_equals_the_adapted_one(encoders, name, include_proj):
    encoder, x = encoders[name]
    adapted = add_lora(encoder, rank=4, alpha=6.0, include_proj=include_proj).eval()
    randomise_adapters(adapted)
    merged = merge_lora(adapted).eval()
    assert not lora_modules(merged) and lora_modules(adapted)  # merged into a copy
    assert list(merged.state_dict()) == list(encoder.state_dict())  # SAM's own layout again
    adapted_out = outputs(adapted, x)
    for m, a in zip(outputs(merged, x), adapted_out, strict=True):
        assert (m - a).norm() / a.norm() < 1e-5
    # The adapters do change the embedding (not every tap: TinyViT's first tap comes
    # before any attention).
    embedding = adapted_out[0]
    assert (embedding - outputs(encoder, x)[0]).norm() / embedding.norm() > 1e-3
    merged_weight = merged.get_submodule(lora_target_names(encoder)[0]).weight
    adapter = adapted.get_submodule(lora_target_names(encoder)[0])
    expected = adapter.base.weight + 1.5 * adapter.lora_b.weight @ adapter.lora_a.weight  # alpha / r = 6 / 4
    torch.testing.assert_close(merged_weight, expected)


# Trainable parameters at rank 8, qkv only: each block of width C gets A (8 x C) and
# B (3C x 8), 32 C parameters.
#   vit_b: C 768, 12 blocks: 32 * 768 * 12 = 294,912
#   vit_l: C 1024, 24 blocks: 32 * 1024 * 24 = 786,432
#   vit_h: C 1280, 32 blocks: 32 * 1280 * 32 = 1,310,720
#   mobile_sam: attention stages of widths 128, 160, 320 and depths 2, 6, 2:
#     32 * (2 * 128 + 6 * 160 + 2 * 320) = 32 * 1856 = 59,392
# With proj too, each block adds A (8 x C) and B (C x 8): 48 C in all;
#   vit_b: 48 * 768 * 12 = 442,368.
LORA_COUNTS = {("vit_b", False): 294_912, ("vit_l", False): 786_432, ("vit_h", False): 1_310_720,
               ("mobile_sam", False): 59_392, ("vit_b", True): 442_368}


@pytest.mark.parametrize(("name", "include_proj"), list(LORA_COUNTS))
def test_trainable_parameter_counts(name, include_proj):
    with torch.device("meta"):  # no memory for the weights: only shapes are counted
        encoder = add_lora(get_spec(name).make_encoder(), include_proj=include_proj, copy=False)
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in lora_parameters(encoder)) == LORA_COUNTS[(name, include_proj)]
    blocks = {"vit_b": 12, "vit_l": 24, "vit_h": 32, "mobile_sam": 10}[name]
    assert len(lora_modules(encoder)) == blocks * (2 if include_proj else 1)


def test_tiny_vit_targets_are_its_attention_stages():
    assert lora_target_names(small_tiny_vit()) == [
        "layers.1.blocks.0.attn.qkv", "layers.1.blocks.1.attn.qkv",
        "layers.2.blocks.0.attn.qkv", "layers.2.blocks.1.attn.qkv", "layers.3.blocks.0.attn.qkv"]


def test_an_optimizer_step_leaves_the_frozen_weights_bit_identical(encoders):
    encoder, x = encoders["tapped_vit"]
    adapted = add_lora(encoder).train()
    frozen = {k: v.clone() for k, v in adapted.state_dict().items() if ".lora_" not in k}
    adapters_before = {k: v.clone() for k, v in lora_state_dict(adapted).items()}
    optimizer = torch.optim.AdamW(lora_parameters(adapted), lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # B is zero at first, so A's gradient is zero until B has moved
        embedding, taps = adapted(x)
        (embedding.square().mean() + sum(t.square().mean() for t in taps)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, value in adapted.state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(value, frozen[key]), key
    assert all(p.grad is None for n, p in adapted.named_parameters() if ".lora_" not in n)
    after = lora_state_dict(adapted)
    assert all(not torch.equal(after[k], adapters_before[k]) for k in after)


def test_adapter_files_round_trip_and_load_strictly(encoders, tmp_path):
    encoder, x = encoders["tiny_vit"]
    trained = add_lora(encoder)
    randomise_adapters(trained, seed=7)
    path = tmp_path / "adapters.safetensors"
    meta = save_lora(trained, path, encoder_name="tiny_vit", metadata={"structure": "liver"})
    assert (meta["rank"], meta["alpha"], meta["extra"]) == (8, 8.0, {"structure": "liver"})
    fresh = add_lora(encoder)
    assert load_lora(fresh, path, encoder_name="tiny_vit")["targets"] == lora_target_names(encoder)
    for a, b in zip(outputs(fresh.eval(), x), outputs(trained.eval(), x), strict=True):
        assert torch.equal(a, b)

    def refused(target: nn.Module, match: str, file=path, name="tiny_vit") -> None:
        before = {k: v.clone() for k, v in lora_state_dict(target).items()}
        with pytest.raises(CheckpointError, match=match):
            load_lora(target, file, encoder_name=name)
        assert all(torch.equal(v, before[k]) for k, v in lora_state_dict(target).items())  # nothing loaded

    refused(add_lora(encoder), "made for encoder 'tiny_vit', not 'mobile_sam'", name="mobile_sam")
    refused(add_lora(encoder, rank=4), "rank 8, alpha 8.0; the encoder's are rank 4")
    refused(add_lora(encoder, include_proj=True), "10 missing keys")  # A and B of 5 projs
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:-100])
    refused(add_lora(encoder), "not a readable LoRA file", file=broken)
    refused(add_lora(encoder), "not found", file=tmp_path / "absent.safetensors")


def test_add_lora_refuses_what_it_cannot_adapt(encoders):
    encoder, _ = encoders["tiny_vit"]
    with pytest.raises(ValueError, match="already carries 5 LoRA adapters"):
        add_lora(add_lora(encoder))
    with pytest.raises(ValueError, match="no SAM ViT or TinyViT attention"):
        add_lora(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="nothing to merge|no LoRA adapter to merge"):
        merge_lora(encoder)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv2d(1, 1, 1))
