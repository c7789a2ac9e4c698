"""The per-slice encoder-feature cache: keys, settings, packing, budgets, LRU order, tier
cascade and promotion, concurrency, and the predictor fed from the cache. The disk tier's
format, recovery and restart are in test_feature_cache_disk.py."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch
from conftest import phantom_slice
from feature_cache_helpers import assert_same, check_invariants, key, make_cache, make_features, run_threads

from desam_server.engine import IntensityWindow, SlicePredictor
from desam_server.engine.feature_cache import FeatureCache, FeatureCacheSettings, parse_bytes
from desam_server.engine.feature_packed import pack_features
from desam_server.modeling import build_desam


# ---- key and settings -----------------------------------------------------------------------
def test_key_digest_is_canonical():
    a = key(3, window_center=40, window_width=400)
    b = key(3, window_center=40.0, window_width=400.0)
    assert a == b and a.digest() == b.digest() and len(a.digest()) == 64
    assert key(3, window_center=-0.0).digest() == key(3, window_center=0.0).digest()
    assert '"window_center":"40.0"' in a.canonical_json()
    digests = {a.digest()}
    for change in [dict(volume_id="other"), dict(axis="coronal"), dict(slice_index=4),
                   dict(window_center=40.000001), dict(window_width=401.0), dict(preprocessing_version=2),
                   dict(encoder="mobile_sam"), dict(encoder_weights_sha256="AB" * 32)]:
        digests.add(key(3, **change).digest())
    assert len(digests) == 9
    assert key(1, encoder_weights_sha256="AB" * 32).encoder_weights_sha256 == "ab" * 32
    for bad in [dict(slice_index=-1), dict(slice_index=True), dict(window_width=0.0),
                dict(window_center=float("nan")), dict(volume_id=""), dict(encoder_weights_sha256="xyz")]:
        with pytest.raises(ValueError):
            key(1, **bad)


def test_settings_from_env_and_errors(tmp_path):
    s = FeatureCacheSettings.from_env({})
    assert s.host_bytes == 4 << 30 and s.disk_bytes == 20 << 30 and s.storage_dtype == "float16"
    assert s.resolved_device_bytes == 0 and s.directory.name == "features"
    s = FeatureCacheSettings.from_env({"DESAM_CACHE_DIR": str(tmp_path), "DESAM_CACHE_HOST_BYTES": "512MiB",
                                       "DESAM_CACHE_DISK_BYTES": "1073741824", "DESAM_CACHE_DEVICE_BYTES": "1G",
                                       "DESAM_CACHE_DTYPE": "BFloat16"})
    assert (s.directory, s.host_bytes, s.disk_bytes, s.resolved_device_bytes, s.storage_dtype) == (
        tmp_path, 512 << 20, 1 << 30, 1 << 30, "bfloat16")
    assert FeatureCacheSettings.from_env({"DESAM_CACHE_DIR": "off"}).directory is None
    assert parse_bytes("1.5 GiB") == 3 << 29
    for env, word in [({"DESAM_CACHE_HOST_BYTES": "-5"}, "DESAM_CACHE_HOST_BYTES"),
                      ({"DESAM_CACHE_DISK_BYTES": "lots"}, "DESAM_CACHE_DISK_BYTES"),
                      ({"DESAM_CACHE_DEVICE_BYTES": "4 GB"}, "DESAM_CACHE_DEVICE_BYTES"),
                      ({"DESAM_CACHE_DTYPE": "int8"}, "DESAM_CACHE_DTYPE")]:
        with pytest.raises(ValueError, match=word):
            FeatureCacheSettings.from_env(env)
    with pytest.raises(ValueError, match="storage_dtype"):
        FeatureCacheSettings(storage_dtype="float64")


# ---- packing --------------------------------------------------------------------------------
def test_float16_overflow_falls_back_to_float32_per_tensor(tmp_path):
    f = make_features(0)
    f.taps[1][0, 0, 0, 0] = 1.0e5  # beyond float16's 65504
    packed = pack_features(f, "float16")
    assert [t.dtype for t in packed.tensors] == [torch.float16, torch.float16, torch.float32, torch.float16]
    assert all(torch.isfinite(t.float()).all() for t in packed.tensors)
    assert pack_features(f, "bfloat16").tensors[2].dtype == torch.bfloat16  # bfloat16 has float32's range
    cache = make_cache(tmp_path, entries_disk=4)
    cache.put(key(0), f)
    got = cache.get(key(0))
    assert got.taps[1][0, 0, 0, 0] == 1.0e5 and torch.isfinite(got.taps[1]).all()
    assert cache.stats()["float32_fallbacks"] == 1
    cache.close()
    assert_same(make_cache(tmp_path, entries_disk=4).get(key(0)), got)  # the float32 tensor on disk too


def test_non_finite_features_are_never_stored(tmp_path):
    cache = make_cache(tmp_path, entries_host=4, entries_disk=4)
    f = make_features(1)
    f.embedding[0, 0, 0, 0] = float("inf")
    out = cache.get_or_compute(key(0), lambda: f)
    assert torch.isinf(out.embedding).any()
    assert not cache.contains(key(0)) and cache.stats()["uncacheable"] == 1
    assert not [p.name for p in (tmp_path / "cache").iterdir() if p.name != ".lock"]


def test_float32_storage_is_exact_and_float16_close(tmp_path):
    f = make_features(2)
    exact = make_cache(tmp_path, entries_host=10, storage_dtype="float32", directory=None)
    assert_same(exact.get_or_compute(key(0), lambda: f), f)
    half = make_cache(tmp_path, entries_host=10, directory=None)
    got = half.get_or_compute(key(0), lambda: f)
    torch.testing.assert_close(got.embedding, f.embedding, rtol=1e-3, atol=1e-4)
    assert not torch.equal(got.embedding, f.embedding)
    assert_same(half.get(key(0)), got)  # a miss returns what a hit will return


# ---- budgets, LRU, tiers ----------------------------------------------------------------------
def test_budgets_hold_under_a_stream_larger_than_every_budget(tmp_path):
    cache = make_cache(tmp_path, entries_device=3, entries_host=5, entries_disk=9)
    rnd = random.Random(0)
    sizes = [4, 8, 8, 16, 40, 64]  # 40 and 64 channels exceed the device and host budgets
    for _step in range(120):
        i = rnd.randrange(30)
        if rnd.random() < 0.5:
            channels = sizes[i % len(sizes)]
            cache.put(key(i), make_features(i, channels=channels))
        else:
            got = cache.get(key(i))
            if got is not None:
                assert got.taps[0].shape[1] == sizes[i % len(sizes)]
        check_invariants(cache)
    tiers = cache.stats()["tiers"]
    assert all(tiers[t]["evictions"] > 0 for t in ("device", "host", "disk"))
    huge = make_features(99, channels=400)
    cache.put(key(99), huge)  # larger than every tier: stored nowhere
    check_invariants(cache)
    assert not cache.contains(key(99)) and cache.stats()["too_large"] == 1


def test_lru_order_in_host_and_disk(tmp_path):
    cache = make_cache(tmp_path, entries_host=3, entries_disk=3)
    for i in range(3):
        cache.put(key(i), make_features(i))
    assert cache.get(key(0)) is not None  # 0 becomes most recent: 1 is the oldest now
    cache.put(key(3), make_features(3))
    assert list(cache._host.entries) == [key(i).digest() for i in (2, 0, 3)]
    assert list(cache._disk.index) == [key(i).digest() for i in (2, 0, 3)]
    check_invariants(cache)


def test_cascade_and_promotion(tmp_path):
    cache = make_cache(tmp_path, entries_device=2, entries_host=2, entries_disk=10)
    for i in range(5):
        cache.put(key(i), make_features(i))
    d = [key(i).digest() for i in range(5)]
    assert list(cache._device_tier.entries) == [d[3], d[4]]
    assert list(cache._host.entries) == [d[1], d[2]]
    assert set(cache._disk.index) == set(d)  # write-through
    cache.get(key(1))  # host hit moves up; the device tier's oldest (3) moves down
    assert list(cache._device_tier.entries) == [d[4], d[1]]
    assert list(cache._host.entries) == [d[2], d[3]]
    cache.get(key(0))  # disk hit is copied up
    assert list(cache._device_tier.entries) == [d[1], d[0]]
    assert list(cache._host.entries) == [d[3], d[4]]
    tiers = cache.stats()["tiers"]
    assert (tiers["device"]["hits"], tiers["host"]["hits"], tiers["disk"]["hits"]) == (0, 1, 1)
    check_invariants(cache)


def test_identical_results_from_every_tier(tmp_path):
    cache = make_cache(tmp_path, entries_device=1, entries_host=1, entries_disk=10)
    first = cache.get_or_compute(key(0), lambda: make_features(0))
    assert cache._device_tier.entries.keys() == {key(0).digest()}
    from_device = cache.get(key(0))
    cache.put(key(1), make_features(1))  # pushes 0 down to host
    assert key(0).digest() in cache._host.entries
    from_host = cache._host.entries[key(0).digest()].unpack("cpu")
    cache.put(key(2), make_features(2))  # pushes 0 out of memory: disk only
    assert key(0).digest() not in cache._host.entries and key(0).digest() not in cache._device_tier.entries
    from_disk = cache.get(key(0))
    assert cache.stats()["tiers"]["disk"]["hits"] == 1
    for other in (from_device, from_host, from_disk):
        assert_same(other, first)
    light = cache.get(key(0), taps=False)                  # the prompted decoder's view: embedding only
    assert light.taps == [] and torch.equal(light.embedding, first.embedding)
    assert light.original_size == first.original_size and light.input_size == first.input_size


# ---- threads ------------------------------------------------------------------------------------------
def test_concurrent_get_or_compute_computes_each_key_once(tmp_path):
    cache = make_cache(tmp_path, entries_host=10, entries_disk=10)
    expected = {i: pack_features(make_features(i)).unpack() for i in range(10)}
    counts = {i: 0 for i in range(10)}
    count_lock = threading.Lock()

    def compute(i):
        with count_lock:
            counts[i] += 1
        time.sleep(0.005)
        return make_features(i)

    def worker(seed):
        rnd = random.Random(seed)
        for _ in range(50):
            i = rnd.randrange(10)
            assert_same(cache.get_or_compute(key(i), lambda i=i: compute(i)), expected[i])

    assert not run_threads(worker, 8)
    assert counts == {i: 1 for i in range(10)}
    check_invariants(cache)


def test_simultaneous_requests_for_one_key_compute_once(tmp_path):
    cache = make_cache(tmp_path, entries_host=4, entries_disk=4)
    barrier, calls, results = threading.Barrier(8), [], []

    def compute():
        calls.append(1)
        time.sleep(0.05)
        return make_features(5)

    def worker(_):
        barrier.wait()
        results.append(cache.get_or_compute(key(5), compute))

    assert not run_threads(worker, 8)
    assert len(calls) == 1 and len(results) == 8
    assert cache.stats()["inflight_waits"] >= 1
    for r in results[1:]:
        assert_same(r, results[0])
        assert r.embedding.data_ptr() != results[0].embedding.data_ptr()  # each caller gets its own copy


def test_mixed_concurrent_operations_keep_budgets_and_accounting(tmp_path):
    cache = make_cache(tmp_path, entries_device=2, entries_host=3, entries_disk=6)
    channels = {i: 4 + (i % 3) * 4 for i in range(20)}
    expected = {i: pack_features(make_features(i, channels[i])).unpack() for i in range(20)}

    def worker(seed):
        rnd = random.Random(seed)
        for _ in range(150):
            i, op = rnd.randrange(20), rnd.random()
            if op < 0.5:
                assert_same(cache.get_or_compute(key(i), lambda i=i: make_features(i, channels[i])), expected[i])
            elif op < 0.8:
                got = cache.get(key(i))
                assert got is None or assert_same(got, expected[i]) is None
            elif op < 0.95:
                cache.put(key(i), make_features(i, channels[i]))
            else:
                cache.discard(key(i))
            for tier in cache.stats()["tiers"].values():
                assert tier["bytes_used"] <= tier["byte_budget"]

    assert not run_threads(worker, 6)
    check_invariants(cache)  # files on disk == index == bytes counted


def test_compute_does_not_block_other_keys_and_errors_reach_waiters(tmp_path):
    cache = make_cache(tmp_path, entries_host=10, directory=None)
    started, release = threading.Event(), threading.Event()
    results = {}

    def slow_failing():
        started.set()
        release.wait(5)
        raise RuntimeError("encoder failed")

    def call(name):
        try:
            results[name] = cache.get_or_compute(key(0), slow_failing)
        except RuntimeError as exc:
            results[name] = exc

    owner = threading.Thread(target=call, args=("owner",))
    owner.start()
    assert started.wait(5)
    waiter = threading.Thread(target=call, args=("waiter",))
    waiter.start()
    t0 = time.perf_counter()
    assert cache.get_or_compute(key(1), lambda: make_features(1)) is not None  # not blocked by key 0
    assert time.perf_counter() - t0 < 2
    deadline = time.time() + 5
    while cache.stats()["inflight_waits"] < 1 and time.time() < deadline:
        time.sleep(0.001)
    release.set()
    owner.join(5)
    waiter.join(5)
    assert str(results["owner"]) == str(results["waiter"]) == "encoder failed"
    assert cache.get_or_compute(key(0), lambda: make_features(0)) is not None  # later calls retry


# ---- the predictor fed from the cache ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_case():
    """The tiny model's predictor, a phantom slice, two prompts and their masks after
    ``set_image`` (the reference the cached features must reproduce)."""
    torch.manual_seed(0)
    pred = SlicePredictor(build_desam("tiny"), precision="fp32")
    image, _ = phantom_slice(150, 220)
    window = IntensityWindow(center=40, width=400)
    prompts = [dict(box=np.array([60.0, 30.0, 190.0, 120.0])),
               dict(point_coords=np.array([[120.0, 70.0]]), point_labels=np.array([1]))]
    pred.set_image(image, window)
    reference = [pred.predict(**p, multimask_output=True) for p in prompts]
    for masks, _, _ in reference:
        assert 0.02 < masks.mean() < 0.98  # real masks, not all or nothing
    return pred, image, window, prompts, reference


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "float32"])
def test_predictor_with_cached_features(tmp_path, tiny_case, storage):
    pred, image, window, prompts, reference = tiny_case

    def compute():
        pred.set_image(image, window)
        return pred.features

    k = key(0, window_center=window.center, window_width=window.width)
    for _ in range(2):  # the miss, then a hit from a fresh cache (disk)
        settings = FeatureCacheSettings(directory=tmp_path / "cache", host_bytes=0, disk_bytes=1 << 20,
                                        storage_dtype=storage)
        with FeatureCache(settings) as cache:
            pred.reset_image()
            pred.set_features(cache.get_or_compute(k, compute, device=pred.device))
            for p, (masks, ious, low) in zip(prompts, reference, strict=True):
                m, s, lo = pred.predict(**p, multimask_output=True)
                if storage == "float32":
                    assert np.array_equal(m, masks) and np.array_equal(s, ious) and np.array_equal(lo, low)
                else:
                    assert (m == masks).mean() >= 0.999
                    np.testing.assert_allclose(s, ious, atol=2e-2)
            assert cache.stats()["computes"] == (1 if _ == 0 else 0)
