"""The module's Slicer self-tests (``SlicerDeSAMTest`` in SlicerDeSAM.py) run on slicer-core
against the tiny-model service on loopback, so their code is exercised without Slicer.

slicer-core lacks Slicer's application-only Python (``slicer.ScriptedLoadableModule``,
``slicer.parameterNodeWrapper``, ``slicer.i18n``, ``slicer.app``, the SampleData module);
for the entry file to import, each is replaced, for the duration of a test only
(``monkeypatch``), by the least that lets it load: the test base is ``unittest.TestCase``,
the parameter-node decorator returns the class, and ``SampleData.downloadSample`` gives a
small oblique phantom volume in the test's scene instead of downloading MRHead. The logic,
the worker, MRML and the service are the real ones. The random-weights model predicts low
IoUs, so propagation's stop thresholds are lowered for it (a subclass of the test)."""

from __future__ import annotations

import importlib
import sys
import types
import unittest

import pytest

pytest.importorskip("slicer.util")
pytest.importorskip("SlicerDeSAMLib.SegmentationLogic")
pytest.importorskip("SlicerDeSAMLib.BackgroundWorker")
slicer_helpers = pytest.importorskip("slicer_helpers")
service_helpers = pytest.importorskip("service_helpers")

import slicer  # noqa: E402

IJK_TO_RAS = slicer_helpers.oblique_ijk_to_ras((0.9, 0.9, 2.0), (0.0, 6.0, -10.0), (-20.0, 15.0, 30.0))
TESTS = ("test_automatic", "test_prompted_and_undo", "test_propagated")


class _Quiet(unittest.TestCase):
    def delayDisplay(self, message, msec=None):
        print(message)


def _application_only_modules(monkeypatch, scene) -> None:
    base = types.ModuleType("slicer.ScriptedLoadableModule")
    base.ScriptedLoadableModule = base.ScriptedLoadableModuleLogic = base.ScriptedLoadableModuleWidget = object
    base.ScriptedLoadableModuleTest = _Quiet
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    sample_data = types.ModuleType("SampleData")
    sample_data.downloadSample = lambda name: slicer_helpers.add_volume(
        scene, service_helpers.phantom_volume(k=8, h=48, w=64, seed=3), IJK_TO_RAS, name=name, window=(40.0, 400.0))
    for name, module in (("slicer.ScriptedLoadableModule", base), ("slicer.i18n", i18n),
                         ("slicer.parameterNodeWrapper", wrapper), ("SampleData", sample_data)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: None,
                                                             connect=lambda *args: None), raising=False)


@pytest.fixture()
def entry(monkeypatch):
    """(SlicerDeSAM entry module, scene) loaded with the stand-ins; the modules its import
    adds (made with them) are removed again afterwards."""
    added = ("SlicerDeSAM", "SlicerDeSAMLib.Parameters")
    saved = {name: sys.modules.pop(name) for name in added if name in sys.modules}
    try:
        with slicer_helpers.core_scene() as core:
            _application_only_modules(monkeypatch, core.scene)
            yield importlib.import_module("SlicerDeSAM"), core.scene
    finally:
        for name in added:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with slicer_helpers.tiny_service(tmp_path_factory.mktemp("selftest")) as address:
        yield address


def _run(test_case: unittest.TestCase) -> unittest.TestResult:
    result = unittest.TestResult()
    test_case.run(result)
    return result


@pytest.mark.parametrize("name", TESTS)
def test_self_test_passes_against_the_service(monkeypatch, entry, url, name):
    module, _ = entry
    monkeypatch.setenv(module.TEST_URL_VARIABLE, url)

    class RandomWeights(module.SlicerDeSAMTest):
        PROPAGATION_IOU = 0.0
        PROPAGATION_MIN_AREA = 1

        def setUp(self):  # the scene is the fixture's
            pass

    result = _run(RandomWeights(name))
    problems = [text for _, text in result.errors + result.failures]
    assert not problems, problems[0]
    assert not result.skipped, result.skipped
    assert result.testsRun == 1


def test_self_tests_skip_with_a_message_without_a_service(monkeypatch, entry):
    module, _ = entry
    monkeypatch.delenv(module.TEST_URL_VARIABLE, raising=False)
    for name in TESTS:
        result = _run(module.SlicerDeSAMTest(name))
        assert len(result.skipped) == 1 and not result.errors and not result.failures
        assert "set SLICERDESAM_TEST_URL to a running DeSAM service's URL" in result.skipped[0][1]
