"""Atomic file writes: temporary file in the target directory, fsync, rename.

A reader never sees a half-written file: either the old content or the new one. The
temporary file lives in the target's directory (``os.replace`` is atomic only within one
file system) and is removed when the writer fails, leaving any old file untouched.

- ``atomic_write(path, mode)``: a file object to write into;
- ``atomic_write_bytes(path, data)``: the whole content at once;
- ``atomic_output_path(path)``: a temporary *path* for libraries that only write to file
  names (SimpleITK, for example); it keeps the target's suffix so that the library picks
  the same file format.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_output_path"]


def _new_file_mode() -> int:
    """The permission bits an ordinary ``open(path, "w")`` would give (0o666 minus umask);
    ``mkstemp`` makes 0o600 files, which would hide outputs and caches from other users."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no thread-safe way to read it elsewhere
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform (Windows)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _temp_in(target: Path, suffix: str) -> tuple[int, str]:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    with contextlib.suppress(OSError, AttributeError):
        os.fchmod(fd, _new_file_mode())
    return fd, tmp_name


@contextlib.contextmanager
def _publish(tmp_name: str, target: Path) -> Iterator[None]:
    """On clean exit rename the finished temporary file over ``target`` and fsync the
    directory; on error remove the temporary file and leave ``target`` untouched."""
    try:
        yield
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it over
    ``path`` (and fsync the directory); on error remove it and leave ``path`` untouched."""
    if "w" not in mode:
        raise ValueError("atomic_write only supports write modes ('w', 'wb', ...)")
    target = Path(path)
    fd, tmp_name = _temp_in(target, ".tmp")
    with _publish(tmp_name, target), os.fdopen(fd, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


@contextlib.contextmanager
def atomic_output_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same suffix (``.mha``, ``.nii.gz``);
    whatever the caller writes there is fsynced and renamed over ``path`` on clean exit, and
    removed on error. The caller must write a single file at the yielded path."""
    target = Path(path)
    name = target.name
    dot = name.find(".", 1)
    suffix = name[dot:] if dot > 0 else ""
    fd, tmp_name = _temp_in(target, ".tmp" + suffix)
    os.close(fd)
    with _publish(tmp_name, target):
        yield Path(tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
