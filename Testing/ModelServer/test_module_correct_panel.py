"""The Correct panel's choice of points for a click, on slicer-core's real markups nodes:
every positive and negative point on the clicked slice goes with the newest click (SAM's
interactive use, refining with the previous answer), points on other slices do not."""

from __future__ import annotations

import types

import numpy as np
import pytest

pytest.importorskip("slicer.util")
slicer_helpers = pytest.importorskip("slicer_helpers")

from SlicerDeSAMLib.CorrectPanel import CorrectPanel  # noqa: E402
from SlicerDeSAMLib.nodes import volume_geometry  # noqa: E402


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_a_click_sends_the_points_on_its_slice_with_their_labels(axis):
    ijk_to_ras = slicer_helpers.oblique_ijk_to_ras((0.8, 0.9, 2.0), (10.0, -5.0, 20.0), (-30.0, 12.0, 4.0))
    with slicer_helpers.core_scene() as core:
        volume = slicer_helpers.add_volume(core.scene, np.zeros((9, 20, 24), np.int16), ijk_to_ras)
        geometry = volume_geometry(volume)
        dim = {"k": 2, "j": 1, "i": 0}[axis]

        def world(i, j, k):
            return tuple(float(v) for v in geometry.ijk_to_world([i, j, k])[:3])

        def on(index, a, b):                # a point on slice ``index`` along the axis
            ijk = [a, b, a % 7]
            ijk[dim] = index
            return world(*ijk)

        positive = slicer_helpers.add_markups_points(core.scene, [on(4, 3, 5), on(5, 6, 2), on(4, 7, 6)], "pos")
        far = geometry.ijk_to_world([0, 0, 0])[:3] + 1e4 * geometry.ijk_to_world_matrix[:3, dim]
        outside = tuple(float(v) for v in far)   # beyond the volume along the axis: skipped, not an error
        negative = slicer_helpers.add_markups_points(core.scene, [on(4, 2, 2), on(3, 5, 5), outside], "neg")
        panel = types.SimpleNamespace(nodes={"positive": positive, "negative": negative})
        newest = on(4, 7, 6)
        points, labels = CorrectPanel._pointsOnSlice(panel, volume, axis, newest, 1)
        assert points[0] == newest and labels[0] == 1
        expected = {(np.round(on(4, 3, 5), 6).tobytes(), 1), (np.round(on(4, 2, 2), 6).tobytes(), 0)}
        got = {(np.round(p, 6).tobytes(), label) for p, label in zip(points[1:], labels[1:], strict=True)}
        assert got == expected


def test_undo_of_a_prompt_removes_the_point_that_made_it():
    """Undo takes back the prompt's answer and its control point, so the point is not sent
    again with the slice's next click; other points and other steps stay."""
    with slicer_helpers.core_scene() as core:
        positive = slicer_helpers.add_markups_points(core.scene, [(1.0, 2.0, 3.0), (4.0, 5.0, 6.0)], "pos")
        first, second = (object(), object())      # two undo steps (identity is what counts)
        panel = types.SimpleNamespace(_stepPoints=[(first, (positive, positive.GetNthControlPointID(0))),
                                                   (second, (positive, positive.GetNthControlPointID(1)))])
        CorrectPanel.removePointOf(panel, second)
        assert positive.GetNumberOfControlPoints() == 1
        assert [entry[0] for entry in panel._stepPoints] == [first]
        ras = [0.0, 0.0, 0.0]
        positive.GetNthControlPointPositionWorld(0, ras)
        assert ras == [1.0, 2.0, 3.0]
        CorrectPanel.removePointOf(panel, object())   # a step without a point (propagation, box): nothing
        assert positive.GetNumberOfControlPoints() == 1
