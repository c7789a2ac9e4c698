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
