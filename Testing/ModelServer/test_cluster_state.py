"""The pieces that make the service's state independent of the replica that answers, tested
without Ray: the job board and a replica's publication to it, a volume folder shared by two
stores, a decoder registry changed by another process, and the client's retry when a
gateway (Ray Serve's proxy) answered instead of the service."""

from __future__ import annotations

import http.server
import json
import threading
import time

import numpy as np
import pytest
import torch

from desam_server.api.decoder_versions import DecoderVersions
from desam_server.api.decoders import DecoderSet
from desam_server.api.errors import NotFound
from desam_server.api.jobs import AutoJobSpec, JobManager
from desam_server.api.volume_store import VolumeStore
from desam_server.cluster.cache_slot import CacheSlot
from desam_server.cluster.job_board import LOST, JobBoard
from desam_server.cluster.job_sync import JobSync
from desam_server.decoder_registry import DecoderRegistry
from desam_server.modeling import build_desam
from SlicerDeSAMLib.ServerClient import AFFINITY_HEADER, ServerClient, ServerError

from service_helpers import decoder_files, payload_of, phantom_volume


def _spec(volume: str = "a" * 64) -> AutoJobSpec:
    return AutoJobSpec(volume_id=volume, axis="k", start=0, stop=3, mode="box", decoder="organ", window=(40.0, 400.0))


def _direct(board: JobBoard):
    return lambda method, *args: getattr(board, method)(*args)


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_job_is_seen_from_the_board_with_its_progress_result_and_a_remote_cancel():
    board = JobBoard(stale_s=5.0)
    gate = threading.Event()

    def run(job):
        for n in range(job.total):
            gate.wait(10)
            job.check_cancelled()
            job.done = n + 1
        return b"mask-bytes"

    jobs = JobManager(run, max_jobs=4, keep=8)
    sync = JobSync(jobs, _direct(board), "replica-a")
    try:
        first = jobs.submit(_spec())
        sync.publish()
        assert board.get(first.id)["state"] in ("queued", "running")
        gate.set()
        jobs.wait(first.id, timeout=10)
        sync.publish()
        record = board.get(first.id)
        assert record["state"] == "succeeded" and record["progress"]["done"] == 3
        assert board.result(first.id) == b"mask-bytes"
        # A cancel asked on another replica reaches the job's replica at its next publication.
        gate.clear()
        second = jobs.submit(_spec("b" * 64))
        sync.publish()
        assert board.cancel(second.id)["cancel_requested"] is True
        sync.publish()
        gate.set()
        jobs.wait(second.id, timeout=10)
        sync.publish()
        assert board.get(second.id)["state"] == "cancelled"
        assert board.get("f" * 32) is None and board.cancel("f" * 32) is None
    finally:
        gate.set()
        jobs.close(5)


def test_another_replica_answers_the_result_of_a_job_that_just_finished_and_409_for_a_running_one():
    """A client that saw a job succeed on its replica and asks another one for the result
    gets it, even while the board has not heard of the end yet (publications held back
    here); a job still running gets 409 once its replica has published twice more."""
    from desam_server.api.errors import Conflict
    from desam_server.cluster import job_routes

    board = JobBoard(stale_s=5.0)
    gate = threading.Event()

    def run(job):
        gate.wait(10)
        return b"mask-bytes"

    flowing = threading.Event()                                   # publications held while clear
    flowing.set()

    def held(method, *args):
        if method == "publish":
            flowing.wait(10)
        return getattr(board, method)(*args)

    owner = JobManager(run, max_jobs=4, keep=8)
    other = JobManager(lambda job: b"", max_jobs=4, keep=8)      # the replica asked; it holds no job
    sync = JobSync(owner, held, "replica-a", interval=0.2).start()
    reader = job_routes.BoardClient(_direct(board), settle_s=5.0, poll_s=0.01)
    service_b = type("ReplicaB", (), {"jobs": other})()
    try:
        running = owner.submit(_spec())
        sync.publish()
        started = time.monotonic()
        with pytest.raises(Conflict, match="running: no result"):
            job_routes.job_result(running.id, service=service_b, board=reader)
        assert time.monotonic() - started >= 0.2                  # it waited for two publications
        flowing.clear()
        time.sleep(0.3)                                           # a publication under way has ended
        gate.set()
        owner.wait(running.id, timeout=10)
        assert board.get(running.id)["state"] == "running"        # the board has not heard yet
        threading.Timer(0.3, flowing.set).start()
        response = job_routes.job_result(running.id, service=service_b, board=reader)
        assert response.body == b"mask-bytes"
        assert job_routes.get_job(running.id, service=service_b, board=reader).state == "succeeded"
    finally:
        gate.set()
        flowing.set()
        sync.stop()
        owner.close(5)
        other.close(5)


def test_a_replica_publishes_a_finished_job_at_once_not_at_its_next_interval():
    board = JobBoard(stale_s=60.0)
    gate = threading.Event()
    jobs = JobManager(lambda job: gate.wait(10) and b"r", max_jobs=2, keep=4)
    sync = JobSync(jobs, _direct(board), "r", interval=30.0).start()
    try:
        job = jobs.submit(_spec())
        sync.publish()
        gate.set()
        jobs.wait(job.id, timeout=10)
        _wait(lambda: board.get(job.id)["state"] == "succeeded", timeout=5.0)
        assert board.result(job.id) == b"r"
    finally:
        gate.set()
        sync.stop()
        jobs.close(5)


def test_a_silent_replica_s_active_jobs_read_as_failed_for_good():
    board = JobBoard(stale_s=0.3)
    record = {"id": "j1", "state": "running", "error": None, "created": 1.0, "cancel_requested": False}
    board.publish("replica-a", [record], {}, ["j1"])
    board.publish("replica-b", [{**record, "id": "j2", "state": "succeeded"}], {"j2": b"x"}, ["j2"])
    assert board.get("j1")["state"] == "running"
    time.sleep(0.4)
    lost = board.get("j1")
    assert lost["state"] == "failed" and lost["error"] == LOST
    assert board.get("j2")["state"] == "succeeded"              # finished jobs stay as they were
    board.publish("replica-a", [record], {}, ["j1"])           # a late heartbeat does not revive it
    assert board.get("j1")["error"] == LOST


def test_the_board_keeps_a_bounded_number_of_finished_jobs_and_asks_again_for_what_it_lost():
    board = JobBoard(stale_s=5.0, keep=2)
    for n in range(4):
        board.publish("r", [{"id": f"j{n}", "state": "succeeded", "error": None, "created": float(n)}], {}, [])
    assert [r["id"] for r in board.list()] == ["j2", "j3"]
    assert board.publish("r", [], {}, ["j3", "j9"])["missing"] == ["j9"]


def test_a_replica_publishes_again_everything_a_restarted_board_lacks():
    jobs = JobManager(lambda job: b"r", max_jobs=2, keep=4)
    try:
        job = jobs.submit(_spec())
        jobs.wait(job.id, timeout=10)
        first = JobBoard()
        calls = {"board": first}
        sync = JobSync(jobs, lambda method, *args: getattr(calls["board"], method)(*args), "r")
        sync.publish()
        calls["board"] = JobBoard()                              # the board's replica was restarted
        sync.publish()                                           # heartbeat: the board names what it lacks
        sync.publish()
        assert calls["board"].get(job.id)["state"] == "succeeded"
        assert calls["board"].result(job.id) == b"r"
    finally:
        jobs.close(5)


def test_two_stores_sharing_a_volume_folder_see_each_others_volumes(tmp_path):
    kwargs = dict(disk_bytes=1 << 30, memory_bytes=1 << 30, max_voxels=1 << 24)
    a = VolumeStore(tmp_path, **kwargs)
    b = VolumeStore(tmp_path, **kwargs)                         # opened before the upload
    vol = phantom_volume(3, 16, 20)
    stored, created = a.put(payload_of(vol))
    assert created
    assert b.contains(stored.volume_id) and b.on_disk(stored.volume_id)
    assert stored.volume_id in b.ids()
    with b.use(stored.volume_id) as seen:
        assert np.array_equal(seen.array, vol)
    other = a.put(payload_of(phantom_volume(3, 16, 20, seed=1)))[0].volume_id
    c = VolumeStore(tmp_path, **kwargs)                         # indexes both files at its start
    assert b.delete(other)                                      # removed through one store ...
    with pytest.raises(NotFound) as caught:                     # ... is unknown to another, not "damaged"
        with c.use(other):
            pass
    assert "upload it first" in caught.value.message and c.stats()["corrupt_files"] == 0
    assert not c.contains(other)


def test_a_registry_changed_by_another_process_is_served_after_sync_if_changed(tmp_path):
    torch.manual_seed(3)
    model = build_desam("tiny")
    files = decoder_files(tmp_path, "organ", 2)
    registry_dir = tmp_path / "registry"
    DecoderRegistry(registry_dir).register(files[0])
    versions = DecoderVersions(DecoderRegistry(registry_dir), DecoderSet(model))
    assert versions.decoders.peek("organ").version == "v1"
    assert not versions.changed() and not versions.sync_if_changed()
    other = DecoderRegistry(registry_dir)                       # another replica, or a training process
    other.register(files[1], activate=True)
    assert versions.changed()
    assert versions.sync_if_changed()
    assert versions.decoders.peek("organ").version == "v2"
    assert not versions.sync_if_changed()


def test_each_replica_on_a_node_claims_a_feature_cache_folder_of_its_own(tmp_path):
    first = CacheSlot.claim(tmp_path)
    second = CacheSlot.claim(tmp_path)
    assert (first.number, second.number) == (0, 1) and first.directory != second.directory
    first.release()                                             # a replica that died frees its slot ...
    third = CacheSlot.claim(tmp_path)
    assert third.number == 0 and third.directory == first.directory   # ... for the one Ray starts instead
    second.release()
    third.release()


class _Gateway(http.server.BaseHTTPRequestHandler):
    """Answers the first ``fail`` requests as a gateway would (text/plain 500), then as the
    service (JSON); records each request's method, path and affinity header."""

    fail = 0
    seen: list = []
    service_error = False

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        type(self).seen.append((self.command, self.path, self.headers.get(AFFINITY_HEADER)))
        if type(self).fail > 0:
            type(self).fail -= 1
            body, status, kind = b"Internal Server Error", 500, "text/plain"
        elif type(self).service_error:
            body, status, kind = json.dumps({"detail": "internal error"}).encode(), 500, "application/json"
        else:
            body, status, kind = json.dumps({"volume_id": "v", "ok": True}).encode(), 200, "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def gateway():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Gateway.fail, _Gateway.seen, _Gateway.service_error = 0, [], False
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_client_retries_a_repeatable_request_a_gateway_failed_and_sends_the_volume_id(gateway):
    client = ServerClient(gateway)
    _Gateway.fail = 2
    assert client.set_view("ab" * 32, "k", 1) == {"volume_id": "v", "ok": True}
    assert client.gateway_retries == 2
    assert [s[2] for s in _Gateway.seen] == ["ab" * 32] * 3     # the volume id rode on every attempt
    assert ServerClient(gateway, affinity=False).set_view("ab" * 32, "k", 1)["ok"]
    assert _Gateway.seen[-1][2] is None


def test_the_client_does_not_retry_what_must_not_run_twice_nor_the_service_s_own_errors(gateway):
    client = ServerClient(gateway)
    _Gateway.fail = 1
    with pytest.raises(ServerError) as caught:                   # a job submission is not repeated
        client.segment_auto("ab" * 32, decoder="organ")
    assert caught.value.status == 500 and client.gateway_retries == 0 and len(_Gateway.seen) == 1
    _Gateway.service_error = True
    with pytest.raises(ServerError) as caught:                   # the service answered: no retry
        client.info()
    assert caught.value.status == 500 and client.gateway_retries == 0
    _Gateway.fail, _Gateway.service_error = 100, False
    brief = ServerClient(gateway, gateway_retry_s=0.6)
    with pytest.raises(ServerError) as caught:                   # bounded by gateway_retry_s
        brief.health()
    assert caught.value.status == 500 and 1 <= brief.gateway_retries <= 4
