"""One encoder pass of the scheduler: a batch of requests through the feature cache.

``run_pass`` encodes the requests' slices (those not cached meanwhile) in one pass, puts
the features in the cache and settles every request's future with its features or its
error. ``between_steps`` goes to the encoder (``DeSAM.encode``): the worker serves clicks
there, and stops a pass nobody waits for by raising ``EncodePreempted`` from it, which
passes through here unhandled (the scheduler re-queues what is still wanted).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..io.slices import slice_view
from ..modeling.desam import DeSAM, ImageFeatures
from .feature_cache import FeatureCache
from .preprocess import prepare_input, to_rgb
from .runtime import Precision
from .scheduler_queue import EncodeRequest

log = logging.getLogger("desam_server.engine.scheduler")

__all__ = ["EncodeFn", "PassOutcome", "encode_slices", "run_pass"]

#: ``model.encode`` or a stand-in: (input B x 3 x S x S, between_steps) -> (embedding, taps).
EncodeFn = Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]


@dataclass
class PassOutcome:
    """What one pass did: slices encoded, requests found cached meanwhile, requests failed,
    seconds in the encoder."""

    encoded: int = 0
    skipped_cached: int = 0
    errors: int = 0
    seconds: float = 0.0


@torch.no_grad()
def encode_slices(model: DeSAM, encode: EncodeFn, precision: Precision, requests: list[EncodeRequest],
                  between_steps: Callable[[], None] | None = None) -> list[ImageFeatures]:
    """One encoder pass over the requests' slices (same volume and axis, so same input
    size), preprocessed exactly as ``SlicePredictor.set_image`` does."""
    inputs, sizes, originals = [], [], []
    for request in requests:
        axis = request.key.axis
        rgb = to_rgb(slice_view(request.volume.array, axis, request.key.slice_index), request.volume.window)
        x, input_size = prepare_input(model, rgb)
        inputs.append(x)
        sizes.append(input_size)
        originals.append(tuple(rgb.shape[:2]))
    with precision.autocast():
        embedding, taps = encode(inputs[0] if len(inputs) == 1 else torch.cat(inputs), between_steps=between_steps)
    return [ImageFeatures(embedding=embedding[b:b + 1].float(), taps=[t[b:b + 1].float() for t in taps],
                          input_size=sizes[b], original_size=originals[b]) for b in range(len(requests))]


def _fail(requests: list[EncodeRequest], exc: BaseException, outcome: PassOutcome) -> None:
    pending = [r for r in requests if not r.future.done()]
    outcome.errors += len(pending)
    if pending:
        first = pending[0]
        log.warning("scheduler: encoding %d slice(s) of volume %s axis %s failed (%s)", len(pending),
                    first.volume.tag, first.key.axis, exc.__class__.__name__)
    for request in pending:
        request.future.set_exception(exc)


def run_pass(requests: list[EncodeRequest], *, model: DeSAM, encode: EncodeFn, precision: Precision,
             cache: FeatureCache, between_steps: Callable[[], None] | None) -> PassOutcome:
    """Encode the requests' slices in one pass through ``cache`` and settle their futures
    (results or errors; see the module docstring for ``between_steps``)."""
    outcome = PassOutcome()
    device = model.device
    todo = []
    for request in requests:
        cached = cache.get(request.key, device) if cache.contains(request.key) else None
        if cached is not None:
            outcome.skipped_cached += 1
            request.future.set_result(cached)
        else:
            todo.append(request)

    def compute() -> list[ImageFeatures]:
        start = time.perf_counter()
        try:
            features = encode_slices(model, encode, precision, todo, between_steps)
        finally:
            outcome.seconds += time.perf_counter() - start
        outcome.encoded += len(features)
        return features

    if len(todo) == 1:
        request = todo[0]
        try:
            request.future.set_result(cache.get_or_compute(request.key, lambda: compute()[0], device))
        except Exception as exc:  # noqa: BLE001 - the request's waiters get the error
            _fail([request], exc, outcome)
    elif todo:
        try:
            computed = compute()
        except Exception as exc:  # noqa: BLE001 - the requests' waiters get the error
            _fail(todo, exc, outcome)
            return outcome
        for request, feats in zip(todo, computed, strict=True):
            try:
                request.future.set_result(cache.get_or_compute(request.key, lambda f=feats: f, device))
            except Exception as exc:  # noqa: BLE001 - the request's waiters get the error
                _fail([request], exc, outcome)
    return outcome
