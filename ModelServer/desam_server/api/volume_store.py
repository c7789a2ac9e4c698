"""Uploaded volumes: content-addressed, kept decoded in memory and as payloads on disk.

A volume's id is ``wire.volume_id`` of its voxels and geometry, so uploading the same
volume twice stores it once, and a client can ask for an id before uploading. Two
tiers, each with a byte budget that is never exceeded:

- memory: decoded arrays (``volume_memory_bytes``), least recently used first out;
  a volume in use (``use()``) is pinned and never evicted; eviction calls ``on_evict``
  (the service unregisters the volume from the encoding scheduler);
- disk: the verified payload as received, ``<volume_dir>/<id>.vol``, written atomically
  (temp file, fsync, rename) so a restart finds every volume it had. A file that fails
  its checks on reading (crc, id) is deleted and reads as unknown: the client uploads
  again. Least recently used files go first when the budget would be exceeded, except
  that volumes for which ``keep_longer(id)`` is true (the service: volumes with labels,
  ``label_store``) go only after all others.

Several processes may share one ``volume_dir`` (the replicas of a cluster, ``desam_server.cluster``):
a volume another process wrote is found on first asking for it (its file is adopted into
this store's index), and a file another process removed reads as unknown (the client
uploads again), not as damage. Each process enforces the disk budget over the files it
knows (those found at start, its own, and those it adopted).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import wire
from ..atomic import atomic_write_bytes
from ..engine.preprocess import IntensityWindow
from .errors import NotFound, PayloadTooLarge

log = logging.getLogger(__name__)

__all__ = ["StoredVolume", "VolumeStore"]

_ID_RE = re.compile(r"^[0-9a-f]{64}$")
SUFFIX = ".vol"


@dataclass(eq=False)
class StoredVolume:
    volume_id: str
    array: np.ndarray                    # K x J x I, read-only
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    pins: int = 0
    _default_window: IntensityWindow | None = field(default=None, repr=False)

    @property
    def tag(self) -> str:
        return self.volume_id[:12]

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def default_window(self) -> IntensityWindow:
        """CT soft tissue for Hounsfield-like data, else the volume's percentiles."""
        if self._default_window is None:
            self._default_window = IntensityWindow.default_for(self.array, "auto")
        return self._default_window

    def describe(self) -> dict:
        return {"volume_id": self.volume_id, "shape": list(self.array.shape), "dtype": self.array.dtype.name,
                "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": self.direction.reshape(9).tolist()}


def check_id(volume_id: str) -> str:
    if not isinstance(volume_id, str) or not _ID_RE.match(volume_id):
        raise NotFound("unknown volume: a volume id is 64 lowercase hex characters (wire.volume_id)")
    return volume_id


class VolumeStore:
    def __init__(self, directory: Path | None, *, disk_bytes: int, memory_bytes: int, max_voxels: int,
                 max_bytes: int = wire.DEFAULT_MAX_BYTES, on_evict: Callable[[str], None] | None = None,
                 keep_longer: Callable[[str], bool] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.disk_bytes = disk_bytes
        self.memory_bytes = memory_bytes
        self.max_voxels = max_voxels
        self.max_bytes = max_bytes
        self.on_evict = on_evict or (lambda volume_id: None)
        self.keep_longer = keep_longer or (lambda volume_id: False)
        self._lock = threading.RLock()
        self._memory: collections.OrderedDict[str, StoredVolume] = collections.OrderedDict()
        self._disk: collections.OrderedDict[str, int] = collections.OrderedDict()   # id -> file size, LRU order
        self._loading: dict[str, threading.Lock] = {}
        self._counters = collections.Counter(dict.fromkeys(
            ("uploads", "duplicates", "memory_evictions", "disk_evictions", "disk_loads", "corrupt_files"), 0))
        if self.directory is not None:
            self._scan()

    # ---- queries --------------------------------------------------------------------------
    def contains(self, volume_id: str) -> bool:
        with self._lock:
            if volume_id in self._memory or volume_id in self._disk:
                return True
        return self._adopt_file(volume_id)

    def on_disk(self, volume_id: str) -> bool:
        with self._lock:
            if volume_id in self._disk:
                return True
        return self._adopt_file(volume_id)

    def ids(self) -> list[str]:
        if self.directory is not None:       # volumes other processes wrote since the start
            with contextlib.suppress(OSError):
                for entry in os.scandir(self.directory):
                    if entry.name.endswith(SUFFIX):
                        self._adopt_file(entry.name[: -len(SUFFIX)])
        with self._lock:
            return sorted(set(self._memory) | set(self._disk))

    def describe(self, volume_id: str) -> dict:
        """Shape, dtype and geometry (loads a volume that is only on disk: a client asks
        just before it works on the volume)."""
        with self.use(volume_id) as stored:
            return {**stored.describe(), "on_disk": self.on_disk(volume_id)}

    def stats(self) -> dict:
        with self._lock:
            return {"memory": {"entries": len(self._memory), "bytes": sum(v.nbytes for v in self._memory.values()),
                               "budget_bytes": self.memory_bytes},
                    "disk": {"enabled": self.directory is not None, "entries": len(self._disk),
                             "bytes": sum(self._disk.values()), "budget_bytes": self.disk_bytes},
                    **self._counters}

    # ---- upload ---------------------------------------------------------------------------
    def put(self, payload: bytes) -> tuple[StoredVolume, bool]:
        """Decode and verify a payload, store it; (volume, created). Raises
        ``wire.WireFormatError`` (bad bytes) or ``PayloadTooLarge``."""
        try:
            decoded = wire.decode_volume(payload, max_voxels=self.max_voxels, max_bytes=self.max_bytes)
        except wire.PayloadTooLargeError as exc:
            raise PayloadTooLarge(f"volume too large: {exc}") from None
        if decoded.array.nbytes > self.memory_bytes:
            raise PayloadTooLarge(f"volume of {decoded.array.nbytes} bytes exceeds the service's volume memory "
                                  f"budget of {self.memory_bytes} bytes (volume_memory_bytes)")
        volume_id = decoded.volume_id
        with self._lock:
            self._counters["uploads"] += 1
            existing = self._memory.get(volume_id)
            if existing is not None or volume_id in self._disk:
                self._counters["duplicates"] += 1
        if existing is not None:
            self._touch(volume_id)
            return existing, False
        stored = self._adopt(decoded)
        self._persist(volume_id, payload)
        log.info("volume %s stored: shape %s %s", stored.tag, stored.array.shape, stored.array.dtype.name)
        return stored, True

    # ---- use ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, volume_id: str) -> Iterator[StoredVolume]:
        """The volume, loaded into memory if needed and pinned while in use."""
        stored = self._load(check_id(volume_id))
        try:
            yield stored
        finally:
            with self._lock:
                stored.pins -= 1
            self._evict_memory()

    def delete(self, volume_id: str) -> bool:
        """Forget a volume (memory and disk). Users in flight keep their reference."""
        check_id(volume_id)
        self._adopt_file(volume_id)                       # written by another process sharing the folder
        with self._lock:
            stored = self._memory.pop(volume_id, None)
            size = self._disk.pop(volume_id, None)
        if size is not None:
            self._unlink(volume_id)
        if stored is not None:
            self.on_evict(volume_id)
        return stored is not None or size is not None

    # ---- internals -----------------------------------------------------------------------
    def _path(self, volume_id: str) -> Path:
        assert self.directory is not None
        return self.directory / (volume_id + SUFFIX)

    def _scan(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        found = []
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp"):          # an interrupted write
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                continue
            if name.endswith(SUFFIX) and _ID_RE.match(name[: -len(SUFFIX)]) and entry.is_file():
                st = entry.stat()
                found.append((st.st_mtime, name[: -len(SUFFIX)], st.st_size))
        for _, volume_id, size in sorted(found):
            self._disk[volume_id] = size
        self._evict_disk(0)
        if found:
            log.info("volume store: %d volume(s) on disk", len(self._disk))

    def _adopt(self, decoded: wire.DecodedVolume) -> StoredVolume:
        array = decoded.array
        array.setflags(write=False)
        stored = StoredVolume(decoded.volume_id, array, decoded.spacing, decoded.origin, decoded.direction)
        with self._lock:
            self._memory[stored.volume_id] = stored
            self._memory.move_to_end(stored.volume_id)
        self._evict_memory()
        return stored

    def _persist(self, volume_id: str, payload: bytes) -> None:
        if self.directory is None or len(payload) > self.disk_bytes:
            return
        self._evict_disk(len(payload))
        atomic_write_bytes(self._path(volume_id), payload)
        with self._lock:
            self._disk[volume_id] = len(payload)

    def _load(self, volume_id: str) -> StoredVolume:
        with self._lock:
            stored = self._memory.get(volume_id)
            if stored is not None:
                stored.pins += 1
                self._memory.move_to_end(volume_id)
                return stored
            known = volume_id in self._disk
        if not known and not self._adopt_file(volume_id):
            raise NotFound(f"unknown volume {volume_id[:12]}: upload it first")
        with self._lock:
            gate = self._loading.setdefault(volume_id, threading.Lock())
        with gate:                                        # one reader per file at a time
            with self._lock:
                stored = self._memory.get(volume_id)
                if stored is not None:
                    stored.pins += 1
                    return stored
            try:
                decoded = wire.decode_volume(self._path(volume_id).read_bytes(), max_voxels=self.max_voxels,
                                             max_bytes=self.max_bytes)
                ok = decoded.volume_id == volume_id
            except FileNotFoundError:                     # removed by another process sharing the folder
                with self._lock:
                    self._disk.pop(volume_id, None)
                    self._loading.pop(volume_id, None)
                raise NotFound(f"unknown volume {volume_id[:12]}: upload it first") from None
            except (OSError, wire.WireFormatError):
                ok = False
            if not ok:
                self._drop_corrupt(volume_id)
                raise NotFound(f"volume {volume_id[:12]} was damaged on the service's disk and is gone: "
                               "upload it again")
            self._counters["disk_loads"] += 1
            self._touch(volume_id)
            stored = StoredVolume(volume_id, decoded.array, decoded.spacing, decoded.origin, decoded.direction)
            stored.array.setflags(write=False)
            with self._lock:
                stored.pins += 1
                self._memory[volume_id] = stored
                self._loading.pop(volume_id, None)
        self._evict_memory()
        return stored

    def _adopt_file(self, volume_id: str) -> bool:
        """Index the volume's file when another process sharing the folder wrote it; whether
        the store has it on disk now."""
        if self.directory is None or not _ID_RE.match(volume_id):
            return False
        try:
            st = os.stat(self._path(volume_id))
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        with self._lock:
            if volume_id not in self._disk:
                self._disk[volume_id] = st.st_size
        return True

    def _touch(self, volume_id: str) -> None:
        with self._lock:
            if volume_id in self._memory:
                self._memory.move_to_end(volume_id)
            if volume_id in self._disk:
                self._disk.move_to_end(volume_id)
                with contextlib.suppress(OSError):
                    now = time.time()
                    os.utime(self._path(volume_id), (now, now))

    def _drop_corrupt(self, volume_id: str) -> None:
        log.warning("volume store: file of volume %s failed its checks; deleted", volume_id[:12])
        with self._lock:
            self._counters["corrupt_files"] += 1
            self._disk.pop(volume_id, None)
        self._unlink(volume_id)

    def _unlink(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(volume_id))

    def _evict_memory(self) -> None:
        evicted = []
        with self._lock:
            total = sum(v.nbytes for v in self._memory.values())
            for volume_id in list(self._memory):
                if total <= self.memory_bytes:
                    break
                stored = self._memory[volume_id]
                if stored.pins > 0:
                    continue
                del self._memory[volume_id]
                total -= stored.nbytes
                evicted.append(volume_id)
                self._counters["memory_evictions"] += 1
        for volume_id in evicted:
            self.on_evict(volume_id)

    def _evict_disk(self, incoming: int) -> None:
        doomed = []
        with self._lock:
            total = sum(self._disk.values())
            if total + incoming <= self.disk_bytes:
                return
            kept = {volume_id: self.keep_longer(volume_id) for volume_id in self._disk}
            for volume_id in sorted(self._disk, key=kept.__getitem__):    # stable: LRU within each group
                if total + incoming <= self.disk_bytes:
                    break
                total -= self._disk.pop(volume_id)
                doomed.append(volume_id)
                self._counters["disk_evictions"] += 1
                if kept[volume_id]:
                    log.warning("volume store: volume %s left the disk for its budget although kept longer "
                                "(it has labels, which stay: upload the volume again to use them)", volume_id[:12])
        for volume_id in doomed:
            self._unlink(volume_id)
