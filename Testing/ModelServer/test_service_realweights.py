"""The service with pretrained MobileSAM on the real head CT, through the client.

Its answers are checked against ``segment_anything.SamPredictor`` on the same checkpoint
(``realweights_helpers``), fed the embedding the service decodes from: our fp32 encoder's,
rounded through the feature cache's storage dtype (float16 by default). So the test says
"the service, over HTTP and the wire format, answers what SAM answers on its cached
features", with the tolerances of ``realweights_helpers`` (float rounding only)."""

from __future__ import annotations

import numpy as np
import pytest

from desam_server.api import build_service
from desam_server.io import read_volume
from SlicerDeSAMLib.ServerClient import ServerClient

from conftest import dice
from realweights_helpers import (
    IOU_ATOL,
    LOGIT_RTOL,
    MAX_DIFFERING_FRACTION,
    cranium,
    encode_slice,
    load_model,
    stock_sam,
)
from service_helpers import live_server, tiny_settings

pytestmark = pytest.mark.realweights


def assert_answer_as_stock(answer, stock, head: np.ndarray, prompt: dict) -> None:
    """The service's masks and scores against the stock predictor's for one prompt
    (``realweights_helpers.assert_same_as_stock``'s bounds; the service returns no
    low-res logits, only their ids)."""
    logits, ious, _ = stock.predict(**prompt, return_logits=True)
    masks = logits > stock.model.mask_threshold  # what SamPredictor returns without return_logits
    assert answer.masks.shape == masks.shape
    np.testing.assert_allclose(answer.ious, ious, atol=IOU_ATOL)
    assert answer.best == int(np.argmax(ious))
    differ = answer.masks != masks
    assert differ.mean() <= MAX_DIFFERING_FRACTION
    if differ.any():
        assert np.abs(logits[differ]).max() <= 2 * LOGIT_RTOL * np.abs(logits).max()
    assert abs(dice(answer.mask, head) - dice(masks[answer.best], head)) <= 1e-3


def test_mobile_sam_round_trip_on_real_ct_answers_as_the_stock_predictor(tmp_path):
    from desam_server.samples import fetch_cranium

    sample = fetch_cranium()
    volume = read_volume(sample.volume)
    ct = cranium()
    index = ct.reference_slice
    g = volume.geometry
    settings = tiny_settings(tmp_path, decoder=False, encoder="mobile_sam")
    assert settings.device == "cpu" and settings.precision == "fp32"
    model = load_model("mobile_sam", settings.device)
    sam, encoder = stock_sam("mobile_sam", model)
    reference = encode_slice(model, sam, encoder, ("k", index), storage=settings.cache.storage_dtype)
    head = reference.head
    with live_server(settings, factory=build_service) as (url, _):
        client = ServerClient(url, timeout=120)
        info = client.info()["model"]
        assert info["encoder"] == "mobile_sam" and info["embedded_default"] is True
        assert info["encoder_weights_sha256"]
        vid, sent = client.upload_volume(volume.array, spacing=g.spacing, origin=g.origin, direction=g.direction)
        assert sent and client.volume(vid)["shape"] == list(volume.array.shape)
        window = sample.window
        client.set_view(vid, "k", index, window=window)
        box = reference.prompts["box"]["box"]
        answer = client.segment_prompt(vid, "k", index, box=box.tolist(), multimask=False, window=window)
        assert answer.masks.shape == (1, *head.shape)
        assert_answer_as_stock(answer, reference.stock, head, dict(box=box, multimask_output=False))
        centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
        click = client.segment_prompt(vid, "k", index, points=[centre], labels=[1], window=window)
        assert click.timing["cached"] is True
        assert_answer_as_stock(click, reference.stock, head,
                               dict(point_coords=np.array([centre]), point_labels=np.array([1]),
                                    multimask_output=True))


#: The propagation checked on the head CT: seeded with the true head mask on slice 100,
#: within slices [96, 108): the head's top, where its section shrinks from ~5 900 pixels
#: to nothing (slice 106: 17 pixels). Few slices: each costs an encoder pass (~2 s on 2 CPU cores).
PROPAGATION_SEED, PROPAGATION_BOUNDS = 100, (96, 108)


def test_propagation_follows_the_head_on_real_ct(tmp_path):
    """Pretrained MobileSAM: the head's mask on one slice carried to its neighbours (SAM's
    decoder, the box around each neighbour's mask) keeps close to the true head mask on
    every slice it reaches, reaches the lower bound, and stops at the top of the skull
    (where the head's section shrinks to nothing) before the slices without head."""
    from desam_server.samples import fetch_cranium

    sample = fetch_cranium()
    volume = read_volume(sample.volume)
    head = read_volume(sample.head_mask).array > 0
    g = volume.geometry
    settings = tiny_settings(tmp_path, decoder=False, encoder="mobile_sam")
    start, stop = PROPAGATION_BOUNDS
    with live_server(settings, factory=build_service) as (url, _):
        client = ServerClient(url, timeout=120)
        vid, _ = client.upload_volume(volume.array, spacing=g.spacing, origin=g.origin, direction=g.direction)
        job = client.segment_propagate(vid, "k", PROPAGATION_SEED, head[PROPAGATION_SEED], start=start, stop=stop,
                                       window=sample.window)
        done = client.wait_job(job["id"], timeout=300, poll=0.2)
        assert done["state"] == "succeeded", done["error"]
        slab = client.job_result(job["id"])
    first, last = done["reached"]
    assert first == start                                   # the head goes on below the bound
    # It stops before the bound, at a slice where little head is left (the answer there leaks outwards).
    assert last < stop - 1 and head[last + 1].sum() < 0.3 * head[PROPAGATION_SEED].sum()
    assert (slab.offset, slab.mask.shape[0]) == (first, last - first + 1)
    dices = {first + n: dice(mask, head[first + n]) for n, mask in enumerate(slab.mask)}
    print(f"propagation on the head CT: reached [{first}, {last}] from {PROPAGATION_SEED} in "
          f"{done['elapsed_s']:.1f} s ({done['elapsed_s'] / (stop - start):.2f} s per slice); Dice per slice: "
          + ", ".join(f"{k}: {d:.3f}" for k, d in dices.items()))
    others = [d for k, d in dices.items() if k != PROPAGATION_SEED]
    assert np.mean(others) >= 0.95 and min(others) >= 0.8, dices
    iou = {s["index"]: s["iou"] for s in done["slices"]}
    assert iou[PROPAGATION_SEED] is None and all(iou[k] >= 0.5 for k in dices if k != PROPAGATION_SEED)
