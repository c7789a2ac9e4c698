"""SegmentationLogic on slicer-core against the tiny-model service on loopback: the
prepare / request / apply parts of upload, prompts and automatic jobs, undo per action.
(The tiny model's masks are random-ish: these tests check mechanics and geometry; the
pretrained model's answers are checked in test_module_realweights.py.)"""

from __future__ import annotations

import time

import numpy as np
import pytest

from SlicerDeSAMLib import nodes, slices
from SlicerDeSAMLib.requests import AutoOptions, PromptOutcome, PropagationOptions
from SlicerDeSAMLib.SegmentationLogic import SegmentationLogic
from SlicerDeSAMLib.ServerClient import ServerClient, ServerError

from service_helpers import FinishedRequests, live_server, phantom_volume, tiny_settings
from slicer_helpers import (
    add_linear_transform,
    add_markups_points,
    add_segmentation,
    add_volume,
    core_scene,
    oblique_ijk_to_ras,
    rigid,
)

IJK_TO_RAS = oblique_ijk_to_ras((0.8, 0.8, 2.5), (0.0, 8.0, -12.0), (-20.0, 15.0, 30.0))
WINDOW = (40.0, 400.0)


@pytest.fixture(scope="module")
def finished():
    return FinishedRequests()


@pytest.fixture(scope="module")
def url(tmp_path_factory, finished):
    with live_server(tiny_settings(tmp_path_factory.mktemp("module")), finished=finished) as (address, _):
        yield address


@pytest.fixture()
def scene():
    with core_scene() as s:
        yield s


@pytest.fixture()
def case(scene):
    """(volume, segmentation, segment id) of the phantom, both nodes under their own transforms."""
    volume = add_volume(scene.scene, phantom_volume(k=6, h=48, w=64, seed=5), IJK_TO_RAS, window=WINDOW,
                        parent=add_linear_transform(scene.scene, rigid((5.0, 0.0, 20.0), (3.0, 1.0, -2.0))))
    segmentation, segment_id = add_segmentation(
        scene.scene, volume, parent=add_linear_transform(scene.scene, rigid((0.0, -10.0, 0.0), (-6.0, 0.0, 4.0))))
    return volume, segmentation, segment_id


def wait_done(logic: SegmentationLogic, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = logic.request_job(job_id)
        if job["state"] not in ("queued", "running"):
            return job
        assert time.monotonic() < deadline, f"job still {job['state']}"
        time.sleep(0.1)


def test_volume_is_uploaded_once_with_its_local_lps_geometry_and_display_window(url, case, finished):
    volume, _, _ = case
    logic = SegmentationLogic(ServerClient(url))
    prepared = logic.prepare_volume(volume)
    assert prepared.window == WINDOW
    assert not prepared.array.flags.writeable
    before = finished.count("POST", "/volumes")
    volume_id = logic.request_upload(prepared)
    assert logic.request_upload(logic.prepare_volume(volume)) == volume_id
    assert finished.count("POST", "/volumes") == before + 1
    held = logic.client.volume(volume_id)
    lps = prepared.geometry.lps_geometry()
    assert held["shape"] == list(prepared.array.shape)
    np.testing.assert_allclose(held["spacing"], lps["spacing"])
    np.testing.assert_allclose(held["origin"], lps["origin"])
    np.testing.assert_allclose(np.reshape(held["direction"], (3, 3)), lps["direction"])


@pytest.mark.parametrize("axis", ["k", "j"])
def test_markups_prompt_updates_only_that_slice_and_undo_restores_it(url, scene, case, axis):
    volume, segmentation, segment_id = case
    logic = SegmentationLogic(ServerClient(url))
    volume_id = logic.request_upload(logic.prepare_volume(volume))
    geometry = nodes.volume_geometry(volume)
    index = 3 if axis == "k" else 20
    earlier = np.zeros(geometry.slice_shape(axis), bool)
    earlier[5:9, 10:30] = True
    logic.slices.write_slice(segmentation, segment_id, volume, axis, index, earlier)
    logic.slices.write_slice(segmentation, segment_id, volume, axis, index - 1, earlier)
    logic.accept()
    pixel = (30.5, 4.5)                                              # x, y in the slice frame
    world = geometry.slice_pixel_to_world(*pixel, axis, index)
    markups = add_markups_points(scene.scene, [world, geometry.slice_pixel_to_world(2.5, 2.5, axis, index)])
    placed = [np.array(markups.GetNthControlPointPositionWorld(n)) for n in range(2)]
    prompt = logic.prepare_prompt(volume, segmentation, segment_id, placed, [1, 0], axis=axis)
    assert (prompt.axis, prompt.index) == (axis, index)
    np.testing.assert_allclose(prompt.points, [pixel, (2.5, 2.5)], atol=1e-6)
    np.testing.assert_array_equal(prompt.mask, earlier)            # the slice's current mask is refined
    assert prompt.window == WINDOW
    answer = logic.request_prompt(volume_id, prompt)
    assert answer.mask.shape == geometry.slice_shape(axis) and answer.round_trip_s > 0
    assert answer.area == int(answer.mask.sum())
    logic.apply_prompt(answer, segmentation, segment_id, volume)
    np.testing.assert_array_equal(logic.slices.read_slice(segmentation, segment_id, volume, axis, index), answer.mask)
    np.testing.assert_array_equal(logic.slices.read_slice(segmentation, segment_id, volume, axis, index - 1), earlier)
    step = logic.undo_last(segmentation)
    assert step is not None and step.offset == index
    np.testing.assert_array_equal(logic.slices.read_slice(segmentation, segment_id, volume, axis, index), earlier)
    assert logic.undo_last(segmentation) is None


def test_box_prompt_and_undo_one_step_per_action(url, case):
    volume, segmentation, segment_id = case
    logic = SegmentationLogic(ServerClient(url))
    volume_id = logic.request_upload(logic.prepare_volume(volume))
    geometry = nodes.volume_geometry(volume)
    corners = [geometry.slice_pixel_to_world(10, 8, "k", 2), geometry.slice_pixel_to_world(50, 40, "k", 2)]
    first = logic.request_prompt(volume_id, logic.prepare_prompt(volume, segmentation, segment_id, [], [],
                                                                 box_world=corners))
    assert first.index == 2
    logic.apply_prompt(first, segmentation, segment_id, volume)
    second = PromptOutcome(axis="k", index=2, mask=np.ones((48, 64), bool), iou=1.0, area=48 * 64)
    logic.apply_prompt(second, segmentation, segment_id, volume)
    assert logic.slices.read_slice(segmentation, segment_id, volume, "k", 2).all()
    logic.undo_last(segmentation)
    np.testing.assert_array_equal(logic.slices.read_slice(segmentation, segment_id, volume, "k", 2), first.mask)
    logic.undo_last(segmentation)
    assert not logic.slices.read_slice(segmentation, segment_id, volume, "k", 2).any()


def test_automatic_job_applied_reviewed_and_undone(url, case):
    volume, segmentation, segment_id = case
    logic = SegmentationLogic(ServerClient(url))
    prepared = logic.prepare_volume(volume)
    volume_id = logic.request_upload(prepared)
    outside = np.zeros((48, 64), bool)
    outside[:3, :3] = True
    logic.slices.write_slice(segmentation, segment_id, volume, "k", 0, outside)
    job = logic.request_auto(volume_id, AutoOptions(axis="k", start=1, stop=5, decoder="phantom"), prepared.window)
    assert wait_done(logic, job["id"])["state"] == "succeeded"
    outcome = logic.request_job_result(job["id"])
    assert (outcome.axis, outcome.offset, outcome.slab.shape) == ("k", 1, (4, 48, 64))
    logic.apply_auto(outcome, segmentation, segment_id, volume)
    expected = np.zeros((6, 48, 64), bool)
    expected[0] = outside
    slices.put_slab(expected, "k", 1, outcome.slab)
    np.testing.assert_array_equal(logic.slices.read_slab(segmentation, segment_id, volume, "k", 0, 6), expected)
    logic.undo_last(segmentation)
    np.testing.assert_array_equal(logic.slices.read_slab(segmentation, segment_id, volume, "k", 0, 6),
                                  np.where(np.arange(6)[:, None, None] == 0, outside, False))
    if "slices" not in job:
        pytest.skip("this service does not report per-slice IoU yet (the service branch's 'slices')")
    assert [s[0] for s in outcome.slices] == [1, 2, 3, 4]
    items = logic.review_items(outcome, include_empty=True)
    assert [iou for _, iou in items] == sorted(iou for _, iou in items)


def test_review_items_lowest_iou_first_without_empty_slices():
    from SlicerDeSAMLib.requests import AutoOutcome

    outcome = AutoOutcome(job_id="j", kind="auto", axis="k", offset=3, slab=np.zeros((4, 2, 2), bool),
                          slices=((2, None, 30), (3, 0.9, 10), (4, 0.4, 12), (5, 0.1, 0), (6, 0.4, 3)))
    assert SegmentationLogic.review_items(outcome) == [(4, 0.4), (6, 0.4), (3, 0.9)]
    assert SegmentationLogic.review_items(outcome, include_empty=True)[0] == (5, 0.1)
    assert outcome.ious == {2: None, 3: 0.9, 4: 0.4, 5: 0.1, 6: 0.4}


def test_errors_say_what_is_wrong(url, case, tmp_path):
    volume, segmentation, segment_id = case
    logic = SegmentationLogic(ServerClient(url))
    geometry = nodes.volume_geometry(volume)
    far = geometry.ijk_to_world([10.0, 10.0, 40.0])
    with pytest.raises(ValueError, match="outside the volume along axis k"):
        logic.prepare_prompt(volume, segmentation, segment_id, [far], [1])
    with pytest.raises(ValueError, match="needs at least one point or a box"):
        logic.prepare_prompt(volume, segmentation, segment_id, [], [])
    with pytest.raises(ValueError, match="label 1 .* or 0"):
        logic.prepare_prompt(volume, segmentation, segment_id, [geometry.ijk_to_world([1.0, 1.0, 1.0])], [2])
    with pytest.raises(ValueError, match="is empty: segment it"):
        logic.prepare_propagation(volume, segmentation, segment_id, "k", 2)
    volume_id = logic.request_upload(logic.prepare_volume(volume))
    with pytest.raises(ServerError, match="no-such-decoder") as refused:
        logic.request_auto(volume_id, AutoOptions(decoder="no-such-decoder"))
    assert refused.value.status == 404
    with pytest.raises(ServerError, match="404"):
        logic.request_job_result("0" * 32)
    gone = SegmentationLogic(ServerClient("http://127.0.0.1:9", timeout=2))
    with pytest.raises(ServerError, match="cannot reach the service"):
        gone.request_upload(gone.prepare_volume(volume))


@pytest.mark.skipif(not hasattr(ServerClient, "segment_propagate"),
                    reason="this client has no segment_propagate yet (the service branch's POST /segment/propagate)")
def test_propagation_job_applied_and_undone(url, case):
    volume, segmentation, segment_id = case
    logic = SegmentationLogic(ServerClient(url))
    volume_id = logic.request_upload(logic.prepare_volume(volume))
    seed_mask = np.zeros((48, 64), bool)
    seed_mask[15:35, 25:45] = True
    logic.slices.write_slice(segmentation, segment_id, volume, "k", 3, seed_mask)
    logic.accept()
    anything = PropagationOptions(iou_threshold=0.0, min_area=1, min_area_ratio=0.0, max_area_ratio=1e6)
    seed = logic.prepare_propagation(volume, segmentation, segment_id, "k", 3, anything)
    np.testing.assert_array_equal(seed.mask, seed_mask)
    job = logic.request_propagation(volume_id, seed)
    assert wait_done(logic, job["id"])["state"] == "succeeded"
    outcome = logic.request_job_result(job["id"])
    assert outcome.kind == "propagate" and outcome.axis == "k"
    first, last = outcome.reached
    assert first <= 3 <= last and outcome.offset == first and outcome.slab.shape[0] == last - first + 1
    assert 3 in outcome.ious
    logic.apply_auto(outcome, segmentation, segment_id, volume)
    expected = np.zeros((6, 48, 64), bool)
    expected[3] = seed_mask
    slices.put_slab(expected, "k", first, outcome.slab)
    np.testing.assert_array_equal(logic.slices.read_slab(segmentation, segment_id, volume, "k", 0, 6), expected)
    logic.undo_last(segmentation)
    after = logic.slices.read_slab(segmentation, segment_id, volume, "k", 0, 6)
    np.testing.assert_array_equal(after, np.where(np.arange(6)[:, None, None] == 3, seed_mask, False))


def test_refinement_uses_the_answers_logits_while_the_slice_is_unchanged(url, case):
    from dataclasses import replace

    volume, segmentation, segment_id = case
    logic = SegmentationLogic(ServerClient(url))
    volume_id = logic.request_upload(logic.prepare_volume(volume))
    geometry = nodes.volume_geometry(volume)
    click = [geometry.slice_pixel_to_world(30.5, 20.5, "k", 2)]
    first = logic.prepare_prompt(volume, segmentation, segment_id, click, [1])
    assert first.mask is None and first.logits_id is None
    answer = logic.request_prompt(volume_id, first)
    logic.apply_prompt(answer, segmentation, segment_id, volume)
    again = logic.prepare_prompt(volume, segmentation, segment_id, click, [1])
    assert again.logits_id == answer.logits_id is not None
    assert logic.request_prompt(volume_id, again).mask.shape == (48, 64)
    expired = replace(again, logits_id="f" * 32, mask=np.ones((48, 64), bool))
    assert logic.request_prompt(volume_id, expired).mask.shape == (48, 64)       # fell back to the mask
    edited = answer.mask.copy()
    edited[:4, :4] = ~edited[:4, :4]
    logic.slices.write_slice(segmentation, segment_id, volume, "k", 2, edited)   # the user edited the slice
    after_edit = logic.prepare_prompt(volume, segmentation, segment_id, click, [1])
    assert after_edit.logits_id is None
    np.testing.assert_array_equal(after_edit.mask, edited)


def test_prompt_through_the_background_worker(url, case):
    """The panels' way: prepare on the main thread, request on the worker thread, apply in
    the callback that ``poll()`` runs on the main thread."""
    import threading

    from SlicerDeSAMLib.BackgroundWorker import BackgroundWorker

    volume, segmentation, segment_id = case
    logic = SegmentationLogic(ServerClient(url))
    geometry = nodes.volume_geometry(volume)
    main = threading.current_thread()
    threads, applied = [], []

    def upload_and_prompt(volume_input, prompt):
        threads.append(threading.current_thread())
        return logic.request_prompt(logic.request_upload(volume_input), prompt)

    def apply(outcome):
        assert threading.current_thread() is main
        applied.append(logic.apply_prompt(outcome, segmentation, segment_id, volume))

    prompt = logic.prepare_prompt(volume, segmentation, segment_id,
                                  [geometry.slice_pixel_to_world(20.5, 30.5, "k", 4)], [1])
    worker = BackgroundWorker()
    try:
        worker.submit(upload_and_prompt, logic.prepare_volume(volume), prompt, on_done=apply, key="prompt")
        deadline = time.monotonic() + 60
        while not applied:
            worker.poll()
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        worker.shutdown()
    assert threads and threads[0] is not main
    assert not worker.busy("prompt")
    assert applied[0].offset == 4
    assert logic.slices.read_slice(segmentation, segment_id, volume, "k", 4).shape == (48, 64)


def test_cancelled_job_reports_why_and_writes_nothing(url, scene):
    volume = add_volume(scene.scene, phantom_volume(k=40, h=48, w=64, seed=9), IJK_TO_RAS)
    segmentation, segment_id = add_segmentation(scene.scene, volume)
    logic = SegmentationLogic(ServerClient(url))
    volume_id = logic.request_upload(logic.prepare_volume(volume))
    job = logic.request_auto(volume_id, AutoOptions(decoder="phantom", mode="grid", grid_size=9))
    logic.cancel(job["id"])
    final = wait_done(logic, job["id"])
    assert final["state"] == "cancelled", f"the job ended {final['state']} before the cancel reached it"
    with pytest.raises(RuntimeError, match="cancelled: cancelled on request"):
        logic.request_job_result(job["id"])
    assert not logic.can_undo(segmentation)
    assert not logic.slices.read_slab(segmentation, segment_id, volume, "k", 0, 40).any()


def test_review_by_presence_puts_the_least_certain_decisions_first():
    from SlicerDeSAMLib.requests import AutoOutcome

    outcome = AutoOutcome(job_id="j", kind="auto", axis="k", offset=0, slab=np.zeros((4, 2, 2), bool),
                          slices=((0, None, 0), (1, 0.9, 10), (2, 0.7, 12), (3, None, 0)),
                          presence=((0, 0.02), (1, 0.97), (2, 0.55), (3, 0.41)), presence_threshold=0.5)
    assert SegmentationLogic.review_items(outcome, by="presence") == [(2, 0.55), (3, 0.41), (1, 0.97), (0, 0.02)]
    assert SegmentationLogic.review_items(outcome) == [(2, 0.7), (1, 0.9)]
    with pytest.raises(ValueError, match="review by 'iou' or 'presence'"):
        SegmentationLogic.review_items(outcome, by="area")


def test_roi_job_from_a_markups_roi(url, scene, case):
    """The 'roi' mode: a markups ROI under the volume's transform becomes the box and the
    slices it covers; the job prompts each of those slices with that box."""
    volume, segmentation, segment_id = case
    geometry = nodes.volume_geometry(volume)
    roi = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetXYZ(*geometry.ijk_to_world([32.0, 24.0, 2.5]))
    roi.SetSize(20.0, 20.0, 4.0)
    logic = SegmentationLogic(ServerClient(url))
    box, start, stop = logic.prepare_roi(volume, roi, "k")
    assert (box, start, stop) == geometry.region_box(nodes.roi_corners_world(roi), "k")
    prepared = logic.prepare_volume(volume)
    volume_id = logic.request_upload(prepared)
    job = logic.request_auto(volume_id, AutoOptions(axis="k", mode="roi", start=start, stop=stop, box=box),
                             prepared.window)
    assert job["spec"]["box"] == pytest.approx(list(box)) and job["spec"]["decoder"] == "sam"
    assert wait_done(logic, job["id"])["state"] == "succeeded"
    outcome = logic.request_job_result(job["id"])
    assert (outcome.offset, outcome.slab.shape[0]) == (start, stop - start) and outcome.presence == ()
    logic.apply_auto(outcome, segmentation, segment_id, volume)
    np.testing.assert_array_equal(logic.slices.read_slab(segmentation, segment_id, volume, "k", start, stop - start),
                                  outcome.slab)


def test_cam_box_job_reports_presence_for_the_review_list(tmp_path, case):
    """A SAM-Mix model (a stand-in classifier with a known map) served: the cam-box run's
    outcome carries each slice's presence probability and the run's threshold."""
    from family_helpers import TwoBlobClassifier, adapted

    from desam_server.api.service import Service
    from desam_server.modeling import build_desam

    def factory(settings):
        model = build_desam("tiny", sam_checkpoint=settings.sam_checkpoint)
        service = Service(settings, model, model_info={"encoder": "tiny"})
        service.decoders.put(adapted(model, "sammix", "b2" * 32, name="organ_mix",
                                     classifier=TwoBlobClassifier().eval()))
        return service

    volume, segmentation, segment_id = case
    with live_server(tiny_settings(tmp_path), factory=factory) as (address, _):
        logic = SegmentationLogic(ServerClient(address))
        prepared = logic.prepare_volume(volume)
        volume_id = logic.request_upload(prepared)
        job = logic.request_auto(volume_id, AutoOptions(mode="cam-box", decoder="organ_mix", presence_threshold=0.6),
                                 prepared.window)
        assert wait_done(logic, job["id"])["state"] == "succeeded"
        outcome = logic.request_job_result(job["id"])
    assert [index for index, _ in outcome.presence] == list(range(6)) and outcome.presence_threshold == 0.6
    assert all(p == pytest.approx(0.99330714, abs=1e-6) for _, p in outcome.presence)
    assert outcome.slab.any() and len(logic.review_items(outcome, by="presence")) == 6
