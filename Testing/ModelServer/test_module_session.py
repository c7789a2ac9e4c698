"""The Qt-free parts of the module's GUI layer on slicer-core's real MRML classes:
``SliceViews`` (which slice a view shows, which view a prompt is on, moving the views to a
Review slice) and ``Session`` (upload once per volume version through the BackgroundWorker,
the user's messages for a service that cannot be reached), plus the Correct panel's worker
function against the tiny-model service on loopback.

These use the logic helpers' files (SegmentationLogic, BackgroundWorker, ...) and
slicer_helpers.py; on a branch without them the tests are skipped."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("slicer.util")
pytest.importorskip("SlicerDeSAMLib.SegmentationLogic")
pytest.importorskip("SlicerDeSAMLib.BackgroundWorker")
slicer_helpers = pytest.importorskip("slicer_helpers")
service_helpers = pytest.importorskip("service_helpers")

import slicer  # noqa: E402

from SlicerDeSAMLib.CorrectPanel import CorrectPanel  # noqa: E402
from SlicerDeSAMLib.ServerClient import ServerError  # noqa: E402
from SlicerDeSAMLib.Session import Session  # noqa: E402
from SlicerDeSAMLib.SliceViews import SliceViews  # noqa: E402

IJK_TO_RAS = slicer_helpers.oblique_ijk_to_ras((0.8, 0.7, 2.5), (0.0, 8.0, -12.0), (-20.0, 15.0, 30.0))
PARENT = slicer_helpers.rigid((5.0, 0.0, 20.0), (3.0, 1.0, -2.0))
WINDOW = (40.0, 400.0)


@pytest.fixture()
def scene():
    with slicer_helpers.core_scene() as s:
        yield s.scene


@pytest.fixture()
def volume(scene):
    parent = slicer_helpers.add_linear_transform(scene, PARENT)
    return slicer_helpers.add_volume(scene, service_helpers.phantom_volume(k=6, h=48, w=64, seed=5), IJK_TO_RAS,
                                     window=WINDOW, parent=parent)


def _axis_directions(volume) -> dict[str, np.ndarray]:
    """World direction of each index axis of the volume (oblique, under its transform)."""
    geometry = SliceViews.geometry(volume)
    origin = np.asarray(geometry.ijk_to_world([0.0, 0.0, 0.0]), float)[:3]
    out = {}
    for axis, step in (("i", (1.0, 0.0, 0.0)), ("j", (0.0, 1.0, 0.0)), ("k", (0.0, 0.0, 1.0))):
        d = np.asarray(geometry.ijk_to_world(step), float)[:3] - origin
        out[axis] = d / np.linalg.norm(d)
    return out


def _slice_node(scene, name: str, normal, mapped: bool = True):
    """A slice node (singleton ``name``, as Slicer's views have) whose plane has ``normal``."""
    node = slicer.vtkMRMLSliceNode()
    node.SetSingletonTag(name)
    node.SetLayoutName(name)
    scene.AddNode(node)
    normal = np.asarray(normal, float) / np.linalg.norm(normal)
    helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(helper, normal)
    x /= np.linalg.norm(x)
    y = np.cross(normal, x)
    m = node.GetSliceToRAS()
    for r in range(3):
        m.SetElement(r, 0, x[r])
        m.SetElement(r, 1, y[r])
        m.SetElement(r, 2, normal[r])
        m.SetElement(r, 3, 0.0)
    node.UpdateMatrices()
    node.SetMappedInLayout(1 if mapped else 0)
    return node


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_jump_to_a_review_slice_then_read_it_back(scene, volume, axis):
    views = _axis_directions(volume)
    red = _slice_node(scene, "Red", views[axis])
    assert red.GetID() == "vtkMRMLSliceNodeRed"
    index = {"k": 4, "j": 30, "i": 11}[axis]
    ras = SliceViews.jump_to_slice(scene, volume, axis, index)
    assert SliceViews.slice_of(volume, red) == (axis, index)
    assert SliceViews.red_slice(scene, volume) == (axis, index)
    # The point is the middle of that slice: back through the volume's geometry.
    ijk = SliceViews.geometry(volume).world_to_ijk(ras)
    assert ijk[{"i": 0, "j": 1, "k": 2}[axis]] == pytest.approx(index, abs=1e-6)


def test_a_view_outside_the_volume_is_reported(scene, volume):
    red = _slice_node(scene, "Red", _axis_directions(volume)["k"])
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, 500.0, 500.0, 500.0, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    assert SliceViews.slice_of(volume, red) is None
    with pytest.raises(ValueError, match="The Red view does not show a slice of 'Volume'"):
        SliceViews.red_slice(scene, volume)


def test_the_prompt_view_is_the_one_whose_plane_holds_the_point(scene, volume):
    directions = _axis_directions(volume)
    _slice_node(scene, "Red", directions["k"])
    _slice_node(scene, "Yellow", directions["i"])
    _slice_node(scene, "Green", directions["j"], mapped=False)  # not in the layout: ignored
    geometry = SliceViews.geometry(volume)
    crossing = geometry.ijk_to_world([40.0, 10.0, 2.0])[:3]  # both views pass through it
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *(float(v) for v in crossing),
                                          slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    on_red_only = geometry.ijk_to_world([20.0, 10.0, 2.0])[:3]
    on_yellow_only = geometry.ijk_to_world([40.0, 5.0, 5.0])[:3]
    on_green_only = geometry.ijk_to_world([30.0, 10.0, 4.0])[:3]
    assert SliceViews.axis_for_point(scene, volume, on_red_only) == "k"
    assert SliceViews.axis_for_point(scene, volume, on_yellow_only) == "i"
    assert SliceViews.axis_for_point(scene, volume, on_green_only) != "j"


def test_no_view_in_the_layout_means_axis_k(scene, volume):
    _slice_node(scene, "Red", _axis_directions(volume)["i"], mapped=False)
    assert SliceViews.axis_for_point(scene, volume, [0.0, 0.0, 0.0]) == "k"


# ---- Session against the tiny service ----------------------------------------------------------------
@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with slicer_helpers.tiny_service(tmp_path_factory.mktemp("session")) as address:
        yield address


def _run(session: Session, fn, *args, timeout: float = 60.0):
    """``fn(*args)`` on the session's worker, its callback delivered by ``poll()`` as the
    module's timer does."""
    answer = {}
    session.worker.submit(fn, *args, on_done=lambda v: answer.setdefault("value", v),
                          on_error=lambda e: answer.setdefault("error", e))
    deadline = time.monotonic() + timeout
    while not answer:
        assert time.monotonic() < deadline, "the worker did not answer"
        session.worker.poll()
        time.sleep(0.01)
    if "error" in answer:
        raise answer["error"]
    return answer["value"]


def test_session_uploads_each_volume_version_once(scene, volume, url):
    session = Session(url)
    try:
        first = session.volume_ref(volume)
        assert first.volume_id is None and first.volume_input is not None
        assert session.known_volume_id(volume) is None
        volume_id = _run(session, session.resolve, first)
        again = session.volume_ref(volume)
        assert again.volume_id == volume_id and again.volume_input is None  # nothing prepared, nothing sent
        assert session.known_volume_id(volume) == volume_id
        array = slicer.util.arrayFromVolume(volume)
        array[0, 0, 0] += 7
        slicer.util.arrayFromVolumeModified(volume)
        changed = session.volume_ref(volume)
        assert changed.volume_id is None  # new voxels: a new version to upload
        assert _run(session, session.resolve, changed) != volume_id
        session.forget_volumes()
        assert session.known_volume_id(volume) is None
    finally:
        session.close()


def test_the_correct_panels_worker_part_refines_one_slice(scene, volume, url):
    segmentation, segment_id = slicer_helpers.add_segmentation(scene, volume)
    session = Session(url)
    try:
        ras = SliceViews.geometry(volume).ijk_to_world([32.0, 24.0, 3.0])[:3]
        prompt = session.segmentation.prepare_prompt(volume, segmentation, segment_id, [ras], [1], axis="k")
        outcome = _run(session, CorrectPanel._request, session, session.volume_ref(volume), prompt)
        assert (outcome.axis, outcome.index) == ("k", 3)
        session.segmentation.apply_prompt(outcome, segmentation, segment_id, volume)
        labels = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
        assert np.array_equal(labels[3] > 0, outcome.mask)
        assert not labels[[0, 1, 2, 4, 5]].any()
    finally:
        session.close()


def test_an_unreachable_service_is_named_in_the_message():
    session = Session("http://127.0.0.1:9")
    try:
        with pytest.raises(ServerError) as caught:
            _run(session, session.client.health)
        message = session.describe(caught.value)
        assert message.startswith("Cannot reach the DeSAM service at http://127.0.0.1:9: ")
        assert "Check that it is running" in message
    finally:
        session.close()


def test_a_lost_volume_or_service_is_uploaded_again_on_the_next_action(scene, volume, url):
    session = Session(url)
    try:
        session.connected = True
        volume_id = _run(session, session.resolve, session.volume_ref(volume))
        message = session.report(ServerError(404, f"no volume {volume_id}", method="GET", path="/volumes"))
        assert message.endswith("(404)") and volume_id in message
        assert session.known_volume_id(volume) is None and session.connected  # reachable: still connected
        _run(session, session.resolve, session.volume_ref(volume))
        assert session.known_volume_id(volume) == volume_id  # same content, same id
        session.report(ServerError(0, "connection refused", method="GET", path="/health"))
        assert session.known_volume_id(volume) is None and not session.connected
        assert session.report(ValueError("Choose a volume first.")) == "Choose a volume first."
    finally:
        session.close()
