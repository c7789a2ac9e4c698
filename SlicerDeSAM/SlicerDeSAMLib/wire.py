"""Wire format of volumes and masks between Slicer and the service (docs/WIRE_FORMAT.md).

Standard library and numpy only, so the Slicer-side client uses this module unchanged.
Bad bytes raise ``WireFormatError`` (a ``ValueError``); sizes over the receiver's limits
raise ``PayloadTooLargeError`` before anything is allocated or inflated."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["WireFormatError", "PayloadTooLargeError", "DecodedVolume", "DecodedMask", "encode_volume",
           "decode_volume", "volume_id", "encode_mask", "decode_mask", "mask_slice_shape", "DTYPES", "AXES",
           "axis_dimension"]

FORMAT_VERSION = 1
VOLUME_MAGIC, MASK_MAGIC = b"DESAMVOL", b"DESAMMSK"
_PREFIX = struct.Struct("<8sI")          # magic, header length in bytes
MAX_HEADER_BYTES = 65536
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")
DEFAULT_MAX_VOXELS = 1 << 30
DEFAULT_MAX_BYTES = 2 << 30               # raw (inflated) voxel bytes
DEFAULT_MAX_PIXELS = 1 << 28              # mask pixels (32 MiB packed)
ORTHONORMAL_TOL = 1e-3                    # max |D^T D - I| accepted for a direction matrix
ID_SCALE = 1_000_000                      # volume_id quantum: 1e-6 mm (direction: 1e-6)
MAX_INFLATE_RATIO = 1032                  # deflate cannot expand beyond this
_STRATEGIES = {"default": zlib.Z_DEFAULT_STRATEGY, "rle": zlib.Z_RLE, "filtered": zlib.Z_FILTERED,
               "huffman": zlib.Z_HUFFMAN_ONLY}
_PARALLEL_MIN, _PIECE = 8 << 20, 4 << 20  # deflate in parallel 4 MiB pieces above 8 MiB
_MAX_DIM = (1 << 31) - 1
#: The index axes of a [K, J, I] volume by name, in array-dimension order: the one
#: vocabulary of slicing axes in payloads, the HTTP API, the client and the service. A slice
#: along "k" is J x I (rows j, columns i), along "j" K x I, along "i" K x J.
AXES = ("k", "j", "i")


def axis_dimension(axis: str) -> int:
    """The array dimension (0, 1 or 2) of index axis ``axis`` ('k', 'j' or 'i')."""
    if not isinstance(axis, str) or axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(AXES)}, got {axis!r}")
    return AXES.index(axis)


class WireFormatError(ValueError):
    """The bytes are not a valid payload (or an encoder was given something unsendable)."""


class PayloadTooLargeError(WireFormatError):
    """The payload is well-formed so far but exceeds the receiver's size limits (HTTP 413)."""


@dataclass(frozen=True)
class DecodedVolume:
    array: np.ndarray                         # [k, j, i], native byte order, writable
    spacing: tuple[float, float, float]       # mm along (i, j, k)
    origin: tuple[float, float, float]        # LPS mm, centre of voxel (0, 0, 0)
    direction: np.ndarray                     # 3x3, column c = LPS unit vector of axis c
    header: dict

    @cached_property
    def volume_id(self) -> str:
        return volume_id(self.array, spacing=self.spacing, origin=self.origin, direction=self.direction)


@dataclass(frozen=True)
class DecodedMask:
    mask: np.ndarray                          # bool, (H, W) or (N, H, W) as sent
    axis: str                                 # "k", "j" or "i"
    offset: int                               # index of the first slice along axis
    header: dict


# ------------------------------------------------------------------ shared checks

def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _geometry(spacing, origin, direction):
    """Validated (spacing tuple, origin tuple, 3x3 float64 direction)."""
    try:
        s = np.asarray(spacing, dtype=np.float64).reshape(-1)
        o = np.asarray(origin, dtype=np.float64).reshape(-1)
        d = np.array(direction, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireFormatError(f"geometry values must be numbers: {exc}") from None
    if s.shape != (3,) or o.shape != (3,) or d.size != 9 or d.shape not in ((3, 3), (9,)):
        raise WireFormatError("geometry needs 3 spacings, 3 origin coordinates and 9 direction values")
    d = d.reshape(3, 3)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise WireFormatError(f"spacing must be finite and positive, got {s.tolist()}")
    if not np.all(np.isfinite(o)) or not np.all(np.isfinite(d)):
        raise WireFormatError("origin and direction must be finite")
    err = float(np.max(np.abs(d.T @ d - np.eye(3))))
    if err > ORTHONORMAL_TOL:
        raise WireFormatError(f"direction is not orthonormal (max |D^T D - I| = {err:.3g} > {ORTHONORMAL_TOL})")
    return tuple(float(x) for x in s), tuple(float(x) for x in o), d


def _check_array(array: np.ndarray) -> str:
    if array.ndim != 3 or any(n < 1 for n in array.shape):
        raise WireFormatError(f"a volume must be 3-D (K x J x I) with positive sizes, got {array.shape}")
    name = array.dtype.name
    if name not in DTYPES or array.dtype.kind not in "uif":
        raise WireFormatError(f"dtype {array.dtype} is not sendable; allowed: {', '.join(DTYPES)}")
    return name


def _quantised(values) -> str:
    return " ".join(str(int(math.floor(float(v) * ID_SCALE + 0.5))) for v in values)


def volume_id(array: np.ndarray, *, spacing, origin, direction) -> str:
    """sha256 hex of a canonical text (shape, dtype, geometry quantised to 1e-6) followed
    by the little-endian KJI voxel bytes; see docs/WIRE_FORMAT.md."""
    array = np.asarray(array)
    name = _check_array(array)
    spacing, origin, direction = _geometry(spacing, origin, direction)
    text = (f"desam.volume_id/1\nshape {' '.join(map(str, array.shape))}\ndtype {name}\n"
            f"spacing {_quantised(spacing)}\norigin {_quantised(origin)}\n"
            f"direction {_quantised(direction.reshape(9))}\n\n")
    h = hashlib.sha256(text.encode("ascii"))
    le = np.dtype(name).newbyteorder("<")
    if array.flags.c_contiguous and array.dtype == le:
        h.update(memoryview(array).cast("B"))
    else:                              # one k-slab at a time: bounded extra memory
        for k in range(array.shape[0]):
            h.update(memoryview(np.ascontiguousarray(array[k], dtype=le)).cast("B"))
    return h.hexdigest()


# ------------------------------------------------------------------ framing

def _frame(magic: bytes, header: dict, body) -> bytes:
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    text += b" " * (-(_PREFIX.size + len(text)) % 8)     # body starts 8-byte aligned
    if len(text) > MAX_HEADER_BYTES:
        raise WireFormatError("header too long")
    return b"".join((_PREFIX.pack(magic, len(text)), text, body))


def _unique_keys(pairs):
    if len({key for key, _ in pairs}) != len(pairs):
        raise WireFormatError("duplicate field in the header")
    return dict(pairs)


def _reject_constant(name: str):
    raise WireFormatError(f"header contains {name}, which is not valid JSON")


def _unframe(data, magic: bytes, kind: str) -> tuple[dict, memoryview]:
    view = memoryview(data).cast("B")
    if len(view) < _PREFIX.size:
        raise WireFormatError(f"truncated: {len(view)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    got, hlen = _PREFIX.unpack_from(view)
    if got != magic:
        raise WireFormatError(f"bad magic {bytes(got)!r}: not a {kind} payload (expected {magic!r})")
    if hlen > MAX_HEADER_BYTES:
        raise WireFormatError(f"header too long: {hlen} bytes (limit {MAX_HEADER_BYTES})")
    if len(view) < _PREFIX.size + hlen:
        raise WireFormatError("truncated inside the header")
    try:
        text = bytes(view[_PREFIX.size:_PREFIX.size + hlen]).decode("utf-8")
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except WireFormatError:
        raise
    except (ValueError, RecursionError) as exc:
        raise WireFormatError(f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireFormatError("header must be a JSON object")
    if header.get("format") != f"desam.{kind}":
        raise WireFormatError(f"header field 'format' must be 'desam.{kind}', got {header.get('format')!r}")
    version = header.get("version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise WireFormatError(f"unsupported version {version!r} (this decoder reads {FORMAT_VERSION})")
    return header, view[_PREFIX.size + hlen:]


def _field(h: dict, key: str, ok, what: str):
    if key not in h:
        raise WireFormatError(f"header field {key!r} is missing")
    if not ok(h[key]):
        raise WireFormatError(f"header field {key!r} must be {what}, got {str(h[key])[:80]!r}")
    return h[key]


def _choice(h: dict, key: str, allowed) -> str:
    return _field(h, key, lambda v: isinstance(v, str) and v in allowed, f"one of {list(allowed)}")


def _int(h: dict, key: str, lo: int, hi: int) -> int:
    return _field(h, key, lambda v: _is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")


def _numbers(h: dict, key: str, n: int) -> list:
    return _field(h, key, lambda v: isinstance(v, list) and len(v) == n and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v), f"a list of {n} numbers")


def _shape(h: dict, ndims) -> tuple[int, ...]:
    return tuple(_field(h, "shape", lambda v: isinstance(v, list) and len(v) in ndims and all(
        _is_int(n) and 1 <= n <= _MAX_DIM for n in v), f"a list of {' or '.join(map(str, ndims))} positive integers"))


def _body_checks(h: dict, body: memoryview, raw_length: int, compressions) -> tuple[str, int]:
    if _int(h, "raw_length", 0, 1 << 62) != raw_length:
        raise WireFormatError(f"raw_length {h['raw_length']} != {raw_length} implied by shape and dtype")
    compression = _choice(h, "compression", compressions)
    encoded = _int(h, "encoded_length", 0, 1 << 62)
    if len(body) < encoded:
        raise WireFormatError(f"truncated body: {len(body)} of {encoded} bytes")
    if len(body) > encoded:
        raise WireFormatError(f"{len(body) - encoded} trailing bytes after the body")
    if compression == "none" and encoded != raw_length:
        raise WireFormatError(f"uncompressed body is {encoded} bytes, expected {raw_length}")
    if compression == "zlib" and raw_length > encoded * MAX_INFLATE_RATIO + 64:
        raise WireFormatError(f"a {encoded}-byte zlib stream cannot inflate to {raw_length} bytes")
    return compression, _int(h, "crc32", 0, 0xFFFFFFFF)


# ------------------------------------------------------------------ deflate / inflate

def _deflate(buf: memoryview, level: int, strategy: int, threads: int) -> bytes:
    """One standard zlib (RFC 1950) stream; large inputs are deflated in parallel pieces, each
    ended by a sync flush, so that they concatenate into one deflate stream (header 78 01)."""
    if len(buf) < _PARALLEL_MIN or threads <= 1:
        co = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
        return co.compress(buf) + co.flush()
    pieces = [buf[i:i + _PIECE] for i in range(0, len(buf), _PIECE)]

    def piece(index: int) -> bytes:
        co = zlib.compressobj(level, zlib.DEFLATED, -15, 9, strategy)
        last = index == len(pieces) - 1
        return co.compress(pieces[index]) + co.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = pool.map(piece, range(len(pieces)))
        checksum = zlib.adler32(buf)
        return b"".join([b"\x78\x01", *parts, struct.pack(">I", checksum)])


def _inflate(body: memoryview, raw_length: int) -> np.ndarray:
    """Inflate exactly ``raw_length`` bytes; zlib may never produce more (bounded memory)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(body, raw_length)
        if not d.eof and d.decompress(d.unconsumed_tail, 1):
            raise WireFormatError(f"zlib stream inflates to more than the declared {raw_length} bytes")
    except zlib.error as exc:
        raise WireFormatError(f"corrupt zlib stream: {exc}") from None
    if len(out) < raw_length:
        raise WireFormatError(f"zlib stream ends early: {len(out)} of {raw_length} bytes")
    if not d.eof:
        raise WireFormatError("zlib stream is truncated (no end-of-stream marker)")
    if d.unused_data:
        raise WireFormatError(f"{len(d.unused_data)} trailing bytes after the end of the zlib stream")
    return np.frombuffer(out, np.uint8)


# ------------------------------------------------------------------ volumes

def _shuffle(buf: np.ndarray, itemsize: int, inverse: bool = False) -> np.ndarray:
    """Byte b of element e <-> byte e of plane b (strided copies; a transposed copy is slower)."""
    out, n = np.empty_like(buf), buf.size // itemsize
    for b in range(itemsize):
        if inverse:
            out[b::itemsize] = buf[b * n:(b + 1) * n]
        else:
            out[b * n:(b + 1) * n] = buf[b::itemsize]
    return out


def _check_compression(compression: str, level: int) -> None:
    if compression not in ("none", "zlib"):
        raise WireFormatError(f"compression must be 'none' or 'zlib', got {compression!r}")
    if not _is_int(level) or not 0 <= level <= 9:
        raise WireFormatError(f"zlib level must be 0..9, got {level!r}")


def encode_volume(array: np.ndarray, *, spacing, origin, direction, compression: str = "zlib", level: int = 1,
                  shuffle: bool | None = None, strategy: str = "rle", threads: int | None = None) -> bytes:
    """Serialise a [k, j, i] volume and its LPS geometry (``direction`` 3x3 or 9 values,
    row-major). ``shuffle`` (default: on for zlib and multi-byte dtypes) groups the bytes
    of each significance; ``strategy`` and ``threads`` only change how deflate works."""
    array = np.asarray(array)
    name = _check_array(array)
    spacing, origin, direction = _geometry(spacing, origin, direction)
    _check_compression(compression, level)
    if strategy not in _STRATEGIES:
        raise WireFormatError(f"strategy must be one of {list(_STRATEGIES)}, got {strategy!r}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise WireFormatError("float volumes must not contain NaN or infinity")
    le = np.ascontiguousarray(array, dtype=np.dtype(name).newbyteorder("<"))
    raw = le.reshape(-1).view(np.uint8)
    itemsize = le.dtype.itemsize
    use_shuffle = itemsize > 1 and (compression == "zlib" if shuffle is None else bool(shuffle))
    body = memoryview(_shuffle(raw, itemsize) if use_shuffle else raw).cast("B")
    if compression == "zlib":
        body = _deflate(body, level, _STRATEGIES[strategy], threads or min(os.cpu_count() or 1, 8))
    header = {
        "format": "desam.volume", "version": FORMAT_VERSION, "shape": list(array.shape),
        "dtype": name, "byte_order": "little", "axis_order": "KJI", "space": "LPS",
        "spacing": list(spacing), "origin": list(origin),
        "direction": direction.reshape(9).tolist(), "direction_layout": "row-major",
        "compression": compression, "filter": "shuffle" if use_shuffle else "none",
        "raw_length": raw.size, "encoded_length": len(body), "crc32": zlib.crc32(raw),
    }
    return _frame(VOLUME_MAGIC, header, body)


def decode_volume(data, *, max_voxels: int = DEFAULT_MAX_VOXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> DecodedVolume:
    """Parse and fully validate a volume payload from untrusted bytes."""
    h, body = _unframe(data, VOLUME_MAGIC, "volume")
    shape = _shape(h, (3,))
    name = _choice(h, "dtype", DTYPES)
    for key, value in (("byte_order", "little"), ("axis_order", "KJI"), ("space", "LPS"),
                       ("direction_layout", "row-major")):
        _choice(h, key, (value,))
    spacing, origin, direction = _geometry(_numbers(h, "spacing", 3), _numbers(h, "origin", 3),
                                           _numbers(h, "direction", 9))
    voxels = shape[0] * shape[1] * shape[2]
    itemsize = np.dtype(name).itemsize
    if voxels > max_voxels:
        raise PayloadTooLargeError(f"{voxels} voxels exceed the limit of {max_voxels}")
    if voxels * itemsize > max_bytes:
        raise PayloadTooLargeError(f"{voxels * itemsize} voxel bytes exceed the limit of {max_bytes}")
    compression, crc = _body_checks(h, body, voxels * itemsize, ("none", "zlib"))
    shuffled = _choice(h, "filter", ("none", "shuffle")) == "shuffle" and itemsize > 1
    raw = _inflate(body, voxels * itemsize) if compression == "zlib" else np.frombuffer(body, np.uint8)
    raw = _shuffle(raw, itemsize, inverse=True) if shuffled else raw.copy()    # writable, owned
    if zlib.crc32(raw) != crc:
        raise WireFormatError(f"crc32 mismatch: header {crc:08x}, voxels {zlib.crc32(raw):08x}")
    array = raw.view(np.dtype(name).newbyteorder("<")).reshape(shape)
    if array.dtype != np.dtype(name):                  # big-endian host
        array = array.astype(np.dtype(name))
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise WireFormatError("float volume contains NaN or infinity")
    direction.setflags(write=False)
    return DecodedVolume(array, spacing, origin, direction, h)


# ------------------------------------------------------------------ masks

def mask_slice_shape(volume_shape, axis: str) -> tuple[int, int]:
    """(H, W) of one slice of a [K, J, I] volume along ``axis``: k -> JI, j -> KI, i -> KJ
    (the other two dimensions, in order)."""
    if axis not in AXES:
        raise WireFormatError(f"axis must be one of {list(AXES)}, got {axis!r}")
    shape = [int(n) for n in volume_shape]
    del shape[AXES.index(axis)]
    return shape[0], shape[1]


def encode_mask(mask: np.ndarray, *, axis: str, offset: int, compression: str = "zlib",
                level: int = 6, volume_id: str | None = None) -> bytes:
    """Bit-pack a bool (H, W) slice or (N, H, W) slab starting at slice ``offset`` of ``axis``."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise WireFormatError(f"a mask must be a bool array (use mask != 0), got {mask.dtype}")
    if mask.ndim not in (2, 3) or any(n < 1 for n in mask.shape):
        raise WireFormatError(f"a mask must be 2-D (H x W) or 3-D (N x H x W) and non-empty, got {mask.shape}")
    if axis not in AXES:
        raise WireFormatError(f"axis must be one of {list(AXES)}, got {axis!r}")
    if not (_is_int(offset) or isinstance(offset, np.integer)) or not 0 <= offset <= _MAX_DIM:
        raise WireFormatError(f"offset must be an integer in [0, {_MAX_DIM}], got {offset!r}")
    _check_compression(compression, level)
    packed = np.packbits(mask.reshape(-1), bitorder="little")
    body = zlib.compress(packed, level) if compression == "zlib" else packed.tobytes()
    header = {"format": "desam.mask", "version": FORMAT_VERSION, "shape": list(mask.shape),
              "axis": axis, "offset": int(offset), "packing": "bits-lsb-first",
              "compression": compression, "raw_length": packed.size,
              "encoded_length": len(body), "crc32": zlib.crc32(packed)}
    if volume_id is not None:
        header["volume_id"] = str(volume_id)
    return _frame(MASK_MAGIC, header, body)


def decode_mask(data, *, max_pixels: int = DEFAULT_MAX_PIXELS, volume_shape=None) -> DecodedMask:
    """Parse and validate a mask payload (and, given ``volume_shape`` [K, J, I], that it fits)."""
    h, body = _unframe(data, MASK_MAGIC, "mask")
    shape = _shape(h, (2, 3))
    axis = _choice(h, "axis", AXES)
    offset = _int(h, "offset", 0, _MAX_DIM)
    _choice(h, "packing", ("bits-lsb-first",))
    if "volume_id" in h and not isinstance(h["volume_id"], str):
        raise WireFormatError("header field 'volume_id' must be a string")
    pixels = math.prod(shape)
    if pixels > max_pixels:
        raise PayloadTooLargeError(f"{pixels} mask pixels exceed the limit of {max_pixels}")
    if volume_shape is not None:
        n, extent = (shape[0] if len(shape) == 3 else 1), int(volume_shape[AXES.index(axis)])
        if tuple(shape[-2:]) != mask_slice_shape(volume_shape, axis) or offset + n > extent:
            raise WireFormatError(f"mask {shape} at {axis}={offset} does not fit volume shape {tuple(volume_shape)}")
    nbytes = (pixels + 7) // 8
    compression, crc = _body_checks(h, body, nbytes, ("none", "zlib"))
    packed = _inflate(body, nbytes) if compression == "zlib" else np.frombuffer(body, np.uint8)
    if zlib.crc32(packed) != crc:
        raise WireFormatError(f"crc32 mismatch: header {crc:08x}, bits {zlib.crc32(packed):08x}")
    if pixels % 8 and int(packed[-1]) >> (pixels % 8):
        raise WireFormatError("padding bits after the last pixel must be zero")
    bits = np.unpackbits(packed, count=pixels, bitorder="little")
    return DecodedMask(bits.view(np.bool_).reshape(shape), axis, offset, h)
