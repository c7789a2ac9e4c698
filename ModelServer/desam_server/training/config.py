"""A training run's settings (the command line's and the API's options, one meaning)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

__all__ = ["TrainConfig", "PRECISIONS"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """family: the model family ('desam'); strategy: the family's prompt strategy (DeSAM:
    'grid' or 'box'); epochs, batch_size (global, over all processes), learning_rate and
    poly_power (Adam, no weight decay, polynomial decay per epoch; spec item 20); seed
    (split, empty-slice choice, sample order, prompts); precision of the decoders' forward
    and backward: 'auto' is bf16 (fp16 without bf16 support) autocast on CUDA, bf16 on CPUs
    with native bf16 (avx512_bf16 / AMX: 2.8x faster steps measured with MobileSAM) and
    fp32 on other CPUs (emulated bf16 is slower); validation_grid_size / min_region_area /
    iou_threshold: the automatic mode used for validation Dice; family_options: the
    family's own settings (JSON values; ``family.get_family``; DeSAM's families take
    none, SAM-Mix's are listed in ``sammix_family.SamMixSettings``)."""

    family: str = "desam"
    strategy: str = "grid"
    epochs: int = 50
    batch_size: int = 8
    learning_rate: float = 1e-4
    poly_power: float = 0.9
    seed: int = 0
    precision: str = "auto"
    validation_grid_size: int = 9
    min_region_area: int = 64
    iou_threshold: float = 0.5
    family_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "validation_grid_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.min_region_area < 0:
            raise ValueError("min_region_area must be >= 0")
        if not isinstance(self.family_options, dict) or not all(isinstance(k, str) for k in self.family_options):
            raise ValueError("family_options must be a dict with string keys")
        try:
            json.dumps(self.family_options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"family_options must hold JSON values: {exc}") from exc

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
        return cls(**data)

    def prediction_options(self) -> dict:
        return {"grid_size": self.validation_grid_size, "min_region_area": self.min_region_area,
                "iou_threshold": self.iou_threshold}
