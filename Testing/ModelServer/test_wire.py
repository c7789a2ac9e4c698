"""Wire codec (desam_server/wire.py): round trips, the documented byte layout, every
rejection of untrusted bytes, bounded inflation and the content id."""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import struct
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from desam_server import wire
from desam_server.wire import PayloadTooLargeError, WireFormatError

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (4, 5, 6)                     # K x J x I, all different
ANISO = dict(spacing=(0.7, 0.8, 2.5), origin=(-120.5, 33.25, 1001.0))


def rotation(seed: int = 3, proper: bool = True) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 0] *= -1
    return q


GEOM = dict(ANISO, direction=rotation())


def sample(dtype: str, shape=SHAPE, seed: int = 0) -> np.ndarray:
    r = np.random.default_rng(seed)
    if dtype.startswith("float"):
        return (r.normal(0, 1000, size=shape)).astype(dtype)
    info = np.iinfo(dtype)
    return r.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def split(payload: bytes) -> tuple[bytes, dict, bytes]:
    magic, hlen = struct.unpack_from("<8sI", payload)
    return magic, json.loads(payload[12:12 + hlen]), payload[12 + hlen:]


def join(magic: bytes, header, body: bytes, *, fix_lengths: bool = False) -> bytes:
    if fix_lengths:
        header = dict(header, encoded_length=len(body))
    # json.dumps spells inf "Infinity" (not JSON); "1e999" is valid JSON that parses to inf
    text = header if isinstance(header, bytes) else json.dumps(header).replace("Infinity", "1e999").encode()
    return struct.pack("<8sI", magic, len(text)) + text + body


def edited(payload: bytes, **changes) -> bytes:
    magic, header, body = split(payload)
    header.update(changes)
    for key in [k for k, v in changes.items() if v is ...]:
        del header[key]
    return join(magic, header, body)


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("compression", ["none", "zlib"])
@pytest.mark.parametrize("dtype", wire.DTYPES)
def test_volume_round_trip_every_dtype(dtype, compression):
    a = sample(dtype)
    payload = wire.encode_volume(a, compression=compression, **GEOM)
    d = wire.decode_volume(payload)
    assert d.array.dtype == np.dtype(dtype) and d.array.shape == SHAPE
    assert np.array_equal(d.array, a) and d.array.flags.c_contiguous and d.array.flags.writeable
    assert d.spacing == ANISO["spacing"] and d.origin == ANISO["origin"]
    assert np.array_equal(d.direction, GEOM["direction"])        # exact, not just close
    assert d.header["dtype"] == dtype and d.header["compression"] == compression
    assert (12 + struct.unpack_from("<I", payload, 8)[0]) % 8 == 0   # body 8-byte aligned


@pytest.mark.parametrize("proper", [True, False])
def test_oblique_direction_is_row_major_on_the_wire(proper):
    direction = rotation(seed=7, proper=proper)
    assert not np.allclose(direction, direction.T)
    payload = wire.encode_volume(sample("int16"), spacing=(0.5, 0.9, 3.0), origin=(1, 2, 3),
                                 direction=direction)
    header = split(payload)[1]
    assert header["direction"] == direction.reshape(9).tolist()   # row-major: [r*3 + c]
    assert header["direction"][3 * 1 + 0] == direction[1, 0]      # L/P/S row 1 of axis i
    assert header["direction_layout"] == "row-major" and header["space"] == "LPS"
    d = wire.decode_volume(payload)
    assert np.array_equal(d.direction, direction) and d.spacing == (0.5, 0.9, 3.0)
    flat = wire.encode_volume(sample("int16"), spacing=(0.5, 0.9, 3.0), origin=(1, 2, 3),
                              direction=direction.reshape(9))
    assert flat == payload


def test_layouts_and_byte_orders_give_identical_payloads():
    base = sample("int32", shape=(6, 8, 10))
    ref = wire.encode_volume(base, **GEOM)
    big = base.astype(">i4")
    for variant in (np.asfortranarray(base), big, np.asfortranarray(big), base[:, :, ::-1][:, :, ::-1]):
        assert wire.encode_volume(variant, **GEOM) == ref
    strided = np.zeros((12, 8, 20), np.int32)[::2, :, ::2]
    strided[...] = base
    assert wire.encode_volume(strided, **GEOM) == ref
    raw = split(wire.encode_volume(big, compression="none", **GEOM))[2]
    assert raw == base.astype("<i4").tobytes()                       # little-endian, i fastest
    assert np.array_equal(wire.decode_volume(ref).array, base)


def test_smallest_volume_and_uint8_never_shuffled():
    one = np.array([[[-7]]], np.int8)
    d = wire.decode_volume(wire.encode_volume(one, spacing=(1, 1, 1), origin=(0, 0, 0), direction=np.eye(3)))
    assert d.array.shape == (1, 1, 1) and d.array[0, 0, 0] == -7
    assert split(wire.encode_volume(sample("uint8"), **GEOM))[1]["filter"] == "none"
    assert split(wire.encode_volume(sample("int16"), **GEOM))[1]["filter"] == "shuffle"
    assert split(wire.encode_volume(sample("int16"), shuffle=False, **GEOM))[1]["filter"] == "none"


@pytest.mark.parametrize("strategy", ["default", "rle", "filtered", "huffman"])
@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_every_deflate_setting_is_one_standard_zlib_stream(strategy, level, monkeypatch):
    monkeypatch.setattr(wire, "_PARALLEL_MIN", 1000)      # force the parallel path
    monkeypatch.setattr(wire, "_PIECE", 997)
    a = sample("int16", shape=(3, 17, 29))
    for threads in (1, 3):
        payload = wire.encode_volume(a, level=level, strategy=strategy, threads=threads, **GEOM)
        header, body = split(payload)[1:]
        shuffled = np.frombuffer(zlib.decompress(body), np.uint8)    # plain zlib reads it
        assert np.array_equal(shuffled.reshape(2, -1).T.reshape(-1), a.view(np.uint8).reshape(-1))
        assert np.array_equal(wire.decode_volume(payload).array, a)


def test_header_holds_no_voxel_values_and_only_documented_fields():
    a = np.full(SHAPE, 12345.678, np.float64)
    a[0, 0, 0] = 31337
    header_text = json.dumps(split(wire.encode_volume(a, compression="none", **GEOM))[1])
    assert "12345" not in header_text and "31337" not in header_text
    assert set(json.loads(header_text)) == {
        "format", "version", "shape", "dtype", "byte_order", "axis_order", "space", "spacing",
        "origin", "direction", "direction_layout", "compression", "filter", "raw_length",
        "encoded_length", "crc32"}


# ------------------------------------------------------------------ volume rejections

GOOD = wire.encode_volume(sample("int16"), compression="none", **GEOM)
GOOD_Z = wire.encode_volume(sample("float32"), **GEOM)


def rejects(payload, match: str, cls=WireFormatError, **limits):
    with pytest.raises(cls, match=match):
        wire.decode_volume(payload, **limits)


def test_framing_errors():
    rejects(b"DESAMVO", "truncated")
    rejects(b"NOTDESAM" + GOOD[8:], "bad magic")
    rejects(wire.encode_mask(np.ones((2, 2), bool), axis="k", offset=0), "bad magic")
    rejects(GOOD[:8] + struct.pack("<I", 70000) + GOOD[12:], "header too long")
    rejects(GOOD[:40], "truncated inside the header")
    magic, header, body = split(GOOD)
    rejects(join(magic, b"\xff\xfe{}", body), "not UTF-8 JSON")
    rejects(join(magic, b'{"format": ', body), "not UTF-8 JSON")
    rejects(join(magic, b"[1, 2]", body), "JSON object")
    rejects(join(magic, b'{"format": "desam.volume", "format": "x"}', body), "duplicate")
    rejects(join(magic, json.dumps(header).replace('"spacing": [', '"spacing": [NaN, ').encode(), body), "NaN")
    rejects(join(magic, b"[" * 60000 + b"]" * 5000, body), "not UTF-8 JSON")   # deep nesting
    assert isinstance(WireFormatError("x"), ValueError)


@pytest.mark.parametrize("changes, match", [
    (dict(version=2), "unsupported version 2"),
    (dict(version="1"), "unsupported version"),
    (dict(version=...), "unsupported version None"),
    (dict(format="desam.mask"), "'format'"),
    (dict(shape=[4, 5]), "'shape'"), (dict(shape=[4, 0, 6]), "'shape'"),
    (dict(shape=[4, -5, 6]), "'shape'"), (dict(shape=[4, 5.0, 6]), "'shape'"),
    (dict(shape=[4, True, 6]), "'shape'"), (dict(shape="4x5x6"), "'shape'"),
    (dict(dtype="float16"), "'dtype'"), (dict(dtype="bool"), "'dtype'"), (dict(dtype=2), "'dtype'"),
    (dict(byte_order="big"), "'byte_order'"), (dict(axis_order="IJK"), "'axis_order'"),
    (dict(direction_layout="column-major"), "'direction_layout'"), (dict(space="RAS"), "'space'"),
    (dict(spacing=[1, 1]), "'spacing'"), (dict(spacing=["1", 1, 1]), "'spacing'"),
    (dict(spacing=[1, 0, 1]), "spacing must be finite and positive"),
    (dict(spacing=[1, -2, 1]), "spacing must be finite and positive"),
    (dict(spacing=[1e999, 1, 1]), "spacing must be finite"),          # JSON 1e999 -> inf
    (dict(origin=[0, 1e999, 0]), "finite"), (dict(origin=None), "'origin'"),
    (dict(direction=[1, 0, 0, 0, 1, 0, 0, 0, 1e999]), "finite"),
    (dict(direction=[2, 0, 0, 0, 2, 0, 0, 0, 2]), "not orthonormal"),
    (dict(direction=[1, 0.1, 0, 0, 1, 0, 0, 0, 1]), "not orthonormal"),
    (dict(direction=[1, 0, 0, 0, 1, 0]), "'direction'"),
    (dict(compression="lz4"), "'compression'"), (dict(filter="delta"), "'filter'"),
    (dict(raw_length=239), "raw_length 239 != 240"), (dict(raw_length=...), "'raw_length' is missing"),
    (dict(crc32=-1), "'crc32'"), (dict(crc32=2 ** 32), "'crc32'"), (dict(crc32=...), "'crc32' is missing"),
    (dict(encoded_length=241), "truncated body"), (dict(encoded_length=239), "trailing bytes"),
])
def test_header_errors(changes, match):
    rejects(edited(GOOD, **changes), match)


def test_near_orthonormal_direction_is_accepted():
    noisy = (np.eye(3) + 1e-5 * np.random.default_rng(0).normal(size=(3, 3))).reshape(9).tolist()
    assert wire.decode_volume(edited(GOOD, direction=noisy)).direction[0, 0] == noisy[0]


def test_body_errors():
    rejects(GOOD[:-1], "truncated body")
    rejects(GOOD + b"\0", "1 trailing bytes")
    flipped = bytearray(GOOD)
    flipped[-3] ^= 0x10
    rejects(bytes(flipped), "crc32 mismatch")
    magic, header, body = split(GOOD_Z)
    rejects(join(magic, header, body[:-9], fix_lengths=True), "ends early|truncated|corrupt")
    rejects(join(magic, header, body + b"junk", fix_lengths=True), "trailing bytes after the end")
    rejects(join(magic, header, b"\x78\x01" + b"\xff" * 40, fix_lengths=True), "corrupt zlib")
    bad = bytearray(body)
    bad[len(bad) // 2] ^= 0x55
    rejects(join(magic, header, bytes(bad)), "corrupt zlib|crc32 mismatch|ends early")
    rejects(join(magic, dict(header, compression="none"), body, fix_lengths=True), "uncompressed body")


def test_nan_and_inf_voxels_are_rejected_both_ways():
    for value in (np.nan, np.inf, -np.inf):
        a = sample("float64")
        a[1, 2, 3] = value
        with pytest.raises(WireFormatError, match="NaN or infinity"):
            wire.encode_volume(a, **GEOM)
        magic, header, body = split(wire.encode_volume(sample("float64"), compression="none", **GEOM))
        rejects(join(magic, dict(header, crc32=zlib.crc32(a.tobytes())), a.tobytes()), "NaN or infinity")


def test_encoder_refuses_unsendable_input():
    good = sample("int16")
    for bad, match in [(good.astype(bool), "dtype bool"), (good.astype(np.float16), "float16"),
                       (good.astype(np.int64), "int64"), (good[0], "3-D"), (good[:0], "positive sizes")]:
        with pytest.raises(WireFormatError, match=match):
            wire.encode_volume(bad, **GEOM)
    for geometry, match in [(dict(GEOM, spacing=(1, 0, 1)), "spacing"), (dict(GEOM, origin=(0, 0)), "geometry"),
                            (dict(GEOM, direction=np.eye(3) * 2), "orthonormal"),
                            (dict(GEOM, direction=np.eye(4)), "geometry")]:
        with pytest.raises(WireFormatError, match=match):
            wire.encode_volume(good, **geometry)
    for options, match in [(dict(compression="gzip"), "compression"), (dict(level=10), "level"),
                           (dict(strategy="fast"), "strategy")]:
        with pytest.raises(WireFormatError, match=match):
            wire.encode_volume(good, **GEOM, **options)


# ------------------------------------------------------------------ size limits and bombs

def bounded(fn, max_seconds: float = 0.5, max_bytes: int = 8 << 20):
    """Run ``fn`` and return (exception, seconds, peak traced allocation in bytes)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
    except WireFormatError as exc:
        caught = exc
    else:
        caught = None
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < max_seconds and peak < max_bytes, (elapsed, peak)
    return caught


def test_claimed_huge_size_is_rejected_before_allocating():
    huge = edited(GOOD, shape=[65536, 65536, 65536], raw_length=2 * 65536 ** 3)
    exc = bounded(lambda: wire.decode_volume(huge))
    assert isinstance(exc, PayloadTooLargeError) and "voxels exceed" in str(exc)
    rejects(GOOD, "voxel bytes exceed", PayloadTooLargeError, max_bytes=239)
    rejects(GOOD, "120 voxels exceed the limit of 119", PayloadTooLargeError, max_voxels=119)
    # within the limits, but no 240-byte zlib stream can inflate to 1 GiB: refused unallocated
    fake = edited(GOOD_Z, shape=[1024, 1024, 256], raw_length=1 << 30)
    exc = bounded(lambda: wire.decode_volume(fake))
    assert type(exc) is WireFormatError and "cannot inflate" in str(exc)


def test_zip_bomb_is_refused_without_inflating():
    co = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    chunk = bytes(1 << 20)
    body = b"".join(co.compress(chunk) for _ in range(128)) + co.flush()   # 128 MiB of zeros
    assert len(body) < 150_000
    honest = join(b"DESAMVOL", dict(split(GOOD)[1], shape=[128, 1024, 1024], dtype="uint8",
                                     compression="zlib", filter="none", raw_length=1 << 27,
                                     crc32=0), body, fix_lengths=True)
    exc = bounded(lambda: wire.decode_volume(honest, max_bytes=64 << 20))
    assert isinstance(exc, PayloadTooLargeError)
    # a header that lies (120 voxels) over the same stream: inflation stops at 120 bytes
    liar = join(b"DESAMVOL", dict(split(GOOD)[1], dtype="uint8", compression="zlib", filter="none",
                                  raw_length=120, crc32=0), body, fix_lengths=True)
    exc = bounded(lambda: wire.decode_volume(liar))
    assert type(exc) is WireFormatError and "more than the declared 120 bytes" in str(exc)


# ------------------------------------------------------------------ volume_id

def test_volume_id_matches_the_documented_recipe():
    a = sample("int16")
    direction = np.array([[0.6, -0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, -1.0]])
    text = ("desam.volume_id/1\nshape 4 5 6\ndtype int16\nspacing 700000 800000 2500000\n"
            "origin -120500000 33250000 1001000000\n"
            "direction 600000 -800000 0 800000 600000 0 0 0 -1000000\n\n")
    expected = hashlib.sha256(text.encode() + a.astype("<i2").tobytes()).hexdigest()
    assert wire.volume_id(a, direction=direction, **ANISO) == expected


def test_volume_id_is_stable():
    a = sample("float32", shape=(5, 7, 9))
    ref = wire.volume_id(a, **GEOM)
    assert re.fullmatch(r"[0-9a-f]{64}", ref)
    variants = [np.asfortranarray(a), a.astype(">f4"), np.asfortranarray(a.astype(">f4")), a[::-1][::-1]]
    assert all(wire.volume_id(v, **GEOM) == ref for v in variants)
    for compression in ("none", "zlib"):
        assert wire.decode_volume(wire.encode_volume(a, compression=compression, **GEOM)).volume_id == ref
    noisy = dict(spacing=tuple(s + 1e-10 for s in GEOM["spacing"]), origin=tuple(o - 3e-9 for o in GEOM["origin"]),
                 direction=GEOM["direction"] + 1e-12)
    assert wire.volume_id(a, **noisy) == ref
    negative_zero = dict(GEOM, direction=np.where(np.eye(3) == 1, 1.0, -0.0), origin=(-0.0, 0.0, -0.0))
    assert wire.volume_id(a, **negative_zero) == wire.volume_id(a, **dict(GEOM, direction=np.eye(3), origin=(0, 0, 0)))
    assert wire.volume_id(a, **dict(GEOM, direction=GEOM["direction"].reshape(9))) == ref


def test_volume_id_is_sensitive():
    a = sample("int16", shape=(5, 7, 9))
    ref = wire.volume_id(a, **GEOM)
    b = a.copy()
    b[4, 6, 8] ^= 1
    c, s = math.cos(1e-3), math.sin(1e-3)
    turned = GEOM["direction"] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    others = [
        wire.volume_id(b, **GEOM),
        wire.volume_id(a, **dict(GEOM, spacing=(0.7, 0.8, 2.501))),
        wire.volume_id(a, **dict(GEOM, origin=(-120.5, 33.251, 1001.0))),
        wire.volume_id(a, **dict(GEOM, direction=turned)),
        wire.volume_id(a.astype(np.int32), **GEOM),                        # same values, other dtype
        wire.volume_id(a.reshape(7, 5, 9), **GEOM),                        # same bytes, other shape
    ]
    assert len(set(others + [ref])) == len(others) + 1


# ------------------------------------------------------------------ module hygiene and docs

def test_wire_imports_only_stdlib_and_numpy():
    tree = ast.parse(Path(wire.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            roots.add(node.module.split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"numpy", "__future__"}
    assert roots and roots <= allowed, roots - allowed
    assert "numpy" in roots


def test_documented_hex_examples_match_the_encoder():
    doc = (ROOT / "docs" / "WIRE_FORMAT.md").read_text(encoding="utf-8")
    dumps = re.findall(r"```text\n(0000.*?)```", doc, flags=re.S)
    assert len(dumps) == 2

    def unhex(dump: str) -> bytes:
        return bytes.fromhex("".join(line[10:57] for line in dump.strip().splitlines()))

    volume = np.array([[[-1, 0, 1000], [2, 3, -32768]]], np.int16)
    expected = wire.encode_volume(volume, spacing=(0.5, 0.5, 2.0), origin=(-10.0, 20.0, 30.0),
                                  direction=[[0, 0, 1], [1, 0, 0], [0, -1, 0]], compression="none")
    assert unhex(dumps[0]) == expected
    mask = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]], bool)
    assert unhex(dumps[1]) == wire.encode_mask(mask, axis="k", offset=7, compression="zlib")
