"""The decoder registry's versions as one service serves them.

``DecoderVersions`` keeps the served decoders (``DecoderSet``) in step with the registry
(``decoder_registry.DecoderRegistry``): the active version of every structure is served
under the structure's name; activating, rolling back, deleting or installing a version
swaps what is served at once (requests already running finish on the version they
started with: they hold their ``LoadedDecoder``); a version that does not fit the model is
not served and the reason is kept. Decoder files given at start win over registry
structures of the same name. Changes other processes make to the registry (a training
process, another replica of a cluster) are picked up by ``sync``; ``sync_if_changed`` calls
it only when the registry's ``fingerprint`` moved. Errors are ``errors.ServiceError`` subclasses.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from ..decoder_registry import (
    DecoderRegistry,
    RegistryConflict,
    RegistryError,
    StructureState,
    UnknownVersion,
    VersionInfo,
)
from ..modeling.checkpoint import CheckpointError, read_model_metadata
from .decoders import DecoderSet, LoadedDecoder
from .errors import Conflict, NotFound

log = logging.getLogger(__name__)

__all__ = ["DecoderVersions"]


class DecoderVersions:
    """``registry``: None when the service runs without one (``registry_dir`` off: every
    method but ``registry`` then answers 409); ``decoders``: the service's served set;
    ``file_decoders``: names of the decoder files given at start."""

    def __init__(self, registry: DecoderRegistry | None, decoders: DecoderSet, *,
                 file_decoders: frozenset[str] = frozenset()) -> None:
        self.registry = registry
        self.decoders = decoders
        self._file_decoders = file_decoders
        self._lock = threading.Lock()          # one registry change (and its swap) at a time
        self._problems: dict[str, str] = {}    # structure -> why its active version is not served
        self._seen: tuple | None = None        # the registry's fingerprint at the last sync_if_changed
        if registry is not None:
            self._seen = registry.fingerprint()
            self.sync()

    def _registry(self) -> DecoderRegistry:
        if self.registry is None:
            raise Conflict("the service runs without a decoder registry (registry_dir is off)")
        return self.registry

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except UnknownVersion as exc:
            raise NotFound(str(exc)) from None
        except (RegistryConflict, RegistryError) as exc:  # conflicts; an unreadable versions.json
            raise Conflict(str(exc)) from None

    def _build_version(self, info: VersionInfo) -> LoadedDecoder:
        """A registry version as a ``LoadedDecoder`` (not yet served); ``CheckpointError``
        (its message naming the version, not the path) when it does not fit the model."""
        path = self.registry.path(info.structure, info.version)
        try:
            loaded = self.decoders.build(path, info.structure, version=info.version)
            if loaded.sha256 != info.sha256:
                raise CheckpointError(f"{path}: the file changed on disk since it was registered")
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(str(path), f"{info.structure} {info.version}")) from None
        return loaded

    def _serve_active(self, structure: str, prebuilt: LoadedDecoder | None = None) -> None:
        """Serve the structure's active version under its name (nothing when it has none, or
        when it does not fit the model: the reason is kept for ``structure``). Under
        ``_lock``."""
        if structure in self._file_decoders:
            self._problems[structure] = ("a decoder file of the same name given at start (decoders / "
                                                  "decoder_dir) is served instead")
            return
        try:
            info = self.registry.active(structure)
        except UnknownVersion:
            info = None
        current = self.decoders.peek(structure)
        if info is None:
            self._problems.pop(structure, None)
            if current is not None:
                self.decoders.remove(structure)
            return
        if current is not None and current.version == info.version and current.sha256 == info.sha256:
            return
        try:
            loaded = prebuilt if prebuilt is not None and prebuilt.version == info.version else (
                self._build_version(info))
        except CheckpointError as exc:
            self._problems[structure] = str(exc)
            log.warning("decoder registry: %s %s not served: %s", structure, info.version, exc)
            if current is not None:
                self.decoders.remove(structure)
            return
        self._problems.pop(structure, None)
        self.decoders.put(loaded)

    def sync(self) -> None:
        """Serve the registry's active version of every structure, and stop serving
        structures that no longer have one: picks up changes other processes made. The
        registry routes call it for the structure they change."""
        registry = self._registry()
        with self._lock:
            served = {d.name for d in (self.decoders.peek(n) for n in self.decoders.names())
                      if d is not None and d.version is not None}
            for structure in sorted(set(registry.structures()) | served | set(self._problems)):
                self._serve_active(structure)

    def changed(self) -> bool:
        """Whether the registry on disk changed since the last ``sync_if_changed`` (a few
        ``stat`` calls: cheap enough for an event loop). False without a registry."""
        return self.registry is not None and self.registry.fingerprint() != self._seen

    def sync_if_changed(self) -> bool:
        """``sync`` when another process (a training job, another replica of a cluster)
        changed the registry since the last call; whether it synced. The fingerprint is
        taken before syncing, so a change made during the sync is seen by the next call."""
        if self.registry is None:
            return False
        seen = self.registry.fingerprint()
        if seen == self._seen:
            return False
        self._seen = seen
        self.sync()
        return True

    def _state(self, state: StructureState) -> dict:
        current = self.decoders.peek(state.structure)
        served = current.version if current is not None and current.version is not None else None
        return {**state.to_json(), "served": served, "problem": self._problems.get(state.structure)}

    def structures(self) -> list[dict]:
        registry = self._registry()
        states = []
        for structure in registry.structures():
            with contextlib.suppress(UnknownVersion):  # deleted meanwhile
                states.append(self._state(registry.state(structure)))
        return states

    def structure(self, structure: str) -> dict:
        registry = self._registry()
        with self._errors():
            return self._state(registry.state(structure))

    def record(self, structure: str, version: str) -> dict:
        """The version (``VersionInfo``) with its decoder metadata, training record included."""
        registry = self._registry()
        with self._errors():
            state = registry.state(structure)
            return {**state.version(version).to_json(), "active": state.active == version,
                    "metadata": registry.record(structure, version)}

    def curve(self, structure: str, version: str) -> bytes:
        registry = self._registry()
        with self._errors():
            path = registry.curve_path(structure, version)
            if path is None:
                raise NotFound(f"{structure} {version} was registered without a training curve")
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise NotFound(f"{structure} {version} was deleted meanwhile") from None

    def _check_servable(self, structure: str) -> None:
        if structure in self._file_decoders:
            raise Conflict(f"the name {structure!r} is taken by a decoder file this service was started with "
                           "(decoders / decoder_dir): it would not serve the registry's version; nothing changed")

    def _fitting(self, info: VersionInfo) -> LoadedDecoder:
        try:
            return self._build_version(info)
        except CheckpointError as exc:
            raise Conflict(f"{info.structure} {info.version} does not fit the service's model, nothing changed: "
                           f"{exc}") from None

    def activate(self, structure: str, version: str) -> dict:
        """Make ``version`` the structure's active version and serve it at once: new
        requests get it, requests already running finish on the version they started with.
        409 (nothing changed) when it does not fit the model or the name is a decoder file's."""
        registry = self._registry()
        with self._lock, self._errors():
            self._check_servable(structure)
            loaded = self._fitting(registry.version(structure, version))
            registry.activate(structure, version)
            self._serve_active(structure, loaded)
            return self._state(registry.state(structure))

    def rollback(self, structure: str) -> dict:
        """Back to the version active before the present one, served at once (as ``activate``)."""
        registry = self._registry()
        with self._lock, self._errors():
            self._check_servable(structure)
            state = registry.state(structure)
            history = [v for v in state.history if v != state.active]
            loaded = self._fitting(state.version(history[-1])) if history else None
            registry.rollback(structure)
            self._serve_active(structure, loaded)
            return self._state(registry.state(structure))

    def delete(self, structure: str, version: str) -> None:
        """Delete a version (409 for the active one while the structure has others; the
        only version removes the structure, which the service then stops serving)."""
        registry = self._registry()
        with self._lock, self._errors():
            registry.delete(structure, version)
            self._serve_active(structure)

    def install(self, decoder_file, *, curve_png=None, activate: bool = True) -> VersionInfo:
        """Register a trained decoder file (and its training-curve PNG) as the next version of
        its structure and, with ``activate``, serve it at once. ``CheckpointError`` when the
        file is unreadable or (with ``activate``) does not fit the service's model: then
        nothing is registered; ``Conflict`` when a decoder file given at start has the name."""
        registry = self._registry()
        with self._lock:
            loaded = None
            if activate:  # fits the model? (before anything is registered)
                structure = read_model_metadata(decoder_file)[1].get("structure")
                loaded = self.decoders.build(decoder_file, structure)
                self._check_servable(structure)
            info = registry.register(decoder_file, curve_png=curve_png, activate=activate)
            if loaded is not None:
                loaded = loaded.as_version(info.structure, info.version)
            self._serve_active(info.structure, loaded)
            return info
