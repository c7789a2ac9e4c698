"""Wire codec, mask payloads (desam_server/wire.py): bit layout, round trips, fit to a
volume, every rejection, and a mutation fuzz of both decoders. Helpers: test_wire.py."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pytest
from test_wire import GEOM, GOOD, bounded, edited, join, sample, split

from desam_server import wire
from desam_server.wire import PayloadTooLargeError, WireFormatError


@pytest.mark.parametrize("compression", ["none", "zlib"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (512, 512), (3, 5, 7), (1, 1, 9), (2, 8, 8)])
def test_mask_round_trip(shape, compression):
    r = np.random.default_rng(sum(shape))
    for mask in (r.random(shape) < 0.3, np.ones(shape, bool), np.zeros(shape, bool)):
        payload = wire.encode_mask(mask, axis="j", offset=11, compression=compression)
        d = wire.decode_mask(payload)
        assert d.mask.dtype == bool and d.mask.shape == shape and np.array_equal(d.mask, mask)
        assert (d.axis, d.offset) == ("j", 11) and d.header["packing"] == "bits-lsb-first"
        assert d.header["raw_length"] == (mask.size + 7) // 8


def test_mask_bit_layout_and_inputs():
    mask = np.zeros((2, 5), bool)
    mask[0, 0] = mask[1, 2] = True               # C-order flat positions 0 and 7
    raw = split(wire.encode_mask(mask, axis="k", offset=0, compression="none"))[2]
    assert raw == bytes([0b1000_0001, 0b0000_0000])
    mask[1, 4] = True                            # position 9: bit 1 of byte 1
    assert split(wire.encode_mask(mask, axis="k", offset=0, compression="none"))[2] == b"\x81\x02"
    big = np.random.default_rng(1).random((6, 10)) < 0.5
    for variant in (np.asfortranarray(big), big[::-1][::-1]):
        assert wire.encode_mask(variant, axis="i", offset=np.int64(3)) == wire.encode_mask(big, axis="i", offset=3)
    ident = "ab" * 32
    assert wire.decode_mask(wire.encode_mask(big, axis="i", offset=3, volume_id=ident)).header["volume_id"] == ident
    for bad, kwargs, match in [(big.astype(np.uint8), {}, "bool"), (big[0], {}, "2-D"), (big[:, :0], {}, "non-empty"),
                               (big, dict(axis="x"), "axis"), (big, dict(offset=-1), "offset"),
                               (big, dict(offset=2.0), "offset"), (big, dict(compression="lz4"), "compression")]:
        with pytest.raises(WireFormatError, match=match):
            wire.encode_mask(bad, **{"axis": "k", "offset": 0, **kwargs})


def test_mask_fits_volume():
    vol = (30, 40, 50)                           # K, J, I
    assert [wire.mask_slice_shape(vol, a) for a in "kji"] == [(40, 50), (30, 50), (30, 40)]
    ok = wire.encode_mask(np.ones((2, 30, 40), bool), axis="i", offset=48)
    assert wire.decode_mask(ok, volume_shape=vol).offset == 48
    for mask, axis, offset in [(np.ones((2, 30, 40), bool), "i", 49), (np.ones((40, 50), bool), "j", 0),
                               (np.ones((40, 50), bool), "k", 30)]:
        with pytest.raises(WireFormatError, match="does not fit"):
            wire.decode_mask(wire.encode_mask(mask, axis=axis, offset=offset), volume_shape=vol)


MASK = wire.encode_mask(np.eye(3, 5, dtype=bool), axis="k", offset=2, compression="none")


@pytest.mark.parametrize("changes, match", [
    (dict(version=0), "unsupported version"), (dict(format="desam.volume"), "'format'"),
    (dict(shape=[15]), "'shape'"), (dict(shape=[1, 1, 3, 5]), "'shape'"), (dict(shape=[3, 0]), "'shape'"),
    (dict(axis="z"), "'axis'"), (dict(axis=...), "'axis' is missing"), (dict(offset=-1), "'offset'"),
    (dict(offset=1.5), "'offset'"), (dict(packing="bits-msb-first"), "'packing'"),
    (dict(volume_id=7), "'volume_id'"), (dict(compression="gzip"), "'compression'"),
    (dict(raw_length=3), "raw_length 3 != 2"), (dict(shape=[3, 6]), "raw_length 2 != 3"),
    (dict(crc32=0), "crc32 mismatch"), (dict(encoded_length=3), "truncated body"),
])
def test_mask_header_errors(changes, match):
    with pytest.raises(WireFormatError, match=match):
        wire.decode_mask(edited(MASK, **changes))


def test_mask_body_errors_and_limits():
    magic, header, body = split(MASK)
    padded = bytes([body[0], body[1] | 0x80])    # 15 pixels: bit 7 of byte 1 is padding
    with pytest.raises(WireFormatError, match="padding bits"):
        wire.decode_mask(join(magic, dict(header, crc32=zlib.crc32(padded)), padded))
    with pytest.raises(WireFormatError, match="bad magic"):
        wire.decode_mask(GOOD)
    with pytest.raises(PayloadTooLargeError, match="15 mask pixels exceed the limit of 14"):
        wire.decode_mask(MASK, max_pixels=14)
    huge = edited(MASK, shape=[1 << 20, 1 << 20, 1 << 20], raw_length=1 << 57)
    assert isinstance(bounded(lambda: wire.decode_mask(huge)), PayloadTooLargeError)


def test_mutated_payloads_fail_only_with_wire_errors():
    """Random byte edits, insertions, deletions and truncations of valid payloads: each
    decodes or raises WireFormatError, never another exception. Edits that still decode
    are possible (a digit of a header number, JSON whitespace, unused deflate bits): the
    header is not checksummed; compare volume_id end to end to cover it."""
    r = np.random.default_rng(0)
    seeds = [wire.encode_volume(sample(dt, shape=(3, 4, 5)), compression=c, **GEOM)
             for dt in ("int16", "float32", "uint8") for c in ("none", "zlib")]
    seeds += [wire.encode_mask(r.random((3, 5, 7)) < 0.5, axis="i", offset=2, compression=c) for c in ("none", "zlib")]
    rnd, outcomes = random.Random(1), {"ok": 0, "error": 0}
    for _ in range(3000):
        s = bytearray(rnd.choice(seeds))
        op, at = rnd.randrange(4), rnd.randrange(len(s))
        if op == 0:
            s[at] = rnd.randrange(256)
        elif op == 1:
            s[at:at] = bytes([rnd.randrange(256)])
        elif op == 2:
            del s[at]
        else:
            s = s[:at]
        for decode in (wire.decode_volume, wire.decode_mask):
            try:
                decode(bytes(s))
                outcomes["ok"] += 1
            except WireFormatError:
                outcomes["error"] += 1
    assert outcomes["error"] > 5900
