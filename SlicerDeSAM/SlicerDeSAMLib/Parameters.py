"""The module's parameter node: what the user chose, saved with the scene.

Only scene-specific choices live here (nodes, segment, axis, ranges, thresholds, training
options). The service URL and token are per machine and per user: they are kept in
Slicer's settings (``qt.QSettings``, see ``ServerPanel``), never in the scene, so a saved
scene carries no secret.

Needs Slicer 5.4+ (``slicer.parameterNodeWrapper``); imported only inside Slicer.
"""

from typing import Annotated

from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

# Axes of the volume's index grid, the service's names (wire.AXES): slices along K, J, I.
AXES = ("k", "j", "i")
AXIS_TITLES = {"k": "K (slices along the 3rd index axis)", "j": "J (2nd index axis)", "i": "I (1st index axis)"}


@parameterNodeWrapper
class SlicerDeSAMParameters:
    """
    volume - the volume to segment (its display window/level is the intensity window sent).
    segmentation, segmentId - where results are written.
    autoMode - the automatic mode: "box" (whole-slice box) or "grid" (grid of points), DeSAM's;
        "roi" (the box of ``roi`` on every slice it covers); "cam-box" (a SAM-Mix model finds
        the slices and their boxes).
    roi - the markups ROI of the "roi" mode.
    decoder - the service's decoder name ("" = the service's default).
    reviewBy - the Review list's order: "iou" (lowest predicted IoU first) or "presence"
        (a cam-box run: the slice classifier's least certain decisions first).
    axis - slicing axis of the volume's index grid ("k", "j" or "i"), see AXES.
    wholeVolume - segment every slice along the axis; otherwise [firstSlice, lastSlice].
    gridSize - points per side in grid mode.
    iouThreshold - automatic mode: drop a slice's mask under this predicted IoU.
    propagationIou, minArea - propagation stops, per direction, at the first slice whose
        predicted IoU or mask area (pixels) falls under these.
    trainStructure, trainFamily, trainStrategy, trainEpochs - the Train panel's options
        (trainFamily "desam", "dbsam" or "sammix"; DB-SAM trains with boxes only, SAM-Mix with
        the painted slices' boxes and presence for every slice between the first and last
        painted one).
    """

    volume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentId: str = ""
    autoMode: Annotated[str, Choice(["box", "grid", "roi", "cam-box"])] = "box"
    roi: vtkMRMLMarkupsROINode
    decoder: str = ""
    reviewBy: Annotated[str, Choice(["iou", "presence"])] = "iou"
    axis: Annotated[str, Choice(list(AXES))] = "k"
    wholeVolume: bool = True
    firstSlice: Annotated[int, WithinRange(0, 100000)] = 0
    lastSlice: Annotated[int, WithinRange(0, 100000)] = 0
    gridSize: Annotated[int, WithinRange(2, 32)] = 9
    iouThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    propagationIou: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    minArea: Annotated[int, WithinRange(1, 100000)] = 20
    trainStructure: str = ""
    trainFamily: Annotated[str, Choice(["desam", "dbsam", "sammix"])] = "desam"
    trainStrategy: Annotated[str, Choice(["grid", "box"])] = "grid"
    trainEpochs: Annotated[int, WithinRange(1, 1000)] = 20
