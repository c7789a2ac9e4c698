"""Fetching one exact release file from PyPI without installing it: ``pip download
--no-deps`` (pip's own index, proxy and certificate settings apply). Used for files that
ship inside Python packages whose dependencies must not enter this environment (model
weights, the MNI152 template)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["pip_download"]


def pip_download(workdir: Path, package: str, version: str, *, binary_only: bool = False) -> Path:
    """Download ``package==version`` (a wheel or an sdist; only a wheel with
    ``binary_only``) into ``workdir`` and return its path. Raises RuntimeError with pip's
    message when the download fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(workdir)]
    if binary_only:
        cmd += ["--only-binary", ":all:"]
    cmd.append(f"{package}=={version}")
    log.info("pip download --no-deps %s==%s", package, version)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = [p for p in Path(workdir).iterdir() if p.is_file()]
    if proc.returncode != 0 or not archives:
        raise RuntimeError(f"pip download of {package}=={version} failed: {proc.stderr.strip()[-500:]}")
    return archives[0]
