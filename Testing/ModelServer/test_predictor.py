"""SlicePredictor: equivalence with SamPredictor, automatic modes, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from torchvision.ops import nms

from desam_server.engine import IntensityWindow, SlicePredictor, UntrainedDecoderError, apply_window, to_rgb
from desam_server.engine.postprocess import grid_points, remove_small_regions
from desam_server.modeling import FastPath, build_desam, save_decoder

from conftest import phantom_slice


@pytest.fixture(scope="module")
def rgb_slice():
    image, _ = phantom_slice(150, 220)
    return to_rgb(image, IntensityWindow(center=40, width=400))


@pytest.fixture(scope="module")
def pair(tiny_sam_checkpoint, rgb_slice):
    """Our predictor and segment_anything's own, same weights (from the file), same image."""
    path, sam = tiny_sam_checkpoint
    ours = SlicePredictor(build_desam("tiny", sam_checkpoint=path), precision="fp32")
    ours.set_image(rgb_slice)
    theirs = SamPredictor(sam)
    theirs.set_image(rgb_slice)
    return ours, theirs


PROMPTS = [
    dict(point_coords=np.array([[120.0, 70.0]]), point_labels=np.array([1])),
    dict(point_coords=np.array([[120.0, 70.0], [30.0, 20.0]]), point_labels=np.array([1, 0])),
    dict(box=np.array([60.0, 30.0, 190.0, 120.0])),
    dict(point_coords=np.array([[100.0, 80.0]]), point_labels=np.array([0]), box=np.array([50.0, 20.0, 200.0, 140.0])),
]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("multimask", [True, False])
def test_prompted_predict_matches_sam_predictor(pair, prompt, multimask):
    ours, theirs = pair
    torch.testing.assert_close(ours.features.embedding, theirs.features, rtol=1e-5, atol=1e-5)
    m1, s1, l1 = ours.predict(**prompt, multimask_output=multimask)
    m2, s2, l2 = theirs.predict(**prompt, multimask_output=multimask)
    assert m1.shape == m2.shape == ((3 if multimask else 1), 150, 220)
    np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(l1, l2, rtol=1e-4, atol=1e-4)
    # Binary masks may differ only where the logit is within float noise of 0.
    assert (m1 != m2).mean() < 1e-3
    lg1, _, _ = ours.predict(**prompt, multimask_output=multimask, return_logits=True)
    lg2, _, _ = theirs.predict(**prompt, multimask_output=multimask, return_logits=True)
    np.testing.assert_allclose(lg1, lg2, rtol=1e-4, atol=1e-4)


def test_refinement_with_previous_low_res_logits_matches(pair):
    ours, theirs = pair
    _, _, low = theirs.predict(**PROMPTS[0], multimask_output=False)
    args = dict(point_coords=np.array([[120.0, 70.0], [150.0, 90.0]]), point_labels=np.array([1, 0]), mask_input=low)
    m1, s1, l1 = ours.predict(**args, multimask_output=False)
    m2, s2, l2 = theirs.predict(**args, multimask_output=False)
    np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(l1, l2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(point_coords=np.array([[500.0, 10.0]]), point_labels=np.array([1])), "inside"),
        (dict(point_coords=np.array([[np.nan, 10.0]]), point_labels=np.array([1])), "finite"),
        (dict(point_coords=np.array([[5.0, 10.0]]), point_labels=np.array([2])), "labels"),
        (dict(point_coords=np.array([[5.0, 10.0]])), "point_labels"),
        (dict(box=np.array([50.0, 50.0, 10.0, 80.0])), "x1 > x0"),
        (dict(box=np.array([0.0, 0.0, 300.0, 80.0])), "inside"),
        (dict(mask_input=np.zeros((1, 32, 32))), "mask_input"),
        (dict(), "at least one prompt"),
    ],
)
def test_bad_prompts_are_rejected_with_clear_errors(pair, kwargs, message):
    ours, _ = pair
    with pytest.raises(ValueError, match=message):
        ours.predict(**kwargs)


def test_predict_needs_an_image(tiny_model):
    with pytest.raises(RuntimeError, match="set_image"):
        SlicePredictor(tiny_model).predict(box=np.array([0, 0, 5, 5]))


def test_automatic_modes_refuse_an_untrained_decoder(pair):
    ours, _ = pair
    assert not ours.model.has_trained_decoder
    with pytest.raises(UntrainedDecoderError, match="trained DeSAM decoder"):
        ours.predict_auto("box")
    with pytest.raises(UntrainedDecoderError, match="train"):
        ours.predict_auto("grid")


@pytest.fixture(scope="module")
def trained_predictor(tiny_sam_checkpoint, tmp_path_factory, rgb_slice):
    """A model whose PRIM + PDMM come from a decoder file (random weights written by the
    test, so that outputs are non-trivial and deterministic)."""
    path, _ = tiny_sam_checkpoint
    model = build_desam("tiny", sam_checkpoint=path)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.pdmm.parameters():
            p.normal_(0, 0.05)
    dec = tmp_path_factory.mktemp("dec") / "tiny_decoder.safetensors"
    save_decoder(model, dec, structure="phantom")
    loaded = build_desam("tiny", sam_checkpoint=path, decoder_checkpoint=dec)
    pred = SlicePredictor(loaded, precision="fp32")
    pred.set_image(rgb_slice)
    return pred


# The spec's box NMS, used only by the literal reference procedure below: the predictor
# itself never needs it (NMS always keeps the top-ranked box).
def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """B x H x W bool -> B x 4 XYXY boxes (inclusive pixel extents; zeros for empty)."""
    b, h, w = masks.shape
    if b == 0:
        return torch.zeros((0, 4), device=masks.device)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    ar_h = torch.arange(h, device=masks.device)[None].expand(b, -1)
    ar_w = torch.arange(w, device=masks.device)[None].expand(b, -1)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1)
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    empty = ~rows.any(dim=1)
    boxes[empty] = 0
    return boxes


def nms_keep(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of masks surviving box NMS, ordered by decreasing score."""
    if masks.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.long, device=masks.device)
    boxes = masks_to_boxes(masks)
    # Inclusive extents -> half-open so a one-pixel box has non-zero area.
    boxes[:, 2:] += 1
    return nms(boxes.float().cpu(), scores.float().cpu(), iou_threshold).to(masks.device)


def naive_grid(pred: SlicePredictor, grid_size: int, iou_threshold: float, min_area: int, nms_threshold: float = 0.7):
    """The reference procedure of DESAM_SPEC item 22, literally: every prompt through the
    whole DeSAM decoder on its own (PDMM's image part recomputed per prompt), IoU filter,
    logit > 0, holes/islands removed, empty masks dropped, box NMS ranked by IoU, top one."""
    m, f = pred.model, pred.features
    from desam_server.engine.preprocess import to_input_frame

    pts = to_input_frame(grid_points(grid_size, *f.original_size), f.original_size, m.img_size)
    masks, scores, all_ious = [], [], []
    with torch.no_grad():
        for x, y in pts:
            points = (torch.tensor([[[x, y]]], dtype=torch.float), torch.ones(1, 1, dtype=torch.int))
            iou, logits = m.desam_forward(f.embedding, f.taps, points=points)
            all_ious.append(float(iou))
            mask = m.postprocess_logits(logits, f.input_size, f.original_size)[0, 0] > 0
            mask = torch.from_numpy(remove_small_regions(mask.numpy(), min_area))
            if float(iou) > iou_threshold and mask.any():
                masks.append(mask)
                scores.append(iou[0])
    if not masks:
        return None, None, all_ious
    masks, scores = torch.stack(masks), torch.stack(scores)
    best = int(nms_keep(masks, scores, nms_threshold)[0])
    return masks[best].numpy(), float(scores[best]), all_ious


def between(values, quantile: float) -> float:
    """A threshold at ``quantile`` of ``values`` that lies midway between two of them, so
    float rounding (1e-6) of the scores cannot move a prompt across it."""
    v = np.sort(np.asarray(values))
    i = min(int(quantile * len(v)), len(v) - 2)
    return float((v[i] + v[i + 1]) / 2)


@pytest.fixture(scope="module")
def grid_ious(trained_predictor):
    return naive_grid(trained_predictor, 5, -1e9, 16)[2]


@pytest.mark.parametrize("quantile,min_area", [(0.5, 16), (0.2, 16), (0.5, 2000), (0.9, 0)])
@pytest.mark.parametrize("fast", [FastPath(), FastPath.without("slice_cache"), None])
def test_grid_mode_equals_the_literal_procedure(trained_predictor, grid_ious, quantile, min_area, fast):
    """Scoring all prompts with PRIM, then decoding candidates in IoU order until one
    survives, returns exactly what the full procedure (81 full decoder passes, NMS) does,
    with the fast path (and PDMM's image part kept per slice, or recomputed) or without."""
    pred = SlicePredictor(trained_predictor.model, precision="fp32", fast=fast)
    pred.set_features(trained_predictor.features)
    threshold = between(grid_ious, quantile)
    want, want_iou, _ = naive_grid(pred, 5, threshold, min_area)
    got = pred.predict_auto("grid", grid_size=5, iou_threshold=threshold, min_region_area=min_area,
                            chunk_size=7, decode_chunk=2)
    assert got.candidates == 25
    assert got.passed == sum(i > threshold for i in grid_ious)
    if want is None:
        assert not got.mask.any() and np.isnan(got.iou)
    else:
        np.testing.assert_array_equal(got.mask, want)
        assert got.iou == pytest.approx(want_iou, abs=1e-6)
        assert got.decoded <= got.passed


def test_grid_mode_skips_candidates_whose_cleaned_mask_is_empty(trained_predictor, grid_ious):
    """With a minimum region area larger than the best candidate's mask, the next
    candidates are decoded until one survives (or none does)."""
    pred = trained_predictor
    first = pred.predict_auto("grid", grid_size=5, iou_threshold=-1e9, min_region_area=0, decode_chunk=1)
    area = int(first.mask.sum())
    assert first.decoded == 1 and area > 0
    res = pred.predict_auto("grid", grid_size=5, iou_threshold=-1e9, min_region_area=area + 1, decode_chunk=1)
    want, _, _ = naive_grid(pred, 5, -1e9, area + 1)
    assert res.decoded > 1
    if want is None:
        assert not res.mask.any()
    else:
        np.testing.assert_array_equal(res.mask, want)


def test_grid_mode_returns_empty_when_nothing_passes(trained_predictor):
    res = trained_predictor.predict_auto("grid", grid_size=3, iou_threshold=1e9)
    assert res.passed == 0 and res.decoded == 0 and not res.mask.any() and np.isnan(res.iou)
    assert res.mask.shape == (150, 220)


def test_box_mode_is_one_forward_with_the_whole_slice_box(trained_predictor):
    pred = trained_predictor
    m, f = pred.model, pred.features
    res = pred.predict_auto("box", min_region_area=0)
    box = torch.tensor([[0.0, 0.0, 256.0, 175.0]])  # 150 x 220 resizes to 175 x 256
    with torch.no_grad():
        iou, logits = m.desam_forward(f.embedding, f.taps, boxes=box)
    want = (m.postprocess_logits(logits, f.input_size, f.original_size)[0, 0] > 0).numpy()
    assert abs(res.iou - float(iou)) < 1e-5
    assert (res.mask != want).mean() < 1e-3
    with pytest.raises(ValueError, match="unknown automatic mode"):
        pred.predict_auto("everything")


def test_grid_points_are_cell_centres():
    pts = grid_points(3, 30, 60)
    assert pts.shape == (9, 2)
    np.testing.assert_allclose(pts[0], [10.0, 5.0])
    np.testing.assert_allclose(pts[-1], [50.0, 25.0])


def test_remove_small_regions_fills_holes_and_drops_islands():
    mask = np.zeros((40, 40), bool)
    mask[5:30, 5:30] = True
    mask[15:17, 15:17] = False  # a 4-pixel hole
    mask[35:37, 35:37] = True  # a 4-pixel island
    out = remove_small_regions(mask, 10)
    assert out[15:17, 15:17].all() and not out[35:37, 35:37].any()
    assert out.sum() == 25 * 25
    np.testing.assert_array_equal(remove_small_regions(mask, 0), mask)


def test_windowing_and_rgb_conversion():
    w = IntensityWindow(center=40, width=400)
    out = apply_window(np.array([[-1000, -160, 40, 240, 3000]], dtype=np.int16), w)
    np.testing.assert_array_equal(out, [[0, 0, 128, 255, 255]])
    rgb = to_rgb(np.array([[-160, 240]], np.int16), w)
    assert rgb.shape == (1, 2, 3) and rgb.dtype == np.uint8
    with pytest.raises(ValueError, match="window"):
        to_rgb(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError):
        IntensityWindow(center=0, width=0)
    mr = IntensityWindow.from_percentiles(np.arange(1000, dtype=np.float32))
    assert 0 < mr.low < 10 and mr.width > 980
    assert IntensityWindow.default_for(np.array([-1024, 500], np.int16)) == IntensityWindow.ct_soft_tissue()


@pytest.mark.parametrize("mode", ["box", "grid"])
def test_automatic_modes_call_between_steps_and_leave_nothing_on_the_model(trained_predictor, mode):
    """A caller (the service's compute thread) gets control between PRIM chunks and
    before PDMM's stages and blocks, not only after the whole slice; nothing is
    installed on the model for it."""
    from desam_server.modeling import SliceDecoderState

    trained_predictor.features.decoder_state = SliceDecoderState()  # PDMM's image part computed again
    served = []
    trained_predictor.predict_auto(mode, grid_size=5, iou_threshold=-1e9, min_region_area=0, decode_chunk=1,
                                   between_steps=lambda: served.append(1))
    prim_chunks = 25 if mode == "grid" else 0
    pdmm_steps = 3 + 3  # PDMM's three stages (once per slice), fusion, up1, up2 (one decode here)
    assert len(served) >= prim_chunks + pdmm_steps
    model = trained_predictor.model
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert not any(name.startswith("_desam") for m in model.modules() for name in vars(m))
