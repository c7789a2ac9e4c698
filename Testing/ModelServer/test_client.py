"""The stdlib client (SlicerDeSAMLib.ServerClient) against a real uvicorn server on loopback."""

from __future__ import annotations

import ast
import socket
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from desam_server import wire
from SlicerDeSAMLib import ServerClient as client_module
from SlicerDeSAMLib.ServerClient import ServerClient, ServerError

from service_helpers import DIRECTION, ORIGIN, SPACING, FinishedRequests, live_server, phantom_volume, tiny_settings

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "SlicerDeSAM" / "SlicerDeSAMLib"


@pytest.fixture(scope="module")
def finished():
    return FinishedRequests()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_sam_checkpoint, finished):
    tmp = tmp_path_factory.mktemp("live")
    with live_server(tiny_settings(tmp, checkpoint=tiny_sam_checkpoint[0]), finished=finished) as (url, app):
        yield url, app


def upload(client, vol):
    return client.upload_volume(vol, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)


def test_client_imports_only_stdlib_numpy_and_wire():
    allowed = {"numpy"} | set(__import__("sys").stdlib_module_names)
    for name in ("ServerClient.py", "ServerError.py", "PromptResult.py", "TrainingJobsClient.py", "wire.py"):
        tree = ast.parse((LIB / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {"."} if node.level else {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed | {"__future__", "."}, (name, roots)
    # The Slicer side's codec is a copy of the service's file (test_repository.py checks
    # that the bytes are the same).
    assert client_module.wire.FORMAT_VERSION == wire.FORMAT_VERSION


def test_round_trip_through_the_client(server):
    url, app = server
    c = ServerClient(url, timeout=60)
    assert c.health()["status"] == "ok"
    vol = phantom_volume(seed=11)
    vid, sent = upload(c, vol)
    assert sent and c.has_volume(vid) and vid in c.volumes()
    uploads = c.info()["volumes"]["uploads"]
    assert upload(c, vol) == (vid, False)                      # skipped: the service has it
    assert c.info()["volumes"]["uploads"] == uploads
    assert c.set_view(vid, "k", 2)["total"] == 6
    r = c.segment_prompt(vid, "k", 2, points=[[30, 24]], labels=[1])
    assert r.masks.shape == (3, 48, 64) and r.mask.dtype == bool and r.index == 2
    assert r.best == int(np.argmax(r.ious))
    refined = c.segment_prompt(vid, "k", 2, points=[[30, 24]], labels=[1], logits_id=r.logits_ids[r.best],
                               multimask=False)
    assert refined.masks.shape == (1, 48, 64) and refined.timing["cached"] is True
    by_mask = c.segment_prompt(vid, "j", 20, box=[5, 0, 40, 5], mask=np.ones((6, 64), bool))
    assert by_mask.masks.shape[1:] == (6, 64)
    job = c.segment_auto(vid, start=0, stop=3, mode="grid", grid_size=3)
    done = c.wait_job(job["id"], timeout=120, poll=0.05)
    assert done["state"] == "succeeded", done["error"]
    slab = c.job_result(job["id"])
    assert slab.mask.shape == (3, 48, 64) and slab.offset == 0
    assert any(j["id"] == job["id"] for j in c.jobs())
    assert c.progress(vid, "k")["total"] == 6 and c.precompute(vid, "i", window=(40, 400))["total"] == 64
    busy, unused = c.progress(vid, "i", window=(40, 400)), c.progress(vid, "i", window=(1000, 10))
    assert busy["cached"] + busy["queued"] + busy["running"] > 0      # the precompute's window
    assert (unused["total"], unused["cached"], unused["queued"], unused["running"]) == (64, 0, 0, 0)
    assert c.precompute(vid, "i", window=(40, 400), cancel=True)["total"] == 64
    c.delete_volume(vid)
    assert not c.has_volume(vid)


def test_propagation_through_the_client(server):
    url, _ = server
    c = ServerClient(url, timeout=60)
    vol = phantom_volume(k=10, seed=13)
    vid, _ = upload(c, vol)
    seed = vol[4] > 30
    job = c.segment_propagate(vid, "k", 4, seed, start=2, stop=8, iou_threshold=0.0, min_area=1,
                              min_area_ratio=0.0, max_area_ratio=1e6, window=(40, 400))
    assert job["kind"] == "propagate" and job["state"] in ("queued", "running", "succeeded")
    assert job["spec"]["window"] == {"center": 40.0, "width": 400.0} and job["spec"]["seed_area"] == seed.sum()
    done = c.wait_job(job["id"], timeout=120, poll=0.05)
    assert done["state"] == "succeeded", done["error"]
    first, last = done["reached"]
    assert 2 <= first <= 4 <= last <= 7
    assert [s["index"] for s in done["slices"]] == list(range(first, last + 1))
    slab = c.job_result(job["id"])
    assert (slab.axis, slab.offset, slab.mask.shape) == ("k", first, (last - first + 1, 48, 64))
    np.testing.assert_array_equal(slab.mask[4 - first], seed)
    with pytest.raises(ServerError) as err:
        c.segment_propagate(vid, "k", 4, np.zeros_like(seed))
    assert err.value.status == 422 and "the seed mask is empty" in err.value.message
    with pytest.raises(ServerError) as err:
        c.segment_propagate(vid, "k", 4, seed, decoder="liver")
    assert err.value.status == 404 and "unknown decoder 'liver'" in err.value.message


def test_typed_errors_carry_status_and_message(server):
    url, _ = server
    c = ServerClient(url)
    with pytest.raises(ServerError) as err:
        c.segment_prompt("0" * 64, "k", 0, box=[0, 0, 1, 1])
    assert err.value.status == 404 and "upload it first" in err.value.message
    vid, _ = upload(c, phantom_volume(seed=12))
    with pytest.raises(ServerError) as err:
        c.segment_prompt(vid, "k", 0, points=[[500, 1]], labels=[1])
    assert err.value.status == 422 and "inside" in err.value.message
    with pytest.raises(ServerError) as err:
        c.job("nope")
    assert err.value.status == 404
    with pytest.raises(ServerError) as err:
        ServerClient("http://127.0.0.1:9", timeout=2).health()
    assert err.value.status == 0 and "cannot reach" in err.value.message
    with pytest.raises(ValueError):
        ServerClient("ftp://x")


def test_eight_threads_fifty_clicks_two_volumes(server):
    """Clicks start on cold slices (encoded while other threads click); every answer equals
    the one a lone client gets afterwards for the same prompt on the same slice."""
    url, _ = server
    c = ServerClient(url)
    vols = [phantom_volume(seed=21), phantom_volume(seed=22)]
    vids = [upload(c, v)[0] for v in vols]
    prompts = [(v, k, [[10 + 5 * (n % 8), 8 + 4 * (n % 7)]]) for n, (v, k) in
               enumerate((v, k) for v in range(2) for k in range(6))]
    answers, errors = {}, []

    def worker(t: int) -> None:
        own = ServerClient(url)
        try:
            for n in range(50):
                p = (t * 7 + n) % len(prompts)
                v, k, pts = prompts[p]
                answers[(t, n)] = (p, own.segment_prompt(vids[v], "k", k, points=pts, labels=[1]).masks)
        except Exception as exc:  # noqa: BLE001 - any failure on a thread is reported by the assertion below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "click threads still running after 300 s"
    assert not errors, errors[:5]
    assert len(answers) == 400
    expected = [c.segment_prompt(vids[v], "k", k, points=pts, labels=[1]).masks for v, k, pts in prompts]
    wrong = [key for key, (p, masks) in answers.items() if not np.array_equal(masks, expected[p])]
    assert not wrong, wrong[:5]


def test_token_is_required_on_every_request(tmp_path, tiny_sam_checkpoint):
    token = "s3cret-token-for-tests-0123456789"
    settings = tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0], decoder=False, token=token)
    with live_server(settings) as (url, _):
        for bad in (None, "wrong-token-wrong-token-wrong"):
            with pytest.raises(ServerError) as err:
                ServerClient(url, token=bad).health()
            assert err.value.status == 401
        with pytest.raises(ServerError):
            ServerClient(url).info()
        good = ServerClient(url, token=token)
        assert good.health()["status"] == "ok"
        vid, _ = upload(good, phantom_volume(seed=3))
        assert good.has_volume(vid)


def test_client_disconnect_mid_upload_stores_nothing(server, finished):
    url, app = server
    c = ServerClient(url)
    before = set(c.volumes())
    uploads = finished.count("POST", "/volumes")
    payload = wire.encode_volume(phantom_volume(seed=31), spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
    with socket.create_connection(("127.0.0.1", urllib.parse.urlsplit(url).port)) as sock:
        sock.sendall(b"POST /volumes HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(payload) + payload[: len(payload) // 2])
    finished.wait_for("POST", "/volumes", uploads + 1)     # the service has handled the cut upload
    assert c.health()["status"] == "ok"
    assert set(c.volumes()) == before
    assert not [p for p in app.state.settings.volume_dir.iterdir() if p.name.startswith(".")]
    assert c.upload_volume(phantom_volume(seed=31), spacing=SPACING, origin=ORIGIN, direction=DIRECTION)[1]
