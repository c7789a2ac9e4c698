"""The feature cache's tiers: LRU bookkeeping with hard byte budgets.

Neither class locks: ``FeatureCache`` calls them under its own lock, and does file writes
and reads (the slow part) outside it. Both count only real bytes: tensor bytes in memory,
file sizes (header + payload) on disk, plus disk space reserved for writes in progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

from .feature_disk import CorruptEntryError, entry_name, is_entry_name, is_legacy_name, is_temp_name, read_entry_info
from .feature_packed import PackedFeatures

log = logging.getLogger(__name__)

__all__ = ["MemoryTier", "DiskTier"]


class MemoryTier:
    """Device or host memory: digest -> PackedFeatures, least recently used first."""

    def __init__(self, name: str, budget: int, device: str) -> None:
        self.name = name
        self.budget = int(budget)
        self.device = device
        self.entries: OrderedDict[str, PackedFeatures] = OrderedDict()
        self.used = 0
        self.hits = self.misses = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def lookup(self, digest: str) -> PackedFeatures | None:
        """A counted lookup: a hit becomes the most recently used entry."""
        if not self.enabled:
            return None
        packed = self.entries.get(digest)
        if packed is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(digest)
        return packed

    def pop(self, digest: str) -> PackedFeatures | None:
        packed = self.entries.pop(digest, None)
        if packed is not None:
            self.used -= packed.nbytes
        return packed

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.budget

    def make_room(self, nbytes: int) -> list[tuple[str, PackedFeatures]]:
        """Evict least recently used entries until ``nbytes`` more fit; returns them."""
        evicted = []
        while self.entries and self.used + nbytes > self.budget:
            digest, packed = self.entries.popitem(last=False)
            self.used -= packed.nbytes
            self.evictions += 1
            evicted.append((digest, packed))
        return evicted

    def add(self, digest: str, packed: PackedFeatures) -> None:
        if self.used + packed.nbytes > self.budget:
            raise AssertionError(f"{self.name} tier budget would be exceeded")
        self.entries[digest] = packed
        self.used += packed.nbytes

    def clear(self) -> None:
        self.entries.clear()
        self.used = 0

    def stats(self) -> dict:
        return {"enabled": self.enabled, "entries": len(self.entries), "bytes_used": self.used,
                "byte_budget": self.budget, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}


class DiskTier:
    """One file per entry under ``directory``; LRU by access time (the files' mtime,
    refreshed on every access, so the order survives a restart). ``used`` includes space
    reserved by writes in progress, so the budget holds while files are being written."""

    LOCK_NAME = ".lock"

    def __init__(self, directory: Path | None, budget: int, storage_dtype: str) -> None:
        self.directory = directory
        self.budget = int(budget) if directory is not None else 0
        self.storage_dtype = storage_dtype
        self.index: OrderedDict[str, int] = OrderedDict()
        self.used = 0
        self.hits = self.misses = self.evictions = 0
        self.write_errors = 0
        self.startup = {"indexed": 0, "temp_removed": 0, "bad_removed": 0, "stale_removed": 0, "evicted": 0}
        self.disabled_reason: str | None = None if directory is not None else "no cache directory"
        self._zombies: dict[Path, int] = {}  # evicted files that could not be deleted yet
        self._lock_handle = None
        if self.budget <= 0 and self.disabled_reason is None:
            self.disabled_reason = "budget 0"

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    def path(self, digest: str) -> Path:
        assert self.directory is not None
        return self.directory / entry_name(digest)

    # ---- startup -------------------------------------------------------------------------
    def open(self) -> int:
        """Lock the directory, remove stray temp files, bad entries and stale ones (another
        storage dtype, an older format), index the valid ones (oldest access first) and
        evict the oldest while over budget. Other files are left alone. Returns the number
        of corrupt entries removed."""
        if not self.enabled:
            return 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if not self._lock_directory():
                self.disabled_reason = "directory in use by another process"
                log.warning("feature cache: the disk tier's directory is in use by another process; "
                            "this process runs without a disk tier")
                return 0
            names = os.listdir(self.directory)
        except OSError as exc:
            self.disabled_reason = f"directory not usable ({exc.__class__.__name__})"
            log.warning("feature cache: disk tier disabled: %s", self.disabled_reason)
            return 0
        found = []
        for name in names:
            path = self.directory / name
            if is_temp_name(name):
                if self._unlink(path):
                    self.startup["temp_removed"] += 1
                continue
            if is_legacy_name(name):  # an entry of an older format
                if self._unlink(path):
                    self.startup["stale_removed"] += 1
                continue
            digest = is_entry_name(name)
            if digest is None:
                continue  # not ours: leave it alone
            try:
                info = read_entry_info(path, digest)
                mtime = os.stat(path).st_mtime_ns
            except CorruptEntryError as exc:
                log.warning("feature cache: removing bad entry %s at startup (%s)", digest[:12], exc)
                if self._unlink(path):
                    self.startup["bad_removed"] += 1
                continue
            except OSError:
                continue
            if info.storage_dtype != self.storage_dtype:
                if self._unlink(path):
                    self.startup["stale_removed"] += 1
                continue
            found.append((mtime, digest, info.file_size))
        for _, digest, size in sorted(found):
            self.index[digest] = size
            self.used += size
        self.startup["indexed"] = len(self.index)
        before = self.evictions
        self.make_room(0)
        self.startup["evicted"] = self.evictions - before
        log.info("feature cache: disk tier indexed %d entries (%d bytes)", len(self.index), self.used)
        return self.startup["bad_removed"]

    def _lock_directory(self) -> bool:
        handle = open(self.directory / self.LOCK_NAME, "a+b")
        try:
            try:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # Windows
                import msvcrt

                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            handle.close()
            return False
        self._lock_handle = handle
        return True

    def close(self) -> None:
        """Release the directory; the tier is disabled from now on (its files stay)."""
        if self._lock_handle is not None:
            self._lock_handle.close()  # closing releases the lock
            self._lock_handle = None
        if self.disabled_reason is None:
            self.disabled_reason = "closed"

    # ---- bookkeeping (caller holds the cache lock) ------------------------------------------
    def _unlink(self, path: Path) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            return False

    def _retry_zombies(self) -> None:
        for path, size in list(self._zombies.items()):
            if self._unlink(path):
                del self._zombies[path]
                self.used -= size

    def lookup(self, digest: str) -> Path | None:
        """A counted lookup; a hit becomes the most recently used entry."""
        if not self.enabled:
            return None
        if digest not in self.index:
            self.misses += 1
            return None
        self.hits += 1
        self.index.move_to_end(digest)
        return self.path(digest)

    def make_room(self, nbytes: int) -> bool:
        """Delete least recently used files until ``nbytes`` more fit. False when the
        entry can never fit (larger than the budget)."""
        if not self.enabled or nbytes > self.budget:
            return False
        self._retry_zombies()
        while self.index and self.used + nbytes > self.budget:
            digest, size = self.index.popitem(last=False)
            self.evictions += 1
            self._delete_file(digest, size)
        return self.used + nbytes <= self.budget

    def _delete_file(self, digest: str, size: int) -> None:
        path = self.path(digest)
        if self._unlink(path):
            self.used -= size
        else:  # e.g. still mapped by a reader on Windows: retry later, keep counting it
            self._zombies[path] = size

    def reserve(self, nbytes: int) -> None:
        self.used += nbytes

    def commit(self, digest: str, reserved: int, actual: int) -> None:
        """A write finished: the reservation becomes an indexed entry."""
        self.used += actual - reserved
        self.index[digest] = actual

    def release(self, reserved: int) -> None:
        self.used -= reserved

    def discard(self, digest: str) -> bool:
        """Forget and delete one entry (corrupt, invalidated or replaced)."""
        size = self.index.pop(digest, None)
        if size is None:
            return False
        self._delete_file(digest, size)
        return True

    def delete_unindexed(self, digest: str) -> None:
        """Delete a file that was written but never indexed."""
        path = self.path(digest)
        if not self._unlink(path):
            with contextlib.suppress(OSError):
                self._zombies[path] = path.stat().st_size
                self.used += self._zombies[path]

    def forget(self, digest: str) -> None:
        """A read found no file: drop the entry unless a newer write has committed it
        meanwhile (commits happen under the cache lock, after the rename)."""
        if digest in self.index and not self.path(digest).exists():
            self.used -= self.index.pop(digest)

    def clear(self) -> None:
        for digest in list(self.index):
            self.discard(digest)

    def stats(self) -> dict:
        return {"enabled": self.enabled, "entries": len(self.index), "bytes_used": self.used,
                "byte_budget": self.budget, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "write_errors": self.write_errors,
                "disabled_reason": self.disabled_reason, "startup": dict(self.startup)}


def touch(path: Path) -> None:
    """Record an access in the file's mtime (the persisted LRU order)."""
    with contextlib.suppress(OSError):
        os.utime(path)
