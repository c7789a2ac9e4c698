"""A feature-cache folder of its own for each replica on a node: ``CacheSlot``.

The feature cache's disk tier locks its folder (one process per folder). Replicas on one
node share the configured folder's parent: each claims the first free
``<cache dir>/replica-<n>`` by holding an exclusive ``flock`` on ``replica-<n>.claim`` for
its whole life. The kernel releases the lock when the process dies, so the replica Ray
starts in place of a killed one takes the free slot again and finds the disk cache warm
(the files of the slot's earlier owner).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["CacheSlot"]


class CacheSlot:
    """``CacheSlot.claim(base)``: the first free slot under ``base`` (at most ``limit``)."""

    def __init__(self, number: int, directory: Path, handle) -> None:
        self.number = number
        self.directory = directory
        self._handle = handle

    @classmethod
    def claim(cls, base: Path, limit: int = 256) -> CacheSlot:
        base = Path(base).expanduser()
        base.mkdir(parents=True, exist_ok=True)
        for number in range(limit):
            handle = open(base / f"replica-{number}.claim", "a+b")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            directory = base / f"replica-{number}"
            directory.mkdir(exist_ok=True)
            os.set_inheritable(handle.fileno(), False)
            return cls(number, directory, handle)
        raise RuntimeError(f"all {limit} feature-cache slots under {base} are held by running replicas")

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
