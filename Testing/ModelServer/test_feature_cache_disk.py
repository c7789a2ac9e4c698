"""The feature cache's disk tier: corrupt entries are detected, deleted and recomputed;
the startup scan; restart; one process per directory; write failures."""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import time
import zlib

import pytest
import torch
from safetensors.torch import load_file, save

from desam_server.engine import feature_disk
from desam_server.engine.feature_disk import ENTRY_SUFFIX, CorruptEntryError, read_entry, read_entry_info, write_entry
from desam_server.engine.feature_packed import TENSOR_NAMES, pack_features
from desam_server.modeling.desam import ImageFeatures

from feature_cache_helpers import (
    SECRET_VOLUME,
    assert_same,
    check_invariants,
    key,
    make_cache,
    make_features,
)


# ---- disk format: corruption, startup scan, restart -----------------------------------------------
def _layout(data: bytes) -> tuple[int, dict]:
    """(offset of the data section, the parsed JSON header) of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + n, json.loads(data[8 : 8 + n])


def _header_position(data: bytes, text: bytes, after: int = 0) -> int:
    """The byte position ``after`` bytes into the only occurrence of ``text`` in the header."""
    start, _ = _layout(data)
    assert data[:start].count(text) == 1
    return data.index(text) + after


def _rewrite(data: bytes, change) -> bytes:
    """A well-formed entry with its metadata changed by ``change`` and both CRCs valid:
    only the checks of the facts themselves can refuse it."""
    start, header = _layout(data)
    meta = header.pop("__metadata__")
    change(meta)
    table = {name: (header[name]["dtype"], header[name]["shape"]) for name in header}
    meta["header_crc32"] = f"{zlib.crc32(feature_disk._canonical(meta, table)):08x}"
    text = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[start:]


def _flip(data: bytearray, position: int, mask: int = 0x01) -> bytearray:
    data[position] ^= mask
    return data


def _corrupt(path, kind, other_path):
    """Damage the entry at ``path`` (``other_path``: a valid entry of another key)."""
    raw = path.read_bytes()
    start, header = _layout(raw)
    data = bytearray(raw)
    if kind == "empty":
        data = bytearray()
    elif kind.startswith("truncated_"):  # at several points: length prefix, header, header end, data
        cut = {"truncated_prefix": 5, "truncated_header": start // 2, "truncated_at_data": start,
               "truncated_data": (start + len(raw)) // 2, "truncated_last_byte": len(raw) - 1}[kind]
        data = data[:cut]
    elif kind == "extended":
        data += bytes(64)
    elif kind == "flipped_length_prefix":
        _flip(data, 0)
    elif kind == "flipped_size_digit":  # still valid JSON and a valid safetensors file
        _flip(data, _header_position(raw, b'"input_size":"[96,', after=len('"input_size":"[9')))
    elif kind == "flipped_shape_digit":
        _flip(data, _header_position(raw, b'"shape":[1,16,', after=len('"shape":[1,1')))
    elif kind == "flipped_header_padding":
        _flip(data, start - 1, 0x20)  # the last byte of the header: "}" or a padding space
    elif kind.startswith("flipped_byte_in_"):  # one byte in the middle of that tensor's data
        first, last = header[kind.removeprefix("flipped_byte_in_")]["data_offsets"]
        _flip(data, start + (first + last) // 2, 0x10)
    elif kind == "wrong_key_digest":  # another key's valid entry under this key's name
        data = bytearray(other_path.read_bytes())
    elif kind == "wrong_storage_dtype":  # a valid entry, but stored as float32
        data = bytearray(_rewrite(raw, lambda meta: meta.update(storage_dtype="float32")))
    elif kind == "wrong_format_version":
        data = bytearray(_rewrite(raw, lambda meta: meta.update(format_version="3")))
    elif kind == "not_safetensors":  # e.g. a version-1 .dsfc file renamed
        data = bytearray(b"DSAMFC\r\n" + raw[8:])
    else:
        raise AssertionError(kind)
    path.write_bytes(bytes(data))


CORRUPTIONS = ["empty", "truncated_prefix", "truncated_header", "truncated_at_data", "truncated_data",
               "truncated_last_byte", "extended", "flipped_length_prefix", "flipped_size_digit",
               "flipped_shape_digit", "flipped_header_padding", *(f"flipped_byte_in_{n}" for n in TENSOR_NAMES),
               "wrong_key_digest", "wrong_storage_dtype", "wrong_format_version", "not_safetensors"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_entry_is_detected_deleted_and_recomputed(tmp_path, kind, caplog):
    caplog.set_level(logging.DEBUG)
    cache = make_cache(tmp_path, entries_disk=4)  # disk only: every read goes to the file
    expected = pack_features(make_features(0)).unpack()
    cache.put(key(0), make_features(0))
    cache.put(key(1), make_features(1))
    path = cache._disk.path(key(0).digest())
    assert path.name.endswith(ENTRY_SUFFIX) and load_file(path).keys() == set(TENSOR_NAMES)
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


def test_every_flipped_header_byte_is_detected(tmp_path):
    """Each single byte of the header (length prefix, JSON, padding), changed in three
    ways, makes the header check refuse the entry (without reading the data)."""
    digest = key(0).digest()
    path = tmp_path / (digest + ENTRY_SUFFIX)
    write_entry(path, digest, pack_features(make_features(0)))
    raw = path.read_bytes()
    start, _ = _layout(raw)
    read_entry_info(path, digest)
    missed = []
    for position in range(start):
        for mask in (0x01, 0x20, 0x80):
            path.write_bytes(bytes(_flip(bytearray(raw), position, mask)))
            try:
                read_entry_info(path, digest)
                missed.append((position, mask))
            except CorruptEntryError:
                pass
    assert missed == []


@pytest.mark.parametrize("storage", ["float16", "bfloat16", "float32"])
def test_entry_is_a_standard_safetensors_file(tmp_path, storage):
    """safetensors reads an entry as written, and its own writer lays out the same bytes."""
    features = make_features(3)
    features.taps[1][0, 0, 0, 0] = 1.0e5  # a float32 fallback tensor in the 16-bit dtypes
    packed = pack_features(features, storage)
    digest = key(3).digest()
    path = tmp_path / (digest + ENTRY_SUFFIX)
    assert write_entry(path, digest, packed) == path.stat().st_size
    loaded = load_file(path)
    for name, t in zip(TENSOR_NAMES, packed.tensors, strict=True):
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    del loaded
    raw = path.read_bytes()
    start, header = _layout(raw)
    theirs = save(dict(zip(TENSOR_NAMES, packed.tensors, strict=True)), metadata=header["__metadata__"])
    their_start, their_header = _layout(theirs)
    assert their_header == header and theirs[their_start:] == raw[start:]
    got = read_entry(path, digest, storage)
    assert [t.dtype for t in got.tensors] == [t.dtype for t in packed.tensors]
    assert all(torch.equal(a, b) for a, b in zip(got.tensors, packed.tensors, strict=True))
    assert (got.input_size, got.original_size, got.storage_dtype) == ((96, 128), (150, 200), storage)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_no_mapping_outlives_a_read(tmp_path):
    digest = key(0).digest()
    path = tmp_path / (digest + ENTRY_SUFFIX)
    write_entry(path, digest, pack_features(make_features(0)))
    got = read_entry(path, digest, "float16")
    read_entry_info(path, digest)
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        assert str(path) not in maps.read()
    assert got.tensors[0].untyped_storage().nbytes() == got.tensors[0].numel() * 2  # a copy of its own


def test_entry_replaced_while_read_is_gone_not_corrupt(tmp_path, monkeypatch):
    """A read that fails because the path was replaced meanwhile (safe_open opens a file
    twice) raises FileNotFoundError, so the cache forgets it instead of deleting the new file."""
    digest = key(0).digest()
    path = tmp_path / (digest + ENTRY_SUFFIX)
    write_entry(path, digest, pack_features(make_features(0)))
    torn = tmp_path / "torn.safetensors"  # what a read mixing two files sees
    torn.write_bytes(path.read_bytes())
    _corrupt(torn, "flipped_byte_in_tap1", None)
    newer = tmp_path / "newer.safetensors"
    write_entry(newer, digest, pack_features(make_features(5)))
    real_safe_open = feature_disk.safe_open

    def replaced_then_open(file, **kwargs):
        if file == path:
            os.replace(newer, path)  # a writer's rename
            file = torn
        return real_safe_open(file, **kwargs)

    monkeypatch.setattr(feature_disk, "safe_open", replaced_then_open)
    with pytest.raises(FileNotFoundError):
        read_entry(path, digest, "float16")
    monkeypatch.undo()
    assert_same(read_entry(path, digest, "float16").unpack(), pack_features(make_features(5)).unpack())
    with pytest.raises(CorruptEntryError, match="data checksum"):  # a damaged file that stays is corrupt
        read_entry(torn, digest, "float16")


def test_startup_scan_removes_temp_and_bad_files_and_enforces_budget(tmp_path):
    cache = make_cache(tmp_path, entries_disk=10)
    for i in range(5):
        cache.put(key(i), make_features(i))
    cache.close()
    directory = tmp_path / "cache"
    now = time.time()
    for i in range(5):  # access order: 4 oldest ... 0 newest
        os.utime(directory / (key(i).digest() + ENTRY_SUFFIX), (now - 10 * i, now - 10 * i))
    strays = [directory / f".{key(7).digest()}{ENTRY_SUFFIX}.k2j3h4.tmp",
              directory / f".{key(8).digest()}.dsfc.x8f2q1.tmp"]  # format version 1's temporary file
    for stray in strays:
        stray.write_bytes(b"half a file")
    legacy = directory / f"{key(9).digest()}.dsfc"  # a format version 1 entry
    legacy.write_bytes(b"DSAMFC\r\n" + bytes(100))
    foreign = [directory / "README.txt", directory / f"{key(9).digest()}.safetensors.bak"]
    for path in foreign:
        path.write_text("not ours")
    _corrupt(directory / (key(0).digest() + ENTRY_SUFFIX), "flipped_size_digit", None)
    small = make_cache(tmp_path, entries_disk=2)
    stats = small.stats()
    assert not any(stray.exists() for stray in strays) and not legacy.exists()
    assert all(path.exists() for path in foreign)
    assert stats["corrupt_entries"] == 1
    startup = stats["tiers"]["disk"]["startup"]
    assert startup == {"indexed": 4, "temp_removed": 2, "bad_removed": 1, "stale_removed": 1, "evicted": 2}
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


def test_embedding_only_entries_round_trip_through_every_tier_and_restart(tmp_path):
    """An adapted encoder's features (embedding, no taps) are stored as a one-tensor entry:
    read back bit-identical from memory and from disk after a restart, a standard
    safetensors file; three taps or none, nothing else, is accepted."""
    full = make_features(1)
    alone = ImageFeatures(embedding=full.embedding, taps=[], input_size=full.input_size,
                          original_size=full.original_size)
    packed = pack_features(alone, "float16")
    assert len(packed.tensors) == 1 and packed.nbytes == 2 * 16 * 8 * 8
    digest = key(5).digest()
    path = tmp_path / (digest + ENTRY_SUFFIX)
    write_entry(path, digest, packed)
    assert list(load_file(path)) == ["embedding"]
    got = read_entry(path, digest, "float16")
    assert len(got.tensors) == 1 and torch.equal(got.tensors[0], packed.tensors[0])
    path.unlink()
    with make_cache(tmp_path, entries_host=10, entries_disk=10) as first:
        stored = first.get_or_compute(key(7), lambda: alone)
        assert stored.taps == [] and torch.equal(stored.embedding, alone.embedding.half().float())
    with make_cache(tmp_path, entries_host=10, entries_disk=10) as second:
        again = second.get_or_compute(key(7), lambda: pytest.fail("recomputed"))
        assert_same(again, stored) and again.taps == []
        assert second.get(key(7), taps=False).taps == []
    with pytest.raises(ValueError, match="three taps or none"):
        pack_features(ImageFeatures(embedding=full.embedding, taps=full.taps[:2], input_size=full.input_size,
                                    original_size=full.original_size))
