"""Helpers shared by the feature cache tests: small synthetic features, keys, caches
with budgets counted in entries, and the invariants every operation must keep."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import torch

from desam_server.engine.feature_cache import FeatureCache, FeatureCacheSettings, FeatureKey
from desam_server.engine.feature_disk import ENTRY_SUFFIX
from desam_server.modeling.desam import ImageFeatures

SECRET_VOLUME = "PATIENT-Doe^Jane-1234"


def make_features(seed: int, channels: int = 8, side: int = 16) -> ImageFeatures:
    g = torch.Generator().manual_seed(seed)
    return ImageFeatures(
        embedding=torch.randn(1, 16, 8, 8, generator=g) * 3,
        taps=[torch.randn(1, channels, side, side, generator=g) * 10 for _ in range(3)],
        input_size=(96, 128), original_size=(150, 200),
    )


def nbytes16(channels: int = 8, side: int = 16) -> int:
    return 2 * (16 * 8 * 8 + 3 * channels * side * side)


def key(i: int, **changes) -> FeatureKey:
    fields = dict(volume_id=SECRET_VOLUME, axis="axial", slice_index=i, window_center=40.0, window_width=400.0,
                  preprocessing_version=1, encoder="tiny", encoder_weights_sha256=None)
    fields.update(changes)
    return FeatureKey(**fields)


def make_cache(tmp_path, entries_device=0, entries_host=0, entries_disk=0, **kw) -> FeatureCache:
    """Budgets in units of one standard entry (disk: file size, ~1 KiB larger)."""
    unit = nbytes16()
    settings = FeatureCacheSettings(
        directory=kw.pop("directory", tmp_path / "cache"), device_bytes=entries_device * unit,
        host_bytes=entries_host * unit, disk_bytes=entries_disk * (unit + 1024), **kw)
    return FeatureCache(settings)


def assert_same(a: ImageFeatures, b: ImageFeatures) -> None:
    assert a.embedding.dtype == torch.float32 and torch.equal(a.embedding, b.embedding)
    for x, y in zip(a.taps, b.taps, strict=True):
        assert x.dtype == torch.float32 and torch.equal(x, y)
    assert tuple(a.input_size) == tuple(b.input_size) and tuple(a.original_size) == tuple(b.original_size)


def check_invariants(cache: FeatureCache) -> None:
    stats = cache.stats()
    for name, tier in stats["tiers"].items():
        assert tier["bytes_used"] <= tier["byte_budget"], name
    for tier in (cache._device_tier, cache._host):
        assert tier.used == sum(p.nbytes for p in tier.entries.values())
        assert set(cache._device_tier.entries).isdisjoint(cache._host.entries)
    disk = cache._disk
    if disk.enabled and not cache._writing:
        files = {p.name: p.stat().st_size for p in disk.directory.glob("*" + ENTRY_SUFFIX)}
        assert files == {d + ENTRY_SUFFIX: s for d, s in disk.index.items()}
        assert disk.used == sum(files.values())
    json.dumps(stats)


def run_threads(worker: Callable[[int], None], count: int, timeout: float = 120.0) -> list[BaseException]:
    """Run ``worker(index)`` on ``count`` threads at once; join them all (failing after
    ``timeout`` seconds) and return the exceptions they raised (an assertion failing in a
    thread would otherwise be lost)."""
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            worker(index)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), f"threads still running after {timeout} s"
    return errors
