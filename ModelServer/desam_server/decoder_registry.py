"""The registry of trained DeSAM decoder versions, per structure, on disk.

Layout under the registry's root (default ``default_registry_dir()``)::

    <root>/.lock                        # writers serialise on it (fcntl.flock)
    <root>/<structure>/versions.json    # the structure's state: versions, active, history
    <root>/<structure>/v<N>.safetensors # a version's decoder file (PRIM + PDMM, checkpoint format)
    <root>/<structure>/v<N>.png         # its training curve, when one came with it

``versions.json`` is the single source of truth: a version exists when it is listed
there. Registering writes the version's files first (each atomically: temporary file,
fsync, rename) and then replaces ``versions.json`` atomically, so a version becomes
visible complete or not at all. A writer killed at any moment leaves at most temporary
files and version files that ``versions.json`` does not list; both are removed by the
next writer and whenever a registry is opened (under the lock, so never a concurrent
writer's files). Readers take no lock: ``versions.json`` is always a whole file.

Version names are ``v1``, ``v2``, ... per structure, never reused: the highest number
handed out stays in ``versions.json`` after its version is deleted. The *active* version
is the one a service serves under the structure's name; activating another version or
rolling back (to the version active before, an undo stack of activations) changes it.
Deleting the active version is refused while the structure has other versions (activate
or roll back first); deleting a structure's only version removes the structure.

Safe for several threads and processes at once (a training process registers while the
service reads and activates): every change holds an exclusive ``flock`` on ``<root>/.lock``
(on systems without ``fcntl``, a lock within the process only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes
from .modeling.checkpoint import SERVED_FORMATS, CheckpointError, read_model_metadata

log = logging.getLogger(__name__)

__all__ = ["DecoderRegistry", "VersionInfo", "StructureState", "RegistryError", "UnknownVersion",
           "RegistryConflict", "NAME_RE", "VERSION_RE", "RESERVED_NAMES", "check_structure_name",
           "default_registry_dir"]

#: Decoder names: a structure in the registry, the stem of a decoder file given to the service.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Names that mean something else in the API (``decoder: "sam"`` is SAM's own decoder).
RESERVED_NAMES = frozenset({"sam"})
VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})$")
STATE_NAME = "versions.json"
LOCK_NAME = ".lock"
STATE_FORMAT = "desam-decoder-registry"
STATE_FORMAT_VERSION = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Activations remembered for rollback, per structure.
HISTORY_KEPT = 64

_process_lock = threading.Lock()  # where fcntl is missing (Windows)


class RegistryError(Exception):
    """A registry operation was refused; subclasses say why."""


class UnknownVersion(RegistryError, LookupError):
    """No such structure, or no such version of it, in the registry."""


class RegistryConflict(RegistryError):
    """Refused in the registry's present state (deleting the active version, rolling back
    without an earlier activation)."""


def default_registry_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/slicer-desam/decoders``, else ``~/.local/share/slicer-desam/decoders``
    (the service's setting ``registry_dir`` / ``DESAM_REGISTRY_DIR`` overrides it)."""
    env = os.environ if environ is None else environ
    data_home = env.get("XDG_DATA_HOME", "").strip()
    base = Path(data_home).expanduser() if data_home and Path(data_home).is_absolute() else (
        Path.home() / ".local" / "share")
    return base / "slicer-desam" / "decoders"


def check_structure_name(name: str) -> str:
    """``name`` when it is usable as a decoder name (letters, digits, ``_ . -``; not a
    reserved name); ``ValueError`` otherwise."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a usable decoder name (1-64 letters, digits, _ . -, "
                         "starting with a letter or digit)")
    if name.lower() in RESERVED_NAMES:
        raise ValueError(f"{name!r} is reserved (decoder 'sam' is SAM's own prompted decoder)")
    return name


@dataclass(frozen=True)
class VersionInfo:
    """One registered version. created: Unix time of its registration; sha256 and
    size_bytes: of its model file; encoder / encoder_weights_sha256: what it was trained
    for (from the file's metadata); curve: whether a training-curve PNG came with it;
    family: the model family its file's format serves (``checkpoint.SERVED_FORMATS``)."""

    structure: str
    version: str
    created: float
    sha256: str
    size_bytes: int
    encoder: str | None
    encoder_weights_sha256: str | None
    curve: bool
    family: str = "desam"

    @property
    def number(self) -> int:
        return int(self.version[1:])

    def to_json(self) -> dict[str, Any]:
        return {"structure": self.structure, "version": self.version, "created": self.created,
                "sha256": self.sha256, "size_bytes": self.size_bytes, "encoder": self.encoder,
                "encoder_weights_sha256": self.encoder_weights_sha256, "curve": self.curve, "family": self.family}


@dataclass(frozen=True)
class StructureState:
    """A structure's registry state: its versions (oldest first), the active one (None:
    none is served) and the earlier active versions a rollback returns to (most recent last)."""

    structure: str
    versions: tuple[VersionInfo, ...]
    active: str | None
    history: tuple[str, ...]
    last_number: int = 0
    metadata: dict[str, dict] = field(default_factory=dict, repr=False, compare=False)

    def version(self, version: str) -> VersionInfo:
        for info in self.versions:
            if info.version == version:
                return info
        known = ", ".join(v.version for v in self.versions) or "none"
        raise UnknownVersion(f"structure {self.structure!r} has no version {version!r} (versions: {known})")

    def active_version(self) -> VersionInfo | None:
        return None if self.active is None else self.version(self.active)

    def to_json(self) -> dict[str, Any]:
        return {"structure": self.structure, "active": self.active, "history": list(self.history),
                "versions": [v.to_json() for v in self.versions]}


class DecoderRegistry:
    """Decoder versions per structure under ``root`` (see the module docstring). Opening
    one removes what killed writers left behind; it creates nothing until the first
    ``register``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        if self.root.is_dir():
            try:
                with self._locked():
                    for directory in self._structure_dirs():
                        try:
                            state = self._read_state_file(directory)
                        except RegistryError as exc:
                            log.warning("%s", exc)
                            continue
                        self._clean(directory, state)
            except OSError as exc:  # a registry this process may only read
                log.warning("decoder registry: cannot tidy it (%s); reading only", exc.strerror)

    # ---- reading ------------------------------------------------------------------------
    def structures(self) -> list[str]:
        """Structures with at least one version, sorted (an unreadable one is left out, logged)."""
        found = []
        for directory in self._structure_dirs():
            try:
                if self._read_state_file(directory).versions:
                    found.append(directory.name)
            except RegistryError as exc:
                log.warning("%s", exc)
        return found

    def fingerprint(self) -> tuple[tuple[str, int, int, int], ...]:
        """(structure, inode, mtime in ns, size) of every structure's ``versions.json``:
        changes whenever a writer in any process replaces one (an atomic rename gives a new
        inode) or a structure appears or goes. A few ``stat`` calls, no file read: cheap
        enough to compare before every request (``api.DecoderVersions.sync_if_changed``)."""
        found = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(self.root):
                if not NAME_RE.match(entry.name):
                    continue
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    st = os.stat(os.path.join(entry.path, STATE_NAME))
                    found.append((entry.name, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(sorted(found))

    def state(self, structure: str) -> StructureState:
        """The structure's versions, active version and rollback history; ``UnknownVersion``
        when it has no version."""
        state = self._read_state_file(self._dir(structure))
        if not state.versions:
            raise UnknownVersion(f"no decoder structure {structure!r} in the registry "
                                 f"(structures: {', '.join(self.structures()) or 'none'})")
        return state

    def versions(self, structure: str) -> list[VersionInfo]:
        return list(self.state(structure).versions)

    def version(self, structure: str, version: str) -> VersionInfo:
        return self.state(structure).version(version)

    def record(self, structure: str, version: str) -> dict[str, Any]:
        """The version's decoder metadata (``modeling.checkpoint.decoder_metadata``: encoder,
        taps, input convention, structure, the trainer's ``training`` record)."""
        state = self.state(structure)
        state.version(version)
        return json.loads(json.dumps(state.metadata[version]))  # a copy the caller may change

    def active(self, structure: str) -> VersionInfo | None:
        return self.state(structure).active_version()

    def path(self, structure: str, version: str) -> Path:
        """The version's decoder file (read-only: it never changes while registered)."""
        self.version(structure, version)
        return self._dir(structure) / f"{version}.safetensors"

    def curve_path(self, structure: str, version: str) -> Path | None:
        """The version's training-curve PNG, or None when it came without one."""
        return self._dir(structure) / f"{version}.png" if self.version(structure, version).curve else None

    def active_paths(self) -> dict[str, tuple[VersionInfo, Path]]:
        """Structure -> (active version, its decoder file), for every structure with one."""
        found = {}
        for structure in self.structures():
            with contextlib.suppress(UnknownVersion):  # deleted meanwhile
                info = self.active(structure)
                if info is not None:
                    found[structure] = (info, self._dir(structure) / f"{info.version}.safetensors")
        return found

    # ---- changing -------------------------------------------------------------------------
    def register(self, decoder_file: str | os.PathLike, *, curve_png: str | os.PathLike | None = None,
                 activate: bool = True) -> VersionInfo:
        """Copy a decoder file (and its training-curve PNG) in as the next version of the
        structure its metadata names, and make it the active version unless ``activate`` is
        false. ``CheckpointError`` when the file is not a readable decoder file or its
        structure name is not usable; ``ValueError`` when ``curve_png`` is not a PNG file.
        The source files are only read."""
        source = Path(decoder_file)
        family, meta = read_model_metadata(source)
        try:
            structure = check_structure_name(meta.get("structure"))
        except ValueError as exc:
            raise CheckpointError(f"{source}: structure {exc}") from None
        curve = None
        if curve_png is not None:
            curve = Path(curve_png).read_bytes()
            if not curve.startswith(PNG_SIGNATURE):
                raise ValueError(f"{curve_png}: not a PNG file")
        data = source.read_bytes()
        directory = self._dir(structure)
        with self._locked():
            directory.mkdir(parents=True, exist_ok=True)
            state = self._read_state_file(directory)
            self._clean(directory, state)
            number = state.last_number + 1
            version = f"v{number}"
            target = directory / f"{version}.safetensors"
            atomic_write_bytes(target, data)
            try:
                _, written = read_model_metadata(target)
                if written != meta:
                    raise CheckpointError(f"{source}: the file changed while it was being registered")
            except CheckpointError:
                target.unlink(missing_ok=True)
                raise
            if curve is not None:
                atomic_write_bytes(directory / f"{version}.png", curve)
            info = VersionInfo(structure=structure, version=version, created=round(time.time(), 3),
                               sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
                               encoder=meta.get("encoder"), encoder_weights_sha256=meta.get("encoder_weights_sha256"),
                               curve=curve is not None, family=family)
            active, history = state.active, list(state.history)
            if activate:
                if active is not None:
                    history.append(active)
                active = version
            self._write_state(directory, StructureState(
                structure=structure, versions=(*state.versions, info), active=active, history=tuple(history),
                last_number=number, metadata={**state.metadata, version: meta}))
        log.info("decoder registry: %s %s registered%s", structure, version, " and active" if activate else "")
        return info

    def activate(self, structure: str, version: str) -> StructureState:
        """Make ``version`` the structure's active version (the one before goes onto the
        rollback history). Activating the active version changes nothing."""
        with self._locked():
            state = self.state(structure)
            state.version(version)
            if state.active == version:
                return state
            history = state.history if state.active is None else (*state.history, state.active)
            new = _replace(state, active=version, history=history)
            self._write_state(self._dir(structure), new)
        log.info("decoder registry: %s %s active", structure, version)
        return new

    def rollback(self, structure: str) -> StructureState:
        """Back to the version that was active before the present one (``RegistryConflict``
        when there is none: no earlier activation, or its versions were deleted)."""
        with self._locked():
            state = self.state(structure)
            history = list(state.history)
            while history and history[-1] == state.active:
                history.pop()
            if not history:
                raise RegistryConflict(f"structure {structure!r} has no earlier active version to roll back to "
                                       f"(active: {state.active or 'none'})")
            new = _replace(state, active=history[-1], history=tuple(history[:-1]))
            self._write_state(self._dir(structure), new)
        log.info("decoder registry: %s rolled back from %s to %s", structure, state.active, new.active)
        return new

    def delete(self, structure: str, version: str) -> StructureState:
        """Remove a version (files and history entries). The active version only when it is
        the structure's only one (``RegistryConflict`` otherwise): that removes the
        structure. Returns the structure's state after (no versions when it is gone)."""
        directory = self._dir(structure)
        with self._locked():
            state = self.state(structure)
            state.version(version)
            if state.active == version and len(state.versions) > 1:
                others = ", ".join(v.version for v in state.versions if v.version != version)
                raise RegistryConflict(f"{version} is the active version of {structure!r}: activate another "
                                       f"version ({others}) or roll back first")
            new = StructureState(
                structure=structure, versions=tuple(v for v in state.versions if v.version != version),
                active=None if state.active == version else state.active,
                history=_without(state.history, version), last_number=state.last_number,
                metadata={k: v for k, v in state.metadata.items() if k != version})
            self._write_state(directory, new)
            self._clean(directory, new)
        log.info("decoder registry: %s %s deleted", structure, version)
        return new

    # ---- files ------------------------------------------------------------------------------
    def _dir(self, structure: str) -> Path:
        try:
            return self.root / check_structure_name(structure)
        except ValueError:
            raise UnknownVersion(f"no decoder structure {structure!r} in the registry") from None

    def _structure_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(d for d in self.root.iterdir() if d.is_dir() and NAME_RE.match(d.name))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:
            with _process_lock:
                yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        # One open file description per holder: flock excludes threads of one process too.
        with open(self.root / LOCK_NAME, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def _clean(self, directory: Path, state: StructureState) -> None:
        """Remove temporary files and version files that ``state`` does not list (what a
        killed writer left). Only under the lock."""
        listed = {v.version for v in state.versions}
        for path in directory.iterdir():
            name = path.name
            stem, _, suffix = name.partition(".")
            orphan = VERSION_RE.match(stem) and suffix in ("safetensors", "png") and stem not in listed
            if name.startswith(".") and ".tmp" in name or orphan:  # atomic.py's temporary names
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    log.info("decoder registry: removed %s/%s left by an interrupted change", directory.name, name)

    def _read_state_file(self, directory: Path) -> StructureState:
        path = directory / STATE_NAME
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return StructureState(structure=directory.name, versions=(), active=None, history=())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"decoder registry: {directory.name}/{STATE_NAME} is unreadable ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or (
                data.get("format_version") != STATE_FORMAT_VERSION):
            found = data.get("format_version") if isinstance(data, dict) else None
            raise RegistryError(f"decoder registry: {directory.name}/{STATE_NAME} is not {STATE_FORMAT!r} version "
                                f"{STATE_FORMAT_VERSION} (found version {found!r})")
        try:
            versions, metadata = [], {}
            for name, entry in data["versions"].items():
                meta = entry["metadata"]
                metadata[name] = meta
                versions.append(VersionInfo(structure=directory.name, version=name, created=entry["created"],
                                            sha256=entry["sha256"], size_bytes=entry["size_bytes"],
                                            encoder=meta.get("encoder"),
                                            encoder_weights_sha256=meta.get("encoder_weights_sha256"),
                                            curve=entry["curve"],
                                            family=SERVED_FORMATS.get(meta.get("format"), "desam")))
            versions.sort(key=lambda v: v.number)
            return StructureState(structure=directory.name, versions=tuple(versions), active=data["active"],
                                  history=tuple(data["history"]), last_number=int(data["last_number"]),
                                  metadata=metadata)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RegistryError(f"decoder registry: {directory.name}/{STATE_NAME} is malformed "
                                f"({type(exc).__name__}: {exc})") from None

    def _write_state(self, directory: Path, state: StructureState) -> None:
        data = {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, "structure": state.structure,
                "last_number": state.last_number, "active": state.active,
                "history": list(state.history[-HISTORY_KEPT:]),
                "versions": {v.version: {"created": v.created, "sha256": v.sha256, "size_bytes": v.size_bytes,
                                         "curve": v.curve, "metadata": state.metadata[v.version]}
                             for v in state.versions}}
        atomic_write_bytes(directory / STATE_NAME, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _replace(state: StructureState, **changes) -> StructureState:
    values = {"structure": state.structure, "versions": state.versions, "active": state.active,
              "history": state.history, "last_number": state.last_number, "metadata": state.metadata}
    return StructureState(**{**values, **changes})


def _without(history: tuple[str, ...], version: str) -> tuple[str, ...]:
    """The history without ``version``, and without the repeats that removing it makes adjacent."""
    kept: list[str] = []
    for v in history:
        if v != version and (not kept or kept[-1] != v):
            kept.append(v)
    return tuple(kept)
