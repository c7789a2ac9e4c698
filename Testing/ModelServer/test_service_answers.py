"""What the service answers, against the same computation in-process.

One service (tiny encoder from a seeded SAM checkpoint, a "phantom" DeSAM decoder file
written from random weights) and one in-process ``SlicePredictor`` built from the same
two files, with the same precision (fp32) and the same decoder fast path. The service's
feature cache stores float32 here (exact): with the default float16 storage its features
are rounded, and its answers are close to, not equal to, an in-process encoding (that
rounding is tested in test_api.py and the feature-cache tests). So every answer below
must equal the in-process one bit for bit: masks, predicted IoUs and areas.

With random weights a mask means nothing anatomically, so where a prompt lands is proven
by equality with the in-process answer for the prompt at that place, together with the
in-process answers for the prompt at the transposed or mirrored place being different
(each test checks that its comparison can tell them apart).
"""

from __future__ import annotations

import base64
from dataclasses import replace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from desam_server import wire
from desam_server.api import create_app
from desam_server.api.prompting import mask_to_logits
from desam_server.api.propagation import box_around
from desam_server.engine import IntensityWindow, SlicePredictor
from desam_server.io.slices import slice_view
from desam_server.modeling import build_desam
from desam_server.modeling.checkpoint import save_decoder

from scheduler_helpers import wait_until
from service_helpers import payload_of, phantom_volume, tiny_factory, tiny_settings

#: The window of the prompted requests below (not the volume's default, so that it
#: must travel); automatic jobs use the default and report it in their spec.
WINDOW = {"center": 30.0, "width": 350.0}
#: The logit of inside (+) and outside (-) pixels of a binary mask input (``api.prompting``).
MASK_LOGIT = 10.0


def asymmetric_volume() -> np.ndarray:
    """phantom_volume (K x J x I = 24 x 48 x 64: k slices 48 x 64, j slices 24 x 64, i
    slices 24 x 48) plus a bright block off the organ's axis of symmetry."""
    vol = phantom_volume(k=24, h=48, w=64, seed=5)
    vol[:12, 30:40, 36:45] += 60
    return vol


VOLUME = asymmetric_volume()


def write_decoder(path, checkpoint) -> None:
    """A DeSAM decoder file from random weights (seeded). PRIM's IoU head is scaled so that
    its scores spread around the default threshold 0.5 (as written, a random head scores
    every prompt near 0 and grid mode would have nothing to rank)."""
    torch.manual_seed(1)
    model = build_desam("tiny", sam_checkpoint=checkpoint)
    with torch.no_grad():
        last = model.prim.iou_prediction_head.layers[-1]
        last.weight.mul_(5)
        last.bias.add_(0.5)
    save_decoder(model, path, structure="phantom", training={"note": "random weights, for tests"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sam_checkpoint):
    """(test client, volume id, in-process model with the same weights, the service's settings)."""
    tmp = tmp_path_factory.mktemp("answers")
    write_decoder(tmp / "phantom.safetensors", tiny_sam_checkpoint[0])   # tiny_settings loads it from there
    settings = tiny_settings(tmp, checkpoint=tiny_sam_checkpoint[0])
    assert settings.decoders == (tmp / "phantom.safetensors",)
    settings = replace(settings, cache=replace(settings.cache, storage_dtype="float32"))
    model = build_desam("tiny", sam_checkpoint=tiny_sam_checkpoint[0], decoder_checkpoint=settings.decoders[0])
    with TestClient(create_app(settings, tiny_factory)) as client:
        r = client.post("/volumes", content=payload_of(VOLUME))
        assert r.status_code == 201, r.text
        yield client, r.json()["volume_id"], model, settings


def predictor_on(setup, axis: str, index: int, window: IntensityWindow) -> SlicePredictor:
    """The in-process predictor on the slice the service answers about."""
    _, _, model, settings = setup
    predictor = SlicePredictor(model, precision="fp32", fast=settings.decoder_fast_path())
    predictor.set_image(slice_view(VOLUME, axis, index), window)
    return predictor


def prompt(setup, axis: str, index: int, **body) -> dict:
    client, vid, _, _ = setup
    r = client.post("/segment/prompt", json={"volume_id": vid, "axis": axis, "index": index, "window": WINDOW,
                                             **body})
    assert r.status_code == 200, r.text
    return r.json()


def masks_of(answer: dict, axis: str, index: int) -> np.ndarray:
    """The answer's masks as C x H x W, each checked to be exactly that slice."""
    out = []
    for m in answer["masks"]:
        decoded = wire.decode_mask(base64.b64decode(m["mask"]), volume_shape=VOLUME.shape)
        assert (decoded.axis, decoded.offset) == (axis, index)
        assert decoded.mask.shape == wire.mask_slice_shape(VOLUME.shape, axis) == slice_view(VOLUME, axis, 0).shape
        assert m["area"] == int(decoded.mask.sum())
        out.append(decoded.mask)
    return np.stack(out)


def assert_sam_answer_equals(answer: dict, axis: str, index: int, ref_masks, ref_ious) -> None:
    masks = masks_of(answer, axis, index)
    assert masks.shape == ref_masks.shape
    for c in range(len(masks)):
        np.testing.assert_array_equal(masks[c], ref_masks[c], err_msg=f"mask {c}")
    assert [m["iou"] for m in answer["masks"]] == [float(v) for v in ref_ious]
    assert answer["best"] == int(np.argmax(ref_ious))


def differs(a: np.ndarray, b: np.ndarray) -> bool:
    return not np.array_equal(a, b)


def finished(client, job_id: str, timeout: float = 120.0) -> dict:
    """GET /jobs/{id} until the job has finished; fail after ``timeout`` seconds."""
    wait_until(lambda: client.get(f"/jobs/{job_id}").json()["state"] not in ("queued", "running"), timeout, 0.05)
    return client.get(f"/jobs/{job_id}").json()


# ---- automatic jobs ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode, options, found", [
    ("box", {"min_region_area": 32}, True),
    ("grid", {"grid_size": 4, "min_region_area": 16}, True),
    # No prompt scores above 0.9 here (the best score about 0.7): every slice stays empty.
    ("grid", {"grid_size": 4, "min_region_area": 16, "iou_threshold": 0.9}, False),
])
def test_automatic_job_equals_predict_auto_in_process(setup, mode, options, found):
    client, vid, _, _ = setup
    start, stop = 3, 7
    r = client.post("/segment/auto", json={"volume_id": vid, "axis": "k", "start": start, "stop": stop,
                                           "mode": mode, **options})
    assert r.status_code == 202, r.text
    job = finished(client, r.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    spec = job["spec"]
    assert (spec["mode"], spec["decoder"], spec["start"], spec["stop"]) == (mode, "phantom", start, stop)
    window = IntensityWindow(**spec["window"])
    assert window == IntensityWindow.ct_soft_tissue()           # the default for a CT-like int16 volume
    result = client.get(f"/jobs/{job['id']}/result")
    slab = wire.decode_mask(result.content, volume_shape=VOLUME.shape)
    assert (slab.axis, slab.offset, slab.mask.shape) == ("k", start, (stop - start, 48, 64))
    references = []
    for n, index in enumerate(range(start, stop)):
        predictor = predictor_on(setup, "k", index, window)
        ref = predictor.predict_auto(mode, spec["grid_size"], iou_threshold=spec["iou_threshold"],
                                     min_region_area=spec["min_region_area"])
        np.testing.assert_array_equal(slab.mask[n], ref.mask, err_msg=f"slice {index}")
        references.append(ref)
    assert job["slices_with_mask"] == sum(bool(ref.mask.any()) for ref in references)
    # Each slice's predicted IoU and area, as predict_auto gives them (no IoU where it has none).
    assert job["kind"] == "auto" and job["reached"] is None
    assert job["slices"] == [{"index": index, "iou": None if np.isnan(ref.iou) else ref.iou,
                              "area": int(ref.mask.sum()), "presence": None, "box": None}
                             for index, ref in zip(range(start, stop), references, strict=True)]
    if not found:
        assert job["slices_with_mask"] == 0 and all(ref.passed == 0 for ref in references)
        return
    # The comparison means something: the masks are neither empty nor full, they differ
    # from slice to slice and from the other mode's, and (grid) the winner was chosen
    # among several candidates.
    assert all(0 < ref.mask.mean() < 1 for ref in references)
    assert differs(slab.mask[0], slab.mask[-1])
    other = predictor.predict_auto("grid" if mode == "box" else "box", spec["grid_size"],
                                   min_region_area=spec["min_region_area"])
    assert differs(slab.mask[-1], other.mask)
    if mode == "grid":
        assert all(ref.passed > 1 for ref in references)


# ---- DeSAM's prompted decoder ---------------------------------------------------------------------
@pytest.mark.parametrize("body", [
    {"points": [[40.5, 20.5]], "labels": [1]},
    {"box": [20, 10, 55, 40]},
    {"points": [[40.5, 20.5], [10, 40]], "labels": [1, 0], "box": [20, 10, 55, 40]},
])
def test_desam_decoder_answer_equals_predict_desam(setup, body):
    answer = prompt(setup, "k", 9, decoder="phantom", **body)
    assert answer["decoder"] == "phantom" and len(answer["masks"]) == 1 and answer["best"] == 0
    assert answer["masks"][0]["logits_id"] is None
    predictor = predictor_on(setup, "k", 9, IntensityWindow(**WINDOW))
    points = np.array(body["points"]) if "points" in body else None
    labels = np.array(body["labels"]) if "labels" in body else None
    box = np.array(body["box"]) if "box" in body else None
    ref_mask, ref_iou = predictor.predict_desam(points, labels, box=box)
    (mask,) = masks_of(answer, "k", 9)
    np.testing.assert_array_equal(mask, ref_mask)
    assert answer["masks"][0]["iou"] == ref_iou
    assert 0 < mask.mean() < 1
    # SAM's decoder answers differently on the same prompt: the decoder name was honoured.
    sam_masks, _, _ = predictor.predict(points, labels, box=box, multimask_output=False)
    assert differs(mask, sam_masks[0])


# ---- a binary mask as mask input ---------------------------------------------------------------------
def asymmetric_mask(h: int = 48, w: int = 64) -> np.ndarray:
    """An L in the upper left (a bar down, a foot to the right) plus a dot near the lower
    right: no flip or transpose maps it onto itself."""
    m = np.zeros((h, w), bool)
    m[4:30, 6:14] = True      # the L's bar, rows 4..29
    m[22:30, 6:40] = True     # its foot
    m[36:42, 50:58] = True    # the dot
    return m


def eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3 x 3 neighbourhood is all in ``mask`` (the edges of the slice count as
    outside)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_and.reduce([padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                                  for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def expected_mask_logits(mask: np.ndarray, input_size: tuple[int, int], img_size: int, side: int) -> np.ndarray:
    """The documented mapping, written out with numpy: the H x W mask resized (bilinear,
    half-pixel centres, edges clamped) to the input frame h x w, zero-padded to
    img_size x img_size, averaged over (img_size / side)-pixel squares, then mapped from
    [0, 1] to [-MASK_LOGIT, +MASK_LOGIT]. 1 x side x side float32."""

    def linear(n_out: int, n_in: int) -> np.ndarray:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        weights = np.zeros((n_out, n_in))
        np.add.at(weights, (np.arange(n_out), i0), 1 - (src - i0))
        np.add.at(weights, (np.arange(n_out), i1), src - i0)
        return weights

    h, w = input_size
    resized = linear(h, mask.shape[0]) @ mask.astype(np.float64) @ linear(w, mask.shape[1]).T
    padded = np.zeros((img_size, img_size))
    padded[:h, :w] = resized
    f = img_size // side
    pooled = padded.reshape(side, f, side, f).mean(axis=(1, 3))
    return ((pooled * 2 - 1) * MASK_LOGIT).astype(np.float32)[None]


def test_binary_mask_input_is_mapped_in_the_slice_frame(setup):
    _, vid, model, _ = setup
    index, mask = 11, asymmetric_mask()
    predictor = predictor_on(setup, "k", index, IntensityWindow(**WINDOW))
    features = predictor.features
    side = 4 * model.prompt_encoder.image_embedding_size[0]
    # The tiny encoder: 48 x 64 -> 192 x 256 in a 256 frame; 64 x 64 logits, so one
    # low-res cell is one slice pixel (rows 48.. are the padding).
    assert (features.input_size, model.img_size, side) == ((192, 256), 256, 64)
    expected = expected_mask_logits(mask, features.input_size, model.img_size, side)
    # Orientation and values, independent of the interpolation's details: cells well
    # inside the mask are +10, well outside (and the padding) -10.
    inner, outer = eroded(mask), eroded(~mask)
    cells = expected[0, :48, :64]
    assert inner.sum() > 300 and outer.sum() > 2000
    np.testing.assert_allclose(cells[inner], MASK_LOGIT, rtol=0, atol=1e-5)
    np.testing.assert_allclose(cells[outer], -MASK_LOGIT, rtol=0, atol=1e-5)
    np.testing.assert_allclose(expected[0, 48:], -MASK_LOGIT, rtol=0, atol=1e-5)
    # The service's mapping is that one.
    np.testing.assert_allclose(mask_to_logits(mask, model, features), expected, rtol=0, atol=1e-5)

    encoded = base64.b64encode(wire.encode_mask(mask, axis="k", offset=index, volume_id=vid)).decode()
    points, labels = np.array([[30.5, 20.5]]), np.array([1])
    answer = prompt(setup, "k", index, points=points.tolist(), labels=labels.tolist(), mask_input={"mask": encoded})
    ref_masks, ref_ious, _ = predictor.predict(points, labels, mask_input=expected)
    assert_sam_answer_equals(answer, "k", index, ref_masks, ref_ious)
    # The answer tells the mask's orientation apart: the mask flipped either way, or
    # transposed (64 x 48, resized onto the same frame), gives other answers, and so does
    # no mask at all.
    got = masks_of(answer, "k", index)
    for wrong in (mask[::-1], mask[:, ::-1], mask.T):
        other = expected_mask_logits(np.ascontiguousarray(wrong), features.input_size, model.img_size, side)
        assert differs(got, predictor.predict(points, labels, mask_input=other)[0])
    assert differs(got, predictor.predict(points, labels)[0])


# ---- the j and i axes ---------------------------------------------------------------------------------
# The organ of phantom_volume is an ellipse in each k slice whose centre column moves with
# k (column 35.2 + k), so on a j slice it is an oblique band; on an i slice it is symmetric
# in j, and the extra block of asymmetric_volume breaks that. A point at (x = column,
# y = row) inside a bright structure has its mirrored places outside it, and its
# transposed place outside the slice.
@pytest.mark.parametrize("axis, index, point, box", [
    ("j", 24, (55, 20), (40, 10, 63, 23)),    # slice 24 x 64 (rows k, columns i)
    ("i", 40, (35, 3), (15, 0, 40, 12)),      # slice 24 x 48 (rows k, columns j)
])
def test_answers_on_the_j_and_i_axes_equal_the_extracted_slice(setup, axis, index, point, box):
    image = slice_view(VOLUME, axis, index)
    np.testing.assert_array_equal(image, VOLUME[:, index, :] if axis == "j" else VOLUME[:, :, index])
    h, w = image.shape
    x, y = point
    bright = image > 40                         # the organ (60 + noise); body 0, air -1000
    assert bright[y, x] and not bright[h - 1 - y, x] and not bright[y, w - 1 - x]
    assert x > h                                # (x, y) read as (row, column) would lie outside the slice
    predictor = predictor_on(setup, axis, index, IntensityWindow(**WINDOW))

    click = prompt(setup, axis, index, points=[list(point)], labels=[1])
    assert click["shape"] == [h, w]
    ref_masks, ref_ious, _ = predictor.predict(np.array([point], float), np.array([1]))
    assert_sam_answer_equals(click, axis, index, ref_masks, ref_ious)
    got = masks_of(click, axis, index)
    for elsewhere in ((x, h - 1 - y), (w - 1 - x, y)):
        assert differs(got, predictor.predict(np.array([elsewhere], float), np.array([1]))[0]), elsewhere

    boxed = prompt(setup, axis, index, box=list(box))
    ref_masks, ref_ious, _ = predictor.predict(box=np.array(box, float))
    assert_sam_answer_equals(boxed, axis, index, ref_masks, ref_ious)
    x0, y0, x1, y1 = box
    mirrored = np.array([w - x1, y0, w - x0, y1], float)
    assert differs(masks_of(boxed, axis, index), predictor.predict(box=mirrored)[0])

    # Another slice of the same axis is another image: its answer differs.
    neighbour = predictor_on(setup, axis, index - 8, IntensityWindow(**WINDOW))
    assert differs(got, neighbour.predict(np.array([point], float), np.array([1]))[0])
    # The point swapped into (row, column) order is refused, not silently moved.
    client, vid, _, _ = setup
    swapped = client.post("/segment/prompt", json={"volume_id": vid, "axis": axis, "index": index,
                                                   "points": [[y, x]], "labels": [1], "window": WINDOW})
    assert swapped.status_code == 422 and "inside" in swapped.json()["detail"]


# ---- propagation ------------------------------------------------------------------------------------
#: Rules that never stop a direction before its bound unless a mask comes out empty.
PERMISSIVE = {"iou_threshold": 0.0, "min_area": 1, "min_area_ratio": 0.0, "max_area_ratio": 1e6}


@pytest.mark.parametrize("decoder, axis, index, start, stop", [("sam", "k", 12, 7, 18), ("phantom", "j", 20, 15, 25)])
def test_propagation_equals_the_walk_in_process(setup, decoder, axis, index, start, stop):
    """Each slice prompted by the box around its neighbour's mask, answered in process:
    the job's masks, IoUs, areas and reach are exactly those of that walk."""
    client, vid, _, _ = setup
    h, w = wire.mask_slice_shape(VOLUME.shape, axis)
    seed = np.zeros((h, w), bool)
    seed[h // 4: h // 2 + 4, w // 3: w // 2 + 8] = True
    payload = base64.b64encode(wire.encode_mask(seed, axis=axis, offset=index)).decode("ascii")
    r = client.post("/segment/propagate", json={"volume_id": vid, "axis": axis, "index": index, "mask": payload,
                                                "decoder": decoder, "start": start, "stop": stop, "window": WINDOW,
                                                **PERMISSIVE})
    assert r.status_code == 202, r.text
    job = finished(client, r.json()["id"])
    assert job["state"] == "succeeded", job["error"]
    expected, scores = {index: seed}, {index: None}
    for direction, bound in ((1, stop), (-1, start - 1)):
        previous, n = seed, index + direction
        while n != bound:
            predictor = predictor_on(setup, axis, n, IntensityWindow(**WINDOW))
            if decoder == "sam":
                masks, ious, _ = predictor.predict(box=box_around(previous), multimask_output=False)
                mask, iou = masks[0], float(ious[0])
            else:
                mask, iou = predictor.predict_desam(box=box_around(previous))
            if not mask.any():
                break
            expected[n], scores[n], previous, n = mask, iou, mask, n + direction
    first, last = min(expected), max(expected)
    assert last - first >= 4, "the walk went nowhere: the comparison would say little"
    assert (job["kind"], job["reached"]) == ("propagate", [first, last])
    assert job["slices"] == [{"index": n, "iou": scores[n], "area": int(expected[n].sum()), "presence": None,
                              "box": None} for n in sorted(expected)]
    slab = wire.decode_mask(client.get(f"/jobs/{job['id']}/result").content, volume_shape=VOLUME.shape)
    assert (slab.axis, slab.offset, slab.mask.shape) == (axis, first, (last - first + 1, h, w))
    for n in range(first, last + 1):
        np.testing.assert_array_equal(slab.mask[n - first], expected[n], err_msg=f"slice {n}")
    assert differs(slab.mask[0], slab.mask[-1])
