"""The folder of a training job that the service runs in a process of its own.

The service writes, before it starts the process: ``job.json`` (``JobSpec``: the model the
service serves -- encoder, checkpoint and its hash, device, encoder precision --, the
training features' folder, the CPU threads and niceness of the process, the training
options, and one entry per case) and, per case, ``cases/<n>/volume.npy``,
``cases/<n>/mask.npy`` (bool) beside the geometry and window in ``job.json``. The process
needs nothing else from the service (no lock of the service's, no volume store) and
writes its decoder files into ``output/`` (``trainer.Trainer``'s files).

Cases are written by number, never by name or path; every file atomically.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..engine.preprocess import IntensityWindow
from ..io import Geometry, Volume
from .cases import Case
from .sammix_data import SamMixCase, sammix_case

__all__ = ["JobSpec", "write_cases", "read_cases", "write_spec", "read_spec", "SPEC_FILE", "OUTPUT_DIR", "CASES_DIR"]

SPEC_FILE = "job.json"
OUTPUT_DIR = "output"
CASES_DIR = "cases"


@dataclass(frozen=True)
class JobSpec:
    """job_id: the service's id of the job; structure: what is trained; encoder /
    sam_checkpoint / encoder_weights_sha256: the service's encoder (the process builds
    the same model with ``loading.build_model`` and refuses to train when the hash
    differs); device; encoder_precision: the encoder pass's precision for precompute;
    features_dir / features_bytes: the training features' cache; threads: PyTorch CPU
    threads of the process; nice: its niceness increment (the serving process keeps the
    CPU for clicks); options: ``TrainingOptions.to_json()``; cases: ``write_cases``'s
    entries."""

    job_id: str
    structure: str
    encoder: str
    sam_checkpoint: str | None
    encoder_weights_sha256: str | None
    device: str
    encoder_precision: str
    features_dir: str
    features_bytes: int
    threads: int
    nice: int
    options: dict
    cases: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> JobSpec:
        return cls(**data)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_cases(job_dir: Path, cases: Sequence[Case]) -> list[dict]:
    """Each case's volume and mask as ``.npy`` files under ``job_dir/cases/<n>/``; returns
    the entries for ``JobSpec.cases`` (relative file names, geometry, window, structure,
    group; a SAM-Mix case's axis, present and segmented slices)."""
    entries = []
    for n, case in enumerate(cases):
        folder = Path(job_dir) / CASES_DIR / str(n)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "volume.npy", _npy(case.volume.array))
        atomic_write_bytes(folder / "mask.npy", _npy(case.mask))
        g = case.volume.geometry
        entries.append({"volume": f"{CASES_DIR}/{n}/volume.npy", "mask": f"{CASES_DIR}/{n}/mask.npy",
                        "spacing": list(g.spacing), "origin": list(g.origin),
                        "direction": np.asarray(g.direction).reshape(9).tolist(),
                        "window": case.window.to_json(), "structure": case.structure, "group": case.group})
        if isinstance(case, SamMixCase):          # its slice labels (the mask holds the segmented slices)
            entries[-1]["sammix"] = {"axis": case.axis, "present_slices": np.flatnonzero(case.presence).tolist(),
                                     "segmented_slices": list(case.segmented)}
    return entries


def read_cases(job_dir: Path, entries: Sequence[dict]) -> list[Case]:
    """The cases ``write_cases`` wrote (the volume ids are recomputed from the voxels and
    geometry, so the features' keys are the service's)."""
    cases = []
    for entry in entries:
        array = np.load(Path(job_dir) / entry["volume"], allow_pickle=False)
        mask = np.load(Path(job_dir) / entry["mask"], allow_pickle=False)
        geometry = Geometry(tuple(entry["spacing"]), tuple(entry["origin"]), np.asarray(entry["direction"]))
        window = IntensityWindow(center=float(entry["window"]["center"]), width=float(entry["window"]["width"]))
        volume = Volume(array, geometry)
        if "sammix" in entry:
            labels = entry["sammix"]
            cases.append(sammix_case(volume, structure=entry["structure"], segmentation=mask,
                                     segmented=labels["segmented_slices"], axis=labels["axis"],
                                     present_slices=labels["present_slices"], window=window,
                                     group=entry.get("group")))
            continue
        cases.append(Case(volume=volume, mask=mask, structure=entry["structure"], window=window,
                          group=entry.get("group")))
    return cases


def write_spec(job_dir: Path, spec: JobSpec) -> None:
    atomic_write_bytes(Path(job_dir) / SPEC_FILE, json.dumps(spec.to_json(), indent=1).encode())


def read_spec(job_dir: Path) -> JobSpec:
    return JobSpec.from_json(json.loads((Path(job_dir) / SPEC_FILE).read_text(encoding="utf-8")))
