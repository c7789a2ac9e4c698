"""Label volumes of uploaded volumes: one bool K x J x I mask per (volume id, structure).

This is how cases corrected in Slicer become training data: the client sends the label of
a structure for a volume it uploaded, and a training job takes its cases as (volume id,
structure) pairs from here (``get``, ``cases``).

- A label is defined on its volume's voxel grid: the same volume id (the content hash of
  voxels *and* geometry), the volume's shape, never empty. Shape and the volume-id binding
  are what the service can check; geometry is the volume's by construction.
- Stored as a canonical wire mask payload (docs/WIRE_FORMAT.md: axis 'k', offset 0, the
  whole volume, ``volume_id`` in its header), ``<directory>/<volume id>/<escaped
  structure>.mask``, written atomically (``desam_server.atomic``); verified on every read
  (crc32, 3-D shape along 'k' at offset 0, the volume id of its folder): a file that
  fails is deleted and reads as missing. Without a directory (``volume_dir`` off) labels
  live in memory only, like the volumes.
- Labels are never evicted. A label is deleted with its volume (``DELETE /volumes/{id}``)
  or on its own. When the volume store evicts the volume for its disk budget, the labels
  stay and the volume store evicts volumes that have labels only after all others
  (``VolumeStore(keep_longer=...)``): re-uploading the same volume gives the same id and
  its labels are there again. Labels of volumes the service no longer holds are listed
  with ``volume_available`` false.

Structure names (``STRUCTURE_RE``): 1 to 64 characters, ASCII letters, digits, spaces and
``_ . - ( ) + ,``, starting with a letter or digit and not ending with a space (Slicer's
segment names such as "Left kidney"); case-sensitive. File names escape every character
but lowercase letters, digits and ``_ . -`` as ``%XX`` (``structure_file_name``), so a
name never reaches a path raw and two names never share a file, even on case-insensitive
file systems. Logs name volumes by their first 12 hex digits.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import wire
from ..atomic import atomic_write_bytes
from .errors import NotFound, Unprocessable

log = logging.getLogger(__name__)

__all__ = ["LabelInfo", "LabelStore", "STRUCTURE_RE", "STRUCTURE_RULE", "check_structure", "structure_file_name"]

STRUCTURE_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9 _.()+,-]{0,62}[A-Za-z0-9_.()+,-])?$")
STRUCTURE_RULE = ("1 to 64 ASCII letters, digits, spaces and _ . - ( ) + , starting with a letter or digit, "
                  "not ending with a space")
SUFFIX = ".mask"
_ID_RE = re.compile(r"^[0-9a-f]{64}$")
_FILE_SAFE = "abcdefghijklmnopqrstuvwxyz0123456789_.-"


def check_structure(structure: str) -> str:
    """The structure name, or ``Unprocessable`` (422) saying the rule."""
    if not isinstance(structure, str) or not STRUCTURE_RE.match(structure):
        shown = repr(structure[:80]) if isinstance(structure, str) else type(structure).__name__
        raise Unprocessable(f"structure name {shown} is not usable: {STRUCTURE_RULE}")
    return structure


def structure_file_name(structure: str) -> str:
    """The file name of a structure's label: every character outside ``[a-z0-9_.-]``
    percent-escaped with uppercase hex (injective, also after case folding)."""
    escaped = "".join(c if c in _FILE_SAFE else f"%{ord(c):02X}" for c in check_structure(structure))
    return escaped + SUFFIX


def _structure_of(file_name: str) -> str | None:
    """The structure a file name stands for, or None when it is not one of ours."""
    if not file_name.endswith(SUFFIX):
        return None
    structure = urllib.parse.unquote(file_name[: -len(SUFFIX)], errors="strict")
    if not STRUCTURE_RE.match(structure):
        return None
    try:
        return structure if structure_file_name(structure) == file_name else None
    except Unprocessable:
        return None


@dataclass(frozen=True)
class LabelInfo:
    """What a stored label holds: voxel count, and per axis how many slices contain the
    structure and the first and last of them (the training split picks slabs from these)."""

    volume_id: str
    structure: str
    shape: tuple[int, int, int]
    voxels: int
    slices: dict[str, int]                        # axis -> slices containing the structure
    extent: dict[str, tuple[int, int]]            # axis -> (first, last) such slice
    bytes: int                                    # size of the stored payload

    @classmethod
    def of(cls, volume_id: str, structure: str, mask: np.ndarray, nbytes: int) -> LabelInfo:
        slices, extent = {}, {}
        for dim, axis in enumerate(wire.AXES):
            other = tuple(d for d in range(3) if d != dim)
            present = np.flatnonzero(mask.any(axis=other))
            slices[axis] = int(present.size)
            extent[axis] = (int(present[0]), int(present[-1]))
        return cls(volume_id, structure, tuple(int(n) for n in mask.shape), int(np.count_nonzero(mask)),
                   slices, extent, int(nbytes))

    def to_json(self) -> dict:
        return {"volume_id": self.volume_id, "structure": self.structure, "shape": list(self.shape),
                "voxels": self.voxels, "slices": dict(self.slices),
                "extent": {axis: list(pair) for axis, pair in self.extent.items()}, "bytes": self.bytes}


class LabelStore:
    """Labels per (volume id, structure); thread-safe. ``directory`` None keeps them in
    memory only. Callers check the volume (shape, id) before ``put``; the store checks
    that the mask is a non-empty bool K x J x I array.

    ``read_only``: for another process reading the service's labels (a training job): it
    never writes or deletes -- no cleanup of temporary files (they may be the service's
    writes in progress), a damaged file reads as missing but stays -- and ``put`` and the
    deletions raise ``PermissionError``. Its index is what the directory held when it was
    made (labels stored later are not seen; a label deleted later reads as missing)."""

    def __init__(self, directory: Path | None, *, max_pixels: int = wire.DEFAULT_MAX_PIXELS,
                 read_only: bool = False) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_pixels = max_pixels
        self.read_only = read_only
        self._lock = threading.Lock()                 # the indexes below
        self._write_lock = threading.Lock()           # one writer at a time: file and index agree
        self._known: dict[str, set[str]] = {}         # volume id -> structures with a label
        self._info: dict[tuple[str, str], LabelInfo] = {}
        self._memory: dict[tuple[str, str], bytes] = {}      # payloads when there is no directory
        self._counters = collections.Counter(dict.fromkeys(("puts", "deletes", "corrupt_files"), 0))
        if self.directory is not None:
            self._scan()

    # ---- queries --------------------------------------------------------------------------
    def volumes(self) -> list[str]:
        """Ids of the volumes that have at least one label."""
        with self._lock:
            return sorted(v for v, names in self._known.items() if names)

    def has_labels(self, volume_id: str) -> bool:
        with self._lock:
            return bool(self._known.get(volume_id))

    def structures(self, volume_id: str) -> list[str]:
        with self._lock:
            return sorted(self._known.get(volume_id, ()))

    def cases(self, structure: str | None = None) -> list[tuple[str, str]]:
        """Every (volume id, structure) with a label, or those of one structure; sorted."""
        with self._lock:
            return sorted((v, s) for v, names in self._known.items() for s in names
                          if structure is None or s == structure)

    def list(self, volume_id: str) -> list[LabelInfo]:
        """The labels of a volume (reads and verifies a file the first time after a restart;
        a damaged one is dropped and left out)."""
        found = []
        for structure in self.structures(volume_id):
            with contextlib.suppress(NotFound):
                found.append(self.info(volume_id, structure))
        return found

    def info(self, volume_id: str, structure: str) -> LabelInfo:
        with self._lock:
            info = self._info.get((volume_id, structure))
        if info is None:
            self._read(volume_id, structure)
            with self._lock:
                info = self._info.get((volume_id, structure))
            if info is None:                           # deleted meanwhile
                raise self._missing(volume_id, structure)
        return info

    def get(self, volume_id: str, structure: str) -> np.ndarray:
        """The label as a bool K x J x I array (a new, writable array each call);
        ``NotFound`` when there is none or its file was damaged."""
        return self._read(volume_id, structure)[0]

    def payload(self, volume_id: str, structure: str) -> bytes:
        """The stored wire mask payload (verified)."""
        return self._read(volume_id, structure)[1]

    def stats(self) -> dict:
        with self._lock:
            return {"volumes": sum(1 for names in self._known.values() if names),
                    "labels": sum(len(names) for names in self._known.values()),
                    "disk": self.directory is not None, **self._counters}

    # ---- changes --------------------------------------------------------------------------
    def put(self, volume_id: str, structure: str, mask: np.ndarray) -> tuple[LabelInfo, bool]:
        """Store (or replace) a label; (info, created). The caller has checked that ``mask``
        has the volume's shape."""
        check_structure(structure)
        if not _ID_RE.match(volume_id):
            raise NotFound("unknown volume: a volume id is 64 lowercase hex characters (wire.volume_id)")
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.ndim != 3:
            raise Unprocessable(f"a label is a bool K x J x I array, got {mask.dtype} {mask.shape}")
        if not mask.any():
            raise Unprocessable(f"the label of {structure} is empty: a label must mark at least one voxel")
        self._check_writable()
        payload = wire.encode_mask(mask, axis="k", offset=0, volume_id=volume_id)
        info = LabelInfo.of(volume_id, structure, mask, len(payload))
        key = (volume_id, structure)
        with self._write_lock:
            if self.directory is not None:
                atomic_write_bytes(self._path(volume_id, structure), payload)
            with self._lock:
                created = structure not in self._known.get(volume_id, ())
                self._known.setdefault(volume_id, set()).add(structure)
                self._info[key] = info
                if self.directory is None:
                    self._memory[key] = payload
                self._counters["puts"] += 1
        log.info("label stored for volume %s: %d voxels on %d slices", volume_id[:12], info.voxels,
                 info.slices["k"])
        return info, created

    def delete(self, volume_id: str, structure: str) -> bool:
        """Forget one label; False when there was none."""
        self._check_writable()
        with self._write_lock:
            with self._lock:
                names = self._known.get(volume_id, set())
                if structure not in names:
                    return False
                names.discard(structure)
                if not names:
                    self._known.pop(volume_id, None)
                self._info.pop((volume_id, structure), None)
                self._memory.pop((volume_id, structure), None)
                self._counters["deletes"] += 1
            if self.directory is not None:
                self._unlink(volume_id, structure)
        return True

    def delete_volume(self, volume_id: str) -> int:
        """Forget every label of a volume (its folder too); how many there were."""
        self._check_writable()
        with self._write_lock:
            with self._lock:
                names = self._known.pop(volume_id, set())
                for structure in names:
                    self._info.pop((volume_id, structure), None)
                    self._memory.pop((volume_id, structure), None)
                self._counters["deletes"] += len(names)
            if self.directory is not None and _ID_RE.match(volume_id):
                for structure in names:
                    self._unlink(volume_id, structure)
                with contextlib.suppress(OSError):          # not empty: something that is not ours
                    os.rmdir(self.directory / volume_id)
        if names:
            log.info("volume %s: %d label(s) deleted", volume_id[:12], len(names))
        return len(names)

    # ---- internals ------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError("this label store is read-only (the service writes labels)")

    def _path(self, volume_id: str, structure: str) -> Path:
        assert self.directory is not None and _ID_RE.match(volume_id)
        return self.directory / volume_id / structure_file_name(structure)

    def _missing(self, volume_id: str, structure: str) -> NotFound:
        return NotFound(f"volume {volume_id[:12]} has no label of {structure}")

    def _scan(self) -> None:
        if not self.read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
        elif not self.directory.is_dir():
            return
        count = 0
        for folder in os.scandir(self.directory):
            if not (folder.is_dir() and _ID_RE.match(folder.name)):
                continue
            for entry in os.scandir(folder.path):
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):      # an interrupted write
                    if self.read_only:
                        continue
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                    continue
                structure = _structure_of(entry.name)
                if structure is not None and entry.is_file():
                    self._known.setdefault(folder.name, set()).add(structure)
                    count += 1
        if count:
            log.info("label store: %d label(s) of %d volume(s) on disk", count, len(self._known))

    def _read(self, volume_id: str, structure: str) -> tuple[np.ndarray, bytes]:
        """The verified mask and payload; a damaged file is deleted (``NotFound``)."""
        for _ in range(3):                             # a file replaced while it was read: again
            payload = self._load(volume_id, structure)
            mask = self._verified(volume_id, payload)
            if mask is not None:
                break
            if self.read_only:
                raise NotFound(f"the label of {structure} for volume {volume_id[:12]} is damaged on the "
                               "service's disk")
            if self._drop_corrupt(volume_id, structure, payload):
                raise NotFound(f"the label of {structure} for volume {volume_id[:12]} was damaged on the "
                               "service's disk and is gone: send it again")
        else:
            raise self._missing(volume_id, structure)
        key = (volume_id, structure)
        with self._lock:
            if key not in self._info and structure in self._known.get(volume_id, ()):
                self._info[key] = LabelInfo.of(volume_id, structure, mask, len(payload))
        return mask, payload

    def _load(self, volume_id: str, structure: str) -> bytes:
        with self._lock:
            if structure not in self._known.get(volume_id, ()):
                raise self._missing(volume_id, structure)
            payload = self._memory.get((volume_id, structure))
        if payload is not None:
            return payload
        try:
            return self._path(volume_id, structure).read_bytes()
        except FileNotFoundError:
            self._forget(volume_id, structure)
            raise self._missing(volume_id, structure) from None
        except OSError:
            return b""

    def _verified(self, volume_id: str, payload: bytes) -> np.ndarray | None:
        """The mask of a stored payload, or None when it fails a check."""
        try:
            decoded = wire.decode_mask(payload, max_pixels=self.max_pixels)
        except wire.WireFormatError:
            return None
        ok = (decoded.mask.ndim == 3 and decoded.axis == "k" and decoded.offset == 0
              and decoded.header.get("volume_id") == volume_id and bool(decoded.mask.any()))
        return decoded.mask if ok else None

    def _forget(self, volume_id: str, structure: str) -> None:
        with self._lock:
            names = self._known.get(volume_id, set())
            names.discard(structure)
            if not names:
                self._known.pop(volume_id, None)
            self._info.pop((volume_id, structure), None)

    def _drop_corrupt(self, volume_id: str, structure: str, payload: bytes) -> bool:
        """Delete a label whose stored ``payload`` failed its checks; False (nothing done)
        when a writer replaced it meanwhile."""
        with self._write_lock:
            if self.directory is not None:
                try:
                    current = self._path(volume_id, structure).read_bytes()
                except OSError:
                    current = b""
                if current != payload:
                    return False
                self._unlink(volume_id, structure)
            elif self._memory.get((volume_id, structure)) is not payload:
                return False
            self._forget(volume_id, structure)
            with self._lock:
                self._memory.pop((volume_id, structure), None)
                self._counters["corrupt_files"] += 1
        log.warning("label store: a label file of volume %s failed its checks; deleted", volume_id[:12])
        return True

    def _unlink(self, volume_id: str, structure: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(volume_id, structure))
