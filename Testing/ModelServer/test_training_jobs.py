"""Training jobs of the service: a tiny decoder trained end to end over HTTP in a process
of its own (event stream, status, metrics, log, the on_finished hook), cancel, a killed
job process, one job at a time, bad requests; and the event-stream parser of the client.

The service is a live uvicorn server with the tiny encoder and a seeded checkpoint (the
job process loads the same file); labels come from a dict (the provider the service
takes). Runs are tiny: 2 phantom volumes of 3 slices, batches of 3 slices (one step per
epoch), whole-box strategy.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from desam_server.api import Service
from desam_server.modeling import build_desam
from desam_server.modeling.checkpoint import read_decoder
from SlicerDeSAMLib.ServerClient import ServerClient, ServerError, parse_event_stream

from service_helpers import DIRECTION, ORIGIN, SPACING, id_of, live_server, payload_of, phantom_volume, tiny_settings

VOLUMES = [phantom_volume(k=3, seed=seed) for seed in (0, 1)]
LABELS = {}          # (volume_id, label name) -> bool mask; filled once the volumes are uploaded
OPTIONS = {"validation_fraction": 0.5, "empty_ratio": 0.0,
           "config": {"strategy": "box", "epochs": 2, "batch_size": 3, "seed": 0}}
LONG = {**OPTIONS, "config": {**OPTIONS["config"], "epochs": 50}}
FINAL = ("finished", "failed", "cancelled")


def _labels(volume_id: str, structure: str) -> np.ndarray:
    return LABELS[(volume_id, structure)]


class Installed:
    """The on_finished hook: copies the best decoder away (the job's folder goes with the
    job) and answers what the service shows as ``installed``."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.calls = []

    def __call__(self, outputs):
        copy = self.folder / f"{outputs.job_id}.safetensors"
        shutil.copyfile(outputs.best_path, copy)
        self.calls.append((outputs, copy))
        return {"version": len(self.calls), "structure": outputs.structure}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_sam_checkpoint):
    tmp = tmp_path_factory.mktemp("training")
    installed = Installed(tmp)
    settings = tiny_settings(tmp, checkpoint=tiny_sam_checkpoint[0], training_dir=tmp / "jobs",
                             training_features_dir=tmp / "training-features", training_threads=1)

    def factory(s):
        model = build_desam("tiny", sam_checkpoint=s.sam_checkpoint)
        return Service(s, model, model_info={"encoder": "tiny", "weights": "test"}, labels=_labels,
                       on_training_finished=installed)

    with live_server(settings, factory) as (url, app):
        client = ServerClient(url, timeout=60)
        ids = []
        for vol in VOLUMES:
            vid, _ = client.upload_volume(vol, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
            LABELS[(vid, "organ")] = vol > 30
            LABELS[(vid, "nothing")] = np.zeros(vol.shape, bool)
            partial = vol > 30                   # SAM-Mix: the organ on slices 0 and 1, slice 2 empty
            partial[2] = False
            LABELS[(vid, "partial")] = partial
            ids.append(vid)
        yield client, app.state.service, ids, installed
    LABELS.clear()


def _cases(ids, label="organ"):
    return [(vid, label) for vid in ids]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout} s")


def test_a_decoder_trains_end_to_end_over_http(served):
    client, service, ids, installed = served
    t0 = time.monotonic()
    job = client.start_training("organ", _cases(ids), OPTIONS)
    assert job["state"] in ("queued", "running") and job["structure"] == "organ" and job["cases"] == 2
    # One training job at a time: the second is refused, naming the first.
    with pytest.raises(ServerError) as second:
        client.start_training("organ", _cases(ids), OPTIONS)
    assert second.value.status == 409 and job["id"] in str(second.value)
    events = list(client.training_events(job["id"], timeout=120))
    seconds = time.monotonic() - t0
    kinds = [e["event"] for e in events]
    assert kinds[0] == "status" and kinds[-1] == "finished", kinds
    assert "precompute" in kinds and "start" in kinds and kinds.count("epoch") == 2 and "step" in kinds
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(0 <= e["validation_dice"] <= 1 for e in epochs)
    assert all(e["seconds_left"] is not None for e in events if e["event"] == "step")
    final = events[-1]
    assert final["state"] == "finished" and final["reason"] is None and final["best_epoch"] in (1, 2)
    assert final["installed"] == {"version": 1, "structure": "organ"}

    status = client.training_job(job["id"])
    assert status["state"] == "finished" and status["epoch"] == 2 and status["phase"] == "train"
    assert status["best_validation_dice"] == max(e["validation_dice"] for e in epochs)
    assert status["data"]["volumes"] == 2 and status["precompute"]["done"] == status["precompute"]["total"]
    metrics = client.training_metrics(job["id"])
    assert [m["epoch"] for m in metrics] == [1, 2] and all("loss" in m and "validation_dice" in m for m in metrics)
    log = client.training_log(job["id"], lines=500)
    assert any("epoch 2/2" in line for line in log) and any("finished" in line for line in log)
    assert len(client.training_log(job["id"], lines=1)) == 1
    assert [j["id"] for j in client.training_jobs()] == [job["id"]]

    # The hook got the best decoder, a decoder file of this structure and encoder.
    (outputs, copy), = installed.calls
    assert outputs.job_id == job["id"] and outputs.best_path.name == "best.safetensors"
    _, meta = read_decoder(copy)
    assert meta["structure"] == "organ" and meta["encoder"] == "tiny"
    assert meta["training"]["best_epoch"] == final["best_epoch"]
    # The copies of the volumes and labels are gone from the job's folder; a late stream
    # gets the status and the final event at once.
    assert not (service.training.get(job["id"]).folder / "cases").exists()
    late = list(client.training_events(job["id"]))
    assert [e["event"] for e in late] == ["status", "finished"]
    print(f"\ntiny training job end to end: {seconds:.1f} s")


def test_a_dbsam_model_trains_over_http(served):
    """family 'dbsam' through the API: the encoder in the loop (nothing precomputed), its
    model file handed to the install hook."""
    from desam_server.modeling.checkpoint import read_model_metadata

    client, _, ids, installed = served
    options = {**OPTIONS, "config": {**OPTIONS["config"], "family": "dbsam", "epochs": 1, "precision": "fp32"}}
    job = client.start_training("organ", _cases(ids), options)
    events = list(client.training_events(job["id"], timeout=300))
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "finished" and events[-1]["state"] == "finished", events[-1]
    assert "precompute" not in kinds and "epoch" in kinds
    _, copy = installed.calls[-1]
    family, meta = read_model_metadata(copy)
    assert family == "dbsam" and meta["structure"] == "organ" and meta["training"]["family"] == "dbsam"


SAMMIX = {**OPTIONS, "config": {**OPTIONS["config"], "family": "sammix", "strategy": "gt_box", "epochs": 1,
                                 "precision": "fp32",
                                 "family_options": {"classifier_depth": 18, "classifier_lr_scale": 1.0}}}


def test_a_sammix_model_trains_over_http_from_presence_labels_and_one_segmented_slice(served):
    """family 'sammix' through the API: per case one segmented slice (0) and presence labels
    from the label volume (slices 0 and 1 present, 2 absent); the model file handed to the
    install hook keeps the family options given."""
    from desam_server.modeling.checkpoint import read_model_metadata

    client, service, ids, installed = served
    cases = [{"volume_id": v, "structure": "partial", "segmented_slices": [0]} for v in ids]
    job = client.start_training("organ", cases, SAMMIX)
    events = list(client.training_events(job["id"], timeout=300))
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "finished" and events[-1]["state"] == "finished", events[-1]
    data = next(e for e in events if e["event"] == "data")
    assert data["family_data"] == "sammix" and data["train_segmented"] == 1, data
    assert data["train_labelled_present"] == 2 and data["train_labelled_absent"] == 1, data
    _, copy = installed.calls[-1]
    family, meta = read_model_metadata(copy)
    assert family == "sammix" and meta["structure"] == "organ"
    assert meta["training"]["family"] == "sammix"
    assert meta["training"]["config"]["family_options"]["classifier_depth"] == 18


def test_cancel_stops_the_job_within_seconds(served):
    client, service, ids, _ = served
    job = client.start_training("organ", _cases(ids), LONG)
    _wait_for(lambda: client.training_job(job["id"])["step"] >= 1, 120, "no training step")
    t0 = time.monotonic()
    client.cancel_training(job["id"])
    final = client.wait_training(job["id"], timeout=60, poll=0.1)
    seconds = time.monotonic() - t0
    assert final["state"] == "cancelled" and final["reason"] == "cancelled on request", final
    assert seconds < 25, seconds          # one training step (seconds here) and the process's exit
    assert client.training_job(job["id"])["cancel_requested"]
    assert client.cancel_training(job["id"])["state"] == "cancelled"       # idempotent
    assert any("cancelled" in line for line in client.training_log(job["id"]))
    print(f"\ncancel to cancelled: {seconds:.1f} s")


def test_the_compute_thread_leaves_the_training_process_its_cores(served):
    client, service, ids, _ = served
    import torch

    before = service._on_worker(torch.get_num_threads)
    job = client.start_training("organ", _cases(ids), LONG)
    expected = max(1, before - service.settings.training_process_threads())
    _wait_for(lambda: client.training_job(job["id"])["state"] == "running", 60, "job not running")
    _wait_for(lambda: service._on_worker(torch.get_num_threads) == expected, 30, "threads not given up")
    client.cancel_training(job["id"])
    client.wait_training(job["id"], timeout=60, poll=0.1)
    _wait_for(lambda: service._on_worker(torch.get_num_threads) == before, 30, "threads not taken back")


def test_a_killed_job_process_fails_the_job_and_the_service_goes_on(served):
    client, service, ids, _ = served
    job = client.start_training("organ", _cases(ids), LONG)
    process = _wait_for(lambda: service.training.get(job["id"]).process, 60, "no job process")
    _wait_for(lambda: client.training_job(job["id"])["phase"] is not None, 60, "job not running")
    os.kill(process.pid, signal.SIGKILL)
    final = client.wait_training(job["id"], timeout=60, poll=0.1)
    assert final["state"] == "failed" and "SIGKILL" in final["reason"], final
    assert client.health()["status"] == "ok"
    click = client.segment_prompt(ids[0], "k", 1, box=[10, 8, 50, 40])
    assert click.masks.shape[0] >= 1
    assert not service.training.active_count()


def test_clicks_are_answered_while_a_job_trains(served):
    client, service, ids, _ = served
    job = client.start_training("organ", _cases(ids), LONG)
    try:
        _wait_for(lambda: client.training_job(job["id"])["step"] >= 1, 120, "no training step")
        times = []
        for n in range(3):
            t0 = time.perf_counter()
            client.segment_prompt(ids[1], "k", n % 3, points=[[30.5, 24.5]], labels=[1])
            times.append(time.perf_counter() - t0)
        assert client.training_job(job["id"])["state"] == "running"
        assert max(times) < 30, times
        print(f"\nclick latency while training: {[round(t, 3) for t in times]} s")
    finally:
        client.cancel_training(job["id"])
        client.wait_training(job["id"], timeout=60, poll=0.2)


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"structure": "organ", "cases": [{"volume_id": "0" * 64, "structure": "organ"}]}, 404, "unknown volume"),
    ({"structure": "organ", "cases": []}, 422, "at least 1"),
    ({"structure": "organ", "cases": "ALL", "options": {}}, 422, "list"),
    ({"structure": "organ", "cases": "IDS", "options": {"epochz": 3}}, 422, "epochz"),
    ({"structure": "organ", "cases": "IDS", "options": {"config": {"strategy": "lasso"}}}, 422, "strategy"),
    ({"structure": "organ", "cases": "IDS", "options": {"config": {"batch_size": 64}}}, 422, "fewer than one batch"),
    ({"structure": "organ", "cases": "NOLABEL"}, 404, "no such label volume"),
    ({"structure": "organ", "cases": "EMPTY"}, 422, "is empty"),
    ({"structure": "organ", "cases": "TWICE"}, 422, "same volume"),
    ({"structure": "organ", "cases": "MIX", "options": SAMMIX}, 422, "needs segmented_slices"),
    ({"structure": "organ", "cases": "MIX_OUTSIDE", "options": SAMMIX}, 422, "outside the volume"),
    ({"structure": "organ", "cases": "MIX_CONTRADICTS", "options": SAMMIX}, 422, "labelled present but its "
                                                                                 "segmentation is empty"),
    ({"structure": "organ", "cases": "MIX", "options": {"config": {"family_options": {"rank": 4}}}}, 422,
     "options"),
    ({"structure": "organ", "cases": "MIX_SEGMENTED"}, 422, "segmented_slices is for the sammix family"),
    ({"structure": "organ", "cases": "MIX_SEGMENTED",
      "options": {**SAMMIX, "config": {**SAMMIX["config"], "family_options": {"rank": "eight"}}}}, 422, "rank"),
])
def test_bad_training_requests_get_clear_4xx(served, body, status, message):
    client, service, ids, _ = served
    cases = {"ALL": "all", "IDS": [{"volume_id": v, "structure": "organ"} for v in ids],
             "NOLABEL": [{"volume_id": ids[0], "structure": "liver"}],
             "EMPTY": [{"volume_id": v, "structure": "nothing"} for v in ids],
             "TWICE": [{"volume_id": ids[0], "structure": "organ"}, {"volume_id": ids[0], "structure": "organ"}],
             "MIX": [{"volume_id": v, "structure": "partial"} for v in ids],
             "MIX_SEGMENTED": [{"volume_id": v, "structure": "partial", "segmented_slices": [0]} for v in ids],
             "MIX_OUTSIDE": [{"volume_id": v, "structure": "partial", "segmented_slices": [7]} for v in ids],
             # slice 2 (empty in the label) listed as present and segmented: the lists contradict the label
             "MIX_CONTRADICTS": [{"volume_id": v, "structure": "partial", "segmented_slices": [0, 2],
                                  "present_slices": [0, 1, 2]} for v in ids]}
    body = {**body, "cases": cases.get(body["cases"], body["cases"]) if isinstance(body["cases"], str) else
            body["cases"]}
    before = len(service.training.list())
    with pytest.raises(ServerError) as error:
        client._json("POST", "/training", body)
    assert error.value.status == status and message in str(error.value), str(error.value)
    assert len(service.training.list()) == before


def test_unknown_training_job_is_404(served):
    client, *_ = served
    for call in (client.training_job, client.training_metrics, client.cancel_training, client.training_log,
                 lambda job_id: list(client.training_events(job_id))):
        with pytest.raises(ServerError) as error:
            call("f" * 32)
        assert error.value.status == 404 and "unknown training job" in str(error.value)


def test_event_stream_parser():
    stream = [b": ping - 2026-01-01\r\n", b"\r\n", b"event: step\r\n", b'data: {"loss": 0.5}\r\n', b"id: 3\r\n",
              b"\r\n", b"retry: 100\r\n", b"data: plain\n", b"data: text\n", b"\n", "event: finished\r\n",
              'data: {"event": "finished", "reason": null}\r\n', "\r\n"]
    assert list(parse_event_stream(stream)) == [
        {"event": "step", "loss": 0.5, "id": "3"}, {"event": "message", "data": "plain\ntext", "id": "3"},
        {"event": "finished", "reason": None, "id": "3"}]


def test_a_service_that_stops_cancels_its_training_job(tmp_path, tiny_sam_checkpoint):
    """Closing the service cancels the running job and waits for its process."""
    settings = tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0], training_dir=tmp_path / "jobs",
                             training_features_dir=tmp_path / "tf", training_threads=1)
    table = {(id_of(v), "organ"): v > 30 for v in VOLUMES}
    service = Service(settings, build_desam("tiny", sam_checkpoint=tiny_sam_checkpoint[0]),
                      labels=lambda volume_id, structure: table[(volume_id, structure)])
    try:
        stored = [service.upload(payload_of(v))[0]["volume_id"] for v in VOLUMES]
        job = service.submit_training("organ", [{"volume_id": v, "structure": "organ"} for v in stored], LONG)
        _wait_for(lambda: job.process, 60, "no job process")
    finally:
        closer = threading.Thread(target=service.close)
        closer.start()
        closer.join(90)
    assert not closer.is_alive()
    assert job.state.value == "cancelled" and job.reason == "the service shut down"
    assert job.process.poll() is not None

