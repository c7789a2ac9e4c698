"""The service as Ray Serve replicas (``desam-server cluster``) on a local Ray instance on
loopback: two CPU replicas of the tiny model behind Ray's proxy, driven through
``ServerClient`` exactly as against ``serve``. Upload, view, click and an automatic job;
volume affinity; jobs and decoder activations seen from every replica; a replica killed
during clicks (the client retries, the other replica keeps its state) and during a job
(the job reads as failed, it does not hang). Everything Ray started is stopped at the end
(``cluster_helpers.local_cluster`` checks that no process of the session is left)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from cluster_helpers import local_cluster, raw, replica_states, wait_for_replicas

from desam_server.cluster.job_board import LOST
from desam_server.cluster.options import ClusterOptions
from desam_server.decoder_registry import DecoderRegistry
from desam_server.modeling import build_desam
from desam_server.modeling.checkpoint import save_decoder
from SlicerDeSAMLib.ServerClient import ServerClient

from service_helpers import DIRECTION, ORIGIN, SPACING, free_port, phantom_volume, tiny_settings

WINDOW = (40.0, 400.0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_sam_checkpoint):
    tmp = tmp_path_factory.mktemp("cluster")
    checkpoint, _ = tiny_sam_checkpoint
    settings = tiny_settings(tmp, checkpoint=checkpoint, port=free_port(), neighbours=0)
    # Two decoder versions of "organ" in the shared registry, as a training process leaves them.
    torch.manual_seed(5)
    model = build_desam("tiny", sam_checkpoint=checkpoint)
    registry = DecoderRegistry(settings.registry_dir)
    for n in (1, 2):
        path = tmp / f"organ-{n}.safetensors"
        save_decoder(model, path, structure="organ", training={"epochs": n})
        registry.register(path, activate=n == 1)
    options = ClusterOptions(replicas=2, num_cpus=0.5, job_stale_s=3.0, job_sync_interval_s=0.25,
                             health_check_period_s=1.0)
    with local_cluster(settings, options) as url:
        yield url, settings


def _upload(client: ServerClient, seed: int, k: int = 6, h: int = 48, w: int = 64) -> str:
    vol = phantom_volume(k, h, w, seed=seed)
    volume_id, sent = client.upload_volume(vol, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
    assert sent
    return volume_id


def _click_raw(url: str, volume_id: str, index: int) -> tuple[str, dict]:
    status, replica, answer = raw(url, "POST", "/segment/prompt", {
        "volume_id": volume_id, "axis": "k", "index": index, "points": [[30, 24]], "labels": [1],
        "multimask": False, "window": {"center": WINDOW[0], "width": WINDOW[1]}}, volume_id=volume_id)
    assert status == 200, answer
    return replica, answer


def _every_replica(url: str, path: str, tries: int = 60) -> dict[str, dict]:
    """The answer to GET ``path`` from each of the two replicas (requests without the
    affinity header go to either)."""
    answers: dict[str, dict] = {}
    for _ in range(tries):
        status, replica, answer = raw(url, "GET", path)
        assert status == 200, answer
        answers[replica] = answer
        if len(answers) == 2:
            return answers
    raise AssertionError(f"only replica(s) {sorted(answers)} answered {path} in {tries} tries")


def _every_replica_until(url: str, path: str, agreed, timeout: float = 30.0) -> dict[str, dict]:
    """``_every_replica`` asked again until ``agreed(answers)`` holds: a replica that did not
    run a job learns its state from the job board, which its runner updates every
    0.5 s (later on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while True:
        answers = _every_replica(url, path)
        if agreed(answers) or time.monotonic() > deadline:
            return answers
        time.sleep(0.25)


def test_importing_the_service_and_serve_never_needs_ray():
    code = ("import sys, desam_server, desam_server.cli, desam_server.api, desam_server.serve, "
            "desam_server.cluster.run, desam_server.cluster.job_routes; "
            "from desam_server.cli import main; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_upload_view_click_and_an_automatic_job_through_the_client(cluster):
    url, _ = cluster
    client = ServerClient(url)
    assert client.health()
    volume_id = _upload(client, seed=1)
    assert client.has_volume(volume_id)
    progress = client.set_view(volume_id, "k", 2, window=WINDOW)
    assert progress["total"] == 6
    result = client.segment_prompt(volume_id, "k", 2, points=[[30, 24]], labels=[1], window=WINDOW)
    assert result.masks.shape[1:] == (48, 64) and result.masks.dtype == bool
    job = client.segment_auto(volume_id, axis="k", mode="box", decoder="phantom", window=WINDOW)
    final = client.wait_job(job["id"], timeout=120, poll=0.2)
    assert final["state"] == "succeeded", final
    # Its result, asked at once of either replica: the one that did not run it waits for
    # the board to hear of the end instead of answering 409 "running".
    answered: set[str] = set()
    for _ in range(60):
        status, replica, answer = raw(url, "GET", f"/jobs/{job['id']}/result")
        assert status == 200, answer
        answered.add(replica)
        if len(answered) == 2:
            break
    assert len(answered) == 2, answered
    slab = client.job_result(job["id"])
    assert slab.mask.shape == (6, 48, 64) and slab.offset == 0
    # The job is known to both replicas (the one that ran it and the other, from the board).
    answers = _every_replica_until(url, f"/jobs/{job['id']}",
                                   lambda found: {a["state"] for a in found.values()} == {"succeeded"})
    assert {a["state"] for a in answers.values()} == {"succeeded"}
    assert {a["progress"]["done"] for a in answers.values()} == {6}
    for replica in answers:
        listed = _every_replica(url, "/jobs")
        assert all(job["id"] in [j["id"] for j in a["jobs"]] for a in listed.values()), replica


def test_requests_about_a_volume_stay_on_one_replica(cluster):
    """Each volume's clicks reach one replica from the first request on (consistent
    hashing: nothing to learn), so the second click on a slice finds its features."""
    url, _ = cluster
    client = ServerClient(url)
    for seed in (2, 3, 4):
        volume_id = _upload(client, seed=seed)
        replicas, cached = set(), []
        for index in (0, 1, 0, 1, 2, 2):
            replica, answer = _click_raw(url, volume_id, index)
            replicas.add(replica)
            cached.append(answer["timing"]["cached"])
        assert len(replicas) == 1, f"volume {volume_id[:8]} answered by {replicas}"
        assert cached == [False, False, True, True, False, True]


def test_a_decoder_activation_reaches_every_replica(cluster):
    url, _ = cluster
    before = _every_replica(url, "/registry/organ")
    assert {a["active"] for a in before.values()} == {"v1"}
    assert {a["served"] for a in before.values()} == {"v1"}
    client = ServerClient(url)
    assert client.activate_decoder("organ", "v2")["served"] == "v2"
    after = _every_replica(url, "/registry/organ")
    assert {a["served"] for a in after.values()} == {"v2"}
    served = _every_replica(url, "/decoders")
    for answer in served.values():
        organ = [d for d in answer["decoders"] if d["name"] == "organ"]
        assert organ and organ[0]["version"] == "v2"


def test_a_replica_killed_during_clicks_is_restarted_and_clients_carry_on(cluster):
    url, _ = cluster
    client = ServerClient(url)
    a = _upload(client, seed=10)
    replica_a, _ = _click_raw(url, a, 1)
    for seed in range(11, 30):                  # a second volume whose home is the other replica
        b = _upload(client, seed=seed)
        replica_b, _ = _click_raw(url, b, 1)
        if replica_b != replica_a:
            break
    assert replica_b != replica_a
    _, info = raw(url, "GET", "/info", volume_id=a)[1:]
    assert info["replica"]["id"] == replica_a
    errors, answers, stop = [], [], threading.Event()

    def click_a():
        clicker = ServerClient(url)
        n = 0
        while not stop.is_set():
            try:
                answers.append(clicker.segment_prompt(a, "k", n % 6, points=[[30, 24]], labels=[1],
                                                      window=WINDOW).masks.shape)
            except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                errors.append(exc)
            n += 1

    thread = threading.Thread(target=click_a)
    thread.start()
    try:
        while len(answers) < 3:
            time.sleep(0.05)
        os.kill(info["replica"]["pid"], signal.SIGKILL)
        killed_at = len(answers)
        deadline = time.monotonic() + 90
        while len(answers) < killed_at + 5 and not errors and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(90)
    assert errors == [], errors
    assert len(answers) >= killed_at + 5
    # The other replica kept its volume and features.
    replica, answer = _click_raw(url, b, 1)
    assert replica == replica_b and answer["timing"]["cached"] is True
    wait_for_replicas(2)
    assert replica_states() == {"RUNNING": 2}


def test_a_replica_killed_during_a_job_leaves_a_failed_job_not_a_hanging_one(cluster):
    url, _ = cluster
    client = ServerClient(url)
    volume_id = _upload(client, seed=7, k=48, h=96, w=128)
    job = client.segment_auto(volume_id, axis="k", mode="grid", grid_size=9, decoder="phantom", window=WINDOW)
    _, info = raw(url, "GET", "/info", volume_id=volume_id)[1:]
    deadline = time.monotonic() + 60
    while client.job(job["id"])["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    running = client.job(job["id"])
    assert running["progress"]["done"] < running["progress"]["total"], "the job finished before the kill"
    os.kill(info["replica"]["pid"], signal.SIGKILL)
    started = time.monotonic()
    final = client.wait_job(job["id"], timeout=60, poll=0.25)
    assert final["state"] == "failed" and final["error"] == LOST
    assert time.monotonic() - started < 30
    wait_for_replicas(2)
    # A new job on the same volume runs (on whichever replica takes it).
    again = client.segment_auto(volume_id, axis="k", start=0, stop=2, mode="box", decoder="phantom", window=WINDOW)
    assert client.wait_job(again["id"], timeout=120, poll=0.2)["state"] == "succeeded"


def test_the_same_settings_are_served(cluster):
    """Token-less loopback settings: /info of both replicas shows the service's own settings
    (one source for serve and cluster)."""
    url, settings = cluster
    answers = _every_replica(url, "/info")
    for answer in answers.values():
        assert answer["settings"]["port"] == settings.port
        assert answer["settings"]["neighbours"] == 0
        assert answer["model"]["encoder"] == "tiny"
    assert len({a["replica"]["cache_slot"] for a in answers.values()}) == 2
    assert np.all([a["replica"]["pid"] != os.getpid() for a in answers.values()])
