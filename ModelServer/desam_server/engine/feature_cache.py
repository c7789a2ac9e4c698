"""The service's per-slice encoder-feature cache: device memory -> host memory -> disk.

Encoding a slice is the expensive step (about 1.3 s for MobileSAM on a laptop CPU, tens
of seconds for ViT-H); every prompt after that costs milliseconds. The cache keeps each
slice's ``ImageFeatures`` (neck embedding + three taps) under a ``FeatureKey``:

- device tier: entries on ``settings.device`` (LRU). On CPU its default budget is 0: the
  host tier already is the device's memory, and two CPU tiers would hold the same bytes;
- host tier: CPU memory (LRU);
- disk tier: one file per entry (see ``feature_disk``), LRU by access time, persisted, so
  a restarted service reuses it. It is write-through: every new entry is written when it
  is stored, so a crash loses nothing.

Device and host tiers are exclusive: a host hit moves up to the device tier, and what the
device tier evicts moves down to the host tier; what the host tier evicts falls to disk
(written then if the disk tier no longer has it). A disk hit is copied up to memory. An
entry larger than a tier's budget skips that tier; budgets hold after every operation.

All tiers hold the same packed form (``feature_packed``; float16 by default), and a miss
returns the stored form too: the same key always gives bit-identical float32 tensors.

Threads: one lock guards the bookkeeping; encoder computes, file reads and writes, and
dtype conversions run outside it. Concurrent ``get_or_compute`` calls for one key compute
once: the first caller computes (or loads from disk), the others wait for its result.
Logs name entries by the first 12 hex digits of their key digest only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..modeling.desam import ImageFeatures
from .feature_config import FeatureCacheSettings, FeatureKey, parse_bytes
from .feature_disk import CorruptEntryError, encode_header, read_entry, write_entry
from .feature_packed import PackedFeatures, pack_features
from .feature_tiers import DiskTier, MemoryTier, touch

log = logging.getLogger(__name__)

__all__ = ["FeatureCache", "FeatureCacheSettings", "FeatureKey", "parse_bytes"]


@dataclass
class _Flight:
    """One key being loaded or computed; waiters block on ``done``."""

    done: threading.Event = field(default_factory=threading.Event)
    packed: PackedFeatures | None = None
    error: BaseException | None = None


class FeatureCache:
    """Arguments: ``FeatureCacheSettings`` (default: host 4 GiB, no disk tier). Opening
    scans the disk tier's directory. Use as a context manager or call ``close()`` to
    release the directory lock."""

    def __init__(self, settings: FeatureCacheSettings | None = None) -> None:
        self.settings = settings or FeatureCacheSettings()
        s = self.settings
        self.device = torch.device(s.device)
        self._lock = threading.Lock()
        self._device_tier = MemoryTier("device", s.resolved_device_bytes, str(self.device))
        self._host = MemoryTier("host", s.host_bytes, "cpu")
        self._disk = DiskTier(s.directory, s.disk_bytes, s.storage_dtype)
        self._inflight: dict[str, _Flight] = {}
        self._writing: dict[str, PackedFeatures] = {}  # disk writes in progress
        self._counters = {"corrupt_entries": 0, "computes": 0, "inflight_waits": 0, "float32_fallbacks": 0,
                          "uncacheable": 0, "too_large": 0}
        self._counters["corrupt_entries"] += self._disk.open()

    # ---- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._disk.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- public API --------------------------------------------------------------------------
    def get(self, key: FeatureKey, device: str | torch.device | None = None, *,
            taps: bool = True) -> ImageFeatures | None:
        """The cached features (float32, on ``device``, default the settings' device) or
        None; ``taps=False`` leaves the taps out (``PackedFeatures.unpack``). A disk hit is
        verified and promoted to memory; a corrupt file is deleted and counted, and reads
        as a miss."""
        packed = self.lookup(key)
        return None if packed is None else self.unpack(packed, device, taps=taps)

    def lookup(self, key: FeatureKey) -> PackedFeatures | None:
        """The stored (packed) entry of ``key`` or None, counted as ``get`` counts it; the
        unpacking (parallel PyTorch work) is left to ``unpack``, on a thread of choice."""
        digest = key.digest()
        packed = self._lookup_memory(digest)
        return packed if packed is not None else self._lookup_disk(digest)

    def unpack(self, packed: PackedFeatures, device: str | torch.device | None = None, *,
               taps: bool = True) -> ImageFeatures:
        """A looked-up entry as float32 features on ``device`` (default the settings')."""
        return packed.unpack(self._device_for(device), taps=taps)

    def put(self, key: FeatureKey, features: ImageFeatures) -> None:
        """Store (or replace) the features of ``key``."""
        digest = key.digest()
        packed = pack_features(features, self.settings.storage_dtype)
        with self._lock:
            self._writing.pop(digest, None)
            self._disk.discard(digest)
        self._store(digest, packed)

    def get_or_compute(self, key: FeatureKey, compute: Callable[[], ImageFeatures],
                       device: str | torch.device | None = None) -> ImageFeatures:
        """The cached features, else ``compute()``'s, stored and returned in the stored
        form (float32 tensors on ``device``). One compute per key at a time: concurrent
        callers for the same key wait for it; if it raises, they get the same exception."""
        digest = key.digest()
        target = self._device_for(device)
        while True:
            packed = self._lookup_memory(digest)
            if packed is not None:
                return packed.unpack(target)
            with self._lock:
                flight = self._inflight.get(digest)
                owner = flight is None
                if owner:
                    flight = self._inflight[digest] = _Flight()
                else:
                    self._counters["inflight_waits"] += 1
            if owner:
                break
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.packed is not None:
                return flight.packed.unpack(target)
            # The owner was interrupted (KeyboardInterrupt, SystemExit): try again.
        try:
            # Between our memory miss and taking ownership another owner may have finished.
            packed = self._lookup_memory(digest, count=False) or self._lookup_disk(digest)
            if packed is None:
                features = compute()
                with self._lock:
                    self._counters["computes"] += 1
                packed = pack_features(features, self.settings.storage_dtype)
                self._store(digest, packed)
            flight.packed = packed
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                self._inflight.pop(digest, None)
            flight.done.set()
        return packed.unpack(target)

    def contains(self, key: FeatureKey) -> bool:
        """Whether some tier holds the key (no counters, no LRU change, no file check)."""
        digest = key.digest()
        with self._lock:
            return (digest in self._device_tier.entries or digest in self._host.entries
                    or digest in self._writing or digest in self._disk.index)

    def discard(self, key: FeatureKey) -> bool:
        """Remove the key from every tier (and its file). True when something was removed."""
        digest = key.digest()
        with self._lock:
            found = self._device_tier.pop(digest) is not None
            found = (self._host.pop(digest) is not None) or found
            found = (self._writing.pop(digest, None) is not None) or found
            return self._disk.discard(digest) or found

    def clear(self) -> None:
        """Empty every tier (deletes the disk tier's entry files)."""
        with self._lock:
            self._device_tier.clear()
            self._host.clear()
            self._writing.clear()
            self._disk.clear()

    def stats(self) -> dict:
        """JSON-serialisable counters and sizes per tier."""
        with self._lock:
            return {
                "storage_dtype": self.settings.storage_dtype,
                "device": str(self.device),
                "tiers": {"device": self._device_tier.stats(), "host": self._host.stats(),
                          "disk": self._disk.stats()},
                "disk_writes_in_progress": len(self._writing),
                "inflight": len(self._inflight),
                **self._counters,
            }

    # ---- internals ------------------------------------------------------------------------------
    def _device_for(self, device) -> torch.device:
        return self.device if device is None else torch.device(device)

    def _lookup_memory(self, digest: str, count: bool = True) -> PackedFeatures | None:
        """Device, then host (a host hit moves up to the device tier)."""
        to_disk: list = []
        disk_path = None
        with self._lock:
            if not count:
                return self._device_tier.entries.get(digest) or self._host.entries.get(digest)
            packed = self._device_tier.lookup(digest)
            if packed is None:
                packed = self._host.lookup(digest)
                if packed is not None and self._device_tier.enabled and self._device_tier.fits(packed.nbytes):
                    self._host.pop(digest)
                    to_disk = self._insert_memory(digest, packed)
            if packed is not None and digest in self._disk.index:
                # Keep the disk tier's LRU order global: a hot entry is not evicted from
                # disk just because memory serves it.
                self._disk.index.move_to_end(digest)
                disk_path = self._disk.path(digest)
        if disk_path is not None:
            touch(disk_path)
        self._spill(to_disk)
        return packed

    def _lookup_disk(self, digest: str) -> PackedFeatures | None:
        with self._lock:
            pending = self._writing.get(digest)
            if pending is not None:  # being written: serve the bytes on their way to disk
                self._disk.hits += 1
                packed, path = pending, None
            else:
                path = self._disk.lookup(digest)
                if path is None:
                    return None
        if path is not None:
            try:
                packed = read_entry(path, digest, self.settings.storage_dtype)
            except FileNotFoundError:
                with self._lock:
                    self._disk.forget(digest)
                return None
            except (CorruptEntryError, OSError, ValueError) as exc:
                # CorruptEntryError says what is wrong; other errors could name the path.
                reason = str(exc) if isinstance(exc, CorruptEntryError) else exc.__class__.__name__
                log.warning("feature cache: corrupt disk entry %s removed (%s)", digest[:12], reason)
                with self._lock:
                    self._disk.hits -= 1
                    self._disk.misses += 1
                    self._counters["corrupt_entries"] += 1
                    self._disk.discard(digest)
                return None
            touch(path)
        with self._lock:
            if digest in self._device_tier.entries or digest in self._host.entries:
                return packed  # another thread promoted it meanwhile
            to_disk = self._insert_memory(digest, packed)
        self._spill(to_disk)
        return packed

    def _store(self, digest: str, packed: PackedFeatures) -> None:
        """Insert a new entry into memory (cascading) and write it through to disk."""
        if not packed.finite:
            with self._lock:
                self._counters["uncacheable"] += 1
            log.warning("feature cache: features for %s contain NaN or inf; not cached", digest[:12])
            return
        with self._lock:
            self._counters["float32_fallbacks"] += packed.float32_fallbacks
            self._device_tier.pop(digest)
            self._host.pop(digest)
            to_disk = [item for item in self._insert_memory(digest, packed) if item[0] != digest]
            in_memory = digest in self._device_tier.entries or digest in self._host.entries
        # Write-through: the new entry goes to disk last, as the disk tier's newest.
        written = self._spill(to_disk + [(digest, packed)])
        if not in_memory and digest not in written:
            with self._lock:
                self._counters["too_large"] += 1

    def _insert_memory(self, digest: str, packed: PackedFeatures) -> list[tuple[str, PackedFeatures]]:
        """Place into the device tier, else the host tier; returns what must go to disk
        (entries evicted from the host tier, or this one when it fits no memory tier).
        Caller holds the lock."""
        to_disk: list[tuple[str, PackedFeatures]] = []
        dev = self._device_tier
        if dev.enabled and dev.fits(packed.nbytes):
            for d, p in dev.make_room(packed.nbytes):
                to_disk += self._insert_host(d, p)
            dev.add(digest, packed.to(self.device))
        else:
            to_disk += self._insert_host(digest, packed)
        return to_disk

    def _insert_host(self, digest: str, packed: PackedFeatures) -> list[tuple[str, PackedFeatures]]:
        host = self._host
        if not (host.enabled and host.fits(packed.nbytes)):
            return [(digest, packed)]
        evicted = host.make_room(packed.nbytes)
        host.add(digest, packed.to("cpu"))
        return evicted

    def _spill(self, items: list[tuple[str, PackedFeatures]]) -> set[str]:
        """Make sure these entries are on disk (write those that are not). Returns the
        digests that are on disk afterwards."""
        on_disk = set()
        for digest, packed in items:
            if self._write_disk(digest, packed):
                on_disk.add(digest)
        return on_disk

    def _write_disk(self, digest: str, packed: PackedFeatures) -> bool:
        with self._lock:
            if not self._disk.enabled:
                return False
            if digest in self._disk.index or digest in self._writing:
                return True
        cpu = packed.to("cpu")
        encoded = encode_header(digest, cpu)  # the CRC pass, outside the lock
        size = len(encoded[0]) + encoded[2]
        with self._lock:
            if digest in self._disk.index or digest in self._writing:
                return True
            if not self._disk.make_room(size):
                return False
            self._disk.reserve(size)
            self._writing[digest] = cpu
        ok = False
        try:
            actual = write_entry(self._disk.path(digest), digest, cpu, encoded)
            ok = True
        except OSError as exc:
            log.warning("feature cache: writing disk entry %s failed (%s)", digest[:12], exc.__class__.__name__)
        with self._lock:
            still_wanted = self._writing.get(digest) is cpu
            if still_wanted:
                del self._writing[digest]
            if ok and still_wanted:
                self._disk.commit(digest, size, actual)
                return True
            self._disk.release(size)
            if not ok:
                self._disk.write_errors += 1
            elif digest not in self._disk.index and digest not in self._writing:
                # Discarded or replaced while we wrote: our file must not stay. (When a
                # newer write owns the name, its file replaces ours or already has.)
                self._disk.delete_unindexed(digest)
        return False
