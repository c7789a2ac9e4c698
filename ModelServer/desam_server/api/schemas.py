"""Request and response bodies of the HTTP API (they make the OpenAPI schema).

Frames: a slice along axis ``k`` is J x I (rows j, columns i), along ``j`` K x I, along
``i`` K x J (``wire.mask_slice_shape``). Points and boxes are in that slice's pixel frame:
x = column, y = row, pixel centres at integer + 0.5 as in SAM (x in [0, W], y in [0, H]).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

VolumeId = str
Axis = Literal["k", "j", "i"]
ID_PATTERN = r"^[0-9a-f]{64}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Window(Strict):
    """Intensity window mapped onto 0..255 before the encoder (default: CT soft tissue
    W400/L40 for Hounsfield-like volumes, else the 0.5-99.5 percentiles)."""

    center: float
    width: float = Field(gt=0)


class ViewRequest(Strict):
    axis: Axis
    index: int = Field(ge=0, le=2**31 - 1)
    window: Window | None = None


class PrecomputeRequest(Strict):
    axis: Axis
    window: Window | None = None
    cancel: bool = Field(False, description="withdraw queued background work instead")


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


class MaskInput(Strict):
    """A previous answer's mask to refine: its ``logits_id``, or the slice's current binary
    mask as a base64 wire mask payload (one slice, offset = index)."""

    logits_id: str | None = Field(None, max_length=64)
    mask: str | None = Field(None, max_length=64 << 20)


class PromptRequest(Strict):
    volume_id: str = Field(pattern=ID_PATTERN)
    axis: Axis
    index: int = Field(ge=0, le=2**31 - 1)
    points: list[tuple[float, float]] | None = Field(None, description="(x, y) pixel coordinates in the slice")
    labels: list[Literal[0, 1]] | None = Field(None, description="1 foreground, 0 background, one per point")
    box: tuple[float, float, float, float] | None = Field(None, description="x0, y0, x1, y1 in slice pixels")
    mask_input: MaskInput | None = None
    multimask: bool = Field(True, description="three masks with IoU scores (SAM's decoder), else one")
    decoder: str = Field("sam", max_length=64, description="'sam' (SAM's prompted decoder) or a DeSAM decoder name")
    window: Window | None = None


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
    mode: Literal["box", "grid"] = "box"
    decoder: str | None = Field(None, max_length=64, description="decoder name (default: the only one loaded)")
    window: Window | None = None
    grid_size: int = Field(9, ge=1, le=32)
    iou_threshold: float = Field(0.5, ge=0, le=1)
    min_region_area: int = Field(64, ge=0, le=1 << 24)


class JobProgress(BaseModel):
    done: int
    total: int
    fraction: float


class JobInfo(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
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


class JobList(BaseModel):
    jobs: list[JobInfo]


class DecoderInfo(BaseModel):
    name: str
    structure: str | None
    encoder: str | None
    format_version: int | None
    sha256: str
    training: dict[str, Any]


class DecoderList(BaseModel):
    decoders: list[DecoderInfo]


class Health(BaseModel):
    status: Literal["ok"]
    version: str


class ErrorBody(BaseModel):
    detail: Any


ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in (
    (400, "malformed request"), (401, "missing or wrong API token"), (404, "unknown volume, decoder or job"),
    (409, "conflicts with the service's state"), (413, "payload too large"), (422, "invalid values"),
    (429, "too busy, retry after Retry-After seconds"), (503, "encoder busy or shutting down; see Retry-After"))}


def errors(*codes: int) -> dict:
    """The ``responses=`` entry of a route for these status codes."""
    return {code: ERRORS[code] for code in codes}
