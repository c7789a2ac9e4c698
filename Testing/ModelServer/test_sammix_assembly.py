"""SAM-Mix's assembly on the tiny encoder: what trains and what stays frozen (the source
DeSAM model untouched), slice inference (absent / present, CAM box, mask), equality with
SAM's own prompted prediction while the LoRA adds zero, the merged serving form, the
multitask loss against a direct computation, and a short multitask training run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from desam_server.engine import IntensityWindow, SlicePredictor, prepare_input
from desam_server.engine.preprocess import to_input_frame
from desam_server.engine.sammix import SamMix, SamMixPrediction, build_sammix
from desam_server.modeling.cam import cam_boxes, class_activation_map
from desam_server.modeling.lora import lora_modules
from desam_server.modeling.sammix_loss import SamMixLoss
from desam_server.modeling.slice_classifier import ClassifierOutput
from desam_server.training.desam_family import low_res_target

from conftest import phantom_slice

WINDOW = IntensityWindow.ct_soft_tissue()


def make_sammix(model, seed: int = 0) -> SamMix:
    torch.manual_seed(seed)
    return build_sammix(model, classifier_depth=18)


def disc_slice(h: int = 64, w: int = 80, *, centre=(30, 44), radius: float = 11.0, present: bool = True,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 H x W noise with a bright disc (when present) and its mask."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2) & present
    image = r.normal(60, 12, size=(h, w)) + 150 * mask
    return np.clip(image, 0, 255).astype(np.uint8), mask


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def set_presence_bias(sammix: SamMix, value: float) -> None:
    with torch.no_grad():
        sammix.classifier.fc.bias.fill_(value)


# ---------------------------------------------------------------- what trains


def test_trainable_and_frozen_parameter_sets(tiny_model):
    sammix = make_sammix(tiny_model)
    names = dict(sammix.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}
    expected = ({n for n in names if n.startswith("classifier.") or n.startswith("mask_decoder.")}
                | {n for n in names if n.startswith("image_encoder.") and (".lora_a." in n or ".lora_b." in n)})
    assert trainable == expected
    assert {id(p) for p in sammix.trainable_parameters()} == {id(names[n]) for n in expected}
    # LoRA on every block's qkv (8 blocks in the tiny encoder), nothing else in the encoder trains.
    assert sorted(lora_modules(sammix.image_encoder)) == [f"blocks.{i}.attn.qkv" for i in range(8)]
    assert not any(p.requires_grad for p in sammix.prompt_encoder.parameters())
    frozen_encoder = [n for n in names if n.startswith("image_encoder.") and n not in expected]
    assert any(n.endswith("qkv.base.weight") for n in frozen_encoder) and any("neck" in n for n in frozen_encoder)
    # Copies, not shared modules; the source model gains no adapter.
    assert sammix.mask_decoder is not tiny_model.mask_decoder
    assert sammix.prompt_encoder is not tiny_model.prompt_encoder
    assert not lora_modules(tiny_model.image_encoder)


def test_optimizer_steps_change_the_trainable_parts_only_and_never_the_source(tiny_model):
    source = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sammix = make_sammix(tiny_model)
    before = {k: v.clone() for k, v in sammix.state_dict().items()}
    image, mask = disc_slice()
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    x, input_size = prepare_input(sammix, rgb)
    box = to_input_frame(np.array(mask_box(mask), dtype=float).reshape(2, 2), image.shape, sammix.img_size)
    boxes = torch.tensor(box.reshape(1, 4), dtype=torch.float)
    target = low_res_target(mask, input_size, sammix.img_size, "cpu")[None]
    cls_in = torch.stack([SamMix.classifier_input(image, "cpu")[0], SamMix.classifier_input(disc_slice(
        present=False)[0], "cpu")[0]])
    loss_fn = SamMixLoss()
    optimizer = torch.optim.Adam(sammix.trainable_parameters(), lr=1e-3)
    for _ in range(2):
        logits, low_res, iou = sammix.forward_train(x, cls_in, boxes)
        assert logits.shape == (2,) and low_res.shape == (1, 1, 64, 64) and iou.shape == (1,)
        loss, _ = loss_fn(logits, torch.tensor([1.0, 0.0]), low_res, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = sammix.state_dict()
    trainable_keys = {n for n, p in sammix.named_parameters() if p.requires_grad}
    for key, value in after.items():
        if key in trainable_keys:
            continue
        if key.startswith("classifier."):  # batch-norm running statistics move in train mode
            assert "running" in key or "num_batches" in key or torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key
    changed = [k for k in trainable_keys if not torch.equal(after[k], before[k])]
    assert any(".lora_b." in k for k in changed) and any(k.startswith("mask_decoder.") for k in changed)
    assert any(k.startswith("classifier.") for k in changed)
    now = tiny_model.state_dict()
    assert now.keys() == source.keys()
    assert all(torch.equal(now[k], source[k]) for k in source)


# ---------------------------------------------------------------- slice inference


def test_predict_slice_absent_gives_no_box_and_an_empty_mask(tiny_model):
    sammix = make_sammix(tiny_model).eval()
    set_presence_bias(sammix, -40.0)
    image, _ = phantom_slice(60, 80)
    result = sammix.predict_slice(image, WINDOW)
    assert isinstance(result, SamMixPrediction)
    assert result.probability < 1e-6
    assert result.box is None and result.iou is None
    assert result.mask.shape == (60, 80) and result.mask.dtype == bool and not result.mask.any()


def test_predict_slice_present_prompts_sam_with_the_cam_box(tiny_model):
    sammix = make_sammix(tiny_model).eval()
    set_presence_bias(sammix, 40.0)
    image, _ = phantom_slice(60, 80)
    result = sammix.predict_slice(image, WINDOW, omega=0.5)
    assert result.probability > 1 - 1e-6
    # The box is the largest activated region of the classifier's own map, in slice pixels.
    gray = torch.as_tensor(np.clip(np.rint((image.astype(np.float32) - WINDOW.low) * 255 / WINDOW.width), 0, 255))
    with torch.no_grad():
        features = sammix.classifier(gray[None, None] / 255.0).features
        cam = sammix.classifier.class_activation_map(features, size=(60, 80))[0]
    assert result.box == cam_boxes(cam, 0.5, largest_only=True)[0].xyxy()
    x0, y0, x1, y1 = result.box
    assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 60
    assert result.mask.shape == (60, 80) and result.mask.dtype == bool
    assert isinstance(result.iou, float) and np.isfinite(result.iou)
    # That mask is SAM's answer to that box.
    mask, iou = sammix.predict_box(image, WINDOW, result.box)
    assert np.array_equal(mask, result.mask) and iou == pytest.approx(result.iou)
    assert result.boxes == (result.box,) and result.ious == (result.iou,)
    with pytest.raises(ValueError, match="threshold"):
        sammix.predict_slice(image, WINDOW, threshold=1.5)
    with pytest.raises(ValueError, match="window is required"):
        sammix.predict_slice(image, None)
    with pytest.raises(ValueError, match="H x W slice"):
        sammix.predict_slice(np.zeros((4, 60, 80), np.uint8), None)
    with pytest.raises(RuntimeError, match="eval mode"):
        sammix.train().predict_slice(image, WINDOW)


def test_forward_train_decodes_each_slice_with_its_own_box_and_allows_no_segmented_slice(tiny_model):
    sammix = make_sammix(tiny_model).eval()
    items = [disc_slice(seed=0), disc_slice(56, 72, centre=(20, 30), radius=8.0, seed=1)]
    sam_in, boxes = [], []
    for image, mask in items:
        x, _ = prepare_input(sammix, np.repeat(image[:, :, None], 3, axis=2))
        sam_in.append(x[0])
        box = to_input_frame(np.array(mask_box(mask), dtype=float).reshape(2, 2), image.shape, sammix.img_size)
        boxes.append(torch.tensor(box.reshape(4), dtype=torch.float))
    sam_in, boxes = torch.stack(sam_in), torch.stack(boxes)
    cls_in = SamMix.classifier_input(items[0][0], "cpu")
    with torch.no_grad():
        logits, low_res, iou = sammix.forward_train(sam_in, cls_in, boxes)
        assert logits.shape == (1,) and low_res.shape == (2, 1, 64, 64) and iou.shape == (2,)
        for k in range(2):
            _, alone, alone_iou = sammix.forward_train(sam_in[k:k + 1], cls_in, boxes[k:k + 1])
            torch.testing.assert_close(low_res[k:k + 1], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(iou[k:k + 1], alone_iou, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(low_res[0], low_res[1])
        _, none, none_iou = sammix.forward_train(sam_in[:0], cls_in, boxes[:0])
    assert none.shape == (0, 1, 64, 64) and none_iou.shape == (0,)
    with pytest.raises(ValueError, match="2 SAM images for 1 boxes"):
        sammix.forward_train(sam_in, cls_in, boxes[:1])


class TwoBlobClassifier(torch.nn.Module):
    """A stand-in classifier (the SliceClassifier interface) whose map on a 64 x 80 slice is
    known: an 8 x 10 feature map, one channel, blob A (1.0) on cells rows 1-2, columns 1-3
    and blob B (1.0, smaller) on rows 5-6, columns 7-8; presence logit 5."""

    in_chans = 1

    def forward(self, x):
        features = torch.zeros(x.shape[0], 1, 8, 10)
        features[:, 0, 1:3, 1:4] = 1.0
        features[:, 0, 5:7, 7:9] = 1.0
        return ClassifierOutput(logits=torch.full((x.shape[0],), 5.0), features=features)

    def class_activation_map(self, features, *, size=None):
        return class_activation_map(features, torch.ones(1), size=size)


def test_every_region_prompts_sam_when_not_largest_only(tiny_model):
    base = make_sammix(tiny_model).eval()
    sammix = SamMix(encoder_name=base.encoder_name, classifier=TwoBlobClassifier(), image_encoder=base.image_encoder,
                    prompt_encoder=base.prompt_encoder, mask_decoder=base.mask_decoder,
                    convention=base.convention).eval()
    image, _ = disc_slice(64, 80)
    # Integer scale 8: each blob's box is exactly its cells' pixel block.
    a, b = (8, 8, 32, 24), (56, 40, 72, 56)
    largest = sammix.predict_slice(image, None)
    assert largest.box == a and largest.boxes == (a,)
    every = sammix.predict_slice(image, None, largest_only=False)
    assert every.boxes == (a, b) and every.box == a and len(every.ious) == 2
    alone = [sammix.predict_box(image, None, box) for box in (a, b)]
    assert np.array_equal(every.mask, alone[0][0] | alone[1][0]) and np.array_equal(largest.mask, alone[0][0])
    assert every.ious == pytest.approx([alone[0][1], alone[1][1]], abs=1e-5)
    assert every.iou == pytest.approx(largest.iou, abs=1e-5)


def test_fresh_sammix_with_a_box_equals_sams_prompted_prediction(tiny_model):
    sammix = make_sammix(tiny_model).eval()
    image, organ = phantom_slice(60, 80)
    predictor = SlicePredictor(tiny_model, precision="fp32", fast=None)
    predictor.set_image(image, WINDOW)
    for box in (mask_box(organ), (5, 7, 41, 50)):
        masks, ious, _ = predictor.predict(box=np.array(box), multimask_output=False)
        mask, iou = sammix.predict_box(image, WINDOW, box)
        assert np.array_equal(mask, masks[0])
        assert iou == pytest.approx(float(ious[0]), abs=1e-5)


# ---------------------------------------------------------------- merged serving form


def test_merged_equals_unmerged_after_random_lora_weights(tiny_model):
    sammix = make_sammix(tiny_model, seed=3).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in lora_modules(sammix.image_encoder).values():
            module.lora_b.weight.copy_(0.05 * torch.randn(module.lora_b.weight.shape, generator=generator))
    set_presence_bias(sammix, 2.0)
    merged = sammix.merged()
    assert merged.is_merged and not sammix.is_merged and not merged.training
    assert not any(p.requires_grad for p in merged.parameters())
    assert set(merged.image_encoder.state_dict()) == set(tiny_model.image_encoder.state_dict())
    image, _ = phantom_slice(60, 80)
    # The adapters matter: the adapted encoder's embedding is not the base encoder's.
    x, _ = prepare_input(sammix, np.repeat(np.zeros((60, 80), np.uint8)[:, :, None], 3, axis=2))
    with torch.no_grad():
        assert not torch.allclose(sammix.encode(x), tiny_model.image_encoder(x)[0], atol=1e-3)
        torch.testing.assert_close(merged.encode(x), sammix.encode(x), rtol=1e-4, atol=1e-4)
    a = sammix.predict_slice(image, WINDOW)
    b = merged.predict_slice(image, WINDOW)
    assert a.box is not None
    assert b.probability == pytest.approx(a.probability, abs=1e-6)
    assert b.box == a.box
    union = np.logical_or(a.mask, b.mask).sum()
    assert union == 0 or np.logical_and(a.mask, b.mask).sum() / union > 0.999
    assert b.iou == pytest.approx(a.iou, abs=1e-4)
    with pytest.raises(ValueError, match="no LoRA"):
        merged.merged()


# ---------------------------------------------------------------- the loss


def direct_focal(logits, targets, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(logits)
    p_t = torch.where(targets > 0.5, p, 1 - p)
    a_t = torch.where(targets > 0.5, torch.tensor(alpha), torch.tensor(1 - alpha))
    return (-a_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()


def direct_dice(logits, masks):
    p = torch.sigmoid(logits).flatten(1)
    t = masks.flatten(1)
    return (1 - (2 * (p * t).sum(1) + 1e-5) / (p.sum(1) + t.sum(1) + 1e-5)).mean()


def test_loss_against_a_direct_computation():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    presence = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mask_logits = torch.tensor([[[[3.0, -2.0], [0.5, -0.5]]], [[[-1.0, 1.0], [2.0, 0.0]]]])
    masks = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 1.0], [1.0, 1.0]]]])
    total, parts = SamMixLoss(focal_weight=2.0, dice_weight=0.5)(logits, presence, mask_logits, masks)
    focal, dice = direct_focal(logits, presence), direct_dice(mask_logits, masks)
    assert parts["focal"] == pytest.approx(float(focal), rel=1e-5)
    assert parts["dice"] == pytest.approx(float(dice), rel=1e-5)
    assert float(total) == pytest.approx(float(2.0 * focal + 0.5 * dice), rel=1e-5)


def test_loss_with_labelled_slices_without_segmentation():
    loss_fn = SamMixLoss()
    logits = torch.tensor([1.0, -2.0, 0.3], requires_grad=True)
    presence = torch.tensor([1.0, 0.0, 1.0])
    # Three labelled slices, one of them segmented.
    mask_logits = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    masks = (torch.arange(64).reshape(1, 1, 8, 8) % 3 == 0).float()
    total, parts = loss_fn(logits, presence, mask_logits, masks)
    expected = direct_focal(logits, presence) + direct_dice(mask_logits, masks)
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    total.backward()
    assert logits.grad.abs().sum() > 0 and mask_logits.grad.abs().sum() > 0
    # No segmented slice in the batch: the focal term alone, Dice reported as nan.
    total, parts = loss_fn(logits, presence, torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8))
    assert float(total.detach()) == pytest.approx(float(direct_focal(logits, presence).detach()), rel=1e-5)
    assert np.isnan(parts["dice"]) and total.requires_grad
    with pytest.raises(ValueError, match="at least one"):
        loss_fn(torch.zeros(0), torch.zeros(0), torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="N x 1 x L x L"):
        loss_fn(logits, presence, torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4))


# ---------------------------------------------------------------- a short multitask run


def test_a_short_multitask_run_lowers_the_focal_and_the_dice_loss(tiny_model):
    sammix = make_sammix(tiny_model, seed=1)
    n = 12
    slices = [disc_slice(48, 48, centre=(16 + 2 * (i % 4), 22 + 2 * (i % 3)), radius=9.0, present=i % 2 == 0,
                         seed=i) for i in range(n)]
    cls_in = torch.stack([SamMix.classifier_input(img, "cpu")[0] for img, _ in slices])
    presence = torch.tensor([float(m.any()) for _, m in slices])
    segmented = [0, 2, 4]  # masks on a few of the slices holding the disc
    sam_in, targets, boxes = [], [], []
    for i in segmented:
        img, mask = slices[i]
        x, input_size = prepare_input(sammix, np.repeat(img[:, :, None], 3, axis=2))
        sam_in.append(x[0])
        targets.append(low_res_target(mask, input_size, sammix.img_size, "cpu"))
        boxes.append(to_input_frame(np.array(mask_box(mask), dtype=float).reshape(2, 2), img.shape, sammix.img_size))
    sam_in, targets = torch.stack(sam_in), torch.stack(targets)
    boxes = torch.tensor(np.stack(boxes).reshape(-1, 4), dtype=torch.float)
    loss_fn = SamMixLoss()
    optimizer = torch.optim.Adam(sammix.trainable_parameters(), lr=1e-3)
    history = []
    for step in range(24):
        pick = [segmented[step % len(segmented)]]
        k = segmented.index(pick[0])
        logits, low_res, _ = sammix.forward_train(sam_in[k:k + 1], cls_in, boxes[k:k + 1])
        loss, parts = loss_fn(logits, presence, low_res, targets[k:k + 1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append((parts["focal"], parts["dice"]))
    first, last = np.mean(history[:3], axis=0), np.mean(history[-3:], axis=0)
    assert last[0] < 0.5 * first[0], history
    assert last[1] < 0.5 * first[1], history
    # In eval mode the classifier now tells the slices apart. 24 steps are too few for the
    # batch-norm running statistics to follow the moving weights, so set them to this
    # batch's statistics first (momentum None: a plain average), as a longer run would.
    with torch.no_grad():
        for module in sammix.classifier.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        sammix.classifier(cls_in)
    sammix.eval()
    probabilities = [sammix.predict_slice(img, None).probability for img, _ in slices]
    assert [p >= 0.5 for p in probabilities] == [bool(m.any()) for _, m in slices], probabilities
