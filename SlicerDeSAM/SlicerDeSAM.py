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
See the <a href="https://github.com/SlicerDeSAM/SlicerDeSAM/blob/main/docs/MODULE.md">module documentation</a>.
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
    """Automatic, prompted and propagated segmentation of Slicer's sample chest CT through a
    running DeSAM service, the network part on the BackgroundWorker as in the GUI.

    Needs the service's URL in SLICERDESAM_TEST_URL (and its token, if any, in
    SLICERDESAM_TEST_TOKEN); without it the tests are skipped with a message saying so.
    """

    TIMEOUT_S = 600.0

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        url = os.environ.get(TEST_URL_VARIABLE)
        if not url:
            self.delayDisplay(f"SlicerDeSAM self-test skipped: set {TEST_URL_VARIABLE} to a running DeSAM "
                              "service's URL (e.g. http://127.0.0.1:8765).")
            return
        for test in (self.test_automatic, self.test_prompted_and_undo, self.test_propagated):
            self.setUp()
            test()

    # ---- helpers --------------------------------------------------------------------------------
    def _session(self):
        url = os.environ.get(TEST_URL_VARIABLE)
        if not url:
            raise unittest.SkipTest(f"set {TEST_URL_VARIABLE} to a running DeSAM service's URL to run this test")
        from SlicerDeSAMLib.Session import Session

        return Session(url, os.environ.get(TEST_TOKEN_VARIABLE) or None)

    def _scene(self):
        import SampleData

        volumeNode = SampleData.downloadSample("CTChest")
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("DeSAM test")
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
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)

    def _centreRas(self, volumeNode, k):
        from SlicerDeSAMLib.SliceViews import SliceViews

        geometry = SliceViews.geometry(volumeNode)
        _, rows, columns = geometry.shape
        return tuple(float(v) for v in geometry.ijk_to_world([(columns - 1) / 2, (rows - 1) / 2, k])[:3])

    # ---- tests ----------------------------------------------------------------------------------
    def test_automatic(self):
        from SlicerDeSAMLib.requests import AutoOptions

        session = self._session()
        volumeNode, segmentationNode, segmentId = self._scene()
        depth = slicer.util.arrayFromVolume(volumeNode).shape[0]
        start, stop = depth // 2 - 2, depth // 2 + 3
        self.delayDisplay(f"Automatic segmentation of slices {start}..{stop - 1}")
        ref = session.volume_ref(volumeNode)
        volumeId = self._run(session, session.resolve, ref)
        job = self._run(session, session.segmentation.request_auto, volumeId,
                        AutoOptions(axis="k", mode="box", start=start, stop=stop),
                        session.segmentation.window_of(volumeNode))
        outcome = self._waitJob(session, job)
        session.segmentation.apply_auto(outcome, segmentationNode, segmentId, volumeNode)
        labels = self._segmentArray(segmentationNode, segmentId, volumeNode)
        self.assertEqual(labels.shape, slicer.util.arrayFromVolume(volumeNode).shape)
        self.assertGreater(int(labels[start:stop].sum()), 0, "the automatic run left the segment empty")
        self.assertEqual(int(labels[:start].sum()) + int(labels[stop:].sum()), 0, "slices outside the range changed")
        review = session.segmentation.review_items(outcome, include_empty=True)
        self.assertEqual(sorted(index for index, _ in review), list(range(start, stop)))
        self.assertEqual([iou for _, iou in review], sorted(iou for _, iou in review))
        session.close()
        self.delayDisplay("Automatic segmentation passed")

    def test_prompted_and_undo(self):
        session = self._session()
        volumeNode, segmentationNode, segmentId = self._scene()
        k = slicer.util.arrayFromVolume(volumeNode).shape[0] // 2
        ras = self._centreRas(volumeNode, k)
        self.delayDisplay(f"Prompt at the centre of slice {k}")
        ref = session.volume_ref(volumeNode)
        volumeId = self._run(session, session.resolve, ref)
        request = session.segmentation.prepare_prompt(volumeNode, segmentationNode, segmentId, [ras], [1], axis="k")
        outcome = self._run(session, session.segmentation.request_prompt, volumeId, request)
        session.segmentation.apply_prompt(outcome, segmentationNode, segmentId, volumeNode)
        labels = self._segmentArray(segmentationNode, segmentId, volumeNode)
        self.assertGreater(int(labels[k].sum()), 0, "the prompt left its slice empty")
        self.assertEqual(int(labels.sum()), int(labels[k].sum()), "a prompt changed another slice")
        session.segmentation.undo_last(segmentationNode)
        labels = self._segmentArray(segmentationNode, segmentId, volumeNode)
        self.assertEqual(int(labels.sum()), 0, "Undo did not restore the empty segment")
        session.close()
        self.delayDisplay("Prompted segmentation and undo passed")

    def test_propagated(self):
        from SlicerDeSAMLib.requests import PropagationOptions

        session = self._session()
        volumeNode, segmentationNode, segmentId = self._scene()
        k = slicer.util.arrayFromVolume(volumeNode).shape[0] // 2
        ref = session.volume_ref(volumeNode)
        volumeId = self._run(session, session.resolve, ref)
        request = session.segmentation.prepare_prompt(volumeNode, segmentationNode, segmentId,
                                                      [self._centreRas(volumeNode, k)], [1], axis="k")
        session.segmentation.apply_prompt(self._run(session, session.segmentation.request_prompt, volumeId, request),
                                          segmentationNode, segmentId, volumeNode)
        self.delayDisplay(f"Propagate from slice {k}")
        propagation = session.segmentation.prepare_propagation(volumeNode, segmentationNode, segmentId, "k", k,
                                                               PropagationOptions(iou_threshold=0.3, min_area=10))
        job = self._run(session, session.segmentation.request_propagation, volumeId, propagation)
        outcome = self._waitJob(session, job)
        session.segmentation.apply_auto(outcome, segmentationNode, segmentId, volumeNode)
        labels = self._segmentArray(segmentationNode, segmentId, volumeNode)
        filled = [index for index in range(labels.shape[0]) if labels[index].any()]
        self.assertIn(k, filled)
        self.assertGreater(len(filled), 1, "propagation reached no neighbour of the seed slice")
        self.assertEqual(filled, list(range(filled[0], filled[-1] + 1)), "propagated slices are not contiguous")
        session.close()
        self.delayDisplay("Propagated segmentation passed")
