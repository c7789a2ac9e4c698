"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis, in-process over ASGI).

Every operation gets a few dozen generated requests, valid and invalid (schemathesis's
examples, coverage and fuzzing phases, positive and negative data), and every answer must
be a documented status code with a body matching its declared schema, never a 5xx. A real
volume is uploaded first and the generated volume ids are sometimes swapped for its id, so
the prompts, views, precomputes and jobs reach the model instead of stopping at 404.

Bounded for the default run: few examples per operation, derandomized (the same requests
in every run), no deadline.
"""

from __future__ import annotations

import time

import hypothesis.strategies as st
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from desam_server.api import ServiceSettings, create_app
from service_helpers import id_of, payload_of, phantom_volume, tiny_factory, tiny_settings

VOLUME = phantom_volume()
PAYLOAD = payload_of(VOLUME)
VOLUME_ID = id_of(VOLUME)


class _Served:
    """The ASGI app schemathesis calls: requests go to the service the ``service`` fixture
    started; lifespan events are acknowledged and dropped. The fixture's ``TestClient``
    runs the real lifespan once around the whole run; left to itself schemathesis would
    start a second one (a second ``Service`` replacing the first in ``app.state``) and
    stop it after every test."""

    app = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": f"{message['type']}.complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        assert self.app is not None, "the service fixture has not started the service"
        await self.app(scope, receive, send)


SERVED = _Served()

# The schema cannot say which values fit the stored volume or the wire format, so for the
# operations whose documented 422 means exactly that ("slice index 40 is outside 0..5",
# "start >= stop", "not a volume payload", "labels do not match points"), a 422 answer to
# schema-valid data is a correct answer; everything else keeps schemathesis's defaults.
STATE_DEPENDENT = ["POST /volumes", "PUT /volumes/{volume_id}/view", "POST /volumes/{volume_id}/precompute",
                   "GET /volumes/{volume_id}/progress", "POST /segment/prompt", "POST /segment/auto"]
DEFAULT_ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # schemathesis's default
ACCEPTED = {name: [*DEFAULT_ACCEPTED, "422"] for name in STATE_DEPENDENT}
# GET /volumes/{volume_id}/progress also answers 400 to a window given by one of center
# and width only: OpenAPI cannot state that two query parameters go together.
ACCEPTED["GET /volumes/{volume_id}/progress"].append("400")
CONFIG = SchemathesisConfig.from_dict({"operations": [
    {"include-name": name, "checks": {"positive_data_acceptance": {"expected-statuses": statuses}}}
    for name, statuses in ACCEPTED.items()]})

# Read at import (collection) from an app that is never started: settings do not change
# the routes, and no model is needed to describe them.
schema = schemathesis.openapi.from_dict(create_app(ServiceSettings.load(environ={}, volume_dir="off")).openapi(),
                                        config=CONFIG)
schema.app = SERVED

SLICES = min(VOLUME.shape)  # an index below this is a slice along every axis


def _is_int(value) -> bool:
    """JSON integers, ``2746.0`` included."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _aimed(body: dict) -> dict:
    """``body`` made to reach the model: the uploaded volume, slice numbers in range, SAM's
    decoder for a prompt (the only loaded one for a job), a label per point; a job becomes
    one slice in box mode (a 32 x 32 grid costs seconds a slice on a CPU); a prompt with
    neither points nor a box gets a box."""
    body = {**body, "volume_id": VOLUME_ID} if "volume_id" in body else dict(body)
    if _is_int(body.get("index")):
        body["index"] = int(body["index"]) % SLICES
    if "start" in body or "stop" in body or "mode" in body or "grid_size" in body:
        start = int(body["start"]) % SLICES if _is_int(body.get("start")) else 0
        body.update(start=start, stop=start + 1, mode="box", decoder=None)
    elif "index" in body and "volume_id" in body:
        body["decoder"] = "sam"
        if not body.get("points") and not body.get("box"):
            body["box"] = [1.0, 1.0, 5.0, 5.0]  # inside a slice along every axis
    if "points" in body or "labels" in body:
        points = body.get("points")
        body["labels"] = [1] * len(points) if isinstance(points, list) else None
    return body


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_sam_checkpoint):
    """The running service (tiny model, one test decoder) with the phantom volume uploaded."""
    tmp = tmp_path_factory.mktemp("fuzz")
    app = create_app(tiny_settings(tmp, checkpoint=tiny_sam_checkpoint[0]), tiny_factory)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/volumes", content=PAYLOAD)
        assert r.status_code == 201 and r.json()["volume_id"] == VOLUME_ID, r.text
        SERVED.app = app
        try:
            yield client
        finally:
            SERVED.app = None


def _aim(case, how: int) -> None:
    """Point a third of the requests at the uploaded volume (``how`` 1) and a third at its
    slices with values that reach the model (``how`` 2). The containers are replaced, not
    edited in place, so schemathesis re-judges whether the request is still invalid."""
    if how and "volume_id" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "volume_id": VOLUME_ID}
    if isinstance(case.body, dict) and {"volume_id", "index", "axis"} & case.body.keys():
        if how == 1 and "volume_id" in case.body:
            case.body = {**case.body, "volume_id": VOLUME_ID}
        elif how == 2:
            case.body = _aimed(case.body)


FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def _restore_volume(case, client) -> None:
    if case.method.upper() == "DELETE" and client.get(f"/volumes/{VOLUME_ID}").status_code == 404:
        # A generated DELETE removed the uploaded volume: put it back for the requests after it.
        assert client.post("/volumes", content=PAYLOAD).status_code == 201


@schema.parametrize()
@settings(max_examples=20, **FUZZ)
def test_api_conforms_to_its_schema(case, service):
    """Schemathesis's own requests (examples, coverage and fuzzing phases) as generated."""
    case.call_and_validate()
    _restore_volume(case, service)


@schema.parametrize()
@schema.given(data=st.data())
@settings(max_examples=30, **FUZZ)
def test_api_aimed_at_the_volume(case, data, service):
    """Fuzzing-phase requests, two thirds of them aimed at the uploaded volume (schemathesis
    runs only that phase for a test with its own strategies)."""
    _aim(case, data.draw(st.sampled_from([0, 1, 2]), label="aim"))
    case.call_and_validate()
    _restore_volume(case, service)


def test_valid_requests_conform_to_the_schema(service):
    """The answers the fuzz rarely reaches (prompts, jobs and their results), each request
    written out and checked like a generated one."""

    def call(method, path, **kwargs):
        return schema[path][method].Case(**kwargs).call_and_validate().json()

    def wait_for_jobs():
        for _ in range(600):
            jobs = call("GET", "/jobs")["jobs"]
            if all(job["state"] not in ("queued", "running") for job in jobs):
                return jobs
            time.sleep(0.05)
        raise AssertionError(f"jobs still running: {jobs}")

    vid = {"volume_id": VOLUME_ID}
    assert call("POST", "/volumes", body=PAYLOAD, media_type="application/octet-stream")["volume_id"] == VOLUME_ID
    call("PUT", "/volumes/{volume_id}/view", path_parameters=vid, body={"axis": "k", "index": 2})
    call("POST", "/volumes/{volume_id}/precompute", path_parameters=vid,
         body={"axis": "j", "window": {"center": 40, "width": 400}})
    call("GET", "/volumes/{volume_id}/progress", path_parameters=vid, query={"axis": "j", "center": 40, "width": 400})
    prompt = {**vid, "axis": "k", "index": 2}
    first = call("POST", "/segment/prompt", body={**prompt, "points": [[30.5, 24.5], [5, 5]], "labels": [1, 0]})
    assert len(first["masks"]) == 3
    call("POST", "/segment/prompt", body={**prompt, "box": [10, 8, 50, 40], "multimask": False,
                                          "mask_input": {"logits_id": first["masks"][first["best"]]["logits_id"]}})
    call("POST", "/segment/prompt", body={**prompt, "axis": "i", "box": [5, 1, 40, 5], "decoder": "phantom"})
    wait_for_jobs()  # the fuzz's jobs on this volume (409 for a second job on one volume and axis)
    job = call("POST", "/segment/auto", body={**vid, "start": 1, "stop": 3})
    wait_for_jobs()
    job = call("GET", "/jobs/{job_id}", path_parameters={"job_id": job["id"]})
    assert job["state"] == "succeeded", job
    result = schema["/jobs/{job_id}/result"]["GET"].Case(path_parameters={"job_id": job["id"]}).call_and_validate()
    assert result.headers.get("content-type") == ["application/octet-stream"] and result.content
    call("POST", "/jobs/{job_id}/cancel", path_parameters={"job_id": job["id"]})
    assert call("GET", "/jobs")["jobs"]


def test_service_still_answers_after_the_fuzz(service):
    r = service.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert service.get(f"/volumes/{VOLUME_ID}").status_code == 200
    # No job the fuzz started failed inside the service (cancelled ones are fine).
    assert not [job for job in service.get("/jobs").json()["jobs"] if job["state"] == "failed"]
