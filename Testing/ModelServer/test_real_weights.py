"""Pretrained MobileSAM and LiteMedSAM on a real CT slice (InVesalius "Cranium" head CT).

Reference: the sample's head mask on axial slice 54, window W406/L-18. The prompt box is
the bounding box of the mask's largest component (the head; the threshold-made mask also
holds two small pieces of the head-holder arc, which a user would not box).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import dice
from desam_server.engine import IntensityWindow, SlicePredictor
from desam_server.engine.postprocess import largest_component
from desam_server.io import read_volume
from desam_server.modeling import build_desam
from desam_server.weights import fetch_weights, get_entry

pytestmark = pytest.mark.realweights


@pytest.fixture(scope="module")
def ct_slice():
    from desam_server.samples import fetch_cranium

    sample = fetch_cranium()
    index = sample.reference_slice
    image = read_volume(sample.volume).array[index]
    head = read_volume(sample.head_mask).array[index] > 0
    center, width = sample.window
    return image, head, IntensityWindow(center=center, width=width)


def _predictor(name: str) -> SlicePredictor:
    model = build_desam(name, sam_checkpoint=fetch_weights(name), sam_checkpoint_sha256=get_entry(name).sha256)
    return SlicePredictor(model, precision="fp32")


def _box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(largest_component(mask))
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


@pytest.fixture(scope="module")
def mobile_sam(ct_slice):
    image, _, window = ct_slice
    pred = _predictor("mobile_sam")
    pred.set_image(image, window)
    return pred


def test_mobile_sam_box_prompt_on_real_ct(mobile_sam, ct_slice):
    _, head, _ = ct_slice
    masks, ious, _ = mobile_sam.predict(box=_box(head), multimask_output=False)
    # Measured here: 0.969 (0.981 against the head component alone).
    assert dice(masks[0], head) >= 0.95
    assert ious[0] > 0.9


def test_mobile_sam_one_centre_click_on_real_ct(mobile_sam, ct_slice):
    _, head, _ = ct_slice
    cy, cx = np.argwhere(largest_component(head)).mean(axis=0)
    assert head[int(cy), int(cx)]
    masks, ious, _ = mobile_sam.predict(point_coords=np.array([[cx, cy]]), point_labels=np.array([1]))
    best = int(np.argmax(ious))  # SAM's own pick among its three masks
    # Measured here: 0.970.
    assert dice(masks[best], head) >= 0.95


def test_mobile_sam_refinement_with_a_negative_click_removes_the_clicked_region(mobile_sam, ct_slice):
    _, head, _ = ct_slice
    masks, _, low = mobile_sam.predict(box=_box(head), multimask_output=False)
    ys, xs = np.nonzero(masks[0])
    inside = (float(xs.mean()), float(ys.mean()))
    refined, _, _ = mobile_sam.predict(point_coords=np.array([inside]), point_labels=np.array([0]),
                                       box=_box(head), mask_input=low, multimask_output=False)
    assert not refined[0][int(inside[1]), int(inside[0])]


def test_lite_medsam_box_prompt_gives_a_plausible_mask(ct_slice):
    """LiteMedSAM (fine-tuned on medical images, 256 px, 0-1 input, box prompts) outlines
    the intracranial region rather than the whole head with its scalp. Measured here:
    Dice 0.796 against the head mask, 100 % of its mask inside the head, covering 66 % of
    the head's area. The bounds check that reading (a compact mask inside the head that
    covers most of it) with a little room for numerical noise; they do not pin the input
    convention, which is asserted directly."""
    image, head, window = ct_slice
    pred = _predictor("lite_medsam")
    convention = pred.model.convention
    assert convention.img_size == 256 and convention.pixel_mean == (0.0, 0.0, 0.0)
    assert convention.pixel_std == (255.0, 255.0, 255.0)  # 0-1 scaling of the 8-bit image
    pred.set_image(image, window)
    masks, ious, _ = pred.predict(box=_box(head), multimask_output=False)
    mask = masks[0]
    assert dice(mask, head) >= 0.75
    assert (mask & head).sum() / mask.sum() >= 0.97  # it stays inside the head
    assert mask.sum() >= 0.6 * head.sum()  # and covers most of it
    with pytest.raises(ValueError, match="box prompts only"):
        pred.predict(point_coords=np.array([[100.0, 100.0]]), point_labels=np.array([1]))
