"""Trained DeSAM decoders (PRIM + PDMM) the service holds, by name.

Each decoder file becomes a ``DeSAM`` that shares the service model's encoder, prompt
encoder and SAM mask decoder (no copies of those weights) and owns its PRIM and PDMM.
The name is the file's stem (``liver.safetensors`` -> ``liver``); the file's metadata
gives the structure and training record. A file made for another encoder, other taps or
other encoder weights is refused with ``CheckpointError`` naming the mismatch.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..hashing import sha256_file
from ..modeling.build import build_decoders
from ..modeling.checkpoint import CheckpointError, load_decoder
from ..modeling.desam import DeSAM
from .errors import Conflict, NotFound

log = logging.getLogger(__name__)

__all__ = ["LoadedDecoder", "DecoderSet", "NAME_RE"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class LoadedDecoder:
    name: str
    model: DeSAM
    metadata: dict
    sha256: str

    def describe(self) -> dict:
        return {"name": self.name, "structure": self.metadata.get("structure"),
                "encoder": self.metadata.get("encoder"), "format_version": self.metadata.get("format_version"),
                "sha256": self.sha256, "training": self.metadata.get("training", {})}


class DecoderSet:
    def __init__(self, base: DeSAM) -> None:
        self.base = base
        self._lock = threading.Lock()
        self._decoders: dict[str, LoadedDecoder] = {}

    def load(self, path: str | Path, name: str | None = None) -> LoadedDecoder:
        """Load (or replace) a decoder from a file."""
        path = Path(path)
        name = name or path.name.split(".")[0]
        if not NAME_RE.match(name):
            raise CheckpointError(f"{path}: {name!r} is not a usable decoder name (letters, digits, _ . -)")
        base = self.base
        prim, pdmm = build_decoders(base.encoder_name)
        variant = DeSAM(encoder_name=base.encoder_name, image_encoder=base.image_encoder,
                        prompt_encoder=base.prompt_encoder, mask_decoder=base.mask_decoder, prim=prim, pdmm=pdmm,
                        convention=base.convention, tap_indices=base.tap_indices)
        variant.encoder_weights_sha256 = base.encoder_weights_sha256
        metadata = load_decoder(variant, path)
        for module in (variant.prim, variant.pdmm):
            for p in module.parameters():
                p.requires_grad_(False)
        variant.to(base.device).eval()
        loaded = LoadedDecoder(name, variant, metadata, sha256_file(path))
        with self._lock:
            self._decoders[name] = loaded
        log.info("decoder %s loaded (structure %s)", name, metadata.get("structure"))
        return loaded

    def load_dir(self, directory: str | Path) -> list[LoadedDecoder]:
        return [self.load(p) for p in sorted(Path(directory).glob("*.safetensors"))]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._decoders)

    def describe(self) -> list[dict]:
        with self._lock:
            return [d.describe() for _, d in sorted(self._decoders.items())]

    def get(self, name: str) -> LoadedDecoder:
        with self._lock:
            found = self._decoders.get(name)
            known = sorted(self._decoders)
        if found is None:
            raise NotFound(f"unknown decoder {name!r}; loaded: {', '.join(known) or 'none'}")
        return found

    def require(self, name: str | None) -> LoadedDecoder:
        """The named decoder, or the only one when ``name`` is None. Conflict (409) when
        no trained decoder is loaded (DeSAM's automatic modes need one) or the choice is
        ambiguous."""
        with self._lock:
            known = sorted(self._decoders)
        if not known:
            raise Conflict(
                f"no trained DeSAM decoder is loaded for encoder {self.base.encoder_name}: the automatic modes "
                "need one (PDMM is random until trained). Start the service with --decoder FILE (or "
                "DESAM_DECODERS / decoder_dir), or segment with prompts (POST /segment/prompt).")
        if name is None:
            if len(known) > 1:
                raise Conflict(f"several decoders are loaded ({', '.join(known)}): name one with 'decoder'")
            name = known[0]
        return self.get(name)

