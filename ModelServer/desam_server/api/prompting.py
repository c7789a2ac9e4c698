"""One prompted segmentation of one slice: checks, the decoder pass, the reply.

The reply carries every mask as a wire mask payload (bit-packed, compressed, with the
slice's axis and index as its offset; base64 in JSON), the predicted IoU of each, and a
``logits_id`` per mask: the service keeps the low-resolution logits of recent answers,
so the next click on the same slice can refine a mask by naming it (SAM's mask input)
instead of sending logits back. A client can also send the current binary mask of the
slice (e.g. after Segment Editor edits); it is turned into mask-input logits here.
"""

from __future__ import annotations

import base64
import collections
import threading
import uuid
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import wire
from ..modeling.desam import DeSAM, ImageFeatures
from .errors import NotFound, Unprocessable

__all__ = ["LogitsStore", "mask_to_logits", "mask_payload", "MASK_LOGIT"]

#: Logit given to inside (+) and outside (-) pixels of a binary mask used as mask input.
MASK_LOGIT = 10.0


@dataclass(frozen=True)
class _Logits:
    volume_id: str
    axis: str
    index: int
    logits: np.ndarray          # 1 x L x L float32


class LogitsStore:
    """Low-res logits of recent prompted answers, least recently used out."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: collections.OrderedDict[str, _Logits] = collections.OrderedDict()

    def put(self, volume_id: str, axis: str, index: int, logits: np.ndarray) -> str:
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = _Logits(volume_id, axis, index, np.ascontiguousarray(logits[None], np.float32))
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return key

    def get(self, key: str, volume_id: str, axis: str, index: int) -> np.ndarray:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
        if item is None:
            raise NotFound(f"unknown logits_id {key[:32]!r}: it expired (the service keeps the last "
                           f"{self.capacity}); send the mask itself as mask_input.mask instead")
        if (item.volume_id, item.axis, item.index) != (volume_id, axis, index):
            raise Unprocessable("logits_id belongs to another slice: mask input must come from the same slice")
        return item.logits

    def discard_volume(self, volume_id: str) -> None:
        with self._lock:
            for key in [k for k, v in self._items.items() if v.volume_id == volume_id]:
                del self._items[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def decode_slice_mask(encoded: str, volume_shape, axis: str, index: int, *,
                      field: str = "mask_input.mask") -> np.ndarray:
    """A base64 wire mask of exactly this slice -> H x W bool (``field``: its name in the
    request, for the messages)."""
    try:
        data = base64.b64decode(encoded, validate=True)
    except (ValueError, TypeError):
        raise Unprocessable(f"{field} is not valid base64") from None
    try:
        decoded = wire.decode_mask(data, volume_shape=volume_shape)
    except wire.WireFormatError as exc:
        raise Unprocessable(f"{field}: {exc}") from None
    if decoded.mask.ndim != 2 or decoded.axis != axis or decoded.offset != index:
        raise Unprocessable(f"{field} must be one slice of axis {axis} at index {index}")
    return decoded.mask


@torch.no_grad()
def mask_to_logits(mask: np.ndarray, model: DeSAM, features: ImageFeatures) -> np.ndarray:
    """H x W bool -> 1 x L x L logits in SAM's mask-input frame: the slice's resize to the
    input frame, zero padding to S x S, area-averaged to L x L, mapped to +-MASK_LOGIT."""
    h, w = features.input_size
    side = 4 * model.prompt_encoder.image_embedding_size[0]
    m = torch.as_tensor(np.asarray(mask, np.float32))[None, None]
    m = F.interpolate(m, (h, w), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, model.img_size - w, 0, model.img_size - h))
    p = F.adaptive_avg_pool2d(m, (side, side))[0]
    return ((p * 2 - 1) * MASK_LOGIT).numpy().astype(np.float32)


def mask_payload(mask: np.ndarray, axis: str, index: int, volume_id: str) -> str:
    """H x W bool -> base64 of its wire mask payload (offset = the slice's index)."""
    return base64.b64encode(wire.encode_mask(np.ascontiguousarray(mask, dtype=bool), axis=axis, offset=index,
                                             volume_id=volume_id)).decode("ascii")
