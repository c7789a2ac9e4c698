"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis, in-process over ASGI).

Every operation gets a few dozen generated requests, valid and invalid (schemathesis's
examples, coverage and fuzzing phases, positive and negative data), and every answer must
be a documented status code with a body matching its declared schema, never a 5xx; a
request the schema accepts is refused only for a reason the schema cannot state
(``STATE_DEPENDENT``). A real volume is uploaded first and the generated volume ids are
sometimes swapped for its id, so the prompts, views, precomputes and jobs reach the model
instead of stopping at 404; likewise the decoder registry holds two versions of one
structure, and generated structure names and versions are sometimes swapped for them.
Then schemathesis's stateful phase chains requests along the
schema's links (an uploaded volume's id, a job's id), and every linked operation must
answer a 2xx at least once.

Training: every training route is fuzzed, but a generated ``POST /training`` never starts
a training: its volume ids are random (the uploaded volume's id is aimed only at
top-level ``volume_id`` fields, and a training request names volumes inside ``cases``)
and only the uploaded volume has a label (``organ``), so it ends at 404 or 422. One tiny
training job (one step) is started on purpose in ``test_valid_requests_conform_to_the_schema``
to check the answers of the job's routes.

Bounded for the default run: few examples per operation, few short scenarios,
derandomized (the same requests in every run), no deadline, every wait with a timeout.
"""

from __future__ import annotations

import base64
import collections
import math
import re
import time

import hypothesis.strategies as st
import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from desam_server import wire
from desam_server.api import Service, ServiceSettings, create_app
from desam_server.decoder_registry import DecoderRegistry
from desam_server.hashing import sha256_file
from desam_server.modeling import build_desam

from service_helpers import decoder_files, id_of, payload_of, phantom_volume, tiny_settings

VOLUME = phantom_volume()
PAYLOAD = payload_of(VOLUME)
VOLUME_ID = id_of(VOLUME)


def label_payload(volume) -> bytes:
    """A valid label of ``volume``: its upper half along j."""
    mask = np.zeros(volume.shape, bool)
    mask[:, : volume.shape[1] // 2] = True
    return wire.encode_mask(mask, axis="k", offset=0)


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

# Where a schema-valid request may still get 422: values that must fit the stored volume or the
# service's state, or the wire formats' contents, none of which the schema can state. For these
# operations schemathesis accepts a 422 to valid data, and ``state_dependent_422`` then checks
# that the answer gives one of these reasons; every other operation keeps schemathesis's defaults
# (a valid request is accepted or answered 401/403/404/409/429).
SLICE = "slice index [0-9]+ is outside"  # the volume's extent along the axis
STATE_DEPENDENT = {
    "POST /volumes": ["volume payload rejected: "],  # the payload's bytes (docs/WIRE_FORMAT.md)
    "PUT /volumes/{volume_id}/view": [SLICE, "unknown decoder"],  # the models served now
    "POST /volumes/{volume_id}/precompute": ["unknown decoder"],
    "GET /volumes/{volume_id}/progress": ["unknown decoder"],
    "POST /segment/prompt": [
        SLICE, "points must lie inside the", "box must lie inside the",  # the slice's size
        "box must have x1 > x0 and y1 > y0",    # JSON Schema cannot compare two items
        "points and labels must come together and have the same length",  # nor two lengths
        "mask_input.mask", "logits_id belongs to another slice"],  # a wire mask's contents, an earlier answer
    "POST /segment/auto": [
        r"slice range \[[0-9]+, [0-9]+\) is not within",  # start < stop <= the extent
        "is not a box inside the",  # the slice's size; x0 < x1 and y0 < y1 (JSON Schema cannot compare items)
        "mode 'roi' needs a box", "a box is given with mode 'roi' only",  # nor tie one field to another's value
        "needs a decoder: name a", "its automatic modes are", "not a DeSAM decoder"],  # the named model's family
    "POST /segment/propagate": [  # the extent, the seed within the bounds, the wire mask's contents
        SLICE, r"slice range \[[0-9]+, [0-9]+\) is not within", "the seed slice [0-9]+ is outside the range",
        "^mask", "the seed mask is empty"],
    "POST /training": ["strategy '[a-z_]+' is not one of the [a-z_]+ family's",  # JSON Schema cannot tie the
                       # strategy to the family's value (DB-SAM trains with boxes only), nor check a family's
                       # own options (config.family_options: any JSON object in the schema)
                       "^options: (the [a-z_]+ family takes no options|unknown sammix options|[a-z_]+ must be|"
                       "classifier_output_stride .* is not one of|rank must be|focal_gamma and)"],
    "PUT /volumes/{volume_id}/labels/{structure}": [  # the mask payload's bytes, and its fit to the volume
        "label payload rejected: ", "does not match the volume's shape", "a label is the whole volume along",
        "the label of .* is empty", "the label payload belongs to volume"],
}
PUT_LABEL = "PUT /volumes/{volume_id}/labels/{structure}"
DEFAULT_ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # schemathesis's default
CONFIG = SchemathesisConfig.from_dict({
    "operations": [{"include-name": name, "checks": {"positive_data_acceptance": {
        "expected-statuses": [*DEFAULT_ACCEPTED, "422"]}}} for name in STATE_DEPENDENT],
    # The stateful phase follows the schema's own links only, so that it fails if they break.
    "phases": {"stateful": {"inference": {"algorithms": []}}}})


def state_dependent_422(ctx, response, case) -> None:
    """A schema-valid request answered 422 names one of its operation's ``STATE_DEPENDENT`` reasons."""
    if response.status_code != 422 or case.meta is None or not case.meta.generation.mode.is_positive:
        return
    detail = response.json()["detail"]
    # A list is the request models' own validation (a message from the service is a string).
    messages = [p["msg"] for p in detail] if isinstance(detail, list) else [detail]
    reasons = STATE_DEPENDENT.get(case.operation.label, [])
    unexplained = [m for m in messages if not any(re.search(reason, m) for reason in reasons)]
    assert not unexplained, f"{case.operation.label}: valid data refused with {unexplained}"


# Read at import (collection) from an app that is never started: settings do not change
# the routes, and no model is needed to describe them.
OPENAPI = create_app(ServiceSettings.load(environ={}, volume_dir="off")).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)
schema.app = SERVED


def group_schema(path_regex: str):
    """The schema restricted to the paths matching ``path_regex`` (links to other paths
    dropped), served by the same app."""
    import copy

    spec = copy.deepcopy(OPENAPI)
    spec["paths"] = {p: item for p, item in spec["paths"].items() if re.match(path_regex, p)}
    kept = {op.get("operationId") for item in spec["paths"].values() for op in item.values() if isinstance(op, dict)}
    for item in spec["paths"].values():
        for op in item.values():
            for answer in (op.get("responses", {}) if isinstance(op, dict) else {}).values():
                links = answer.get("links")
                if links:
                    answer["links"] = {n: link for n, link in links.items() if link["operationId"] in kept}
    part = schemathesis.openapi.from_dict(spec, config=CONFIG)
    part.app = SERVED
    return part

SLICES = min(VOLUME.shape)  # an index below this is a slice along every axis


def _is_int(value) -> bool:
    """JSON integers, ``2746.0`` included."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float) and value.is_integer())


def _is_number(value) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _fold(value):
    """A coordinate folded into [0, 5): inside a slice along every axis."""
    return value % 5 if _is_number(value) else value


def seed_mask(axis: str, index: int) -> str:
    """A propagation's seed: base64 of a wire mask of slice ``index`` along ``axis`` (of the
    phantom's shape) with a block in its middle."""
    h, w = wire.mask_slice_shape(VOLUME.shape, axis)
    mask = np.zeros((h, w), bool)
    mask[h // 4: max(h // 2, h // 4 + 1), w // 4: w // 2] = True
    return base64.b64encode(wire.encode_mask(mask, axis=axis, offset=index)).decode("ascii")


def _aimed(label: str, body: dict) -> dict:
    """The body of a ``label`` request made to reach the model, its volume id left as it is:
    slice numbers in range; a job becomes one slice in box mode with the decoder file's decoder
    (a 32 x 32 grid costs seconds a slice on a CPU); a propagation gets a real seed mask of
    its slice and bounds of at most three slices around it; a prompt goes to SAM's decoder with a
    label per point, its coordinates folded into the slice, a box with x1 > x0 and y1 > y0
    (or [1, 1, 5, 5] when it has neither points nor a box) and no mask_input (a generated
    logits id or mask is never a real one; the requests not aimed try those)."""
    body = dict(body)
    if _is_int(body.get("index")):
        body["index"] = int(body["index"]) % SLICES
    if label == "POST /segment/auto":
        start = int(body["start"]) % SLICES if _is_int(body.get("start")) else 0
        body.update(start=start, stop=start + 1, mode="box", decoder="phantom")
    elif label == "POST /segment/propagate":
        axis = body.get("axis", "k")
        if axis in wire.AXES and _is_int(body.get("index")):
            index = body["index"]
            extent = VOLUME.shape[wire.AXES.index(axis)]
            body.update(mask=seed_mask(axis, index), start=max(0, index - 1), stop=min(extent, index + 2),
                        decoder="sam")
    elif label == "POST /segment/prompt":
        body.update(decoder="sam", mask_input=None)
        points, box = body.get("points"), body.get("box")
        if isinstance(points, list):
            body["points"] = [[_fold(c) for c in p] if isinstance(p, list) else p for p in points]
        if isinstance(box, list) and len(box) == 4 and all(map(_is_number, box)):
            (x0, x1), (y0, y1) = sorted(map(_fold, box[::2])), sorted(map(_fold, box[1::2]))
            body["box"] = [x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)]
        if not points and not box:
            body["box"] = [1.0, 1.0, 5.0, 5.0]
        if "points" in body or "labels" in body:
            body["labels"] = [1] * len(points) if isinstance(points, list) else None
    return body


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_sam_checkpoint):
    """The running service (tiny model, one test decoder) with the phantom volume uploaded."""
    tmp = tmp_path_factory.mktemp("fuzz")
    settings = tiny_settings(tmp, checkpoint=tiny_sam_checkpoint[0], training_threads=1)
    DECODERS.extend(decoder_files(tmp, STRUCTURE, 2, encoder_weights_sha256=sha256_file(tiny_sam_checkpoint[0])))
    (tmp / "curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    DECODERS.append(tmp / "curve.png")
    _restore_registry(DecoderRegistry(settings.registry_dir))
    labels = {(VOLUME_ID, "organ"): VOLUME > 30}

    def factory(settings):
        return Service(settings, build_desam("tiny", sam_checkpoint=settings.sam_checkpoint),
                       model_info={"encoder": "tiny", "weights": "test"},
                       labels=lambda volume_id, structure: labels[(volume_id, structure)])

    app = create_app(settings, factory)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/volumes", content=PAYLOAD)
        assert r.status_code == 201 and r.json()["volume_id"] == VOLUME_ID, r.text
        SERVED.app = app
        try:
            yield client
        finally:
            SERVED.app = None


STRUCTURE = "organ"
DECODERS: list = []  # the structure's two decoder files and a curve PNG, written by the ``service`` fixture


def _restore_registry(registry: DecoderRegistry) -> None:
    """Two versions of STRUCTURE in the registry, the first with a curve (generated
    requests activate, roll back and delete them)."""
    have = len(registry.versions(STRUCTURE)) if STRUCTURE in registry.structures() else 0
    for path in DECODERS[have:2]:
        registry.register(path, curve_png=DECODERS[2])


def _aim(case, how: int, client) -> None:
    """Point a third of the requests at the uploaded volume (``how`` 1) and a third at its
    slices with values that reach the model (``how`` 2); registry requests at the registry's
    structure and a version of it. The containers are replaced, not edited in place, so
    schemathesis re-judges whether the request is still invalid."""
    if how and "structure" in case.path_parameters:
        registry = client.app.state.service.versions.registry
        versions = [v.version for v in registry.versions(STRUCTURE)] if STRUCTURE in registry.structures() else []
        aimed = {"structure": STRUCTURE}
        if versions and "version" in case.path_parameters:
            aimed["version"] = versions[how % len(versions)]
        if versions and isinstance(case.body, dict) and "version" in case.body:
            case.body = {**case.body, "version": versions[how % len(versions)]}
        case.path_parameters = {**case.path_parameters, **aimed}
    if how and "volume_id" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "volume_id": VOLUME_ID}
    if how and isinstance(case.body, dict) and {"volume_id", "index", "axis"} & case.body.keys():
        body = {**case.body, "volume_id": VOLUME_ID} if "volume_id" in case.body else case.body
        case.body = _aimed(case.operation.label, body) if how == 2 else body


FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def _restore_volume(case, client) -> None:
    if case.method.upper() == "DELETE" and client.get(f"/volumes/{VOLUME_ID}").status_code == 404:
        # A generated DELETE removed the uploaded volume: put it back for the requests after it.
        assert client.post("/volumes", content=PAYLOAD).status_code == 201
    if case.method.upper() == "DELETE":  # or a version of the registry's structure
        _restore_registry(client.app.state.service.versions.registry)


@schema.parametrize()
@settings(max_examples=20, **FUZZ)
def test_api_conforms_to_its_schema(case, service):
    """Schemathesis's own requests (examples, coverage and fuzzing phases) as generated."""
    case.call_and_validate(additional_checks=[state_dependent_422])
    _restore_volume(case, service)


@schema.parametrize()
@schema.given(data=st.data())
@settings(max_examples=30, **FUZZ)
def test_api_aimed_at_the_volume(case, data, service):
    """Fuzzing-phase requests, two thirds of them aimed at the uploaded volume (schemathesis
    runs only that phase for a test with its own strategies)."""
    _aim(case, data.draw(st.sampled_from([0, 1, 2]), label="aim"), service)
    case.call_and_validate(additional_checks=[state_dependent_422])
    _restore_volume(case, service)


def test_valid_requests_conform_to_the_schema(service):
    """The answers the fuzz rarely reaches (prompts, jobs and their results), each request
    written out and checked like a generated one."""

    def call(method, path, **kwargs):
        return schema[path][method].Case(**kwargs).call_and_validate(additional_checks=[state_dependent_422]).json()

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
    call("GET", "/volumes/{volume_id}/progress", path_parameters=vid, query={"axis": "j", "window": [40, 400]})
    prompt = {**vid, "axis": "k", "index": 2}
    first = call("POST", "/segment/prompt", body={**prompt, "points": [[30.5, 24.5], [5, 5]], "labels": [1, 0]})
    assert len(first["masks"]) == 3
    call("POST", "/segment/prompt", body={**prompt, "box": [10, 8, 50, 40], "multimask": False,
                                          "mask_input": {"logits_id": first["masks"][first["best"]]["logits_id"]}})
    call("POST", "/segment/prompt", body={**prompt, "axis": "i", "box": [5, 1, 40, 5], "decoder": "phantom"})
    wait_for_jobs()  # the fuzz's jobs on this volume (409 for a second job on one volume and axis)
    job = call("POST", "/segment/auto", body={**vid, "start": 1, "stop": 3, "decoder": STRUCTURE})
    wait_for_jobs()
    job = call("GET", "/jobs/{job_id}", path_parameters={"job_id": job["id"]})
    assert job["state"] == "succeeded", job
    assert job["kind"] == "auto" and [s["index"] for s in job["slices"]] == [1, 2] and job["reached"] is None
    propagation = call("POST", "/segment/propagate", body={**vid, "axis": "k", "index": 3, "mask": seed_mask("k", 3),
                                                          "iou_threshold": 0, "min_area": 1, "min_area_ratio": 0,
                                                          "max_area_ratio": 1e6, "window": {"center": 40,
                                                                                            "width": 400}})
    wait_for_jobs()
    propagation = call("GET", "/jobs/{job_id}", path_parameters={"job_id": propagation["id"]})
    assert propagation["state"] == "succeeded" and propagation["kind"] == "propagate", propagation
    assert propagation["reached"][0] <= 3 <= propagation["reached"][1]
    call("POST", "/segment/propagate", body={**vid, "axis": "j", "index": 20, "mask": seed_mask("j", 20),
                                             "decoder": STRUCTURE, "start": 19, "stop": 22})
    wait_for_jobs()
    result = schema["/jobs/{job_id}/result"]["GET"].Case(path_parameters={"job_id": job["id"]}).call_and_validate()
    assert result.headers.get("content-type") == ["application/octet-stream"] and result.content
    call("POST", "/jobs/{job_id}/cancel", path_parameters={"job_id": job["id"]})
    assert call("GET", "/jobs")["jobs"]
    label = {**vid, "structure": "Left kidney"}
    put = call("PUT", "/volumes/{volume_id}/labels/{structure}", path_parameters=label, body=label_payload(VOLUME),
               media_type="application/octet-stream")
    assert put["structure"] == "Left kidney" and put["voxels"] > 0
    listed = call("GET", "/volumes/{volume_id}/labels", path_parameters=vid)["labels"]
    assert "Left kidney" in [x["structure"] for x in listed]
    got = schema["/volumes/{volume_id}/labels/{structure}"]["GET"].Case(path_parameters=label).call_and_validate()
    assert got.headers.get("content-type") == ["application/octet-stream"] and wire.decode_mask(got.content).mask.any()
    gone = schema["/volumes/{volume_id}/labels/{structure}"]["DELETE"].Case(path_parameters=label).call_and_validate()
    assert gone.status_code == 204

    _restore_registry(service.app.state.service.versions.registry)
    structure = {"structure": STRUCTURE}
    versions = [v["version"] for v in call("GET", "/registry/{structure}", path_parameters=structure)["versions"]]
    first, second = ({**structure, "version": v} for v in versions[:2])
    assert STRUCTURE in {s["structure"] for s in call("GET", "/registry")["structures"]}
    call("PUT", "/registry/{structure}/active", path_parameters=structure, body={"version": versions[0]})
    call("PUT", "/registry/{structure}/active", path_parameters=structure, body={"version": versions[1]})
    assert call("POST", "/registry/{structure}/rollback", path_parameters=structure)["served"] == versions[0]
    assert call("GET", "/registry/{structure}/versions/{version}", path_parameters=first)["active"]
    curve = schema["/registry/{structure}/versions/{version}/curve"]["GET"].Case(path_parameters=first)
    assert curve.call_and_validate().content.startswith(b"\x89PNG")
    schema["/registry/{structure}/versions/{version}"]["DELETE"].Case(path_parameters=second).call_and_validate()
    _restore_registry(service.app.state.service.versions.registry)

    options = {"slabs": 1, "gap": 1, "validation_fraction": 0.2, "empty_ratio": 0,
               "config": {"strategy": "box", "epochs": 1, "batch_size": 2}}
    training = call("POST", "/training", body={"structure": "organ", "cases": [{**vid, "structure": "organ"}],
                                                "options": options})
    tid = {"job_id": training["id"]}
    service.app.state.service.training.wait(training["id"], timeout=120)
    assert call("GET", "/training/{job_id}", path_parameters=tid)["state"] == "finished"
    assert len(call("GET", "/training/{job_id}/metrics", path_parameters=tid)["epochs"]) == 1
    assert call("GET", "/training/{job_id}/log", path_parameters=tid, query={"lines": 5})["lines"]
    events = schema["/training/{job_id}/events"]["GET"].Case(path_parameters=tid).call_and_validate()
    assert "event: finished" in events.text
    assert call("POST", "/training/{job_id}/cancel", path_parameters=tid)["state"] == "finished"
    assert call("GET", "/training")["jobs"]


# Operations that only an id from another answer (an OpenAPI link) gets past 404.
LINKED = ["GET /volumes/{volume_id}", "DELETE /volumes/{volume_id}", "PUT /volumes/{volume_id}/view",
          "POST /volumes/{volume_id}/precompute", "GET /volumes/{volume_id}/progress", "POST /segment/prompt",
          "POST /segment/auto", "POST /segment/propagate", "GET /jobs/{job_id}", "POST /jobs/{job_id}/cancel",
          "GET /jobs/{job_id}/result",
          "GET /volumes/{volume_id}/labels", PUT_LABEL, "GET /volumes/{volume_id}/labels/{structure}",
          "DELETE /volumes/{volume_id}/labels/{structure}",
          "GET /registry/{structure}", "GET /registry/{structure}/versions/{version}",
          "PUT /registry/{structure}/active"]
# The state machine runs per group of operations (a group's links stay inside it): over the
# whole schema, operations that need no id (the registry's) take most of the steps and
# some links are left unexplored within the budget.
LINK_GROUPS = {"volumes": "^/(volumes|health|info|decoders)", "segment": r"^/(volumes(/\{volume_id\})?$|segment/|jobs)",
               "registry": "^/registry"}
LINKED_VOLUME = phantom_volume(seed=7)  # not the module's volume, which the other tests need
JOB_WAIT_S = 60


@pytest.mark.parametrize("group", sorted(LINK_GROUPS))
def test_stateful_phase_follows_the_links(service, group):
    """Schemathesis's state machine over the schema's links: chains of requests that carry
    an uploaded volume's id, and an automatic job's id, to the operations that take them.
    The uploads (volumes, labels) send real payloads and the bodies' slice numbers are aimed at it as in
    ``_aimed``, but the ids come only through the links (the schema's own; none inferred):
    every linked operation must have answered a 2xx, so the test fails when links break.

    Every scenario starts without the volume, and each job has ended before the next step,
    so that a scenario's answers do not depend on the ones before it or on timing (which
    Hypothesis would report as inconsistent data generation)."""
    statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    payload, volume_path = payload_of(LINKED_VOLUME), f"/volumes/{id_of(LINKED_VOLUME)}"
    jobs = service.app.state.service.jobs
    for job in jobs.list():  # the earlier tests' jobs (max_jobs active ones would answer 429)
        jobs.wait(job.id, timeout=JOB_WAIT_S)

    part = group_schema(LINK_GROUPS[group])

    class Workflow(part.as_state_machine()):
        def setup(self):
            assert service.delete(volume_path).status_code in (204, 404)

        def before_call(self, case):
            if case.operation.label == "POST /volumes":
                case.body = payload
            elif case.operation.label == PUT_LABEL:
                case.body = label_payload(LINKED_VOLUME)
            elif isinstance(case.body, dict):
                case.body = _aimed(case.operation.label, case.body)

        def after_call(self, response, case):
            super().after_call(response, case)
            statuses[case.operation.label][response.status_code] += 1
            if case.operation.label in ("POST /segment/auto", "POST /segment/propagate") and (
                    response.status_code == 202):
                jobs.wait(response.json()["id"], timeout=JOB_WAIT_S)

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            super().validate_response(response, case, [*(additional_checks or ()), state_dependent_422], **kwargs)

    try:
        Workflow.run(settings=settings(max_examples=80, stateful_step_count=10, **FUZZ))
    finally:
        service.delete(volume_path)
    linked = [label for label in LINKED if re.match(LINK_GROUPS[group], label.split(" ", 1)[1])]
    unreached = [label for label in linked if not any(200 <= status < 300 for status in statuses[label])]
    assert not unreached, {label: dict(counts) for label, counts in statuses.items()}


def test_service_still_answers_after_the_fuzz(service):
    r = service.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert service.get(f"/volumes/{VOLUME_ID}").status_code == 200
    # No job the fuzz started failed inside the service (cancelled ones are fine); the only
    # training job is the one started on purpose.
    assert not [job for job in service.get("/jobs").json()["jobs"] if job["state"] == "failed"]
    assert [job["state"] for job in service.get("/training").json()["jobs"]] == ["finished"]
