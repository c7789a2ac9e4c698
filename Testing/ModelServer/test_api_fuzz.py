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

import hypothesis.strategies as st
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

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
# The schema is read at import (collection) from an app that is never started: settings
# do not change the routes, and no model is needed to describe them.
# The schema cannot say which values fit the stored volume or the wire format, so for the
# operations whose documented 422 means exactly that ("slice index 40 is outside 0..5",
# "start >= stop", "not a volume payload", "labels do not match points"), a 422 answer to
# schema-valid data is a correct answer; everything else keeps schemathesis's defaults.
STATE_DEPENDENT = ["POST /volumes", "PUT /volumes/{volume_id}/view", "POST /volumes/{volume_id}/precompute",
                   "GET /volumes/{volume_id}/progress", "POST /segment/prompt", "POST /segment/auto"]
# GET /volumes/{volume_id}/progress also answers 400 to a window given by one of center
# and width only: OpenAPI cannot state that two query parameters go together.
ACCEPTED = {name: [*POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES, "422"] for name in STATE_DEPENDENT}
ACCEPTED["GET /volumes/{volume_id}/progress"].append("400")
CONFIG = SchemathesisConfig.from_dict({"operations": [
    {"include-name": name, "checks": {"positive_data_acceptance": {"expected-statuses": statuses}}}
    for name, statuses in ACCEPTED.items()]})
schema = schemathesis.openapi.from_dict(create_app(ServiceSettings.load(environ={}, volume_dir="off")).openapi(),
                                        config=CONFIG)
schema.app = SERVED


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    # Half of the requests to /volumes/{volume_id}/... name the uploaded volume.
    if isinstance(path_parameters, dict) and "volume_id" in path_parameters:
        return st.sampled_from([path_parameters, {**path_parameters, "volume_id": VOLUME_ID}])
    return st.just(path_parameters)


@schema.hook
def flatmap_body(context, body):
    # Half of the prompt and job requests whose body is an object name the uploaded volume.
    if isinstance(body, dict) and "volume_id" in body:
        return st.sampled_from([body, {**body, "volume_id": VOLUME_ID}])
    return st.just(body)


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


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms_to_its_schema(case, service):
    case.call_and_validate()
    if case.method.upper() == "DELETE" and service.get(f"/volumes/{VOLUME_ID}").status_code == 404:
        # A generated DELETE removed the uploaded volume: put it back for the operations after it.
        assert service.post("/volumes", content=PAYLOAD).status_code == 201


def test_service_still_answers_after_the_fuzz(service):
    r = service.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert service.get(f"/volumes/{VOLUME_ID}").status_code == 200
