"""Adapted-encoder models (DB-SAM, SAM-Mix) served beside DeSAM decoders: prompts through
SAM's decoder on features of their own encoder (never mixed with the base encoder's),
views and precompute for that encoder, the 'roi' mode for any decoder, SAM-Mix's
'cam-box' mode with per-slice presence and box, propagation, the modes each family
refuses, and the encoder leaving the scheduler with the model. The models are built here
with ``adapted_sam`` (a perturbed copy of the tiny encoder and decoder) and put into the
service's decoder set directly; files and the registry are tested with each family."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from family_helpers import BLOB_A, BLOB_B, TwoBlobClassifier, adapted
from fastapi.testclient import TestClient

from desam_server import wire
from desam_server.api import create_app
from desam_server.engine import IntensityWindow, SlicePredictor

from scheduler_helpers import idle, wait_until
from service_helpers import payload_of, phantom_volume, tiny_factory, tiny_settings

VOLUME = phantom_volume(k=8, h=64, w=80)
BOX = [20.0, 12.0, 60.0, 44.0]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_sam_checkpoint):
    tmp = tmp_path_factory.mktemp("families")
    app = create_app(tiny_settings(tmp, checkpoint=tiny_sam_checkpoint[0]), tiny_factory)
    with TestClient(app, raise_server_exceptions=False) as client:
        service = client.app.state.service
        service.decoders.put(adapted(service.model, "dbsam", "a1" * 32, name="organ_db"))
        service.decoders.put(adapted(service.model, "sammix", "b2" * 32, name="organ_mix",
                                     classifier=TwoBlobClassifier().eval()))
        r = client.post("/volumes", content=payload_of(VOLUME))
        assert r.status_code == 201, r.text
        yield client, r.json()["volume_id"]


WINDOW = {"center": 100.0, "width": 600.0}


def window_of(client, vid) -> IntensityWindow:
    return IntensityWindow(**WINDOW)


def direct(model, image, window, box) -> tuple[np.ndarray, float]:
    predictor = SlicePredictor(model, precision="fp32")
    predictor.set_image(image, window)
    masks, ious, _ = predictor.predict(box=np.asarray(box), multimask_output=False)
    return masks[0], float(ious[0])


def mask_of(answer) -> np.ndarray:
    return wire.decode_mask(base64.b64decode(answer["mask"])).mask


def run_job(client, body) -> tuple[dict, np.ndarray | None]:
    r = client.post("/segment/auto", json={"window": WINDOW, **body})
    assert r.status_code == 202, r.text
    client.app.state.service.jobs.wait(r.json()["id"], timeout=120)
    job = client.get(f"/jobs/{r.json()['id']}").json()
    assert job["state"] == "succeeded", job["error"]
    slab = wire.decode_mask(client.get(f"/jobs/{job['id']}/result").content, volume_shape=VOLUME.shape)
    return job, slab.mask


def test_models_and_encoders_are_listed(served):
    client, _ = served
    service = client.app.state.service
    families = {d["name"]: d["family"] for d in client.get("/decoders").json()["decoders"]}
    assert families["organ_db"] == "dbsam" and families["organ_mix"] == "sammix"
    assert sorted(service.scheduler.encoders()) == ["dbsam:" + "a1" * 8, "sammix:" + "b2" * 8]


def test_a_prompt_uses_the_models_own_encoder_and_decoder(served):
    client, vid = served
    service = client.app.state.service
    loaded = service.decoders.get("organ_db")
    encoded_before = service.scheduler.stats()["encoded"]
    r = client.post("/segment/prompt", json={"volume_id": vid, "axis": "k", "index": 3, "window": WINDOW, "box": BOX,
                                             "decoder": "organ_db", "multimask": False})
    assert r.status_code == 200, r.text
    answer = r.json()["masks"][0]
    expected, iou = direct(loaded.model, VOLUME[3], window_of(client, vid), BOX)
    assert (mask_of(answer) == expected).mean() > 0.99 and answer["iou"] == pytest.approx(iou, abs=2e-2)
    sid = next(iter(service._sessions[vid]))
    assert service.scheduler.is_cached(sid, "k", 3, encoder=loaded.encoder)
    assert not service.scheduler.is_cached(sid, "k", 3)         # the base encoder did not run for it
    assert service.scheduler.stats()["encoded"] == encoded_before + 1
    sam = client.post("/segment/prompt", json={"volume_id": vid, "axis": "k", "index": 3, "window": WINDOW, "box": BOX,
                                               "multimask": False})
    assert sam.status_code == 200 and service.scheduler.is_cached(sid, "k", 3)
    sam_answer = sam.json()["masks"][0]
    assert (mask_of(sam_answer) != mask_of(answer)).any() or sam_answer["iou"] != answer["iou"]
    # refining the model's own answer by its logits works (SAM's prompted decoder)
    again = client.post("/segment/prompt", json={
        "volume_id": vid, "axis": "k", "index": 3, "window": WINDOW, "points": [[40, 28]], "labels": [1],
        "decoder": "organ_db", "mask_input": {"logits_id": answer["logits_id"]}})
    assert again.status_code == 200, again.text


def test_view_and_precompute_for_the_models_encoder(served):
    client, vid = served
    r = client.post(f"/volumes/{vid}/precompute", json={"axis": "j", "decoder": "organ_mix", "window": WINDOW})
    assert r.status_code == 202, r.text
    service = client.app.state.service
    wait_until(lambda: idle(service.scheduler), timeout=120)
    query = {"axis": "j", "window": [100.0, 600.0]}
    mine = client.get(f"/volumes/{vid}/progress", params={**query, "decoder": "organ_mix"}).json()
    base = client.get(f"/volumes/{vid}/progress", params=query).json()
    assert mine["cached"] == mine["total"] == VOLUME.shape[1] and base["cached"] == 0
    view = client.put(f"/volumes/{vid}/view", json={"axis": "k", "index": 5, "decoder": "organ_db"})
    assert view.status_code == 200, view.text
    assert client.put(f"/volumes/{vid}/view", json={"axis": "k", "index": 5, "decoder": "nothing"}).status_code == 422


def test_roi_mode_prompts_every_slice_with_the_box(served):
    client, vid = served
    loaded = client.app.state.service.decoders.get("organ_db")
    job, slab = run_job(client, {"volume_id": vid, "mode": "roi", "decoder": "organ_db", "box": BOX, "start": 2,
                                 "stop": 5})
    window = window_of(client, vid)
    for n, index in enumerate(range(2, 5)):
        expected, iou = direct(loaded.model, VOLUME[index], window, BOX)
        assert (slab[n] == expected).mean() > 0.99
        assert job["slices"][n]["iou"] == pytest.approx(iou, abs=2e-2) and job["slices"][n]["presence"] is None
    sam_job, _ = run_job(client, {"volume_id": vid, "mode": "roi", "box": BOX, "start": 0, "stop": 2})
    assert sam_job["spec"]["decoder"] == "sam" and len(sam_job["slices"]) == 2


def test_cam_box_mode_reports_presence_and_box(served):
    client, vid = served
    loaded = client.app.state.service.decoders.get("organ_mix")
    window = window_of(client, vid)
    job, slab = run_job(client, {"volume_id": vid, "mode": "cam-box", "decoder": "organ_mix", "start": 1, "stop": 3})
    for n, index in enumerate(range(1, 3)):
        score = job["slices"][n]
        assert score["presence"] == pytest.approx(float(torch.sigmoid(torch.tensor(5.0))), abs=1e-6)
        assert score["box"] == list(BLOB_A)
        expected, iou = direct(loaded.model, VOLUME[index], window, BLOB_A)
        assert (slab[n] == expected).mean() > 0.99 and score["iou"] == pytest.approx(iou, abs=2e-2)
    every, slab_every = run_job(client, {"volume_id": vid, "mode": "cam-box", "decoder": "organ_mix", "start": 1,
                                         "stop": 2, "largest_only": False})
    a, _ = direct(loaded.model, VOLUME[1], window, BLOB_A)
    b, _ = direct(loaded.model, VOLUME[1], window, BLOB_B)
    assert (slab_every[0] == (a | b)).mean() > 0.99
    absent, slab_absent = run_job(client, {"volume_id": vid, "mode": "cam-box", "decoder": "organ_mix",
                                           "presence_threshold": 1.0, "start": 0, "stop": 2})
    assert not slab_absent.any() and absent["slices_with_mask"] == 0
    assert all(s["box"] is None and s["iou"] is None and s["area"] == 0 and s["presence"] < 1.0
               for s in absent["slices"])


@pytest.mark.parametrize("body, status, message", [
    ({"mode": "box", "decoder": "organ_db"}, 422, "dbsam model, not a DeSAM decoder"),
    ({"mode": "cam-box", "decoder": "organ_db"}, 422, "its automatic modes are roi"),
    ({"mode": "cam-box"}, 422, "needs a decoder"),
    ({"mode": "roi", "decoder": "organ_db"}, 422, "needs a box"),
    ({"mode": "roi", "box": [10, 10, 90, 30]}, 422, "not a box inside the 80 x 64 slice"),
    ({"mode": "roi", "box": [30, 10, 20, 30]}, 422, "not a box inside"),
    ({"mode": "grid", "box": BOX, "decoder": "organ_db"}, 422, "not a DeSAM decoder"),
    ({"mode": "roi", "box": BOX, "decoder": "nothing"}, 404, "unknown decoder"),
])
def test_modes_a_model_does_not_run_are_refused(served, body, status, message):
    client, vid = served
    r = client.post("/segment/auto", json={"volume_id": vid, **body})
    assert r.status_code == status and message in r.text, r.text


def test_propagation_with_an_adapted_model(served):
    client, vid = served
    seed = np.zeros(VOLUME.shape[1:], bool)
    seed[14:40, 22:58] = True
    r = client.post("/segment/propagate", json={
        "volume_id": vid, "index": 4, "decoder": "organ_db", "iou_threshold": 0.0, "min_area": 1,
        "min_area_ratio": 0.0, "max_area_ratio": 1e6,
        "mask": base64.b64encode(wire.encode_mask(seed, axis="k", offset=4)).decode("ascii")})
    assert r.status_code == 202, r.text
    client.app.state.service.jobs.wait(r.json()["id"], timeout=120)
    job = client.get(f"/jobs/{r.json()['id']}").json()
    assert job["state"] == "succeeded", job["error"]
    assert job["spec"]["decoder"] == "organ_db" and job["reached"] is not None


def test_the_encoder_leaves_with_its_last_model(tmp_path, tiny_sam_checkpoint):
    app = create_app(tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0]), tiny_factory)
    with TestClient(app, raise_server_exceptions=False) as client:
        service = client.app.state.service
        first = adapted(service.model, "dbsam", "c3" * 32, name="one")
        service.decoders.put(first)
        service.decoders.put(adapted(service.model, "dbsam", "c3" * 32, name="two"))  # the same encoder weights
        assert service.scheduler.encoders() == ["dbsam:" + "c3" * 8]
        service.decoders.remove("one")
        assert service.scheduler.encoders() == ["dbsam:" + "c3" * 8]      # "two" still uses it
        service.decoders.put(adapted(service.model, "dbsam", "d4" * 32, name="two"))  # replaced: other weights
        assert service.scheduler.encoders() == ["dbsam:" + "d4" * 8]
        service.decoders.remove("two")
        assert service.scheduler.encoders() == []
