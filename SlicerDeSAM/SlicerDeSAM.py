"""SlicerDeSAM: DeSAM / SAM segmentation from a local service, inside 3D Slicer.

Thin entry: the module's metadata, the widget shell, the logic that gives the parameter
node, the Segment Editor effect's registration and the self-tests. Everything else is in
``SlicerDeSAMLib/``.
"""

import os
import time
import unittest

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from SlicerDeSAMLib.Parameters import SlicerDeSAMParameters

TEST_URL_VARIABLE = "SLICERDESAM_TEST_URL"
TEST_TOKEN_VARIABLE = "SLICERDESAM_TEST_TOKEN"
TEST_DECODER_VARIABLE = "SLICERDESAM_TEST_DECODER"


class SlicerDeSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeSAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["SlicerDeSAM contributors"]
        self.parent.helpText = _("""
Segment CT and MR volumes with DeSAM (a decoupled Segment Anything Model) running in a local
service: automatic segmentation of every slice, point and box prompts on any slice view,
propagation to neighbouring slices, review of the least certain slices, and fine-tuning of
the decoder on your own corrected cases. The service runs beside Slicer (Server panel).
See the <a href="https://github.com/SlicerDeSAM/SlicerDeSAM/#the-slicer-module">module documentation</a>.
""")
        self.parent.acknowledgementText = _("""
DeSAM is the model of Yifan Gao, Wei Xia, Dingdu Hu, Wenkui Wang and Xin Gao, "DeSAM: Decoupled
Segment Anything Model for Generalizable Medical Image Segmentation" (arXiv:2306.00499, 2023-2024).
It builds on Segment Anything (Kirillov et al., Meta AI, 2023). Please cite them when you
publish results obtained with this module.
""")
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as qSlicerSegmentationsEditorEffects

        instance = qSlicerSegmentationsEditorEffects.qSlicerSegmentEditorScriptedEffect(None)
        effectFilename = os.path.join(os.path.dirname(__file__), "SlicerDeSAMLib", "SegmentEditorEffect.py")
        instance.setPythonSource(effectFilename.replace("\\", "/"))
        instance.self().register()


class SlicerDeSAMWidget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.moduleWidget = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        from SlicerDeSAMLib.ModuleWidget import ModuleWidget

        self.moduleWidget = ModuleWidget(self.resourcePath, self.layout, SlicerDeSAMLogic())

    def enter(self) -> None:
        self.moduleWidget.enter()

    def exit(self) -> None:
        self.moduleWidget.exit()

    def cleanup(self) -> None:
        if self.moduleWidget is not None:
            self.moduleWidget.cleanup()


class SlicerDeSAMLogic(ScriptedLoadableModuleLogic):
    """The typed parameter node; the segmentation, server and training logic live in
    ``SlicerDeSAMLib`` and are built by ``Session`` for one service."""

    def getParameterNode(self):
        return SlicerDeSAMParameters(super().getParameterNode())


class SlicerDeSAMTest(ScriptedLoadableModuleTest):
    """Automatic, prompted (with Undo) and propagated segmentation of Slicer's sample head MR
    ("MRHead") through a running DeSAM service, the network part on the BackgroundWorker as
    in the GUI. Each test checks that the segment holds exactly the service's answer on the
    volume's grid, and nothing elsewhere.

    SLICERDESAM_TEST_URL: the service's URL (the tests are skipped without it, saying so);
    SLICERDESAM_TEST_TOKEN: its token, if any; SLICERDESAM_TEST_DECODER: the trained decoder
    for the automatic test (default: the first the service lists; skipped when it has none).
    """

    SAMPLE = "MRHead"
    TIMEOUT_S = 600.0
    # Propagation stops where the predicted IoU or the mask area (pixels) falls below these.
    PROPAGATION_IOU = 0.3
    PROPAGATION_MIN_AREA = 10

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_automatic, self.test_prompted_and_undo, self.test_propagated):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:
                self.delayDisplay(f"{test.__name__} skipped: {reason}")

    # ---- helpers --------------------------------------------------------------------------------
    def _session(self):
        url = os.environ.get(TEST_URL_VARIABLE)
        if not url:
            raise unittest.SkipTest(f"set {TEST_URL_VARIABLE} to a running DeSAM service's URL "
                                    "(e.g. http://127.0.0.1:8765) to run this test")
        from SlicerDeSAMLib.Session import Session

        return Session(url, os.environ.get(TEST_TOKEN_VARIABLE) or None)

    def _scene(self):
        import SampleData

        volumeNode = SampleData.downloadSample(self.SAMPLE)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "DeSAM test")
        return volumeNode, segmentationNode, segmentId

    def _run(self, session, fn, *args):
        """``fn(*args)`` on the session's worker; wait for it as the module's timer does."""
        answer = {}
        session.worker.submit(fn, *args, on_done=lambda value: answer.setdefault("value", value),
                              on_error=lambda exc: answer.setdefault("error", exc))
        deadline = time.monotonic() + self.TIMEOUT_S
        while not answer:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer from the DeSAM service within {self.TIMEOUT_S:.0f} s")
            session.worker.poll()
            slicer.app.processEvents()
            time.sleep(0.02)
        if "error" in answer:
            raise answer["error"]
        return answer["value"]

    def _waitJob(self, session, job):
        while job["state"] in ("queued", "running"):
            time.sleep(0.2)
            job = self._run(session, session.segmentation.request_job, job["id"])
        self.assertEqual(job["state"], "succeeded", job.get("error"))
        return self._run(session, session.segmentation.request_job_result, job["id"])

    @staticmethod
    def _segmentArray(segmentationNode, segmentId, volumeNode):
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode) > 0

    @staticmethod
    def _centreRas(volumeNode, k):
        from SlicerDeSAMLib.SliceViews import SliceViews

        geometry = SliceViews.geometry(volumeNode)
        _, rows, columns = geometry.shape
        return tuple(float(v) for v in geometry.ijk_to_world([(columns - 1) / 2, (rows - 1) / 2, k])[:3])

    def _prompt(self, session, volumeNode, segmentationNode, segmentId, k):
        """A positive point at the middle of slice k, as the Correct panel sends it."""
        from SlicerDeSAMLib.CorrectPanel import CorrectPanel

        request = session.segmentation.prepare_prompt(volumeNode, segmentationNode, segmentId,
                                                      [self._centreRas(volumeNode, k)], [1], axis="k")
        outcome = self._run(session, CorrectPanel._request, session, session.volume_ref(volumeNode), request)
        session.segmentation.apply_prompt(outcome, segmentationNode, segmentId, volumeNode)
        return outcome

    # ---- tests ----------------------------------------------------------------------------------
    def test_automatic(self):
        from SlicerDeSAMLib.requests import AutoOptions

        session = self._session()
        try:
            names = [d["name"] for d in self._run(session, session.client.decoders)]
            decoder = os.environ.get(TEST_DECODER_VARIABLE) or (names[0] if names else None)
            if decoder is None:
                raise unittest.SkipTest("the service has no trained DeSAM decoder (README: First trained decoders); "
                                        "the automatic mode needs one")
            volumeNode, segmentationNode, segmentId = self._scene()
            depth = slicer.util.arrayFromVolume(volumeNode).shape[0]
            start, stop = depth // 2 - 2, depth // 2 + 3
            self.delayDisplay(f"Automatic segmentation of slices {start}..{stop - 1} with decoder {decoder}")
            volumeId = self._run(session, session.resolve, session.volume_ref(volumeNode))
            options = AutoOptions(axis="k", mode="box", start=start, stop=stop, decoder=decoder)
            job = self._run(session, session.segmentation.request_auto, volumeId, options,
                            session.segmentation.window_of(volumeNode))
            outcome = self._waitJob(session, job)
            session.segmentation.apply_auto(outcome, segmentationNode, segmentId, volumeNode)
            labels = self._segmentArray(segmentationNode, segmentId, volumeNode)
            self.assertEqual(labels.shape, slicer.util.arrayFromVolume(volumeNode).shape)
            self.assertEqual((outcome.axis, outcome.offset, outcome.slab.shape[0]), ("k", start, stop - start))
            self.assertTrue((labels[start:stop] == (outcome.slab > 0)).all(), "the segment is not the job's result")
            self.assertFalse(labels[:start].any() or labels[stop:].any(), "slices outside the range changed")
            review = session.segmentation.review_items(outcome, include_empty=True)
            self.assertEqual(sorted(index for index, _ in review), list(range(start, stop)))
            self.assertEqual([iou for _, iou in review], sorted(iou for _, iou in review))
            self.delayDisplay(f"Automatic segmentation passed ({int(labels.sum())} voxels)")
        finally:
            session.close()

    def test_prompted_and_undo(self):
        session = self._session()
        try:
            volumeNode, segmentationNode, segmentId = self._scene()
            k = slicer.util.arrayFromVolume(volumeNode).shape[0] // 2
            self.delayDisplay(f"Positive point at the middle of slice {k}")
            outcome = self._prompt(session, volumeNode, segmentationNode, segmentId, k)
            labels = self._segmentArray(segmentationNode, segmentId, volumeNode)
            self.assertEqual((outcome.axis, outcome.index), ("k", k))
            self.assertTrue(outcome.mask.any(), "the service answered an empty mask for a point inside the head")
            self.assertTrue((labels[k] == outcome.mask).all(), "the slice is not the service's mask")
            self.assertEqual(int(labels.sum()), int(labels[k].sum()), "a prompt changed another slice")
            session.segmentation.undo_last(segmentationNode)
            self.assertFalse(self._segmentArray(segmentationNode, segmentId, volumeNode).any(),
                             "Undo did not restore the empty segment")
            self.delayDisplay("Prompted segmentation and Undo passed")
        finally:
            session.close()

    def test_propagated(self):
        from SlicerDeSAMLib.requests import PropagationOptions

        session = self._session()
        try:
            volumeNode, segmentationNode, segmentId = self._scene()
            k = slicer.util.arrayFromVolume(volumeNode).shape[0] // 2
            self._prompt(session, volumeNode, segmentationNode, segmentId, k)
            self.delayDisplay(f"Propagate from slice {k}")
            volumeId = self._run(session, session.resolve, session.volume_ref(volumeNode))
            request = session.segmentation.prepare_propagation(volumeNode, segmentationNode, segmentId, "k", k,
                                                               PropagationOptions(
                iou_threshold=self.PROPAGATION_IOU, min_area=self.PROPAGATION_MIN_AREA))
            job = self._run(session, session.segmentation.request_propagation, volumeId, request)
            outcome = self._waitJob(session, job)
            seed = self._segmentArray(segmentationNode, segmentId, volumeNode)[k].copy()
            session.segmentation.apply_auto(outcome, segmentationNode, segmentId, volumeNode)
            labels = self._segmentArray(segmentationNode, segmentId, volumeNode)
            first, last = outcome.offset, outcome.offset + outcome.slab.shape[0] - 1
            self.assertLessEqual(first, k)
            self.assertGreaterEqual(last, k)
            self.assertGreater(last - first, 0, "propagation reached no neighbour of the seed slice")
            self.assertTrue((labels[first:last + 1] == (outcome.slab > 0)).all(), "the segment is not the result")
            self.assertFalse(labels[:first].any() or labels[last + 1:].any(), "slices outside the reach changed")
            self.assertTrue(labels[k].any() and seed.any())
            self.delayDisplay(f"Propagated segmentation passed (slices {first}..{last})")
        finally:
            session.close()
