"""Endpoint tests over FastAPI's test client (tiny random-weight model)."""

from __future__ import annotations

import base64
import logging
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient

from desam_server import wire
from desam_server.api import create_app
from desam_server.engine import IntensityWindow, SlicePredictor

from scheduler_helpers import wait_until
from service_helpers import id_of, payload_of, phantom_volume, tiny_factory, tiny_settings


@pytest.fixture()
def client(tmp_path, tiny_sam_checkpoint):
    app = create_app(tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0]), tiny_factory)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture()
def volume(client):
    vol = phantom_volume()
    r = client.post("/volumes", content=payload_of(vol))
    assert r.status_code == 201, r.text
    return vol, r.json()["volume_id"]


def click(client, vid, **body):
    return client.post("/segment/prompt", json={"volume_id": vid, "axis": "k", "index": 2, **body})


def test_health_info_and_decoders(client):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["model"]["encoder"] == "tiny" and info["model"]["device"] == "cpu"
    assert info["model"]["bf16"] is False and info["queue_depth"] == 0
    assert set(info["cache"]["tiers"]) == {"device", "host", "disk"}
    assert info["settings"]["auth"] is False
    decoders = client.get("/decoders").json()["decoders"]
    assert [d["name"] for d in decoders] == ["phantom"] and decoders[0]["structure"] == "phantom"


def test_token_in_either_header_and_never_in_answers_or_logs(tmp_path, caplog):
    token = "s3cret-token-for-tests-0123456789"
    app = create_app(tiny_settings(tmp_path, token=token), tiny_factory)
    with caplog.at_level(logging.DEBUG), TestClient(app) as c:
        good = ({"X-DeSAM-Token": token}, {"Authorization": f"Bearer {token}"}, {"authorization": f"bearer {token}"})
        bad = ({}, {"X-DeSAM-Token": token[:-1] + "x"}, {"X-DeSAM-Token": ""}, {"X-DeSAM-Token": token + "0"},
               {"Authorization": f"Bearer {token[:-1]}x"}, {"Authorization": token},
               {"Authorization": f"Basic {token}"})
        for headers in good:
            assert c.get("/health", headers=headers).status_code == 200, headers
        for headers in bad:
            for method, path in (("GET", "/health"), ("GET", "/info"), ("POST", "/volumes"), ("DELETE", "/volumes/x")):
                r = c.request(method, path, headers=headers, content=b"x" if method == "POST" else None)
                assert r.status_code == 401, (headers, method, path)
                assert r.headers["www-authenticate"] == "Bearer" and token not in r.text
        # Everything works with the header: upload, a click, info; the token shows nowhere.
        header = {"X-DeSAM-Token": token}
        vol = phantom_volume()
        r = c.post("/volumes", content=payload_of(vol), headers=header)
        assert r.status_code == 201 and token not in r.text
        r = c.post("/segment/prompt", json={"volume_id": r.json()["volume_id"], "axis": "k", "index": 2,
                                            "box": [10, 8, 50, 40]}, headers=header)
        assert r.status_code == 200 and token not in r.text
        info = c.get("/info", headers=header)
        assert info.status_code == 200 and info.json()["settings"]["auth"] is True and token not in info.text
        assert token not in c.get("/openapi.json", headers=header).text
    assert caplog.records and token not in caplog.text


def test_upload_is_content_addressed_and_persisted(client, volume):
    vol, vid = volume
    assert vid == id_of(vol)
    again = client.post("/volumes", content=payload_of(vol))
    assert again.status_code == 200 and again.json()["volume_id"] == vid
    meta = client.get(f"/volumes/{vid}").json()
    assert meta["shape"] == list(vol.shape) and meta["dtype"] == "int16" and meta["on_disk"] is True
    assert client.get("/volumes").json()["volumes"] == [vid]
    assert client.get("/info").json()["volumes"]["duplicates"] == 1
    assert client.delete(f"/volumes/{vid}").status_code == 204
    assert client.get(f"/volumes/{vid}").status_code == 404
    assert client.delete(f"/volumes/{vid}").status_code == 404


def test_prompt_matches_the_predictor_and_returns_one_slice(client, volume, tiny_model):
    vol, vid = volume
    r = click(client, vid, points=[[30.5, 24.5], [5, 5]], labels=[1, 0])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["shape"] == [48, 64] and len(body["masks"]) == 3 and body["decoder"] == "sam"
    masks = [wire.decode_mask(base64.b64decode(m["mask"])) for m in body["masks"]]
    assert all(m.axis == "k" and m.offset == 2 and m.mask.shape == (48, 64) for m in masks)
    # The same answer in-process, from features encoded without the cache (fp16 storage: close, not equal).
    predictor = SlicePredictor(tiny_model, precision="fp32")
    predictor.set_image(vol[2], IntensityWindow.ct_soft_tissue())
    ref_masks, ref_iou, _ = predictor.predict(np.array([[30.5, 24.5], [5, 5]]), np.array([1, 0]))
    np.testing.assert_allclose([m["iou"] for m in body["masks"]], ref_iou, atol=2e-2)
    for got, ref in zip(masks, ref_masks, strict=True):
        assert np.mean(got.mask != ref) < 0.01
    single = click(client, vid, box=[10, 8, 50, 40], multimask=False).json()
    assert len(single["masks"]) == 1 and single["best"] == 0


def test_refinement_by_logits_id_and_by_mask(client, volume):
    _, vid = volume
    first = click(client, vid, points=[[30, 24]], labels=[1]).json()
    assert first["timing"]["cached"] is False
    lid = first["masks"][first["best"]]["logits_id"]
    refined = click(client, vid, points=[[30, 24], [40, 30]], labels=[1, 0], mask_input={"logits_id": lid})
    assert refined.status_code == 200 and refined.json()["timing"]["cached"] is True
    other_slice = client.post("/segment/prompt", json={"volume_id": vid, "axis": "k", "index": 3,
                                                       "points": [[30, 24]], "labels": [1],
                                                       "mask_input": {"logits_id": lid}})
    assert other_slice.status_code == 422 and "another slice" in other_slice.json()["detail"]
    assert click(client, vid, points=[[30, 24]], labels=[1], mask_input={"logits_id": "f" * 32}).status_code == 404
    current = np.zeros((48, 64), bool)
    current[10:30, 20:40] = True
    mask_b64 = base64.b64encode(wire.encode_mask(current, axis="k", offset=2)).decode()
    assert click(client, vid, points=[[30, 24]], labels=[1], mask_input={"mask": mask_b64}).status_code == 200
    wrong = base64.b64encode(wire.encode_mask(current, axis="k", offset=3)).decode()
    assert click(client, vid, points=[[30, 24]], labels=[1], mask_input={"mask": wrong}).status_code == 422


def test_desam_decoder_with_a_prompt(client, volume):
    _, vid = volume
    r = click(client, vid, box=[10, 8, 50, 40], decoder="phantom")
    assert r.status_code == 200 and len(r.json()["masks"]) == 1 and r.json()["masks"][0]["logits_id"] is None
    assert click(client, vid, box=[10, 8, 50, 40], decoder="nope").status_code == 404


@pytest.mark.parametrize("body, status, text", [
    ({"points": [[100, 5]], "labels": [1]}, 422, "inside"),
    ({"box": [10, 10, 5, 20]}, 422, "x1 > x0"),
    ({"points": [[1, 1]], "labels": [1, 0]}, 422, "same length"),
    ({"points": [[1, 1]]}, 422, "one label"),
    ({"labels": [1]}, 422, "one label"),
    ({}, 422, "at least one prompt"),
    ({"points": [], "labels": None}, 422, "at least 1 item"),
    ({"points": [], "labels": []}, 422, "at least 1 item"),
    ({"points": [[-1, 1]], "labels": [1]}, 422, "greater than or equal to 0"),
    ({"box": [1, 1, 0, 5]}, 422, "greater than 0"),
    ({"points": [[1, 1]] * 65, "labels": [1] * 65}, 422, "at most 64 points"),
    ({"mask_input": {}}, 422, "needs logits_id or mask"),
    ({"mask_input": {"logits_id": None, "mask": None}}, 422, "needs logits_id or mask"),
    ({"mask_input": {"logits_id": ""}}, 422, "at least 1 character"),
    ({"box": [1, 1, 5, 5], "mask_input": {"logits_id": "f" * 32}, "decoder": "phantom"}, 422, "decoder 'sam'"),
    ({"points": [[1, 1]], "labels": [2]}, 422, ""),
    ({"index": 99, "box": [1, 1, 5, 5]}, 422, "outside"),
    ({"axis": "x", "box": [1, 1, 5, 5]}, 422, ""),
    ({"box": [1, 1, 5, 5], "unknown": 1}, 422, ""),
    # JSON's true and false are not numbers (pydantic alone would read them as 1 and 0).
    ({"box": [1, 1, 5, True]}, 422, "box: true and false are not numbers"),
    ({"points": [[1, 1]], "labels": [True]}, 422, "labels: true and false are not numbers"),
    ({"index": True, "box": [1, 1, 5, 5]}, 422, "index: true and false are not numbers"),
    ({"box": [1, 1, 5, 5], "window": {"center": False, "width": 400}}, 422, "center: true and false are not"),
])
def test_bad_prompts_get_clear_4xx(client, volume, body, status, text):
    _, vid = volume
    r = click(client, vid, **body)
    assert r.status_code == status, r.text
    assert text in str(r.json()["detail"])


def test_bad_json_and_non_finite_numbers(client, volume):
    _, vid = volume
    r = client.post("/segment/prompt", content=b'{"volume_id": ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/segment/prompt", content=b'{"volume_id": "%s", "axis": "k", "index": 1, "box": [NaN, 1, 2, 3]}'
                    % vid.encode(), headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    r = click(client, vid, box=[1, 1, 5, 5], window={"center": 40, "width": 0})
    assert r.status_code == 422
    assert click(client, "0" * 64, box=[1, 1, 5, 5]).status_code == 404
    assert click(client, "not-an-id", box=[1, 1, 5, 5]).status_code == 422
    assert client.get("/health").status_code == 200


def test_bad_volume_payloads(client):
    vol = phantom_volume()
    good = payload_of(vol)
    nan = np.full((2, 3, 4), np.nan, "<f4")
    header = {"format": "desam.volume", "version": 1, "shape": [2, 3, 4], "dtype": "float32",
              "byte_order": "little", "axis_order": "KJI", "space": "LPS", "spacing": [1, 1, 1],
              "origin": [0, 0, 0], "direction": np.eye(3).reshape(9).tolist(), "direction_layout": "row-major",
              "compression": "none", "filter": "none", "raw_length": nan.nbytes, "encoded_length": nan.nbytes,
              "crc32": zlib.crc32(nan.tobytes())}
    cases = [b"", b"junk", good[:-10], good[:40] + b"x" + good[41:], good + b"extra",
             wire._frame(wire.VOLUME_MAGIC, header, nan.tobytes())]
    for payload in cases:
        r = client.post("/volumes", content=payload)
        assert r.status_code in (400, 422), (r.status_code, r.text)
        assert "Traceback" not in r.text
    assert client.get("/volumes").json()["volumes"] == []


def test_upload_limit_gives_413(tmp_path):
    app = create_app(tiny_settings(tmp_path, max_upload_bytes=1000), tiny_factory)
    with TestClient(app) as c:
        r = c.post("/volumes", content=payload_of(phantom_volume()))
        assert r.status_code == 413 and "max_upload_bytes" in r.json()["detail"]
    app = create_app(tiny_settings(tmp_path, max_voxels=100), tiny_factory)
    with TestClient(app) as c:
        assert c.post("/volumes", content=payload_of(phantom_volume())).status_code == 413


def test_view_precompute_progress(client, volume):
    _, vid = volume
    p = client.put(f"/volumes/{vid}/view", json={"axis": "k", "index": 3}).json()
    assert p["total"] == 6
    wait_until(lambda: client.get(f"/volumes/{vid}/progress", params={"axis": "k"}).json()["cached"] == 6, 60, 0.05)
    assert client.post(f"/volumes/{vid}/precompute", json={"axis": "j", "window": {"center": 40, "width": 400}}
                       ).status_code == 202
    q = client.get(f"/volumes/{vid}/progress", params={"axis": "j", "window": [40, 400]}).json()
    assert q["total"] == 48 and q["queued"] + q["running"] + q["cached"] > 0  # the precompute's window
    # The deprecated center and width (clients of earlier versions) still name a window: an unused one here.
    legacy = client.get(f"/volumes/{vid}/progress", params={"axis": "j", "center": 1000, "width": 10}).json()
    assert legacy == {"total": 48, "cached": 0, "queued": 0, "running": 0}
    assert client.post(f"/volumes/{vid}/precompute", json={"axis": "j", "cancel": True}).status_code == 202
    for half in ({"window": 40}, {"window": [40, 400, 1]}, {"window": [40, 0]}):
        assert client.get(f"/volumes/{vid}/progress", params={"axis": "j", **half}).status_code == 422, half
    for half in ({"center": 40}, {"width": 400}, {"center": 40, "width": 400, "window": [40, 400]}):
        assert client.get(f"/volumes/{vid}/progress", params={"axis": "j", **half}).status_code == 400, half
    assert client.put(f"/volumes/{vid}/view", json={"axis": "k", "index": 6}).status_code == 422


def test_smallest_volume_payload_is_the_upload_schemas_min_length(client):
    """schemas.MIN_VOLUME_PAYLOAD_BYTES: a 1 x 1 x 3 int8 volume whose voxels have a two-digit
    CRC-32, in the shortest header; one byte less is never a valid payload (see its comment)."""
    import json

    from desam_server.api.schemas import MIN_VOLUME_PAYLOAD_BYTES

    voxels = bytes([126, 217, 209])
    header = {"format": "desam.volume", "version": 1, "shape": [1, 1, 3], "dtype": "int8", "byte_order": "little",
              "axis_order": "KJI", "space": "LPS", "spacing": [1, 1, 1], "origin": [0, 0, 0],
              "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "direction_layout": "row-major", "compression": "none",
              "filter": "none", "raw_length": 3, "encoded_length": 3, "crc32": zlib.crc32(voxels)}
    text = json.dumps(header, separators=(",", ":")).encode()
    payload = wire.VOLUME_MAGIC + len(text).to_bytes(4, "little") + text + voxels
    assert header["crc32"] == 92 and len(payload) == MIN_VOLUME_PAYLOAD_BYTES
    r = client.post("/volumes", content=payload)
    assert r.status_code == 201 and r.json()["shape"] == [1, 1, 3], r.text
    body = client.app.openapi()["paths"]["/volumes"]["post"]["requestBody"]["content"]["application/octet-stream"]
    assert body["schema"]["minLength"] == MIN_VOLUME_PAYLOAD_BYTES
    assert client.post("/volumes", content=payload[:-1]).status_code == 422


def test_schema_states_the_settings_point_limit(tmp_path):
    schema = create_app(tiny_settings(tmp_path, decoder=False, max_points=5)).openapi()
    prompt = schema["components"]["schemas"]["PromptRequest"]["properties"]
    for name in ("points", "labels"):
        assert [b["maxItems"] for b in prompt[name]["anyOf"] if b.get("type") == "array"] == [5]


CORS_ORIGIN = "http://viewer.example"


@pytest.fixture()
def guarded(tmp_path, tiny_sam_checkpoint):
    """A service with a token and CORS for one origin."""
    token = "s3cret-token-for-tests-0123456789"
    settings = tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0], decoder=False, token=token,
                             cors_origins=(CORS_ORIGIN,))
    with TestClient(create_app(settings, tiny_factory), raise_server_exceptions=False) as c:
        yield c, {"Authorization": f"Bearer {token}"}


def test_cors_preflight_needs_no_token(guarded):
    client, _ = guarded
    preflight = {"Origin": CORS_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = client.options("/segment/prompt", headers=preflight)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


def test_everything_but_a_cors_preflight_needs_the_token(guarded):
    client, auth = guarded
    # Not preflights: a plain OPTIONS, requests from the allowed origin and from others.
    for method, path, headers in (("OPTIONS", "/health", {}), ("OPTIONS", "/health", {"Origin": CORS_ORIGIN}),
                                  ("GET", "/health", {"Origin": CORS_ORIGIN}),
                                  ("GET", "/health", {"Origin": "http://elsewhere.example"}),
                                  ("GET", "/volumes", {})):
        r = client.request(method, path, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, headers)
    # The allowed origin's browser may read the 401 (and ask for the token); another origin's may not.
    assert client.get("/health", headers={"Origin": CORS_ORIGIN}).headers["access-control-allow-origin"] == CORS_ORIGIN
    assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "http://elsewhere.example"}
                                                           ).headers
    # A preflight from another origin gets no CORS grant and reaches nothing behind it.
    r = client.options("/health", headers={"Origin": "http://elsewhere.example",
                                           "Access-Control-Request-Method": "GET"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # With the token, the same requests pass.
    assert client.get("/health", headers={"Origin": CORS_ORIGIN, **auth}).status_code == 200
    assert client.get("/health", headers={"Origin": "http://elsewhere.example", **auth}).status_code == 200


def test_auto_job_runs_and_returns_the_slab(client, volume, tiny_model):
    _, vid = volume
    r = client.post("/segment/auto", json={"volume_id": vid, "axis": "k", "start": 1, "stop": 4, "mode": "box"})
    assert r.status_code == 202 and r.headers["location"] == f"/jobs/{r.json()['id']}"
    job_id = r.json()["id"]
    service = client.app.state.service
    job = service.jobs.wait(job_id, timeout=60)
    assert job.state == "succeeded", job.error
    status = client.get(f"/jobs/{job_id}").json()
    assert status["progress"] == {"done": 3, "total": 3, "fraction": 1.0} and status["result_available"]
    slab = wire.decode_mask(client.get(f"/jobs/{job_id}/result").content)
    assert slab.mask.shape == (3, 48, 64) and slab.offset == 1 and slab.axis == "k"
    assert [j["id"] for j in client.get("/jobs").json()["jobs"]] == [job_id]


def test_auto_needs_a_decoder_and_valid_ranges(tmp_path, volume, client):
    _, vid = volume
    bad = client.post("/segment/auto", json={"volume_id": vid, "start": 4, "stop": 2})
    assert bad.status_code == 422
    assert client.post("/segment/auto", json={"volume_id": vid, "decoder": "liver"}).status_code == 404
    assert client.get("/jobs/deadbeef").status_code == 404
    assert client.get("/jobs/deadbeef/result").status_code == 404
    app = create_app(tiny_settings(tmp_path / "nodec", decoder=False), tiny_factory)
    with TestClient(app) as c:
        c.post("/volumes", content=payload_of(phantom_volume()))
        r = c.post("/segment/auto", json={"volume_id": vid})
        assert r.status_code == 409 and "no trained DeSAM decoder" in r.json()["detail"]


def test_conflicting_job_cancel_and_queue_limit(tmp_path, tiny_sam_checkpoint):
    app = create_app(tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0], max_jobs=2), tiny_factory)
    with TestClient(app) as c:
        vids = [c.post("/volumes", content=payload_of(phantom_volume(k=12, seed=s))).json()["volume_id"]
                for s in range(3)]
        service = c.app.state.service
        service.scheduler.pause()              # hold the encoder so the first job stays active
        first = c.post("/segment/auto", json={"volume_id": vids[0], "mode": "grid"}).json()
        same = c.post("/segment/auto", json={"volume_id": vids[0], "mode": "box"})
        assert same.status_code == 409 and first["id"] in same.json()["detail"]
        assert c.post("/segment/auto", json={"volume_id": vids[0], "axis": "j", "stop": 2}).status_code == 202
        busy = c.post("/segment/auto", json={"volume_id": vids[1]})
        assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
        assert c.post(f"/jobs/{first['id']}/cancel").json()["cancel_requested"] is True
        service.scheduler.resume()
        assert service.jobs.wait(first["id"], timeout=60).state == "cancelled"
        result = c.get(f"/jobs/{first['id']}/result")
        assert result.status_code == 409 and "cancelled" in result.json()["detail"]
        assert c.post(f"/jobs/{first['id']}/cancel").status_code == 200     # idempotent


def finished_job(client, job_id: str, timeout: float = 60.0) -> dict:
    """GET /jobs/{id} until the job has finished; fail after ``timeout`` seconds."""
    wait_until(lambda: client.get(f"/jobs/{job_id}").json()["state"] not in ("queued", "running"), timeout, 0.05)
    return client.get(f"/jobs/{job_id}").json()


def test_deleting_a_volume_cancels_its_jobs(tmp_path, tiny_sam_checkpoint):
    """A running job (held waiting for its first slice's features) and a queued one: both
    end cancelled, saying that their volume was deleted."""
    app = create_app(tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0], max_jobs=3), tiny_factory)
    with TestClient(app) as c:
        vids = [c.post("/volumes", content=payload_of(phantom_volume(seed=s))).json()["volume_id"] for s in (1, 2)]
        service = c.app.state.service
        service.scheduler.pause()
        running = c.post("/segment/auto", json={"volume_id": vids[0]}).json()["id"]
        wait_until(lambda: c.get(f"/jobs/{running}").json()["state"] == "running", interval=0.02)
        queued = c.post("/segment/auto", json={"volume_id": vids[1]}).json()["id"]
        assert c.get(f"/jobs/{queued}").json()["state"] == "queued"       # one job runs at a time
        assert c.delete(f"/volumes/{vids[1]}").status_code == 204
        job = c.get(f"/jobs/{queued}").json()
        assert (job["state"], job["error"]) == ("cancelled", "its volume was deleted")
        assert c.delete(f"/volumes/{vids[0]}").status_code == 204
        service.scheduler.resume()
        job = finished_job(c, running)
        assert (job["state"], job["error"]) == ("cancelled", "its volume was deleted")
        assert job["progress"]["done"] == 0 and not job["result_available"]
        result = c.get(f"/jobs/{running}/result")
        assert result.status_code == 409 and "its volume was deleted" in result.json()["detail"]
        assert c.get("/info").json()["jobs"]["finished_total"]["cancelled"] == 2
        assert c.get("/health").status_code == 200


def test_documented_openapi_schema_is_current():
    """docs/openapi.json is what the app serves (regenerate: desam-server openapi docs/openapi.json)."""
    import json
    from pathlib import Path

    from desam_server.api import ServiceSettings

    documented = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text())
    assert documented == json.loads(json.dumps(create_app(ServiceSettings()).openapi()))


def test_clicks_on_a_slice_share_its_features_until_the_volume_goes(client, volume):
    """The last clicked slices keep their unpacked features (and the decoder work all
    prompts there share); a second click answers the same as a fresh service would,
    and deleting the volume drops them."""
    vol, vid = volume
    service = client.app.state.service
    first = click(client, vid, points=[[30.5, 24.5]], labels=[1]).json()
    (features,) = service._hot.values()
    assert features.decoder_state  # filled by the first click
    again = click(client, vid, points=[[30.5, 24.5]], labels=[1]).json()
    assert [m["mask"] for m in again["masks"]] == [m["mask"] for m in first["masks"]]
    assert next(iter(service._hot.values())) is features and again["timing"]["cached"]
    for index in (0, 1, 3, 4):  # HOT_SLICES other slices push it out
        r = client.post("/segment/prompt", json={"volume_id": vid, "axis": "k", "index": index,
                                                 "points": [[30.5, 24.5]], "labels": [1]})
        assert r.status_code == 200, r.text
    assert client.get("/info").json()["hot_slices"] == 4
    assert all(kept is not features for kept in service._hot.values())
    assert client.delete(f"/volumes/{vid}").status_code == 204
    assert service._hot == {}


def test_recent_click_features_stay_within_their_byte_budget(client, volume, monkeypatch):
    import desam_server.api.service as service_module

    monkeypatch.setattr(service_module, "HOT_BYTES", 1)  # less than one slice: keep only the newest
    _, vid = volume
    for index in (1, 2, 3):
        r = client.post("/segment/prompt", json={"volume_id": vid, "axis": "k", "index": index,
                                                 "points": [[30.5, 24.5]], "labels": [1]})
        assert r.status_code == 200, r.text
    hot = client.app.state.service._hot
    assert [key[2] for key in hot] == [3]
