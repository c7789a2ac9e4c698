"""The image encoders one scheduler serves: the base model's and adapted ones.

An adapted encoder (DB-SAM's adapters, SAM-Mix's merged LoRA) makes features of its own:
they are cached under its own identity (``FeatureKey.encoder`` and
``encoder_weights_sha256`` from the adapted model), so that they are never mixed with the
base encoder's or another adaptation's. Requests name the encoder they want by the name it
was added under; ``None`` is the base model. The one worker thread runs every encoder's
passes, so priorities (click, view, neighbours, background) hold across encoders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..wire import AXES
from .feature_config import FeatureKey
from .preprocess import PREPROCESSING_VERSION
from .scheduler_encode import EncodeFn
from .scheduler_queue import RegisteredVolume

__all__ = ["EncoderEntry", "EncoderSet", "UnknownEncoderError", "ENCODER_NAME_RE"]

#: Names of added encoders (they appear in logs and statistics, never a path or a patient).
ENCODER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$")


class UnknownEncoderError(KeyError):
    """A request named an encoder the scheduler does not hold (or no longer holds)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown encoder"


@dataclass(frozen=True)
class EncoderEntry:
    """model: what encodes (``encode``, ``normalize_and_pad``, ``img_size``, ``device``,
    ``encoder_name``, ``encoder_weights_sha256``); encode: its ``encode`` or a stand-in."""

    name: str | None
    model: object
    encode: EncodeFn


class EncoderSet:
    """The base entry (name None) and added ones. Not thread-safe by itself: the scheduler
    calls it under its lock."""

    def __init__(self, base_model, encode: EncodeFn) -> None:
        self.base = EncoderEntry(None, base_model, encode)
        self._added: dict[str, EncoderEntry] = {}

    def add(self, name: str, model, encode: EncodeFn | None = None) -> EncoderEntry:
        if not isinstance(name, str) or not ENCODER_NAME_RE.match(name):
            raise ValueError(f"encoder name must match {ENCODER_NAME_RE.pattern}, got {name!r}")
        if name in self._added:
            raise ValueError(f"an encoder named {name!r} is already added: remove it first")
        base = self.base.model
        if model.device != base.device:
            raise ValueError(f"encoder {name!r} is on {model.device}, the scheduler's model on {base.device}")
        identity = (model.encoder_name, model.encoder_weights_sha256)
        if identity == (base.encoder_name, base.encoder_weights_sha256):
            raise ValueError(f"encoder {name!r} has the base encoder's identity: its features would be mixed "
                             "with the base encoder's")
        for other in self._added.values():
            if (other.model.encoder_name, other.model.encoder_weights_sha256) == identity:
                raise ValueError(f"encoder {name!r} has the identity of encoder {other.name!r}")
        entry = EncoderEntry(name, model, encode or model.encode)
        self._added[name] = entry
        return entry

    def remove(self, name: str) -> EncoderEntry:
        entry = self._added.pop(name, None)
        if entry is None:
            raise UnknownEncoderError(f"no encoder named {name!r}")
        return entry

    def get(self, name: str | None) -> EncoderEntry:
        if name is None:
            return self.base
        entry = self._added.get(name)
        if entry is None:
            raise UnknownEncoderError(f"no encoder named {name!r}")
        return entry

    def names(self) -> list[str]:
        return sorted(self._added)

    def key(self, entry: EncoderEntry, volume: RegisteredVolume, dimension: int, index: int) -> FeatureKey:
        """The slice's cache key for ``entry``: the base encoder's weights hash is the
        volume's registration (``register_volume``'s override), an added encoder's its own."""
        sha = volume.weights_sha256 if entry.name is None else entry.model.encoder_weights_sha256
        return FeatureKey(
            volume_id=volume.volume_id, axis=AXES[dimension], slice_index=index,
            window_center=volume.window.center, window_width=volume.window.width,
            preprocessing_version=PREPROCESSING_VERSION, encoder=entry.model.encoder_name,
            encoder_weights_sha256=sha)
