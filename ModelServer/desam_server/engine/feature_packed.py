"""Encoder features in their cached form: the four tensors of an ``ImageFeatures`` in a
storage dtype, plus the slice sizes.

Every cache tier (device memory, host memory, disk) holds this same representation, so a
key read from any tier unpacks to bit-identical float32 tensors, and a freshly computed
entry is returned through the same round trip (a hit and a miss give the same numbers).

An entry holds the embedding and the three taps (DeSAM's PDMM reads the taps), or the
embedding alone (``EMBEDDING_ONLY``: features of an adapted encoder served only through
SAM's prompted decoder, DB-SAM and SAM-Mix, whose taps nothing reads).

Storage dtypes: ``float16`` (the default: 10 mantissa bits against bfloat16's 7, and the
encoders' features stay far inside its range), ``bfloat16`` (float32's range, less
precision) and ``float32`` (exact). A tensor whose largest magnitude does not fit the
16-bit type (|x| > 65504 for float16) is kept in float32, that tensor only, so nothing
is ever stored as inf. Features with NaN or inf are packed exactly (float32) and flagged
``finite=False``; the cache never stores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modeling.desam import ImageFeatures

__all__ = [
    "STORAGE_DTYPES", "TENSOR_NAMES", "EMBEDDING_ONLY", "PackedFeatures", "pack_features", "packed_nbytes_for_shapes",
]

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in STORAGE_DTYPES.items()}
TENSOR_NAMES = ("embedding", "tap0", "tap1", "tap2")
#: The tensor names of an embedding-only entry.
EMBEDDING_ONLY = TENSOR_NAMES[:1]


def _check_size(value, what: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be two integers (h, w), got {value!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive, got {(h, w)}")
    return h, w


def storage_dtype(name: str) -> torch.dtype:
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown storage dtype {name!r}; use one of {', '.join(STORAGE_DTYPES)}") from None


@dataclass(frozen=True, eq=False)
class PackedFeatures:
    """tensors: embedding, tap0, tap1, tap2, or the embedding alone (contiguous, each in the
    storage dtype or in float32 where that dtype would overflow), all on one device. Never
    mutate them: tiers may share them."""

    tensors: tuple[torch.Tensor, ...]
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    storage_dtype: str
    finite: bool = True

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (what a memory tier counts against its budget)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    @property
    def float32_fallbacks(self) -> int:
        """Tensors kept in float32 although the storage dtype is narrower."""
        if self.storage_dtype == "float32":
            return 0
        return sum(t.dtype == torch.float32 for t in self.tensors)

    def to(self, device: str | torch.device) -> PackedFeatures:
        """The same entry on ``device`` (self when it is already there)."""
        device = torch.device(device)
        if _same_device(self.device, device):
            return self
        return PackedFeatures(
            tensors=tuple(t.to(device) for t in self.tensors), input_size=self.input_size,
            original_size=self.original_size, storage_dtype=self.storage_dtype, finite=self.finite,
        )

    def unpack(self, device: str | torch.device | None = None, *, taps: bool = True) -> ImageFeatures:
        """Fresh float32 tensors on ``device`` (default: where they are) in a new
        ``ImageFeatures``; the caller may keep, modify or extend it (skips stay None).
        ``taps=False``: the embedding only (``taps`` empty), all SAM's prompted decoder
        needs, at a fraction of the conversion cost."""
        device = self.device if device is None else torch.device(device)
        wanted = self.tensors if taps else self.tensors[:1]
        out = [t.to(device=device, dtype=torch.float32, copy=True) for t in wanted]
        return ImageFeatures(
            embedding=out[0], taps=out[1:], input_size=self.input_size, original_size=self.original_size,
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    ia = a.index if a.index is not None else torch.cuda.current_device() if a.type == "cuda" else 0
    ib = b.index if b.index is not None else torch.cuda.current_device() if b.type == "cuda" else 0
    return ia == ib


def _validate(features: ImageFeatures) -> list[torch.Tensor]:
    if not isinstance(features, ImageFeatures):
        raise TypeError(f"expected ImageFeatures, got {type(features).__name__}")
    taps = list(features.taps)
    if len(taps) not in (0, 3):
        raise ValueError(f"ImageFeatures must have three taps or none (embedding only), got {len(taps)}")
    tensors = [features.embedding, *taps]
    device = tensors[0].device
    for name, t in zip(TENSOR_NAMES[:len(tensors)], tensors, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
        if t.ndim != 4 or t.shape[0] != 1:
            raise ValueError(f"{name} must be 1 x C x S x S, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != device:
            raise ValueError("all feature tensors must be on one device")
    return tensors


def pack_features(features: ImageFeatures, storage: str = "float16") -> PackedFeatures:
    """Convert ``features`` to the storage form (on the features' device; always a copy)."""
    target = storage_dtype(storage)
    tensors = _validate(features)
    input_size = _check_size(features.input_size, "input_size")
    original_size = _check_size(features.original_size, "original_size")
    limit = torch.finfo(target).max
    stats = []
    for t in tensors:
        # One pass gives both extremes; NaN propagates into them, inf shows as inf.
        lo, hi = torch.aminmax(t.detach().float())
        stats.append((float(lo), float(hi)))
    finite = all(abs(lo) < float("inf") and abs(hi) < float("inf") for lo, hi in stats)
    out = []
    for t, (lo, hi) in zip(tensors, stats, strict=True):
        t = t.detach()
        dtype = target if finite and max(-lo, hi) <= limit else torch.float32
        out.append(t.to(dtype=dtype, copy=True).contiguous())
    return PackedFeatures(
        tensors=tuple(out), input_size=input_size, original_size=original_size,
        storage_dtype=storage, finite=finite,
    )


def packed_nbytes_for_shapes(shapes: list[tuple[int, ...]], storage: str) -> int:
    """Bytes one entry takes for the given tensor shapes (no float32 fallbacks)."""
    size = torch.tensor([], dtype=storage_dtype(storage)).element_size()
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= int(s)
        total += n * size
    return total
