"""The decoder registry in the service: active versions served at start, the /registry
routes, and hot swap: activating a version changes the answers without a restart, while
a job already running finishes on the version it started with."""

from __future__ import annotations

import base64
import gc
import threading
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from desam_server import wire
from desam_server.api import create_app
from desam_server.decoder_registry import DecoderRegistry
from SlicerDeSAMLib.ServerClient import ServerClient, ServerError

from service_helpers import (
    DIRECTION,
    ORIGIN,
    SPACING,
    decoder_files,
    live_server,
    payload_of,
    phantom_volume,
    tiny_factory,
    tiny_settings,
)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x01" * 16
WINDOW = {"center": 40, "width": 400}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, list[Path]]:
    tmp = tmp_path_factory.mktemp("decoders")
    return {"organ": decoder_files(tmp, "organ", 2, training={"dice": [0.5, 0.7]}),
            "phantom": decoder_files(tmp, "phantom", 1),
            "foreign": decoder_files(tmp, "foreign", 1, encoder_weights_sha256="f" * 64)}


def _settings(tmp_path: Path, files, **overrides):
    """A tiny service whose registry holds organ v1 (active, with a curve) and v2, a
    'phantom' structure (also the name of the decoder file the service is given) and a
    'foreign' one trained for other encoder weights."""
    settings = tiny_settings(tmp_path, **overrides)
    curve = tmp_path / "curve.png"
    curve.write_bytes(PNG)
    registry = DecoderRegistry(settings.registry_dir)
    registry.register(files["organ"][0], curve_png=curve)
    registry.register(files["organ"][1], activate=False)
    registry.register(files["phantom"][0])
    registry.register(files["foreign"][0])
    return replace(settings, volume_dir=None, cache=replace(settings.cache, storage_dtype="float32"))


def _mask(answer: dict) -> np.ndarray:
    return wire.decode_mask(base64.b64decode(answer["masks"][0]["mask"])).mask


def test_the_registry_routes(tmp_path, files):
    settings = _settings(tmp_path, files)
    with TestClient(create_app(settings, tiny_factory)) as client:
        decoders = {d["name"]: d for d in client.get("/decoders").json()["decoders"]}
        assert set(decoders) == {"organ", "phantom"}  # foreign does not fit; phantom is the file's
        assert (decoders["organ"]["source"], decoders["organ"]["version"]) == ("registry", "v1")
        assert (decoders["phantom"]["source"], decoders["phantom"]["version"]) == ("file", None)

        structures = {s["structure"]: s for s in client.get("/registry").json()["structures"]}
        assert set(structures) == {"foreign", "organ", "phantom"}
        organ = structures["organ"]
        assert (organ["active"], organ["served"], organ["problem"], organ["history"]) == ("v1", "v1", None, [])
        assert [(v["version"], v["curve"]) for v in organ["versions"]] == [("v1", True), ("v2", False)]
        assert structures["phantom"]["served"] is None and "decoder file" in structures["phantom"]["problem"]
        foreign = structures["foreign"]
        assert foreign["served"] is None and "encoder weights" in foreign["problem"]
        assert str(tmp_path) not in foreign["problem"]  # no paths of the service machine

        record = client.get("/registry/organ/versions/v2").json()
        assert record["active"] is False and record["metadata"]["training"] == {"epochs": 2, "dice": [0.5, 0.7]}
        assert record["metadata"]["encoder"] == "tiny" and record["version"] == "v2"
        r = client.get("/registry/organ/versions/v1/curve")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == PNG
        assert client.get("/registry/organ/versions/v2/curve").status_code == 404

        state = client.put("/registry/organ/active", json={"version": "v2"}).json()
        assert (state["active"], state["served"], state["history"]) == ("v2", "v2", ["v1"])
        assert {d["name"]: d["version"] for d in client.get("/decoders").json()["decoders"]}["organ"] == "v2"
        assert client.post("/registry/organ/rollback").json()["served"] == "v1"
        r = client.post("/registry/organ/rollback")
        assert r.status_code == 409 and "no earlier active version" in r.json()["detail"]

        r = client.put("/registry/foreign/active", json={"version": "v1"})
        assert r.status_code == 409 and "does not fit" in r.json()["detail"] and str(tmp_path) not in r.text
        r = client.put("/registry/phantom/active", json={"version": "v1"})
        assert r.status_code == 409 and "decoder file" in r.json()["detail"]

        for method, path, status in (("GET", "/registry/liver", 404), ("GET", "/registry/organ/versions/v9", 404),
                                     ("PUT", "/registry/liver/active", 404), ("POST", "/registry/liver/rollback", 404),
                                     ("DELETE", "/registry/organ/versions/v7", 404),
                                     ("GET", "/registry/organ/versions/x1", 422), ("GET", "/registry/.x", 422)):
            r = client.request(method, path, json={"version": "v1"} if method == "PUT" else None)
            assert r.status_code == status, (method, path, r.text)
        assert client.put("/registry/organ/active", json={"version": "2"}).status_code == 422

        r = client.delete("/registry/organ/versions/v1")
        assert r.status_code == 409 and "active version" in r.json()["detail"]
        assert client.delete("/registry/organ/versions/v2").status_code == 204
        assert client.delete("/registry/organ/versions/v1").status_code == 204  # the only one: organ goes
        assert "organ" not in {s["structure"] for s in client.get("/registry").json()["structures"]}
        assert "organ" not in {d["name"] for d in client.get("/decoders").json()["decoders"]}
        assert client.get("/info").json()["decoder_registry"] is True


def test_activation_swaps_the_clicked_decoder_and_releases_the_old_one(tmp_path, files):
    service = tiny_factory(_settings(tmp_path, files))
    try:
        info, _ = service.upload(payload_of(phantom_volume()))
        click = dict(box=[4.0, 4.0, 60.0, 44.0], decoder="organ", window=WINDOW)
        first = service.prompt(info["volume_id"], "k", 2, **click)
        old = service.decoders.get("organ")
        model, generation = weakref.ref(old.model), old.model.generation
        assert any(f.decoder_state.generation == generation for f in service._hot.values())
        del old
        service.versions.activate("organ", "v2")
        # The old version's slice work left the hot slices, and nothing keeps its model alive.
        assert not any(f.decoder_state.generation == generation for f in service._hot.values())
        gc.collect()
        assert model() is None
        second = service.prompt(info["volume_id"], "k", 2, **click)
        assert second["timing"]["cached"] and not np.array_equal(_mask(first), _mask(second))
        service.versions.rollback("organ")
        assert np.array_equal(_mask(service.prompt(info["volume_id"], "k", 2, **click)), _mask(first))
    finally:
        service.close()


def test_a_job_in_flight_finishes_on_its_version_while_new_ones_get_the_new_one(tmp_path, files):
    """Over HTTP with the client: a job held inside its first slice (the test patches the
    scheduler instance's ``serve_urgent``, the job's between-steps call) while organ v2 is
    activated ends with v1's masks; the next job gets v2's, and after a rollback v1's again."""
    settings = _settings(tmp_path, files)
    with live_server(settings) as (url, app):
        client = ServerClient(url)
        vid, _ = client.upload_volume(phantom_volume(), spacing=SPACING, origin=ORIGIN, direction=DIRECTION)

        def start():
            return client.segment_auto(vid, decoder="organ", window=(40, 400), min_region_area=0)["id"]

        def result(job_id):
            assert client.wait_job(job_id, timeout=120, poll=0.05)["state"] == "succeeded"
            return client.job_result(job_id).mask

        v1 = result(start())   # also encodes every slice: the held job below runs no encoder pass
        scheduler = app.state.service.scheduler
        entered, release = threading.Event(), threading.Event()
        original = scheduler.serve_urgent

        def held() -> None:
            if not entered.is_set():
                entered.set()
                assert release.wait(60)
            original()

        scheduler.serve_urgent = held
        try:
            job = start()
            assert entered.wait(60)
            state = client.activate_decoder("organ", "v2")   # answered while the job is held mid-slice
            assert (state["active"], state["served"]) == ("v2", "v2")
            assert client.job(job)["state"] == "running"
        finally:
            release.set()
        assert np.array_equal(result(job), v1)                # in flight: v1 to the end
        v2 = result(start())
        assert not np.array_equal(v2, v1)                     # new work: v2, without a restart
        assert client.rollback_decoder("organ")["served"] == "v1"
        assert np.array_equal(result(start()), v1)

        # The client's other registry calls.
        assert {s["structure"] for s in client.registry()} == {"foreign", "organ", "phantom"}
        assert client.registry_structure("organ")["history"] == []
        assert client.decoder_record("organ", "v1")["metadata"]["training"]["epochs"] == 1
        assert client.decoder_curve("organ", "v1") == PNG
        with pytest.raises(ServerError) as caught:
            client.delete_decoder_version("organ", "v1")
        assert caught.value.status == 409
        client.delete_decoder_version("organ", "v2")
        assert [v["version"] for v in client.registry_structure("organ")["versions"]] == ["v1"]
