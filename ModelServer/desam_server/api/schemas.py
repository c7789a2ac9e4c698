"""Request and response bodies of the HTTP API (they make the OpenAPI schema).

Frames: a slice along axis ``k`` is J x I (rows j, columns i), along ``j`` K x I, along
``i`` K x J (``wire.mask_slice_shape``). Points and boxes are in that slice's pixel frame:
x = column, y = row, pixel centres at integer + 0.5 as in SAM (x in [0, W], y in [0, H]).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..training.config import PRECISIONS, TrainConfig
from ..training.run import TrainingOptions
from ..training.variants import AUGMENTATIONS
from .jobs import JobState
from .propagation import StopRules
from .training_jobs import TrainingState

VolumeId = str
Axis = Literal["k", "j", "i"]
ID_PATTERN = r"^[0-9a-f]{64}$"

# The smallest valid wire volume payload (docs/WIRE_FORMAT.md), the upload body's minLength.
# The 12-byte prefix; the header with every required field at its shortest (compact JSON
# without padding, which receivers must not rely on; dtype "int8"; shape, spacing, origin,
# the identity direction, raw_length and encoded_length as one-digit integers) is 301 bytes
# plus the digits of crc32; the body holds the N voxels of an uncompressed 1 x 1 x N int8
# volume (a zlib stream is longer). The smallest CRC-32 of N bytes has 7 digits for N = 1, 5
# for N = 2, 2 for N = 3 (92: voxels 126, 217, 209) and 1 for N = 4 (0), so N plus its digits
# is least, 5, at N = 3 or 4: 12 + 301 + 5 bytes. (Test: test_api.py uploads that payload.)
MIN_VOLUME_PAYLOAD_BYTES = 318


def _holds_a_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, list | tuple) and any(map(_holds_a_bool, value)))


class Strict(BaseModel):
    """A request body: no unknown fields, no infinities or NaN, and no true or false where
    a number (or a list of numbers) is expected (pydantic would read them as 1 and 0).
    Nested request models check their own fields."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                if field.annotation not in (bool, bool | None) and name in data and _holds_a_bool(data[name]):
                    raise ValueError(f"{name}: true and false are not numbers")
        return data


class Window(Strict):
    """Intensity window mapped onto 0..255 before the encoder (default: CT soft tissue
    W400/L40 for Hounsfield-like volumes, else the 0.5-99.5 percentiles)."""

    center: float
    width: float = Field(gt=0)


# The window of a query string: ``window=<center>&window=<width>`` (OpenAPI's default form
# style for an array), one parameter so that it cannot come half given.
WindowQuery = tuple[Annotated[float, Field(allow_inf_nan=False)], Annotated[float, Field(gt=0, allow_inf_nan=False)]]


_ENCODER_OF = ("whose encoder's features to prepare: a DB-SAM or SAM-Mix model's name encodes with its adapted "
               "encoder; default (or 'sam', or a DeSAM decoder): the service's encoder")


class ViewRequest(Strict):
    axis: Axis
    index: int = Field(ge=0, le=2**31 - 1)
    window: Window | None = None
    decoder: str | None = Field(None, max_length=64, description="the model " + _ENCODER_OF)


class PrecomputeRequest(Strict):
    axis: Axis
    window: Window | None = None
    cancel: bool = Field(False, description="withdraw queued background work instead")
    decoder: str | None = Field(None, max_length=64, description="the model " + _ENCODER_OF)


class Progress(BaseModel):
    total: int
    cached: int
    queued: int
    running: int


class VolumeInfo(BaseModel):
    volume_id: str
    shape: list[int]
    dtype: str
    spacing: list[float]
    origin: list[float]
    direction: list[float] = Field(description="3x3 LPS direction matrix, row-major")
    on_disk: bool


class VolumeList(BaseModel):
    volumes: list[str]


# ---- labels (training data): api/label_store.py, routers/labels.py ---------------------------------

class LabelInfo(BaseModel):
    """A stored label: a structure's bool mask on the whole grid of its volume."""

    volume_id: str
    structure: str
    shape: list[int] = Field(description="K x J x I, the volume's shape")
    voxels: int = Field(description="voxels in the structure (at least 1)")
    slices: dict[Axis, int] = Field(description="per axis, how many slices contain the structure")
    extent: dict[Axis, Annotated[list[int], Field(min_length=2, max_length=2)]] = Field(
        description="per axis, the first and last slice containing it")
    bytes: int = Field(description="size of the stored wire mask payload")


class LabelList(BaseModel):
    volume_id: str
    volume_available: bool = Field(description="false: the volume left the service (disk budget) while its labels "
                                               "stayed; upload it again to use them")
    labels: list[LabelInfo]


class MaskInput(Strict):
    """A previous answer's mask to refine: its ``logits_id``, or the slice's current binary
    mask as a base64 wire mask payload (one slice, offset = index); at least one of them
    (``logits_id`` wins when both come)."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["logits_id"], "properties": {"logits_id": {"type": "string"}}},
        {"required": ["mask"], "properties": {"mask": {"type": "string"}}}]})

    logits_id: str | None = Field(None, min_length=1, max_length=64)
    mask: str | None = Field(None, min_length=1, max_length=64 << 20)

    @model_validator(mode="after")
    def _one_of(self) -> MaskInput:
        if self.logits_id is None and self.mask is None:
            raise ValueError("mask_input needs logits_id or mask")
        return self


Coordinate = Annotated[float, Field(ge=0)]
Edge = Annotated[float, Field(gt=0)]


class PromptRequest(Strict):
    """At least one prompt: points (each with its label), a box, or a mask to refine.
    The schema states every rule but one: ``labels`` has as many items as ``points``
    (JSON Schema cannot compare two lengths; 422 otherwise). Values that depend on the
    volume (index, points and box inside the slice) or on the service (``max_points``
    is the schema's maxItems, taken from the settings) are checked by the service."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"description": "points and labels come together: both lists, or both absent (or null)",
         "anyOf": [{"required": ["points", "labels"],
                    "properties": {"points": {"type": "array"}, "labels": {"type": "array"}}},
                   {"properties": {"points": {"type": "null"}, "labels": {"type": "null"}}}]},
        {"description": "at least one prompt: points, a box or mask_input",
         "anyOf": [{"required": ["points"], "properties": {"points": {"type": "array"}}},
                   {"required": ["box"], "properties": {"box": {"type": "array"}}},
                   {"required": ["mask_input"], "properties": {"mask_input": {"type": "object"}}}]},
        {"description": "mask_input only with SAM's decoder",
         "anyOf": [{"properties": {"mask_input": {"type": "null"}}},
                   {"properties": {"decoder": {"const": "sam"}}}]}]})

    volume_id: str = Field(pattern=ID_PATTERN)
    axis: Axis
    index: int = Field(ge=0, le=2**31 - 1)
    points: Annotated[list[tuple[Coordinate, Coordinate]], Field(min_length=1)] | None = Field(
        None, description="(x, y) pixel coordinates in the slice, at most max_points")
    labels: Annotated[list[Literal[0, 1]], Field(min_length=1)] | None = Field(
        None, description="1 foreground, 0 background, one per point")
    box: tuple[Coordinate, Coordinate, Edge, Edge] | None = Field(
        None, description="x0, y0, x1, y1 in slice pixels (x1 > x0, y1 > y0)")
    mask_input: MaskInput | None = None
    multimask: bool = Field(True, description="three masks with IoU scores (SAM's decoder), else one")
    decoder: str = Field("sam", max_length=64, description="'sam' (SAM's prompted decoder) or a DeSAM decoder name")
    window: Window | None = None

    @model_validator(mode="after")
    def _prompt_rules(self) -> PromptRequest:
        """The rules of ``model_config``'s schema, and the one it cannot state."""
        if (self.points is None) != (self.labels is None) or (
                self.points is not None and len(self.points) != len(self.labels)):
            raise ValueError("give one label (1 foreground, 0 background) per point: points and labels must come "
                             "together and have the same length")
        if self.points is None and self.box is None and self.mask_input is None:
            raise ValueError("give at least one prompt: points, a box or mask_input")
        # mask_input with a DeSAM decoder is refused by the service (the decoder's family decides)
        return self


class MaskAnswer(BaseModel):
    mask: str = Field(description="base64 of a wire mask payload (bit-packed, zlib) of this slice")
    iou: float
    area: int
    logits_id: str | None


class PromptTiming(BaseModel):
    features_s: float
    cached: bool
    decode_wait_s: float
    decode_s: float
    total_s: float


class PromptResponse(BaseModel):
    volume_id: str
    axis: Axis
    index: int
    shape: list[int]
    decoder: str
    masks: list[MaskAnswer]
    best: int
    timing: PromptTiming


class AutoRequest(Strict):
    volume_id: str = Field(pattern=ID_PATTERN)
    axis: Axis = "k"
    start: int | None = Field(None, ge=0, le=2**31 - 1, description="first slice (default 0)")
    stop: int | None = Field(None, ge=1, le=2**31, description="one past the last slice (default: all)")
    mode: Literal["box", "grid", "roi", "cam-box"] = Field(
        "box", description="box / grid: DeSAM's whole-box and grid-points modes (a DeSAM decoder); roi: every slice "
                           "prompted by 'box' (SAM's decoder 'sam', a DeSAM decoder or a DB-SAM / SAM-Mix model); "
                           "cam-box: a SAM-Mix model finds the slices holding the structure and their boxes")
    decoder: str | None = Field(None, max_length=64,
                                description="decoder name (box / grid: default the only DeSAM decoder loaded; roi: "
                                            "default 'sam')")
    window: Window | None = None
    grid_size: int = Field(9, ge=1, le=32)
    iou_threshold: float = Field(0.5, ge=0, le=1)
    min_region_area: int = Field(64, ge=0, le=1 << 24)
    box: Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=4, max_length=4)] | None = \
        Field(None, description="roi: x0, y0, x1, y1 in slice pixels, the same on every slice")
    presence_threshold: float | None = Field(
        None, ge=0, le=1, description="cam-box: presence probability from which a slice is segmented (default: the "
                                      "SAM-Mix model's own, else 0.5)")
    omega: float | None = Field(None, gt=0, le=1, description="cam-box: the activation map's threshold, a fraction of "
                                                               "its maximum (default: the model's own, else 0.5)")
    largest_only: bool | None = Field(None, description="cam-box: prompt with the largest activated region's box only "
                                                        "(else with every region's, masks united; default: the "
                                                        "model's own, else true)")


_RULES = StopRules()


class PropagateRequest(Strict):
    """Carry the seed slice's mask to its neighbours in both directions (``propagation``)."""

    volume_id: str = Field(pattern=ID_PATTERN)
    axis: Axis = "k"
    index: int = Field(ge=0, le=2**31 - 1, description="the seed slice")
    mask: str = Field(min_length=1, max_length=64 << 20,
                      description="base64 wire mask payload of the seed slice (one slice, offset = index; not "
                                  "empty), as mask_input.mask of /segment/prompt")
    decoder: str = Field("sam", max_length=64,
                         description="'sam' (SAM's prompted decoder) or a structure decoder's name; each slice is "
                                     "prompted by the box around its neighbour's mask")
    start: int | None = Field(None, ge=0, le=2**31 - 1, description="first slice it may reach (default 0)")
    stop: int | None = Field(None, ge=1, le=2**31,
                             description="one past the last slice it may reach (default: all)")
    iou_threshold: float = Field(_RULES.iou_threshold, ge=0, le=1,
                                 description="a direction stops at a slice whose predicted IoU is lower")
    min_area: int = Field(_RULES.min_area, ge=1, le=1 << 30, description="... whose mask has fewer pixels")
    min_area_ratio: float = Field(_RULES.min_area_ratio, ge=0, le=1,
                                  description="... whose mask's area / the previous slice's is lower")
    max_area_ratio: float = Field(_RULES.max_area_ratio, ge=1, le=1e6,
                                  description="... whose mask's area / the previous slice's is higher (a leak)")
    window: Window | None = None

    def rules(self) -> StopRules:
        return StopRules(iou_threshold=self.iou_threshold, min_area=self.min_area,
                         min_area_ratio=self.min_area_ratio, max_area_ratio=self.max_area_ratio)


class JobProgress(BaseModel):
    done: int
    total: int
    fraction: float


class SliceScore(BaseModel):
    index: int
    iou: float | None = Field(description="the decoder's predicted IoU of the slice's mask; null where there is "
                                          "none (an empty automatic answer; a propagation's seed slice)")
    area: int = Field(description="pixels in the slice's mask")
    presence: float | None = Field(None, description="cam-box: the slice classifier's probability that the slice "
                                                     "holds the structure; null in other modes")
    box: list[float] | None = Field(None, description="cam-box: the box (x0, y0, x1, y1, slice pixels) from the "
                                                      "activation map that prompted SAM; null when absent")


class JobInfo(BaseModel):
    """A segmentation job. kind 'auto' (``/segment/auto``) or 'propagate'
    (``/segment/propagate``); slices: the slices finished so far, by index; reached: a
    propagation's first and last slice (its result's range), once it has succeeded."""

    id: str
    kind: Literal["auto", "propagate"]
    state: JobState
    spec: dict[str, Any]
    progress: JobProgress
    slices_with_mask: int
    created: float
    started: float | None
    finished: float | None
    elapsed_s: float | None
    error: str | None
    result_available: bool
    cancel_requested: bool
    slices: list[SliceScore]
    reached: Annotated[list[int], Field(min_length=2, max_length=2)] | None


class JobList(BaseModel):
    jobs: list[JobInfo]


_CONFIG, _OPTIONS = TrainConfig(), TrainingOptions()


class TrainConfigBody(Strict):
    """The optimisation side of a training run (``training.TrainConfig``; defaults as there)."""

    family: Literal["desam", "dbsam", "sammix"] = Field(
        _CONFIG.family, description="the model family: desam (PRIM + PDMM on cached features), dbsam (DB-SAM's "
                                    "encoder adapters and SAM's mask decoder, the encoder in the loop: box strategy) "
                                    "or sammix (SAM-Mix: a slice classifier whose CAM box prompts SAM with LoRA; "
                                    "presence labels for every slice, segmentations for a few: see the cases' "
                                    "segmented_slices)")
    strategy: Literal["grid", "box", "gt_box", "cam_box"] = Field(
        _CONFIG.strategy, description="grid points or whole box (DeSAM); box for DB-SAM (a jittered box per slice); "
                                      "gt_box or cam_box for SAM-Mix (the box SAM trains on: the label's, jittered, "
                                      "or the classifier's CAM box)")
    family_options: dict[str, Any] = Field(
        default_factory=dict, max_length=64,
        description="the family's own options (SAM-Mix: classifier_depth, rank, focal_alpha, segmented_repeat, "
                    "threshold, omega, ... - docs/SAMMIX.md); DeSAM and DB-SAM take none")
    epochs: int = Field(_CONFIG.epochs, ge=1, le=100_000)
    batch_size: int = Field(_CONFIG.batch_size, ge=1, le=4096, description="slices per optimizer step")
    learning_rate: float = Field(_CONFIG.learning_rate, gt=0, le=1)
    poly_power: float = Field(_CONFIG.poly_power, ge=0, le=10, description="polynomial decay per epoch")
    seed: int = Field(_CONFIG.seed, ge=0, le=2**31 - 1, description="split, slice choice, order and prompts")
    precision: Literal[PRECISIONS] = Field(_CONFIG.precision, description="of the decoders' forward and backward")
    validation_grid_size: int = Field(_CONFIG.validation_grid_size, ge=1, le=32)
    min_region_area: int = Field(_CONFIG.min_region_area, ge=0, le=1 << 24)
    iou_threshold: float = Field(_CONFIG.iou_threshold, ge=0, le=1)


class TrainingOptionsBody(Strict):
    """The data side of a training run (``training.TrainingOptions``; defaults as there):
    the axis slices are taken along, the validation split (a fraction of the volumes, or
    ``slabs`` slabs with ``gap`` guard slices for a single-volume source), empty slices per
    slice with the structure, every how many slices to train on, the image-changing
    augmentations; ``config``: the rest."""

    axis: Axis = _OPTIONS.axis
    validation_fraction: float = Field(_OPTIONS.validation_fraction, gt=0, lt=1)
    slabs: int = Field(_OPTIONS.slabs, ge=1, le=64)
    gap: int | None = Field(_OPTIONS.gap, ge=0, le=2**31 - 1, description="default: the slab length")
    empty_ratio: float = Field(_OPTIONS.empty_ratio, ge=0, le=1000)
    slice_step: int = Field(_OPTIONS.slice_step, ge=1, le=1024, description="train on every n-th slice")
    augmentations: list[Literal[tuple(AUGMENTATIONS)]] = Field(list(_OPTIONS.augmentations), max_length=16)
    config: TrainConfigBody = Field(default_factory=TrainConfigBody)


class TrainingCaseRef(Strict):
    """A training case. SAM-Mix cases also say which slices (along the run's ``axis``) hold
    a segmentation that trains SAM (``segmented_slices``), and which hold the structure
    (``present_slices``; default: the slices where the label volume is not empty); other
    families take neither."""

    volume_id: str = Field(pattern=ID_PATTERN, description="an uploaded volume")
    structure: str = Field(min_length=1, max_length=128, description="the name its label volume is stored under")
    segmented_slices: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, max_length=65_536,
        description="sammix (required there): the slice indices whose label trains SAM; the label elsewhere is "
                    "not used for segmentation")
    present_slices: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=65_536,
        description="sammix: the slice indices holding the structure (every other slice is labelled absent); "
                    "default: the slices where the label volume is not empty")


class TrainingRequest(Strict):
    structure: str = Field(min_length=1, max_length=128, pattern=r"\S",
                           description="what the decoder is trained to segment")
    cases: list[TrainingCaseRef] = Field(min_length=1, max_length=10_000)
    options: TrainingOptionsBody = Field(default_factory=TrainingOptionsBody)


class TrainingProgress(BaseModel):
    done: int
    total: int


class TrainingJobInfo(BaseModel):
    """A training job's status: state, phase ('setup', 'precompute' or 'train'), the
    latest step's loss and the latest epoch's validation Dice, the best so far, the
    estimated seconds left; ``reason`` for a failed or cancelled job."""

    id: str
    state: TrainingState
    phase: Literal["setup", "precompute", "train"] | None
    structure: str
    cases: int
    device: str
    options: dict[str, Any]
    created: float
    started: float | None
    ended: float | None
    elapsed_s: float | None
    data: dict[str, Any] | None = Field(description="counts of the split and the slices (the 'data' event)")
    precompute: TrainingProgress | None
    epoch: int
    epochs: int | None
    step: int
    steps: int | None
    loss: float | None
    validation_dice: float | None
    best_epoch: int | None
    best_validation_dice: float | None
    seconds_left: float | None
    reason: str | None
    cancel_requested: bool
    installed: Any = Field(description="what the service did with the finished job's decoder")


class TrainingJobList(BaseModel):
    jobs: list[TrainingJobInfo]


class TrainingLog(BaseModel):
    lines: list[str]


class TrainingMetrics(BaseModel):
    epochs: list[dict[str, Any]] = Field(description="one entry per finished epoch: epoch, loss, validation_dice, "
                                         "validation_dice_per_volume, learning_rate, timings")


class DecoderInfo(BaseModel):
    """A structure model the service serves (a DeSAM decoder, or a DB-SAM / SAM-Mix model).
    source: 'file' (given at start) or 'registry' (the active version of the structure
    ``name``, ``version``)."""

    name: str
    family: Literal["desam", "dbsam", "sammix"] = Field(
        description="desam: PRIM + PDMM on the service's encoder (modes box, grid, roi); dbsam: DB-SAM's adapted "
                    "encoder and mask decoder, prompted (points, boxes; mode roi); sammix: SAM-Mix's LoRA-adapted "
                    "SAM and slice classifier (prompts; modes roi, cam-box)")
    structure: str | None
    encoder: str | None
    format_version: int | None
    sha256: str
    source: Literal["file", "registry"]
    version: str | None
    training: dict[str, Any]


class DecoderList(BaseModel):
    decoders: list[DecoderInfo]


# Decoder registry (``decoder_registry``): structure names are decoder names; versions v1, v2, ...
STRUCTURE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"   # decoder_registry.NAME_RE
VERSION_PATTERN = r"^v[1-9][0-9]{0,8}$"                      # decoder_registry.VERSION_RE


class DecoderVersion(BaseModel):
    """A registered version. created: Unix time of its registration; sha256 and size_bytes:
    of its decoder file; encoder and its weights' hash: what it was trained for; curve:
    whether it has a training-curve PNG."""

    structure: str
    version: str
    created: float
    sha256: str
    size_bytes: int
    encoder: str | None
    encoder_weights_sha256: str | None
    curve: bool
    family: Literal["desam", "dbsam", "sammix"] = Field("desam", description="the model family the file serves")


class RegistryStructure(BaseModel):
    """A structure in the registry: its versions (oldest first), the active one, the earlier
    active ones a rollback returns to (most recent last); served: the version this service
    serves under the structure's name (None: none), problem: why it does not serve the
    active version (another encoder, a decoder file of the same name)."""

    structure: str
    active: str | None
    history: list[str]
    versions: list[DecoderVersion]
    served: str | None
    problem: str | None


class RegistryList(BaseModel):
    structures: list[RegistryStructure]


class DecoderRecord(DecoderVersion):
    """A version with its decoder file's metadata: encoder, taps, input convention,
    structure and the trainer's ``training`` record (counts and metrics, no patient data)."""

    active: bool
    metadata: dict[str, Any]


class ActivateRequest(Strict):
    version: str = Field(pattern=VERSION_PATTERN, description="the version to serve, e.g. 'v2'")


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class ErrorBody(BaseModel):
    detail: Any


ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in (
    (400, "malformed request"), (401, "missing or wrong API token"),
    (404, "unknown volume, label, decoder, decoder version or job"),
    (409, "conflicts with the service's state"), (413, "payload too large"), (422, "invalid values"),
    (429, "too busy, retry after Retry-After seconds"), (503, "encoder busy or shutting down; see Retry-After"))}


def errors(*codes: int) -> dict:
    """The ``responses=`` entry of a route for these status codes."""
    return {code: ERRORS[code] for code in codes}


# OpenAPI links: which operations take the id an answer carries (schemathesis's stateful phase
# and client generators follow them). Source operation -> link name -> target operation and
# where the id goes; added to every 2xx answer of the source that has a body.
_VOLUME_ID = "$response.body#/volume_id"
_JOB_ID = "$response.body#/id"
_LABEL = "/volumes/{volume_id}/labels/{structure}"
_LABEL_PARAMETERS = {"volume_id": _VOLUME_ID, "structure": "$response.body#/structure"}
_STRUCTURE = "$response.body#/structure"
_ACTIVE = "$response.body#/active"
_TRAINING_ID = {"parameters": {"job_id": _JOB_ID}}
_JOB_LINKS = {
    "GetJob": ("get", "/jobs/{job_id}", {"parameters": {"job_id": _JOB_ID}}),
    "CancelJob": ("post", "/jobs/{job_id}/cancel", {"parameters": {"job_id": _JOB_ID}}),
    "GetJobResult": ("get", "/jobs/{job_id}/result", {"parameters": {"job_id": _JOB_ID}}),
}
LINKS: dict[tuple[str, str], dict[str, tuple[str, str, dict]]] = {
    ("post", "/volumes"): {
        "GetVolume": ("get", "/volumes/{volume_id}", {"parameters": {"volume_id": _VOLUME_ID}}),
        "DeleteVolume": ("delete", "/volumes/{volume_id}", {"parameters": {"volume_id": _VOLUME_ID}}),
        "SetView": ("put", "/volumes/{volume_id}/view", {"parameters": {"volume_id": _VOLUME_ID}}),
        "Precompute": ("post", "/volumes/{volume_id}/precompute", {"parameters": {"volume_id": _VOLUME_ID}}),
        "Progress": ("get", "/volumes/{volume_id}/progress", {"parameters": {"volume_id": _VOLUME_ID}}),
        "SegmentPrompt": ("post", "/segment/prompt", {"requestBody": {"volume_id": _VOLUME_ID}}),
        "SegmentAuto": ("post", "/segment/auto", {"requestBody": {"volume_id": _VOLUME_ID}}),
        "SegmentPropagate": ("post", "/segment/propagate", {"requestBody": {"volume_id": _VOLUME_ID}}),
        "ListLabels": ("get", "/volumes/{volume_id}/labels", {"parameters": {"volume_id": _VOLUME_ID}}),
        "PutLabel": ("put", _LABEL, {"parameters": {"volume_id": _VOLUME_ID}}),
    },
    ("put", _LABEL): {
        "GetLabel": ("get", _LABEL, {"parameters": _LABEL_PARAMETERS}),
        "DeleteLabel": ("delete", _LABEL, {"parameters": _LABEL_PARAMETERS}),
    },
    ("post", "/segment/auto"): _JOB_LINKS,
    ("post", "/segment/propagate"): _JOB_LINKS,
    ("get", "/registry"): {
        "GetDecoderStructure": ("get", "/registry/{structure}",
                                {"parameters": {"structure": "$response.body#/structures/0/structure"}}),
    },
    ("get", "/registry/{structure}"): {
        "GetDecoderVersion": ("get", "/registry/{structure}/versions/{version}",
                              {"parameters": {"structure": _STRUCTURE, "version": _ACTIVE}}),
        "ActivateDecoderVersion": ("put", "/registry/{structure}/active",
                                   {"parameters": {"structure": _STRUCTURE},
                                    "requestBody": {"version": "$response.body#/versions/0/version"}}),
        "RollbackDecoder": ("post", "/registry/{structure}/rollback", {"parameters": {"structure": _STRUCTURE}}),
    },
    ("post", "/training"): {
        "GetTrainingJob": ("get", "/training/{job_id}", _TRAINING_ID),
        "GetTrainingLog": ("get", "/training/{job_id}/log", _TRAINING_ID),
        "GetTrainingMetrics": ("get", "/training/{job_id}/metrics", _TRAINING_ID),
        "TrainingEvents": ("get", "/training/{job_id}/events", _TRAINING_ID),
        "CancelTrainingJob": ("post", "/training/{job_id}/cancel", _TRAINING_ID),
    },
}


def complete_openapi(schema: dict, *, max_points: int) -> dict:
    """Add to FastAPI's schema, in place, what the models cannot state: the ``LINKS`` (by
    the targets' operationIds) and the limit the settings set (``max_points``)."""
    paths = schema["paths"]
    for (method, path), links in LINKS.items():
        answers = {status: answer for status, answer in paths[path][method]["responses"].items()
                   if status.startswith("2") and "content" in answer}
        assert answers, f"{method.upper()} {path} has no 2xx answer with a body to link from"
        for answer in answers.values():
            answer["links"] = {name: {"operationId": paths[target][target_method]["operationId"], **how}
                               for name, (target_method, target, how) in links.items()}
    prompt = schema["components"]["schemas"]["PromptRequest"]["properties"]
    for name in ("points", "labels"):
        lists = [branch for branch in prompt[name]["anyOf"] if branch.get("type") == "array"]
        assert len(lists) == 1, f"PromptRequest.{name} is not one list or null"
        lists[0]["maxItems"] = max_points
    return schema
