"""Segmentation: prompted (one slice, answered at once) and automatic (a job)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from ..schemas import AutoRequest, JobInfo, PromptRequest, PromptResponse, PropagateRequest, errors
from .deps import get_service

router = APIRouter(prefix="/segment", tags=["segment"])


@router.post("/prompt", response_model=PromptResponse, responses=errors(400, 401, 404, 409, 422, 429, 503))
def segment_prompt(body: PromptRequest, service=Depends(get_service)) -> PromptResponse:
    """Segment one slice from points and/or a box (and optionally the mask to refine).

    SAM's prompted decoder by default: ``multimask`` gives three masks with predicted IoU
    (``best`` is the highest); a DeSAM decoder name gives one mask from PRIM + PDMM. The
    slice's encoder features come from the cache, or are computed first at the highest
    priority (up to ``click_timeout_s``; then 503). Only this slice's masks come back."""
    mask_input = body.mask_input.model_dump() if body.mask_input else None
    window = body.window.model_dump() if body.window else None
    points = None if body.points is None else [list(p) for p in body.points]
    result = service.prompt(body.volume_id, body.axis, body.index, points=points, labels=body.labels,
                            box=None if body.box is None else list(body.box), mask_input=mask_input,
                            multimask=body.multimask, decoder=body.decoder, window=window)
    return PromptResponse(**result)


@router.post("/auto", status_code=202, response_model=JobInfo, responses=errors(400, 401, 404, 409, 422, 429, 503))
def segment_auto(body: AutoRequest, response: Response, service=Depends(get_service)) -> JobInfo:
    """Start an automatic segmentation of a slice range as a job: DeSAM's whole-box or
    grid-points mode (``box``, ``grid``), one box on every slice (``roi``), or SAM-Mix's
    class-activation-map boxes (``cam-box``: per slice the presence probability and box in
    ``slices``); poll ``GET /jobs/{id}``, fetch ``GET /jobs/{id}/result``. 409 when no
    trained decoder is loaded for the encoder, or a job already runs on this volume and
    axis; 422 when the decoder does not run the mode."""
    window = body.window.model_dump() if body.window else None
    job = service.submit_job(body.volume_id, axis=body.axis, start=body.start, stop=body.stop, mode=body.mode,
                             decoder=body.decoder, window=window, grid_size=body.grid_size,
                             iou_threshold=body.iou_threshold, min_region_area=body.min_region_area, box=body.box,
                             presence_threshold=body.presence_threshold, omega=body.omega,
                             largest_only=body.largest_only)
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobInfo(**job.to_json())


@router.post("/propagate", status_code=202, response_model=JobInfo,
             responses=errors(400, 401, 404, 409, 422, 429, 503))
def segment_propagate(body: PropagateRequest, response: Response, service=Depends(get_service)) -> JobInfo:
    """Carry the seed slice's mask to its neighbours as a job: each next slice is prompted
    by the box around its neighbour's mask, in both directions, until the predicted IoU,
    the area or the area ratio to the previous slice breaks its limit, or the bound
    (``start``, ``stop``). Poll ``GET /jobs/{id}`` (``slices``, ``reached``), fetch the
    slab from the first to the last slice reached with ``GET /jobs/{id}/result``. 404: an
    unknown volume or decoder; 409: a job already runs on this volume and axis."""
    window = body.window.model_dump() if body.window else None
    job = service.submit_propagation(body.volume_id, axis=body.axis, index=body.index, mask=body.mask,
                                     decoder=body.decoder, start=body.start, stop=body.stop, rules=body.rules(),
                                     window=window)
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobInfo(**job.to_json())
