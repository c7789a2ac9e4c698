"""The feature cache's disk entry format: one safetensors file per entry,
``<key digest>.safetensors``.

A standard safetensors file (8-byte little-endian header length, JSON header, data): the
four tensors under their names (``embedding``, ``tap0``..``tap2``; or ``embedding`` alone for an
embedding-only entry; float16 / bfloat16 /
float32 as packed), laid out as safetensors' own writer lays them out (widest dtype
first, then by name, no gaps), and the entry's facts as strings in ``__metadata__``:

    format          "desam.feature-cache"        format_version   "2"
    key_digest      the key's sha256             storage_dtype    "float16" | "bfloat16" | "float32"
    input_size      "[h,w]"                      original_size    "[h,w]"
    data_crc32      CRC-32 of the data section (every byte after the header), 8 hex digits
    header_crc32    CRC-32 of the canonical header facts (every metadata field but this one,
                    each tensor's name, dtype and shape), 8 hex digits

safetensors itself checks the structure: a header that does not parse, tensors whose
extents do not tile the data section, or a file length other than header + data (truncated
or extended) is refused. The two CRCs cover the rest: every header fact (a changed digit in
a size is valid JSON) and every data byte. A key digest, storage dtype or format other than
the expected one is refused too. zlib.crc32: about 10 ms for a 32 MiB ViT-H-sized entry on
the 2-core test machine; the cache guards against torn writes and bit rot in files the user
owns, not against an attacker, and a CRC detects every error burst up to 32 bits.

Writing: the header is built here and the tensors' bytes are written straight from the
tensors, atomically (``desam_server.atomic``: temporary file ``.<name>.<random>.tmp``
beside the target, fsync, rename). safetensors' own writers were measured and not used
(docs/benchmarks/feature_disk.md): ``save`` copies the data twice (1.5-2.4x slower), and
``save_file`` writes through a temporary file of its own (mode 0600, not fsynced, a name the
startup scan does not know) whose size is only known afterwards, while the cache reserves an
entry's exact size before writing it. Tests check that safetensors reads what is written here
and that its writer lays out the same data under the same header.

Reading: ``safetensors.safe_open(framework="pt")`` memory-maps the file
(``torch.UntypedStorage.from_file``, private mapping; the header is parsed from a second,
read-only mapping); ``get_tensor`` returns views into the mapping (no copy), the data CRC
is computed over them, and the tensors are copied out with numpy (one copy, one thread), so
no mapping outlives a read. The startup scan checks headers only (``framework="numpy"``: a
mapping that is never touched past the header).

safe_open opens the file twice (once to parse the header, once to map it for torch). A
writer replacing the entry in between makes the two disagree; that is reported as
FileNotFoundError (the entry read is gone), not as corruption, when the path no longer
names the file first opened.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..atomic import atomic_write
from .feature_packed import DTYPE_NAMES, EMBEDDING_ONLY, STORAGE_DTYPES, TENSOR_NAMES, PackedFeatures

__all__ = [
    "CorruptEntryError", "ENTRY_SUFFIX", "FORMAT_NAME", "FORMAT_VERSION", "EntryInfo", "encode_header",
    "entry_name", "is_entry_name", "is_legacy_name", "is_temp_name", "read_entry", "read_entry_info",
    "write_entry",
]

FORMAT_NAME = "desam.feature-cache"
FORMAT_VERSION = 2  # 1: the .dsfc container (removed at startup, see is_legacy_name)
ENTRY_SUFFIX = ".safetensors"
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_RE = re.compile(r"^([0-9a-f]{64})\.safetensors$")
_TEMP_RE = re.compile(r"^\.[0-9a-f]{64}\.(safetensors|dsfc)\..*\.tmp$")  # .dsfc: format version 1
_LEGACY_RE = re.compile(r"^[0-9a-f]{64}\.dsfc$")
_CRC_RE = re.compile(r"^[0-9a-f]{8}$")
_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}  # safetensors' dtype names
_META_KEYS = frozenset({"format", "format_version", "key_digest", "storage_dtype", "input_size",
                        "original_size", "data_crc32", "header_crc32"})


class CorruptEntryError(ValueError):
    """A disk entry that must not be served (truncated, flipped bytes, not safetensors,
    wrong format, version, key digest or storage dtype)."""


@dataclass(frozen=True)
class EntryInfo:
    """A structurally valid entry's facts, from its header only."""

    digest: str
    storage_dtype: str
    file_size: int
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    data_crc32: int


def entry_name(digest: str) -> str:
    if not _DIGEST_RE.match(digest):
        raise ValueError("a key digest is 64 lowercase hex characters")
    return digest + ENTRY_SUFFIX


def is_entry_name(name: str) -> str | None:
    """The digest when ``name`` is an entry file name, else None."""
    m = _ENTRY_RE.match(name)
    return m.group(1) if m else None


def is_temp_name(name: str) -> bool:
    """A temporary file left by an interrupted ``atomic_write`` of an entry (of this
    format or of version 1)."""
    return bool(_TEMP_RE.match(name))


def is_legacy_name(name: str) -> bool:
    """An entry of format version 1, ``<digest>.dsfc``: this version does not read them,
    and the startup scan deletes them."""
    return bool(_LEGACY_RE.match(name))


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (bfloat16 has no numpy dtype: go via
    a same-sized integer view)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _canonical(meta: dict[str, str], table: dict[str, tuple[str, list[int]]]) -> bytes:
    """What ``header_crc32`` covers: every metadata field but itself, and each tensor's
    dtype and shape (the data offsets are checked by safetensors and the data CRC)."""
    facts = {"metadata": {k: v for k, v in meta.items() if k != "header_crc32"},
             "tensors": {name: [dtype, list(shape)] for name, (dtype, shape) in table.items()}}
    return json.dumps(facts, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_header(digest: str, packed: PackedFeatures) -> tuple[bytes, list[memoryview], int]:
    """(length prefix + padded JSON header, the tensors' byte views in file order, data
    length). Computes the data CRC, so this is the expensive part of a write (do it
    outside locks)."""
    entry_name(digest)
    # safetensors' writer order: widest dtype first, then by name (keeps float32 aligned).
    names = TENSOR_NAMES[:len(packed.tensors)]
    order = sorted(zip(names, packed.tensors, strict=True), key=lambda nt: (-nt[1].element_size(), nt[0]))
    views, tensors, table, offset, crc = [], {}, {}, 0, 0
    for name, t in order:
        view = _tensor_bytes(t)
        code, shape = _CODES[DTYPE_NAMES[t.dtype]], list(t.shape)
        tensors[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(view)]}
        table[name] = (code, shape)
        crc = zlib.crc32(view, crc)
        offset += len(view)
        views.append(view)
    meta = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "key_digest": digest,
        "storage_dtype": packed.storage_dtype,
        "input_size": json.dumps(list(packed.input_size), separators=(",", ":")),
        "original_size": json.dumps(list(packed.original_size), separators=(",", ":")),
        "data_crc32": f"{crc:08x}",
    }
    meta["header_crc32"] = f"{zlib.crc32(_canonical(meta, table)):08x}"
    text = json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads its header with spaces to 8 bytes
    return struct.pack("<Q", len(text)) + text, views, offset


def write_entry(path: Path, digest: str, packed: PackedFeatures,
                encoded: tuple[bytes, list[memoryview], int] | None = None) -> int:
    """Write one entry atomically; returns the file size."""
    head, views, data_length = encoded if encoded is not None else encode_header(digest, packed)
    written = 0
    with atomic_write(path, "wb") as handle:
        handle.write(head)
        for view in views:
            handle.write(view)
            written += len(view)
    if written != data_length:  # cannot happen unless encode and write disagree
        raise RuntimeError("feature cache entry length mismatch while writing")
    return len(head) + data_length


def _size(text: str, what: str) -> tuple[int, int]:
    try:
        value = json.loads(text)
    except ValueError:
        raise CorruptEntryError(f"bad {what}") from None
    if not isinstance(value, list) or len(value) != 2 or not all(
            type(v) is int and v >= 1 for v in value):
        raise CorruptEntryError(f"bad {what}")
    return value[0], value[1]


def _check_header(f, expected_digest: str, file_size: int) -> EntryInfo:
    """The header facts of an open entry (``safe_open`` has checked the structure)."""
    meta = f.metadata()
    if not isinstance(meta, dict) or set(meta) != _META_KEYS:
        raise CorruptEntryError("not a feature cache entry")
    if meta["format"] != FORMAT_NAME:
        raise CorruptEntryError("not a feature cache entry")
    if meta["format_version"] != str(FORMAT_VERSION):
        raise CorruptEntryError("unsupported format version")
    names = sorted(f.keys())
    if names not in (sorted(TENSOR_NAMES), sorted(EMBEDDING_ONLY)):
        raise CorruptEntryError("bad tensor names")
    table = {}
    for name in TENSOR_NAMES[:len(names)]:
        piece = f.get_slice(name)
        table[name] = (piece.get_dtype(), piece.get_shape())
    header_crc, data_crc = meta["header_crc32"], meta["data_crc32"]
    if not (_CRC_RE.match(header_crc) and _CRC_RE.match(data_crc)):
        raise CorruptEntryError("bad checksum field")
    if zlib.crc32(_canonical(meta, table)) != int(header_crc, 16):
        raise CorruptEntryError("header checksum mismatch")
    if meta["key_digest"] != expected_digest:
        raise CorruptEntryError("key digest mismatch")
    storage = meta["storage_dtype"]
    if storage not in STORAGE_DTYPES:
        raise CorruptEntryError("unknown storage dtype")
    for dtype, shape in table.values():
        if dtype not in (_CODES[storage], "F32") or len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
            raise CorruptEntryError("bad tensor dtype or shape")
    return EntryInfo(digest=expected_digest, storage_dtype=storage, file_size=file_size,
                     input_size=_size(meta["input_size"], "input_size"),
                     original_size=_size(meta["original_size"], "original_size"),
                     data_crc32=int(data_crc, 16))


def _open(path: Path, framework: str):
    """safe_open, its refusals as CorruptEntryError (FileNotFoundError passes)."""
    try:
        return safe_open(path, framework=framework, device="cpu")
    except SafetensorError:
        # The message could quote header bytes; the reason is enough.
        raise CorruptEntryError("not a readable safetensors file") from None
    except RuntimeError:  # torch could not map the file (its length changed since the header was read)
        raise CorruptEntryError("file could not be mapped") from None


def read_entry_info(path: Path, expected_digest: str) -> EntryInfo:
    """Check the header of an entry (not the data CRC: that needs the whole file;
    ``read_entry`` checks it). Raises CorruptEntryError or OSError."""
    size = os.stat(path).st_size
    with _open(path, "numpy") as f:
        return _check_header(f, expected_digest, size)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def read_entry(path: Path, expected_digest: str, expected_storage: str) -> PackedFeatures:
    """Read and fully verify one entry into CPU tensors. Raises CorruptEntryError (the
    caller deletes the file) or OSError (FileNotFoundError: evicted or replaced meanwhile)."""
    st = os.stat(path)
    try:
        return _read(path, expected_digest, expected_storage, st.st_size)
    except CorruptEntryError:
        try:
            replaced = _identity(os.stat(path)) != _identity(st)
        except FileNotFoundError:
            replaced = True
        if replaced:
            raise FileNotFoundError("the entry was replaced while it was read") from None
        raise


def _read(path: Path, expected_digest: str, expected_storage: str, size: int) -> PackedFeatures:
    with _open(path, "pt") as f:
        info = _check_header(f, expected_digest, size)
        if info.storage_dtype != expected_storage:
            raise CorruptEntryError(f"stored as {info.storage_dtype}, cache uses {expected_storage}")
        # Views into the mapping, in file order (together the data section), each checked
        # as soon as it is taken: get_tensor touches the tensor's first page, and taking
        # all four first would read the file out of order (slower when it is not cached).
        views, raw, crc = {}, {}, 0
        for name in f.offset_keys():
            views[name] = f.get_tensor(name)
            raw[name] = views[name].reshape(-1).view(torch.uint8).numpy()
            crc = zlib.crc32(raw[name], crc)
        if crc != info.data_crc32:
            raise CorruptEntryError("data checksum mismatch")
        # Copied out by numpy (one thread; a torch copy would start an OpenMP team on the
        # caller's thread, see docs/ENGINE.md), then viewed as the stored dtype.
        tensors = tuple(torch.from_numpy(raw[name].copy()).view(views[name].dtype).reshape(views[name].shape)
                        for name in TENSOR_NAMES[:len(views)])
        del views, raw  # with the file closed below, nothing holds the mapping
    return PackedFeatures(tensors=tensors, input_size=info.input_size, original_size=info.original_size,
                          storage_dtype=info.storage_dtype)
