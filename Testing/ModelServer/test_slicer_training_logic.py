"""TrainingLogic on Slicer's real core classes (slicer-core) against a real tiny-model
service: training cases read from a scene (volume node + segmentation node), uploaded
once, a decoder trained with its progress polled through the BackgroundWorker, the new
version listed and active, roll back and activate, cancel, one job at a time, and a
service that goes away mid-job (a clear error, not a hang; a restarted service is usable
again).

Runs are tiny (as in test_training_jobs.py): 2 phantom volumes of 3 slices, batches of 3
slices (one step per epoch), whole-box strategy, 2 epochs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import numpy as np
import pytest
import slicer

from SlicerDeSAMLib import wire
from SlicerDeSAMLib.BackgroundWorker import BackgroundWorker
from SlicerDeSAMLib.DeSAMError import DeSAMError
from SlicerDeSAMLib.LocalServer import LocalServer
from SlicerDeSAMLib.ServerClient import ServerClient
from SlicerDeSAMLib.ServerLogic import ServerLogic
from SlicerDeSAMLib.TrainingCase import TrainingCase
from SlicerDeSAMLib.TrainingLogic import TrainingLogic
from SlicerDeSAMLib.TrainingStatus import TrainingStatus

import slicer_helpers
from service_helpers import free_port, live_server, phantom_volume, tiny_settings

OPTIONS = {"strategy": "box", "epochs": 2, "batch_size": 3, "seed": 0, "validation_fraction": 0.5,
           "empty_ratio": 0.0}
LONG = {**OPTIONS, "epochs": 50}
# Voxel (0, 0, 0) at RAS (-10, 5, 30); i along -A (0.7 mm), j along R (0.8 mm), k along S (2.5 mm).
IJK_TO_RAS = np.array([[0.0, 0.8, 0.0, -10.0], [-0.7, 0.0, 0.0, 5.0], [0.0, 0.0, 2.5, 30.0], [0, 0, 0, 1]])
LPS = {"spacing": (0.7, 0.8, 2.5), "origin": (10.0, -5.0, 30.0),
       "direction": ((0.0, -1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0))}


def add_case(scene, volume: np.ndarray, mask: np.ndarray, name: str, ijk_to_ras=IJK_TO_RAS):
    """A scalar volume node and a segmentation node with segment 'organ' = ``mask`` and an
    empty segment 'nothing'; returns (volume node, segmentation node, organ id, empty id)."""
    node = slicer_helpers.add_volume(scene, volume, ijk_to_ras, name=name)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
    organ = segmentation.GetSegmentation().AddEmptySegment("", "organ")
    empty = segmentation.GetSegmentation().AddEmptySegment("", "nothing")
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentation, organ, node)
    return node, segmentation, organ, empty


VOLUMES = [phantom_volume(k=3, seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def scene_cases():
    """The two phantom cases in a slicer-core scene, prepared by TrainingLogic.prepare_case."""
    with slicer_helpers.core_scene() as core:
        scene = core.scene
        nodes = [add_case(scene, v, v > 30, f"Phantom {n}") for n, v in enumerate(VOLUMES)]
        cases = [TrainingLogic.prepare_case(vol, seg, organ) for vol, seg, organ, _ in nodes]
        yield scene, nodes, cases


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_sam_checkpoint):
    tmp = tmp_path_factory.mktemp("training-logic")
    settings = tiny_settings(tmp, checkpoint=tiny_sam_checkpoint[0], training_threads=1)
    with live_server(settings) as (url, app):
        yield url, app.state.service


@contextlib.contextmanager
def worker_scope():
    worker = BackgroundWorker()
    try:
        yield worker
    finally:
        worker.shutdown()


def _poll(worker: BackgroundWorker, logic: TrainingLogic, job_id: str, timeout: float, until=None) -> list:
    """Poll ``logic.status`` through the worker (as the panel's QTimer does) until the job
    has ended (or ``until(status)``); returns every status seen."""
    seen, errors = [], []
    deadline = time.monotonic() + timeout
    while True:
        if not worker.busy("train"):
            worker.submit(logic.status, job_id, key="train", on_done=seen.append, on_error=errors.append)
        worker.poll()
        if errors:
            raise errors[0]
        if seen and (seen[-1].ended or (until is not None and until(seen[-1]))):
            return seen
        assert time.monotonic() < deadline, f"job {job_id} not done within {timeout} s: {seen[-1:]}"
        time.sleep(0.1)


def test_prepare_case_reads_volume_label_and_geometry(scene_cases):
    scene, nodes, cases = scene_cases
    for case, volume in zip(cases, VOLUMES, strict=True):
        assert case.structure == "organ" and case.name.endswith(" / organ")
        assert np.array_equal(case.array, volume) and case.array.dtype == volume.dtype
        assert case.label.dtype == bool and np.array_equal(case.label, volume > 30)
        assert all(np.allclose(case.geometry[k], LPS[k]) for k in LPS), case.geometry
        assert case.volume_id == wire.volume_id(volume, **LPS)
        assert case.voxels == int((volume > 30).sum())
    # The case is a copy: later edits of the scene do not change it.
    vol_node, seg_node, organ, empty = nodes[0]
    slicer.util.arrayFromVolume(vol_node)[:] = 0
    assert np.array_equal(cases[0].array, VOLUMES[0])
    slicer.util.updateVolumeFromArray(vol_node, VOLUMES[0])
    # Another name for the label.
    assert TrainingLogic.prepare_case(vol_node, seg_node, organ, "Left kidney").structure == "Left kidney"


def test_the_label_is_read_on_the_volume_grid_through_a_parent_transform(scene_cases):
    scene, nodes, _ = scene_cases
    vol_node, seg_node, organ, _ = nodes[1]
    shift = slicer_helpers.add_linear_transform(
        scene, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2.5], [0, 0, 0, 1]], "one slice up")
    seg_node.SetAndObserveTransformNodeID(shift.GetID())
    try:
        case = TrainingLogic.prepare_case(vol_node, seg_node, organ)
    finally:
        seg_node.SetAndObserveTransformNodeID(None)
    expected = np.zeros_like(VOLUMES[1] > 30)
    expected[1:] = (VOLUMES[1] > 30)[:-1]          # moved up by one slice (k spacing 2.5 mm along S)
    assert np.array_equal(case.label, expected)


def test_prepare_case_refuses_an_empty_segment_and_missing_choices(scene_cases):
    scene, nodes, _ = scene_cases
    vol_node, seg_node, _, empty = nodes[0]
    with pytest.raises(DeSAMError) as error:
        TrainingLogic.prepare_case(vol_node, seg_node, empty)
    assert str(error.value) == ("Training case Phantom 0 / nothing: the segment is empty on the volume's grid. "
                                "Paint the structure in it (or choose another segment) before training.")
    with pytest.raises(DeSAMError) as error:
        TrainingLogic.prepare_case(vol_node, seg_node, "no-such-id")
    assert str(error.value) == "The segmentation 'Phantom 0 segmentation' has no segment 'no-such-id'."
    with pytest.raises(DeSAMError, match="^Choose a volume, a segmentation and a segment"):
        TrainingLogic.prepare_case(None, seg_node, empty)
    colour = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "Photo")
    slicer.util.updateVolumeFromArray(colour, np.zeros((3, 48, 64, 3), np.uint8))
    with pytest.raises(DeSAMError) as error:
        TrainingLogic.prepare_case(colour, seg_node, nodes[0][2])
    assert str(error.value) == ("Training case Photo / organ: 'Photo' is not a scalar 3D volume (voxel array "
                                "(3, 48, 64, 3)).")


def test_training_options_nest_the_loop_configuration():
    assert TrainingLogic.training_options(OPTIONS) == {
        "validation_fraction": 0.5, "empty_ratio": 0.0,
        "config": {"strategy": "box", "epochs": 2, "batch_size": 3, "seed": 0}}
    assert TrainingLogic.training_options({"config": {"epochs": 3}, "strategy": "grid", "slice_step": 2}) == {
        "slice_step": 2, "config": {"epochs": 3, "strategy": "grid"}}
    assert TrainingLogic.training_options(None) == {}


def test_upload_train_poll_list_roll_back_and_activate(service, scene_cases):
    _, _, cases = scene_cases
    client = ServerClient(service[0], timeout=60)
    logic = TrainingLogic(client)
    refs = logic.upload_cases(cases)
    assert [r["uploaded"] for r in refs] == [True, True]
    assert [r["volume_id"] for r in refs] == [c.volume_id for c in cases]
    assert [r["voxels"] for r in refs] == [c.voxels for c in cases]
    assert np.array_equal(client.get_label(refs[0]["volume_id"], "organ"), cases[0].label)
    again = logic.upload_cases(cases)
    assert [r["uploaded"] for r in again] == [False, False]       # volumes sent once (content id)

    with worker_scope() as worker:
        t0 = time.monotonic()
        job = logic.start("organ", refs, OPTIONS)
        with pytest.raises(DeSAMError) as busy:
            logic.start("organ", refs, OPTIONS)
        assert str(busy.value).startswith("Could not start training: ") and busy.value.status == 409
        assert job["id"][:8] in str(busy.value)
        seen = _poll(worker, logic, job["id"], timeout=300)
        seconds = time.monotonic() - t0
    final = seen[-1]
    assert final.state == "finished", final.message
    assert (final.epoch, final.epochs) == (2, 2) and len(final.metrics) == 2
    assert 0 <= final.validation_dice <= 1 and final.best_validation_dice >= final.validation_dice - 1e-9
    assert final.installed == "organ v1" and final.seconds_left is None and final.fraction == 1.0
    assert final.message.startswith("Finished: organ v1 installed; best validation Dice ")
    running = [s for s in seen if s.active]
    assert running and all(s.job_id == job["id"] for s in seen)
    assert all(0.0 <= s.fraction <= 1.0 for s in seen)
    print(f"\ntiny training through TrainingLogic: {seconds:.1f} s, {len(seen)} polls, messages: "
          f"{sorted({s.message.split(',')[0] for s in seen})}")

    versions = logic.versions("organ")
    assert [(v["version"], v["active"]) for v in versions] == [("v1", True)]
    assert logic.versions() == versions
    summary = ServerLogic(client).test_connection()
    assert "organ v1 (registry)" in summary.decoders.split("; ") and "organ" in summary.structures

    second = logic.start("organ", refs, {**OPTIONS, "seed": 1})
    with worker_scope() as poller:
        assert _poll(poller, logic, second["id"], timeout=300)[-1].installed == "organ v2"
    assert [(v["version"], v["active"]) for v in logic.versions("organ")] == [("v1", False), ("v2", True)]
    logic.rollback("organ")
    assert [(v["version"], v["active"]) for v in logic.versions("organ")] == [("v1", True), ("v2", False)]
    logic.activate("organ", "v2")
    assert [v["active"] for v in logic.versions("organ")] == [False, True]
    with pytest.raises(DeSAMError) as error:
        logic.activate("organ", "v9")
    assert str(error.value).startswith("Could not activate organ v9: ") and error.value.status == 404


def test_cancel_stops_a_job_within_seconds(service, scene_cases):
    _, _, cases = scene_cases
    logic = TrainingLogic(ServerClient(service[0], timeout=60))
    refs = logic.upload_cases(cases)
    job = logic.start("organ", refs, LONG)
    with worker_scope() as worker:
        _poll(worker, logic, job["id"], timeout=120, until=lambda s: s.phase == "train" and s.step >= 1)
        t0 = time.monotonic()
        asked = logic.cancel(job["id"])
        assert asked.raw["cancel_requested"]
        final = _poll(worker, logic, job["id"], timeout=60)[-1]
    seconds = time.monotonic() - t0
    assert final.state == "cancelled" and final.reason == "cancelled on request"
    assert final.message == "Training cancelled: cancelled on request"
    assert seconds < 25, seconds
    print(f"\ncancel to cancelled through TrainingLogic: {seconds:.1f} s")


def test_a_sammix_run_sends_the_painted_and_present_slices_and_installs_a_sammix_version(service):
    """SAM-Mix from the Train panel's logic: a segment painted on slices 1 and 3 of 6 ->
    segmented [1, 3], present 1..3, the rest absent; the run finishes and its model is a
    ``sammix`` version of the registry."""
    volumes = [phantom_volume(k=6, seed=seed) for seed in (2, 3)]
    with slicer_helpers.core_scene() as core:
        cases = []
        for n, volume in enumerate(volumes):
            painted = volume > 30
            painted[[0, 2, 4, 5]] = False
            node, segmentation, organ, _ = add_case(core.scene, volume, painted, f"Sparse {n}")
            cases.append(TrainingLogic.prepare_case(node, segmentation, organ, "sparse"))
    assert cases[0].slice_lists() == {"segmented_slices": [1, 3], "present_slices": [1, 2, 3]}
    client = ServerClient(service[0], timeout=60)
    logic = TrainingLogic(client)
    refs = logic.upload_cases(cases)
    assert refs[0]["segmented_slices"] == [1, 3] and refs[0]["present_slices"] == [1, 2, 3]
    options = {**OPTIONS, "family": "sammix", "strategy": "gt_box", "epochs": 1, "precision": "fp32",
               "config": {"family_options": {"classifier_depth": 18}}}
    job = logic.start("sparse", refs, options)
    with worker_scope() as worker:
        final = _poll(worker, logic, job["id"], timeout=300)[-1]
    assert final.state == "finished", final.message
    assert final.installed == "sparse v1"
    data = final.raw["data"]
    assert (data["train_segmented"], data["train_labelled_present"], data["train_labelled_absent"]) == (2, 3, 3)
    assert [(v["version"], v["family"]) for v in logic.versions("sparse")] == [("v1", "sammix")]


def test_an_encoder_with_random_weights_refuses_training(tmp_path):
    """The service's own 409 message reaches the user."""
    volume = VOLUMES[0]
    case = TrainingCase(name="Phantom / kidney", structure="Left kidney", array=volume, label=volume > 30, **LPS)
    with live_server(tiny_settings(tmp_path, decoder=False)) as (url, _):
        logic = TrainingLogic(ServerClient(url))
        refs = logic.upload_cases([case])
        assert refs[0]["structure"] == "Left kidney" and refs[0]["voxels"] == case.voxels
        assert ServerClient(url).list_labels(case.volume_id)["labels"][0]["structure"] == "Left kidney"
        with pytest.raises(DeSAMError) as error:
            logic.start("Left kidney", refs, OPTIONS)
    assert str(error.value).startswith("Could not start training: the service's encoder has random weights")
    assert str(error.value).endswith("(409)")
    with pytest.raises(DeSAMError, match="^Add at least one training case"):
        logic.start("organ", [], OPTIONS)


def test_a_failed_job_reports_its_reason(service, scene_cases):
    url, served = service
    logic = TrainingLogic(ServerClient(url, timeout=60))
    job = logic.start("organ", logic.upload_cases(scene_cases[2]), LONG)
    with worker_scope() as worker:
        _poll(worker, logic, job["id"], timeout=120, until=lambda s: s.phase is not None)
        os.kill(served.training.get(job["id"]).process.pid, signal.SIGKILL)
        final = _poll(worker, logic, job["id"], timeout=60)[-1]
    assert final.state == "failed" and final.ended and not final.active
    assert final.message.startswith("Training failed: ") and "SIGKILL" in final.message, final.message


def test_status_estimates_the_time_left_from_the_epochs():
    job = {"id": "j1", "structure": "organ", "state": "running", "phase": "train", "epoch": 3, "epochs": 5,
           "step": 1, "steps": 2, "loss": 0.5, "seconds_left": 999.0, "precompute": {"done": 4, "total": 4}}
    metrics = [{"epoch": n, "loss": 0.6, "validation_dice": 0.7 + n / 100, "load_seconds": 1.0,
                "compute_seconds": 7.0, "validation_seconds": 2.0} for n in (1, 2)]
    status = TrainingStatus.from_answers(job, metrics)
    assert status.seconds_left == pytest.approx((5 - 2 - 0.5) * 10.0)
    assert status.validation_dice == pytest.approx(0.72)
    assert status.message == "Epoch 3/5, step 1/2, loss 0.5000, validation Dice 0.720, about 25 s left."
    assert status.fraction == pytest.approx(0.1 + 0.9 * 2.5 / 5)
    first = TrainingStatus.from_answers({**job, "epoch": 1, "step": 1}, [])
    assert first.seconds_left == 999.0 and first.validation_dice is None     # the service's estimate
    assert first.message == "Epoch 1/5, step 1/2, loss 0.5000, about 17 min left."
    encoding = TrainingStatus.from_answers({**job, "phase": "precompute", "precompute": {"done": 3, "total": 8}}, [])
    assert encoding.message == "Encoding the training slices: 3 of 8." and encoding.fraction == pytest.approx(0.0375)


def test_a_service_that_goes_away_mid_job_is_reported_and_usable_again(tmp_path, tiny_sam_checkpoint, scene_cases):
    _, _, cases = scene_cases
    port = free_port()
    args = ("--encoder", "tiny", "--device", "cpu", "--sam-checkpoint", str(tiny_sam_checkpoint[0]),
            "--volume-dir", str(tmp_path / "volumes"))
    env = {**os.environ, "DESAM_CACHE_DIR": str(tmp_path / "features"),
           "DESAM_REGISTRY_DIR": str(tmp_path / "registry"), "DESAM_TRAINING_DIR": str(tmp_path / "training-jobs"),
           "DESAM_TRAINING_FEATURES_DIR": str(tmp_path / "training-features"), "DESAM_TRAINING_THREADS": "1"}
    server = LocalServer(sys.executable, args, env=env, port=port, prefix=("-m", "desam_server.cli"))
    server.start()
    try:
        server.wait_until_ready(timeout=180)
        logic = TrainingLogic(ServerClient(server.url, timeout=10), poll_timeout=2.0)
        refs = logic.upload_cases(cases)
        job = logic.start("organ", refs, LONG)
        with worker_scope() as worker:
            _poll(worker, logic, job["id"], timeout=120, until=lambda s: s.state == "running")
        os.kill(server.pid, signal.SIGSTOP)          # a service that hangs: reported within the poll timeout
        try:
            t0 = time.monotonic()
            with pytest.raises(DeSAMError) as hung:
                logic.status(job["id"])
            assert time.monotonic() - t0 < 6
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert str(hung.value).startswith(f"Cannot reach the DeSAM service at {server.url}: no answer within 2 s.")
        assert logic.status(job["id"]).state == "running"     # and the next poll works again
        server.stop(timeout=60)                      # the service goes away (it cancels its job)
        t0 = time.monotonic()
        with pytest.raises(DeSAMError) as gone:
            logic.status(job["id"])
        assert time.monotonic() - t0 < 5
        assert str(gone.value).startswith(f"Cannot reach the DeSAM service at {server.url}: ")
        assert gone.value.status == 0

        server.start()                               # back, same port, same volume folder
        server.wait_until_ready(timeout=180)
        with pytest.raises(DeSAMError) as forgotten:
            logic.status(job["id"])
        assert str(forgotten.value).startswith(f"The DeSAM service at {server.url} no longer knows training job "
                                               f"{job['id'][:8]}: it was restarted")
        assert forgotten.value.status == 404
        again = logic.upload_cases(cases)
        assert [r["uploaded"] for r in again] == [False, False]   # the volumes persisted on its disk
        job = logic.start("organ", again, LONG)
        status = logic.cancel(job["id"])
        assert status.job_id == job["id"]
        with worker_scope() as worker:
            assert _poll(worker, logic, job["id"], timeout=60)[-1].state == "cancelled"
    finally:
        server.stop(timeout=60)
