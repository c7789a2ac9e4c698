"""Propagation (``POST /segment/propagate``): the walk on its own, then as a job of the
service (tiny random-weight model, a 16-slice phantom): stop rules in both directions,
bounds, reach, the result slab, cancel, bad input."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from desam_server import wire
from desam_server.api import create_app
from desam_server.api.propagation import StopRules, box_around, propagate

from scheduler_helpers import wait_until
from service_helpers import payload_of, phantom_volume, tiny_factory, tiny_settings

SEED_INDEX = 8
PERMISSIVE = {"iou_threshold": 0.0, "min_area": 1, "min_area_ratio": 0.0, "max_area_ratio": 1e6}


# ---- the walk ------------------------------------------------------------------------------------------
def square(area_side: int, shape=(20, 30)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[:area_side, :area_side] = True
    return mask


class Table:
    """A fake decoder: slice n answers a square of side ``sides[n]`` with IoU ``ious[n]``;
    records what it was asked (slice, the neighbour mask's area)."""

    def __init__(self, sides: dict[int, int], ious: dict[int, float]) -> None:
        self.sides, self.ious, self.asked = sides, ious, []

    def __call__(self, n: int, neighbour: np.ndarray) -> tuple[np.ndarray, float]:
        self.asked.append((n, int(neighbour.sum())))
        return square(self.sides[n]), self.ious[n]


def test_each_direction_stops_at_its_first_failing_slice_which_is_not_kept():
    # Slices 0..9, seed 5 (side 6): up, slice 8's IoU fails; down, slice 2's area ratio (4 / 25) fails.
    sides = {0: 5, 1: 5, 2: 2, 3: 5, 4: 6, 6: 6, 7: 5, 8: 5, 9: 5}
    ious = {n: 0.9 for n in sides} | {8: 0.4}
    table, kept, progress = Table(sides, ious), [], []
    result = propagate(square(6), 5, 0, 10, StopRules(iou_threshold=0.5, min_area=4, min_area_ratio=0.5),
                       table, on_slice=lambda n, m, iou: kept.append((n, int(m.sum()), iou)),
                       on_progress=progress.append)
    assert (result.first, result.last) == (3, 7)
    assert sorted(result.masks) == [3, 4, 5, 6, 7] and result.slab().shape == (5, 20, 30)
    assert kept == [(6, 36, 0.9), (7, 25, 0.9), (4, 36, 0.9), (3, 25, 0.9)]
    # Each slice was prompted by its neighbour's final mask: the seed, then the previous answer.
    assert table.asked == [(6, 36), (7, 36), (8, 25), (4, 36), (3, 36), (2, 25)]
    assert result.stopped == {1: "slice 8: predicted IoU 0.400 < 0.5", -1: "slice 2: area ratio 0.160 < 0.5"}
    assert progress == sorted(progress) and progress[-1] == 10       # slices past a stop count as decided


@pytest.mark.parametrize("rules, iou, side, previous, why", [
    (StopRules(iou_threshold=0.7), 0.69, 10, 100, "predicted IoU 0.690 < 0.7"),
    (StopRules(iou_threshold=0.7), float("nan"), 10, 100, "predicted IoU nan < 0.7"),
    (StopRules(min_area=101), 0.9, 10, 100, "area 100 < 101 pixels"),
    (StopRules(min_area_ratio=0.5), 0.9, 7, 100, "area ratio 0.490 < 0.5"),
    (StopRules(max_area_ratio=2.0), 0.9, 15, 100, "area ratio 2.250 > 2"),
    (StopRules(iou_threshold=0.7, min_area=100, min_area_ratio=1.0, max_area_ratio=1.0), 0.7, 10, 100, None),
])
def test_stop_rules(rules, iou, side, previous, why):
    assert rules.why_stop(iou, side * side, previous) == why


def test_bounds_and_bad_seeds():
    table = Table({n: 4 for n in range(10)}, {n: 0.9 for n in range(10)})
    result = propagate(square(4), 4, 3, 6, StopRules(), table)
    assert (result.first, result.last, result.stopped) == (3, 5, {1: "the bound", -1: "the bound"})
    assert [n for n, _ in table.asked] == [5, 3]
    edge = propagate(square(4), 0, 0, 1, StopRules(), table)
    assert (edge.first, edge.last) == (0, 0) and edge.slab().shape == (1, 20, 30)
    with pytest.raises(ValueError, match="outside"):
        propagate(square(4), 6, 3, 6, StopRules(), table)
    with pytest.raises(ValueError, match="empty"):
        propagate(square(0), 4, 3, 6, StopRules(), table)


def test_box_around_widens_and_clips():
    mask = np.zeros((20, 30), bool)
    mask[5:8, 10:20] = True
    assert box_around(mask, 2).tolist() == [8, 3, 22, 10]
    mask[0, 29] = True
    assert box_around(mask, 4).tolist() == [6, 0, 30, 12]
    with pytest.raises(ValueError):
        box_around(np.zeros((4, 4), bool))


# ---- the job ---------------------------------------------------------------------------------------------
VOLUME = phantom_volume(k=16, seed=3)
SEED = VOLUME[SEED_INDEX] > 30          # the organ on the seed slice


def encoded(mask: np.ndarray, axis: str = "k", index: int = SEED_INDEX) -> str:
    return base64.b64encode(wire.encode_mask(np.asarray(mask, bool), axis=axis, offset=index)).decode("ascii")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_sam_checkpoint):
    tmp = tmp_path_factory.mktemp("propagation")
    app = create_app(tiny_settings(tmp, checkpoint=tiny_sam_checkpoint[0]), tiny_factory)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/volumes", content=payload_of(VOLUME))
        assert r.status_code == 201, r.text
        yield client, r.json()["volume_id"]


def run(served, **body) -> tuple[dict, wire.DecodedMask | None]:
    """Start a propagation from the seed, wait for it: (its final status, its slab)."""
    client, vid = served
    r = client.post("/segment/propagate", json={"volume_id": vid, "index": SEED_INDEX, "mask": encoded(SEED),
                                                **body})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/jobs/{r.json()['id']}" and r.json()["kind"] == "propagate"
    client.app.state.service.jobs.wait(r.json()["id"], timeout=120)
    job = client.get(f"/jobs/{r.json()['id']}").json()
    if job["state"] != "succeeded":
        return job, None
    return job, wire.decode_mask(client.get(f"/jobs/{job['id']}/result").content, volume_shape=VOLUME.shape)


def expected_reach(slices: dict[int, dict], rules: StopRules, start: int, stop: int) -> tuple[int, int]:
    """Where each direction stops under ``rules``, from a permissive run's slices (the
    walk is deterministic: up to its stop, a stricter run answers the same slices)."""
    reach = []
    for direction, bound in ((-1, start - 1), (1, stop)):
        previous, n = slices[SEED_INDEX]["area"], SEED_INDEX + direction
        while n != bound and n in slices and rules.why_stop(slices[n]["iou"], slices[n]["area"], previous) is None:
            previous, n = slices[n]["area"], n + direction
        reach.append(n - direction)
    return reach[0], reach[1]


@pytest.fixture(scope="module")
def permissive(served):
    """A run over the whole axis that only an empty mask could stop."""
    job, slab = run(served, **PERMISSIVE)
    assert job["state"] == "succeeded", job["error"]
    return job, slab


@pytest.mark.parametrize("decoder", ["sam", "phantom"])
def test_a_permissive_run_reaches_the_whole_axis(served, decoder):
    job, slab = run(served, decoder=decoder, **PERMISSIVE)
    assert job["state"] == "succeeded", job["error"]
    assert job["reached"] == [0, 15] and job["progress"] == {"done": 16, "total": 16, "fraction": 1.0}
    assert job["spec"]["decoder"] == decoder and job["spec"]["seed_area"] == int(SEED.sum())
    assert [s["index"] for s in job["slices"]] == list(range(16)) and job["slices_with_mask"] == 16
    assert job["slices"][SEED_INDEX] == {"index": SEED_INDEX, "iou": None, "area": int(SEED.sum()), "presence": None,
                                         "box": None}
    assert all(s["iou"] is not None and s["area"] > 0 for s in job["slices"] if s["index"] != SEED_INDEX)
    assert (slab.axis, slab.offset, slab.mask.shape) == ("k", 0, (16, 48, 64))
    np.testing.assert_array_equal(slab.mask[SEED_INDEX], SEED)        # the seed's mask is kept as given
    assert [int(m.sum()) for m in slab.mask] == [s["area"] for s in job["slices"]]


def test_stop_rules_are_honoured_in_both_directions(served, permissive):
    """Each rule, set from a permissive run's answers, stops both directions where that
    run's answers break it, and keeps nothing from the stopping slice on."""
    full, full_slab = permissive
    slices = {s["index"]: s for s in full["slices"]}
    others = [s for n, s in slices.items() if n != SEED_INDEX]
    ratios = sorted(slices[n]["area"] / slices[n - 1]["area"] for n in range(SEED_INDEX + 2, 16))
    cases = [
        StopRules(iou_threshold=float(np.median([s["iou"] for s in others])) + 1e-6, **_off("iou_threshold")),
        StopRules(min_area=int(np.median([s["area"] for s in others])), **_off("min_area")),
        StopRules(min_area_ratio=min(1.0, ratios[len(ratios) // 2]), **_off("min_area_ratio")),
        StopRules(max_area_ratio=max(1.0, ratios[len(ratios) // 2]), **_off("max_area_ratio")),
    ]
    early = 0
    for rules in cases:
        first, last = expected_reach(slices, rules, 0, 16)
        job, slab = run(served, iou_threshold=rules.iou_threshold, min_area=rules.min_area,
                        min_area_ratio=rules.min_area_ratio, max_area_ratio=rules.max_area_ratio)
        assert job["state"] == "succeeded", job["error"]
        assert job["reached"] == [first, last], rules
        assert [s["index"] for s in job["slices"]] == list(range(first, last + 1))
        assert job["progress"]["done"] == job["progress"]["total"] == 16
        assert (slab.offset, slab.mask.shape[0]) == (first, last - first + 1)
        np.testing.assert_array_equal(slab.mask, full_slab.mask[first:last + 1])
        early += (first > 0) + (last < 15)
    assert early >= 6, "the rules stopped too few directions for the test to mean much"


def _off(rule: str) -> dict:
    """The other rules switched off."""
    return {name: value for name, value in PERMISSIVE.items() if name != rule}


def test_bounds_limit_the_walk_and_offset_the_slab(served, permissive):
    _, full_slab = permissive
    job, slab = run(served, start=5, stop=11, **PERMISSIVE)
    assert job["reached"] == [5, 10] and job["progress"]["total"] == 6
    assert (job["spec"]["start"], job["spec"]["stop"]) == (5, 11)
    assert (slab.offset, slab.mask.shape) == (5, (6, 48, 64))
    np.testing.assert_array_equal(slab.mask, full_slab.mask[5:11])
    job, slab = run(served, start=SEED_INDEX, stop=SEED_INDEX + 1, **PERMISSIVE)
    assert job["reached"] == [SEED_INDEX, SEED_INDEX] and slab.mask.shape == (1, 48, 64)


def test_other_axes_and_a_window(served):
    client, vid = served
    h, w = wire.mask_slice_shape(VOLUME.shape, "i")
    seed = np.zeros((h, w), bool)
    seed[4:12, 10:30] = True
    r = client.post("/segment/propagate", json={"volume_id": vid, "axis": "i", "index": 30,
                                                "mask": encoded(seed, "i", 30), "start": 27, "stop": 33,
                                                "window": {"center": 30, "width": 300},
                                                **PERMISSIVE})
    assert r.status_code == 202, r.text
    job = client.app.state.service.jobs.wait(r.json()["id"], timeout=60)
    assert job.state == "succeeded", job.error
    slab = wire.decode_mask(job.result, volume_shape=VOLUME.shape)
    assert slab.axis == "i" and slab.mask.shape[1:] == (16, 48) and job.reached[0] <= 30 <= job.reached[1]
    assert job.spec.to_json()["window"] == {"center": 30.0, "width": 300.0}


def test_cancel_and_one_job_per_volume_and_axis(served):
    client, vid = served
    service = client.app.state.service
    service.scheduler.pause()                     # the job waits for its first slice's decoder pass
    try:
        first = client.post("/segment/propagate", json={"volume_id": vid, "index": SEED_INDEX,
                                                        "mask": encoded(SEED), **PERMISSIVE}).json()
        wait_until(lambda: client.get(f"/jobs/{first['id']}").json()["state"] == "running", interval=0.02)
        same = client.post("/segment/auto", json={"volume_id": vid, "axis": "k"})
        assert same.status_code == 409 and first["id"] in same.json()["detail"]
        assert client.post(f"/jobs/{first['id']}/cancel").json()["cancel_requested"] is True
    finally:
        service.scheduler.resume()
    job = service.jobs.wait(first["id"], timeout=60)
    assert (job.state, job.error, job.result) == ("cancelled", "cancelled on request", None)
    result = client.get(f"/jobs/{first['id']}/result")
    assert result.status_code == 409 and "cancelled" in result.json()["detail"]


@pytest.mark.parametrize("change, status, text", [
    ({"mask": encoded(np.zeros_like(SEED))}, 422, "the seed mask is empty"),
    ({"mask": encoded(np.ones((48, 63), bool))}, 422, "does not fit volume shape"),
    ({"mask": encoded(SEED, index=SEED_INDEX + 1)}, 422, "mask must be one slice of axis k at index 8"),
    ({"mask": encoded(SEED, axis="j")}, 422, "does not fit volume shape"),
    ({"mask": "not base64!"}, 422, "mask is not valid base64"),
    ({"mask": base64.b64encode(b"DSAMMASK garbage").decode()}, 422, "mask: "),
    ({"index": 16}, 422, "slice index 16 is outside 0..15 along axis k"),
    ({"start": 9}, 422, "the seed slice 8 is outside the range [9, 16)"),
    ({"stop": 8}, 422, "the seed slice 8 is outside the range [0, 8)"),
    ({"start": 6, "stop": 17}, 422, "slice range [6, 17) is not within [0, 16)"),
    ({"decoder": "liver"}, 404, "unknown decoder 'liver'"),
    ({"volume_id": "0" * 64}, 404, "unknown volume"),
    ({"iou_threshold": 1.5}, 422, "less than or equal to 1"),
    ({"min_area": 0}, 422, "greater than or equal to 1"),
    ({"extra": 1}, 422, "Extra inputs are not permitted"),
])
def test_bad_input_gets_a_clear_4xx_and_the_service_keeps_running(served, change, status, text):
    client, vid = served
    r = client.post("/segment/propagate", json={"volume_id": vid, "index": SEED_INDEX, "mask": encoded(SEED),
                                                **change})
    assert r.status_code == status, r.text
    assert text in str(r.json()["detail"])
    assert client.get("/health").status_code == 200


def test_clicks_are_answered_while_a_propagation_runs(served):
    """The job's decoder passes wait behind clicks (not urgent, on the compute thread): a
    click during the walk is answered while the job is still running."""
    client, _ = served
    volume = phantom_volume(k=96, seed=4)
    vid = client.post("/volumes", content=payload_of(volume)).json()["volume_id"]
    seed = np.zeros((48, 64), bool)
    seed[16:32, 20:44] = True
    r = client.post("/segment/propagate", json={"volume_id": vid, "index": 48, "mask": encoded(seed, index=48),
                                                **PERMISSIVE})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_until(lambda: client.get(f"/jobs/{job_id}").json()["progress"]["done"] >= 3, interval=0.01)
    for index in (5, 90):
        click = client.post("/segment/prompt", json={"volume_id": vid, "axis": "k", "index": index,
                                                     "points": [[30.5, 24.5]], "labels": [1]})
        assert click.status_code == 200, click.text
    status = client.get(f"/jobs/{job_id}").json()
    assert status["state"] == "running" and status["progress"]["done"] < 96, "the walk ended before the clicks"
    job = client.app.state.service.jobs.wait(job_id, timeout=120)
    assert job.state == "succeeded" and job.reached == (0, 95), job.error
