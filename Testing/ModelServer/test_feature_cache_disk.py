"""The feature cache's disk tier: corrupt entries are detected, deleted and recomputed;
the startup scan; restart; one process per directory; write failures."""

from __future__ import annotations

import logging
import os
import struct
import time

import pytest

from desam_server.engine.feature_disk import MAGIC
from desam_server.engine.feature_packed import pack_features
from feature_cache_helpers import (
    SECRET_VOLUME, assert_same, check_invariants, key, make_cache, make_features,
)


# ---- disk format: corruption, startup scan, restart -----------------------------------------------
def _corrupt(path, kind, other_path):
    data = bytearray(path.read_bytes())
    if kind == "truncated_payload":
        data = data[: len(data) // 2]
    elif kind == "truncated_prefix":
        data = data[:10]
    elif kind == "empty":
        data = bytearray()
    elif kind == "flipped_payload_byte":
        data[-7] ^= 0x10
    elif kind == "flipped_header_byte":
        data[40] ^= 0x01
    elif kind == "wrong_magic":
        data[:8] = b"NOTDSFC!"
    elif kind == "wrong_version":
        data[8:12] = struct.pack("<I", 99)
    elif kind == "wrong_key_digest":
        data = bytearray(other_path.read_bytes())
    elif kind == "length_mismatch":
        data += bytes(64)
    path.write_bytes(bytes(data))


CORRUPTIONS = ["truncated_payload", "truncated_prefix", "empty", "flipped_payload_byte", "flipped_header_byte",
               "wrong_magic", "wrong_version", "wrong_key_digest", "length_mismatch"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_entry_is_detected_deleted_and_recomputed(tmp_path, kind, caplog):
    caplog.set_level(logging.DEBUG)
    cache = make_cache(tmp_path, entries_disk=4)  # disk only: every read goes to the file
    expected = pack_features(make_features(0)).unpack()
    cache.put(key(0), make_features(0))
    cache.put(key(1), make_features(1))
    path = cache._disk.path(key(0).digest())
    assert path.read_bytes()[:8] == MAGIC
    _corrupt(path, kind, cache._disk.path(key(1).digest()))
    calls = []
    got = cache.get_or_compute(key(0), lambda: calls.append(1) or make_features(0))
    assert calls == [1]
    assert_same(got, expected)
    stats = cache.stats()
    assert stats["corrupt_entries"] == 1 and stats["computes"] == 1
    check_invariants(cache)
    cache.close()
    fresh = make_cache(tmp_path, entries_disk=4)  # the replaced file is valid again
    assert fresh.stats()["corrupt_entries"] == 0
    assert_same(fresh.get_or_compute(key(0), lambda: pytest.fail("recomputed")), expected)
    assert SECRET_VOLUME not in caplog.text and str(tmp_path) not in caplog.text


def test_startup_scan_removes_temp_and_bad_files_and_enforces_budget(tmp_path):
    cache = make_cache(tmp_path, entries_disk=10)
    for i in range(5):
        cache.put(key(i), make_features(i))
    cache.close()
    directory = tmp_path / "cache"
    now = time.time()
    for i in range(5):  # access order: 4 oldest ... 0 newest
        os.utime(directory / f"{key(i).digest()}.dsfc", (now - 10 * i, now - 10 * i))
    stray = directory / f".{key(7).digest()}.dsfc.k2j3h4.tmp"
    stray.write_bytes(b"half a file")
    foreign = directory / "README.txt"
    foreign.write_text("not ours")
    _corrupt(directory / f"{key(0).digest()}.dsfc", "flipped_header_byte", None)
    small = make_cache(tmp_path, entries_disk=2)
    stats = small.stats()
    assert not stray.exists() and foreign.exists()
    assert stats["corrupt_entries"] == 1
    startup = stats["tiers"]["disk"]["startup"]
    assert startup == {"indexed": 4, "temp_removed": 1, "bad_removed": 1, "stale_removed": 0, "evicted": 2}
    assert list(small._disk.index) == [key(2).digest(), key(1).digest()]  # the two most recent valid
    check_invariants(small)
    small.close()
    other_dtype = make_cache(tmp_path, entries_disk=10, storage_dtype="float32")
    assert other_dtype.stats()["tiers"]["disk"]["startup"]["stale_removed"] == 2
    assert other_dtype.stats()["tiers"]["disk"]["entries"] == 0


def test_restart_serves_disk_entries_without_recomputing(tmp_path):
    with make_cache(tmp_path, entries_host=10, entries_disk=10) as first:
        originals = [first.get_or_compute(key(i), lambda i=i: make_features(i)) for i in range(3)]
    with make_cache(tmp_path, entries_host=10, entries_disk=10) as second:
        for i in range(3):
            assert_same(second.get_or_compute(key(i), lambda: pytest.fail("recomputed")), originals[i])
        stats = second.stats()
        assert stats["computes"] == 0 and stats["tiers"]["disk"]["hits"] == 3
        assert stats["tiers"]["host"]["entries"] == 3  # promoted


def test_second_process_on_the_directory_runs_without_disk_tier(tmp_path):
    first = make_cache(tmp_path, entries_disk=4)
    second = make_cache(tmp_path, entries_host=4, entries_disk=4)
    assert second.stats()["tiers"]["disk"]["disabled_reason"] == "directory in use by another process"
    second.put(key(0), make_features(0))
    assert second.get(key(0)) is not None
    first.close()
    assert make_cache(tmp_path, entries_disk=4).stats()["tiers"]["disk"]["enabled"]


def test_disk_write_failure_is_counted_and_releases_space(tmp_path, monkeypatch):
    import desam_server.engine.feature_cache as fc

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fc, "write_entry", failing)
    cache = make_cache(tmp_path, entries_host=2, entries_disk=4)
    cache.put(key(0), make_features(0))
    disk = cache.stats()["tiers"]["disk"]
    assert disk["write_errors"] == 1 and disk["bytes_used"] == 0 and disk["entries"] == 0
    assert cache.get(key(0)) is not None
