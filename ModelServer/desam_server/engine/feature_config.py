"""The feature cache's key and settings.

``FeatureKey`` names one slice's encoder features: which volume, which slice, the
intensity window and preprocessing that produced the encoder's input, and which encoder
(with which weights) encoded it. ``digest()`` is the sha256 of a canonical JSON of all
fields; it names entries everywhere (memory tiers, file names, logs), so no volume id or
other field ever appears in a log or a path.

``FeatureCacheSettings`` holds the byte budgets, the directory, the storage dtype and the
device; ``from_env()`` reads them from DESAM_CACHE_* environment variables.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .feature_packed import STORAGE_DTYPES

__all__ = ["FeatureKey", "FeatureCacheSettings", "parse_bytes", "default_cache_dir", "KEY_SCHEMA"]

#: Part of every digest: bump when the key's meaning changes.
KEY_SCHEMA = "desam-feature-key/1"
GiB = 1 << 30
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FeatureKey:
    """What determines one slice's encoder features.

    volume_id: an opaque id of the volume's voxels (the service derives it; it never
      leaves the digest); axis: the slicing axis name (e.g. 'axial' or 'k');
    slice_index: index along that axis; window_center / window_width: the intensity
      window; preprocessing_version: ``engine.PREPROCESSING_VERSION``; encoder: registry
      name; encoder_weights_sha256: the checkpoint's sha256, None for random weights.
    Numbers are normalised (ints to float, -0.0 to 0.0), so equal windows give equal keys
    and digests.
    """

    volume_id: str
    axis: str
    slice_index: int
    window_center: float
    window_width: float
    preprocessing_version: int
    encoder: str
    encoder_weights_sha256: str | None

    def __post_init__(self) -> None:
        for name in ("volume_id", "axis", "encoder"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"FeatureKey.{name} must be a non-empty string")
        for name in ("slice_index", "preprocessing_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"FeatureKey.{name} must be a non-negative integer, got {value!r}")
        for name in ("window_center", "window_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"FeatureKey.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value) + 0.0)  # + 0.0 turns -0.0 into 0.0
        if self.window_width <= 0:
            raise ValueError("FeatureKey.window_width must be positive")
        sha = self.encoder_weights_sha256
        if sha is not None:
            if not isinstance(sha, str) or not _SHA256_RE.match(sha.lower()):
                raise ValueError("FeatureKey.encoder_weights_sha256 must be 64 hex characters or None")
            object.__setattr__(self, "encoder_weights_sha256", sha.lower())

    def canonical_json(self) -> str:
        """Sorted keys, no spaces, floats as ``repr`` strings (exact and stable)."""
        data: dict = {"schema": KEY_SCHEMA}
        for f in fields(self):
            value = getattr(self, f.name)
            data[f.name] = repr(value) if isinstance(value, float) else value
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def digest(self) -> str:
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str, what: str = "size") -> int:
    """'1073741824', '512MiB', '4GiB', '1.5G' (K/M/G/T are binary units, as KiB/MiB/...)
    -> bytes. Raises ValueError naming ``what`` for anything else."""
    m = _BYTES_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"{what}: {text!r} is not a byte count; use an integer number of bytes or a number "
            "with KiB, MiB, GiB or TiB (e.g. 4GiB, 512MiB); 0 disables the tier"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def default_cache_dir() -> Path:
    """~/.cache/slicer-desam/features (next to the weights and data directories)."""
    return Path.home() / ".cache" / "slicer-desam" / "features"


@dataclass(frozen=True)
class FeatureCacheSettings:
    """directory: where the disk tier lives (None: no disk tier);
    device: where the device tier keeps entries and where ``get`` returns them by default;
    device_bytes: device tier budget; None means 2 GiB on a CUDA device and 0 elsewhere
      (on CPU the "device" is host memory: a device tier would only hold the same bytes
      twice, so the host tier serves instead; an explicit budget still works there);
    host_bytes / disk_bytes: budgets of the host-memory and disk tiers (0 disables one);
    storage_dtype: 'float16' (default), 'bfloat16' or 'float32'.
    """

    directory: Path | None = None
    device: str = "cpu"
    device_bytes: int | None = None
    host_bytes: int = 4 * GiB
    disk_bytes: int = 20 * GiB
    storage_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.directory is not None:
            object.__setattr__(self, "directory", Path(self.directory).expanduser())
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"unknown device {self.device!r}") from None
        object.__setattr__(self, "device", str(device))
        for name in ("device_bytes", "host_bytes", "disk_bytes"):
            value = getattr(self, name)
            if value is None and name == "device_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer number of bytes, got {value!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")

    @property
    def resolved_device_bytes(self) -> int:
        if self.device_bytes is not None:
            return self.device_bytes
        return 2 * GiB if torch.device(self.device).type == "cuda" else 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, device: str = "cpu") -> FeatureCacheSettings:
        """DESAM_CACHE_DIR (default ~/.cache/slicer-desam/features; 'off' or 'none': no
        disk tier), DESAM_CACHE_DEVICE_BYTES, DESAM_CACHE_HOST_BYTES,
        DESAM_CACHE_DISK_BYTES (bytes or e.g. '4GiB'), DESAM_CACHE_DTYPE ('float16',
        'bfloat16', 'float32'). Unset or empty variables keep the defaults."""
        env = os.environ if environ is None else environ
        kwargs: dict = {"device": device}
        directory = env.get("DESAM_CACHE_DIR", "").strip()
        if directory.lower() in ("off", "none"):
            kwargs["directory"] = None
        else:
            kwargs["directory"] = Path(directory).expanduser() if directory else default_cache_dir()
        for var, name in (("DESAM_CACHE_DEVICE_BYTES", "device_bytes"), ("DESAM_CACHE_HOST_BYTES", "host_bytes"),
                          ("DESAM_CACHE_DISK_BYTES", "disk_bytes")):
            value = env.get(var, "").strip()
            if value:
                kwargs[name] = parse_bytes(value, var)
        dtype = env.get("DESAM_CACHE_DTYPE", "").strip()
        if dtype:
            if dtype.lower() not in STORAGE_DTYPES:
                raise ValueError(f"DESAM_CACHE_DTYPE: {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
            kwargs["storage_dtype"] = dtype.lower()
        return cls(**kwargs)

    def to_json(self) -> dict:
        return {
            "directory_set": self.directory is not None, "device": self.device,
            "device_bytes": self.resolved_device_bytes, "host_bytes": self.host_bytes,
            "disk_bytes": self.disk_bytes, "storage_dtype": self.storage_dtype,
        }
