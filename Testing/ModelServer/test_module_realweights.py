"""End to end on slicer-core with pretrained MobileSAM on loopback: the sample head CT
loaded by Slicer's storage node, markups points placed in the scene, the prompt's answer
written into a segment; its labelmap on that slice against the sample's head mask, its
geometry against the volume's; the same through parent transforms; an automatic run with
the trained 'head' decoder when the user's registry has one."""

from __future__ import annotations

import time

import numpy as np
import pytest
import slicer
import vtk

from SlicerDeSAMLib import nodes
from SlicerDeSAMLib.requests import AutoOptions, PropagationOptions
from SlicerDeSAMLib.SegmentationLogic import SegmentationLogic
from SlicerDeSAMLib.ServerClient import ServerClient

from conftest import dice
from realweights_helpers import click_prompt
from slicer_helpers import (
    HEAD_DECODER,
    add_linear_transform,
    add_markups_points,
    add_segmentation,
    core_scene,
    cranium_head_mask,
    load_cranium,
    mobile_sam_service,
    rigid,
)

pytestmark = pytest.mark.realweights


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with mobile_sam_service(tmp_path_factory.mktemp("mobile-sam")) as address:
        yield address


@pytest.fixture(scope="module")
def head():
    return cranium_head_mask()


@pytest.fixture()
def scene():
    with core_scene() as s:
        yield s


def click_on_reference_slice(scene, volume, head, index: int):
    """A markups node with one point on the head (the head mask's innermost pixel of slice
    ``index``), placed at that voxel's world position."""
    x, y = click_prompt(head[index])[0]
    world = nodes.volume_geometry(volume).ijk_to_world([x, y, float(index)])
    return add_markups_points(scene.scene, [world], name="Foreground")


def prompt_from_markups(logic, volume, segmentation, segment_id, markups):
    points = [np.array(markups.GetNthControlPointPositionWorld(n)) for n in range(markups.GetNumberOfControlPoints())]
    prompt = logic.prepare_prompt(volume, segmentation, segment_id, points, [1] * len(points), axis="k")
    volume_id = logic.request_upload(logic.prepare_volume(volume))
    return logic.request_prompt(volume_id, prompt)


def test_markups_click_segments_the_head_on_that_slice(url, scene, head):
    volume, sample = load_cranium(scene.scene)
    index = sample.reference_slice
    segmentation, segment_id = add_segmentation(scene.scene, volume, "Head")
    logic = SegmentationLogic(ServerClient(url, timeout=300))
    markups = click_on_reference_slice(scene, volume, head, index)
    answer = prompt_from_markups(logic, volume, segmentation, segment_id, markups)
    assert answer.index == index
    logic.apply_prompt(answer, segmentation, segment_id, volume)
    labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0
    assert labelmap.shape == head.shape
    score = dice(labelmap[index], head[index])
    assert score > 0.9, f"Dice {score:.3f} on slice {index}"
    assert not np.delete(labelmap, index, axis=0).any()
    internal = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(segment_id, internal)
    grid, ijk_to_ras = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    internal.GetImageToWorldMatrix(grid)
    volume.GetIJKToRASMatrix(ijk_to_ras)
    np.testing.assert_allclose(nodes.matrix_to_array(grid), nodes.matrix_to_array(ijk_to_ras), atol=1e-6)
    print(f"\nclick on slice {index}: Dice {score:.3f}, round trip {answer.round_trip_s * 1e3:.0f} ms")


def test_the_same_click_through_parent_transforms_lands_on_the_same_voxels(url, scene, head):
    volume, sample = load_cranium(scene.scene)
    index = sample.reference_slice
    moved = add_linear_transform(scene.scene, rigid((10.0, -5.0, 30.0), (20.0, -8.0, 5.0)), "volume moved")
    volume.SetAndObserveTransformNodeID(moved.GetID())
    elsewhere = add_linear_transform(scene.scene, rigid((0.0, 25.0, -10.0), (3.0, 4.0, 5.0)), "segmentation moved")
    segmentation, segment_id = add_segmentation(scene.scene, volume, "Head", parent=elsewhere)
    logic = SegmentationLogic(ServerClient(url, timeout=300))
    markups = click_on_reference_slice(scene, volume, head, index)
    answer = prompt_from_markups(logic, volume, segmentation, segment_id, markups)
    logic.apply_prompt(answer, segmentation, segment_id, volume)
    got = logic.slices.read_slab(segmentation, segment_id, volume, "k", 0, head.shape[0])
    np.testing.assert_array_equal(got[index], answer.mask)
    assert not np.delete(got, index, axis=0).any()
    assert dice(got[index], head[index]) > 0.9


def test_automatic_run_with_the_head_decoder(url, scene, head):
    client = ServerClient(url, timeout=300)
    if "head" not in {d["name"] for d in client.decoders()}:
        pytest.skip(f"no trained 'head' decoder for MobileSAM in the user's registry ({HEAD_DECODER}); "
                    "`make decoders` trains one")
    volume, _ = load_cranium(scene.scene)
    segmentation, segment_id = add_segmentation(scene.scene, volume, "Head")
    logic = SegmentationLogic(client)
    prepared = logic.prepare_volume(volume)
    volume_id = logic.request_upload(prepared)
    start, stop = 50, 56
    job = logic.request_auto(volume_id, AutoOptions(start=start, stop=stop, decoder="head"), prepared.window)
    deadline = time.monotonic() + 600
    while logic.request_job(job["id"])["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    outcome = logic.request_job_result(job["id"])
    logic.apply_auto(outcome, segmentation, segment_id, volume)
    labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0
    score = dice(labelmap[start:stop], head[start:stop])
    assert score > 0.9, f"Dice {score:.3f} over slices {start} .. {stop - 1}"
    assert not labelmap[:start].any() and not labelmap[stop:].any()
    if outcome.slices:
        items = logic.review_items(outcome)
        assert [iou for _, iou in items] == sorted(iou for _, iou in items)
        assert {index for index, _ in items} <= set(range(start, stop))


@pytest.mark.skipif(not hasattr(ServerClient, "segment_propagate"),
                    reason="this client has no segment_propagate yet (the service branch's POST /segment/propagate)")
def test_click_then_propagate_over_neighbouring_slices(url, scene, head):
    volume, sample = load_cranium(scene.scene)
    index = sample.reference_slice
    segmentation, segment_id = add_segmentation(scene.scene, volume, "Head")
    logic = SegmentationLogic(ServerClient(url, timeout=300))
    markups = click_on_reference_slice(scene, volume, head, index)
    logic.apply_prompt(prompt_from_markups(logic, volume, segmentation, segment_id, markups), segmentation,
                       segment_id, volume)
    start, stop = index - 4, index + 5
    seed = logic.prepare_propagation(volume, segmentation, segment_id, "k", index,
                                     PropagationOptions(start=start, stop=stop))
    volume_id = logic.request_upload(logic.prepare_volume(volume))
    job = logic.request_propagation(volume_id, seed)
    deadline = time.monotonic() + 600
    while logic.request_job(job["id"])["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    outcome = logic.request_job_result(job["id"])
    first, last = outcome.reached
    assert start <= first <= index <= last <= stop - 1
    assert last - first >= 4, f"propagation reached only slices {first} .. {last}"
    logic.apply_auto(outcome, segmentation, segment_id, volume)
    labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0
    score = dice(labelmap[first:last + 1], head[first:last + 1])
    assert score > 0.9, f"Dice {score:.3f} over slices {first} .. {last}"
    assert not labelmap[:first].any() and not labelmap[last + 1:].any()
