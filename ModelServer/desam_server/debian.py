"""Fetching files from Debian packages without installing them: ``apt-get download`` (which
verifies the package against the signed archive index) and reading a .deb's data tar in
memory (an ar archive; data.tar.xz/gz/bz2, or dpkg-deb for other compressions)."""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["apt_download", "deb_data_tar", "tar_member"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C", LANG="C", DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _lists_problem(output: str) -> bool:
    """apt's ways of saying its package lists are missing or stale."""
    markers = ("Unable to locate package", "has no installation candidate", "Can't select candidate",
               "404", "Failed to fetch", "Hash Sum mismatch", "File has unexpected size")
    return any(m in output for m in markers)


def apt_download(workdir: Path, package: str) -> Path:
    """``apt-get download invesalius-examples`` into ``workdir``; runs ``apt-get update``
    once and retries when the package lists are missing or stale."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise RuntimeError(
            f"apt-get is not available: the sample CT comes from Debian's package '{package}' "
            "(fetched with `apt-get download`), which needs a Debian or Ubuntu system. Elsewhere, "
            f"download {package}_*.deb from packages.debian.org and pass its path instead.")
    log.info("downloading the sample CT: apt-get download %s", package)
    result = _run([apt, "download", package], workdir)
    if result.returncode != 0:
        output = result.stdout + result.stderr
        if not _lists_problem(output):
            raise RuntimeError(f"`apt-get download {package}` failed: {output.strip()[-600:]}")
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            raise RuntimeError(
                f"`apt-get download {package}` failed because the package lists are missing or stale; "
                f"run `sudo apt-get update` once and try again ({output.strip()[-300:]})")
        log.info("package lists missing or stale: running apt-get update once")
        update = _run([apt, "update"], workdir)
        if update.returncode != 0:
            raise RuntimeError(f"`apt-get update` failed: {(update.stdout + update.stderr).strip()[-600:]}")
        result = _run([apt, "download", package], workdir)
        if result.returncode != 0:
            raise RuntimeError(f"`apt-get download {package}` failed after `apt-get update`: "
                               f"{(result.stdout + result.stderr).strip()[-600:]}")
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"`apt-get download {package}` reported success but wrote no .deb file")
    return debs[-1]


def deb_data_tar(deb: Path) -> bytes:
    """The uncompressed data.tar of a .deb (an ar archive)."""
    with open(deb, "rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise RuntimeError(f"{deb}: not a Debian package (no ar signature)")
        while True:
            header = handle.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            try:
                size = int(header[48:58].decode("ascii").strip())
            except ValueError:
                raise RuntimeError(f"{deb}: corrupt ar member header") from None
            if name.startswith("data.tar"):
                payload = handle.read(size)
                if len(payload) != size:
                    raise RuntimeError(f"{deb}: truncated package")
                if name == "data.tar":
                    return payload
                if name.endswith(".xz") or name.endswith(".lzma"):
                    return lzma.decompress(payload)
                if name.endswith(".gz"):
                    return gzip.decompress(payload)
                if name.endswith(".bz2"):
                    return bz2.decompress(payload)
                return _dpkg_fsys_tarfile(deb, name)
            handle.seek(size + (size & 1), io.SEEK_CUR)
    raise RuntimeError(f"{deb}: no data.tar member")


def _dpkg_fsys_tarfile(deb: Path, member: str) -> bytes:
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise RuntimeError(f"{deb}: {member} needs dpkg-deb to unpack, and dpkg-deb is not available")
    result = subprocess.run([dpkg_deb, "--fsys-tarfile", str(deb)], capture_output=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"dpkg-deb --fsys-tarfile {deb} failed: {result.stderr.decode(errors='replace')[-300:]}")
    return result.stdout


def tar_member(tar_bytes: bytes, wanted: str, mode: str = "r:") -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode=mode) as tar:
        for member in tar:
            if member.isfile() and member.name.lstrip("./") == wanted:
                extracted = tar.extractfile(member)
                assert extracted is not None
                return extracted.read()
    raise RuntimeError(f"the package has no {wanted}")
