"""One training run from cases to decoder files: what ``desam-server train`` and the
service's training job process both call.

``run_training`` lets the model family prepare its model (``ModelFamily.prepare_model``:
DeSAM trains the given model; the no-fusion ablation a variant of it, returned in
``TrainResult.model``), splits the cases, chooses the slices, precomputes the missing encoder
features (event 'precompute' per slice; cancellable) when the family reads features (an
image family reads the slices themselves: nothing to precompute), then trains
(``Trainer``; events 'start', 'step', 'epoch'). Under torchrun, process 0 precomputes
while the others wait.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..engine.feature_cache import FeatureCache, FeatureCacheSettings
from ..engine.feature_config import default_cache_dir
from .cases import Case, check_cases
from .config import TrainConfig
from .distributed import DistributedContext
from .family import get_family
from .features import FeatureReader, PrecomputeReport, TrainingFeatures
from .samples import TrainingData, build_training_data
from .slice_images import SliceImageReader
from .split import split_cases
from .trainer import Trainer, TrainResult
from .variants import parse_augmentations

#: Training features are kept as the service keeps its own (float16).
STORAGE_DTYPE = "float16"
DEFAULT_FEATURES_BYTES = 20 * 2**30

__all__ = ["TrainingOptions", "precompute", "run_training", "prepare_data", "default_training_features_dir"]


def default_training_features_dir() -> Path:
    """~/.cache/slicer-desam/training-features: the training processes' feature cache
    (the serving process locks its own directory)."""
    return default_cache_dir().parent / "training-features"


@dataclass(frozen=True)
class TrainingOptions:
    """The data side of a run (``config`` holds the optimisation side): axis to slice
    along; validation_fraction, slabs and gap (``split.split_cases``); empty_ratio
    and slice_step (``samples``); augmentations (``variants.AUGMENTATIONS`` names)."""

    axis: str = "k"
    validation_fraction: float = 0.1
    slabs: int = 2
    gap: int | None = None
    empty_ratio: float = 0.3
    slice_step: int = 1
    augmentations: tuple[str, ...] = ()
    config: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "augmentations", tuple(v.name for v in parse_augmentations(self.augmentations)))

    def to_json(self) -> dict:
        data = asdict(self)
        data["augmentations"] = list(self.augmentations)
        data["config"] = self.config.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict) -> TrainingOptions:
        data = dict(data)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(sorted(unknown))}")
        config = TrainConfig.from_json(data.pop("config", {}))
        if "augmentations" in data:
            data["augmentations"] = tuple(data["augmentations"])
        return cls(**data, config=config)


def prepare_data(cases: Sequence[Case], options: TrainingOptions) -> TrainingData:
    check_cases(cases)
    split = split_cases(cases, axis=options.axis, validation_fraction=options.validation_fraction,
                        seed=options.config.seed, slabs=options.slabs, gap=options.gap)
    return build_training_data(cases, split, variants=parse_augmentations(options.augmentations),
                               empty_ratio=options.empty_ratio, seed=options.config.seed,
                               slice_step=options.slice_step)


def family_data(family, cases: Sequence[Case], options: TrainingOptions) -> TrainingData:
    """The run's data as ``family`` trains on it: its own ``prepare_data`` where it has one
    (SAM-Mix: presence labels and a few segmented slices), else ``prepare_data``."""
    own = getattr(family, "prepare_data", None)
    return own(cases, options) if own is not None else prepare_data(cases, options)


def run_training(model, cases: Sequence[Case], options: TrainingOptions, *, output_dir: Path,
                 features_dir: Path | None = None, events: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, resume: bool = True,
                 distributed: DistributedContext | None = None, encoder_precision: str = "auto",
                 features_bytes: int = DEFAULT_FEATURES_BYTES) -> TrainResult:
    events = events or (lambda event: None)
    ctx = distributed or DistributedContext()
    family = get_family(options.config.family, options.config.family_options)
    model = family.prepare_model(model)  # DeSAM: the model itself; see TrainResult.model
    # a family with data of its own kind (SAM-Mix: presence labels + a few segmented slices)
    data = family_data(family, cases, options)
    events({"event": "data", **data.summary()})
    if family.input_kind == "image":
        reader = SliceImageReader()
    else:
        directory = Path(features_dir) if features_dir is not None else default_training_features_dir()
        if ctx.is_main:  # one writer; the other processes wait for it
            precompute(model, data, directory, events=events, should_stop=should_stop, precision=encoder_precision,
                       features_bytes=features_bytes)
        ctx.barrier()
        reader = FeatureReader(model, directory, storage_dtype=STORAGE_DTYPE)
    trainer = Trainer(model, family, data, reader, options.config, Path(output_dir), events=events,
                      should_stop=should_stop, distributed=ctx)
    return trainer.run(resume=resume)


def precompute(model, data: TrainingData, directory: Path, *, events: Callable[[dict], None] | None = None,
               should_stop: Callable[[], bool] | None = None, precision: str = "auto",
               features_bytes: int = DEFAULT_FEATURES_BYTES) -> PrecomputeReport:
    """Encode every slice the run reads (training slices in every variant, whole validation
    volumes) that is not cached in ``directory`` yet; events 'precompute' (done, total)."""
    events = events or (lambda event: None)
    settings = FeatureCacheSettings(directory=Path(directory), device="cpu", host_bytes=0, disk_bytes=features_bytes,
                                    storage_dtype=STORAGE_DTYPE)
    refs = data.train + data.validation_refs()
    items = [(data.cases[r.case], r.axis, r.index) for r in refs]
    with FeatureCache(settings) as cache:
        disk = cache.stats()["tiers"]["disk"]
        if not disk["enabled"]:
            raise RuntimeError(f"the training features' directory cannot be used ({disk['disabled_reason']})")
        features = TrainingFeatures(model, cache, precision=precision)
        report = features.precompute(
            items, should_stop=should_stop,
            progress=lambda done, total: events({"event": "precompute", "done": done, "total": total}))
        kept = sum(cache.contains(features.key(*item)) for item in dict.fromkeys(items))
    if kept < report.slices:
        raise RuntimeError(f"the training features' disk budget ({features_bytes} bytes) holds {kept} of the "
                           f"{report.slices} slices this run needs: raise it")
    events({"event": "precomputed", **report.to_json()})
    return report
