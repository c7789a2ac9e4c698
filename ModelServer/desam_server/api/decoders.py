"""Trained structure models the service holds, by name.

A DeSAM decoder file (family ``desam``) becomes a ``DeSAM`` that shares the service
model's encoder, prompt encoder and SAM mask decoder (no copies of those weights) and owns
its PRIM and PDMM. A model of an adapted-encoder family (``dbsam``: DB-SAM's adapters;
``sammix``: SAM-Mix's merged LoRA and its slice classifier) is served through SAM's
prompted decoder on features of its own encoder (``engine.adapted_sam``): the service adds
that encoder to its scheduler (``LoadedDecoder.encoder``) while the model is served.
A decoder file given at start is named by its stem (``liver.safetensors`` -> ``liver``);
a version from the decoder registry by its structure (``decoder_registry``), with its
version. The file's metadata gives the structure and training record. A file made for
another encoder, other taps or other encoder weights is refused with ``CheckpointError``
naming the mismatch.

Replacing a name's decoder (a registry version activated) swaps the entry at once: a
request that already holds the ``LoadedDecoder`` finishes on it, new ones get the new
one, and ``on_replace`` hears of the old one so that the service drops what it derived
from it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..decoder_registry import NAME_RE, check_structure_name
from ..hashing import sha256_file
from ..modeling.build import build_decoders
from ..modeling.checkpoint import CheckpointError, load_decoder, read_model_metadata
from ..modeling.desam import DeSAM
from .errors import Conflict, NotFound, Unprocessable

log = logging.getLogger(__name__)

__all__ = ["LoadedDecoder", "DecoderSet", "NAME_RE"]


#: Model families the service serves, and what each answers.
FAMILIES = ("desam", "dbsam", "sammix")


@dataclass(frozen=True)
class LoadedDecoder:
    """A structure model ready to serve. version: its registry version (None: a file the
    service was started with); family: ``FAMILIES``; classifier: SAM-Mix's slice
    classifier (presence and CAM boxes; None for the other families)."""

    name: str
    model: DeSAM
    metadata: dict
    sha256: str
    version: str | None = None
    family: str = "desam"
    classifier: Any = None

    @property
    def encoder(self) -> str | None:
        """The scheduler's name for this model's adapted encoder (None: the base encoder).
        Named by the adapted encoder's identity, so that two files with the same encoder
        weights share its features."""
        if self.family == "desam":
            return None
        return f"{self.family}:{self.model.encoder_weights_sha256[:16]}"

    @property
    def automatic_modes(self) -> tuple[str, ...]:
        """The modes of ``/segment/auto`` this model runs."""
        return {"desam": ("box", "grid", "roi"), "dbsam": ("roi",), "sammix": ("roi", "cam-box")}[self.family]

    def as_version(self, name: str, version: str) -> LoadedDecoder:
        return replace(self, name=name, version=version)

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "structure": self.metadata.get("structure"),
                "encoder": self.metadata.get("encoder"), "format_version": self.metadata.get("format_version"),
                "sha256": self.sha256, "source": "file" if self.version is None else "registry",
                "version": self.version, "training": self.metadata.get("training", {})}


class DecoderSet:
    """``on_serve(new)`` is called before ``put`` serves a decoder (an exception there
    keeps it out); ``on_replace(old)`` (outside the set's lock) with each decoder that
    ``put`` replaced or ``remove`` removed."""

    def __init__(self, base: DeSAM, *, on_replace: Callable[[LoadedDecoder], None] | None = None,
                 on_serve: Callable[[LoadedDecoder], None] | None = None) -> None:
        self.base = base
        self._on_replace = on_replace
        self._on_serve = on_serve
        self._lock = threading.Lock()
        self._decoders: dict[str, LoadedDecoder] = {}

    def load(self, path: str | Path, name: str | None = None) -> LoadedDecoder:
        """Load (or replace) a decoder from a file."""
        return self.put(self.build(path, name))

    def build(self, path: str | Path, name: str | None = None, *, version: str | None = None) -> LoadedDecoder:
        """A structure model from a file, not yet served (``put`` serves it): a DeSAM decoder,
        or a DB-SAM / SAM-Mix model file (its family's loader builds it beside the base
        model, refusing a file made for another encoder or weights)."""
        path = Path(path)
        name = name or path.name.split(".")[0]
        try:
            check_structure_name(name)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        family, _ = read_model_metadata(path)
        if family == "dbsam":
            from ..engine.dbsam_serving import load_servable as load_dbsam

            model = load_dbsam(self.base, path)
            return LoadedDecoder(name, model, read_model_metadata(path)[1], sha256_file(path), version, family="dbsam")
        if family == "sammix":
            from ..engine.sammix_serving import load_servable as load_sammix

            servable = load_sammix(self.base, path)
            return LoadedDecoder(name, servable, servable.sammix_metadata, sha256_file(path), version,
                                 family="sammix", classifier=servable.classifier)
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
        return LoadedDecoder(name, variant, metadata, sha256_file(path), version)

    def put(self, loaded: LoadedDecoder) -> LoadedDecoder:
        """Serve ``loaded`` under its name from now on, in place of the decoder before."""
        if self._on_serve is not None:
            self._on_serve(loaded)
        with self._lock:
            old = self._decoders.get(loaded.name)
            self._decoders[loaded.name] = loaded
        log.info("decoder %s%s loaded (structure %s)", loaded.name,
                 "" if loaded.version is None else f" {loaded.version}", loaded.metadata.get("structure"))
        if old is not None and old is not loaded and self._on_replace is not None:
            self._on_replace(old)
        return loaded

    def remove(self, name: str) -> LoadedDecoder | None:
        """Stop serving ``name``; the decoder removed, if there was one."""
        with self._lock:
            old = self._decoders.pop(name, None)
        if old is not None:
            log.info("decoder %s removed", name)
            if self._on_replace is not None:
                self._on_replace(old)
        return old

    def peek(self, name: str) -> LoadedDecoder | None:
        """The decoder served under ``name`` now, or None."""
        with self._lock:
            return self._decoders.get(name)

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
        """The named DeSAM decoder, or the only one when ``name`` is None. Conflict (409)
        when no trained DeSAM decoder is loaded (DeSAM's automatic modes need one) or the
        choice is ambiguous; Unprocessable (422) when the named one is another family's."""
        with self._lock:
            known = sorted(n for n, d in self._decoders.items() if d.family == "desam")
        if name is not None:
            found = self.get(name)
            if found.family != "desam":
                raise Unprocessable(f"decoder {name!r} is a {found.family} model, not a DeSAM decoder: DeSAM's "
                                    f"automatic modes need one (its modes: {', '.join(found.automatic_modes)})")
            return found
        if not known:
            raise Conflict(
                f"no trained DeSAM decoder is loaded for encoder {self.base.encoder_name}: the automatic modes "
                "need one (PDMM is random until trained). Activate a version in the decoder registry (GET /registry; "
                "`make decoders` installs the first ones), start the service with --decoder FILE (or DESAM_DECODERS "
                "/ decoder_dir), or segment with prompts (POST /segment/prompt).")
        if name is None:
            if len(known) > 1:
                raise Conflict(f"several decoders are loaded ({', '.join(known)}): name one with 'decoder'")
            name = known[0]
        return self.get(name)

