"""End the service when the program that started it is gone (``serve --exit-with-parent``).

The Slicer module starts a local service as its child and stops it when Slicer quits. If
Slicer crashes or is killed, nothing calls that stop; with ``--exit-with-parent PID`` the
service notices within ``interval`` seconds that its parent process changed (POSIX
re-parents an orphan to init or a subreaper) and shuts itself down as SIGTERM would:
uvicorn's graceful shutdown, then the lifespan closes the service (jobs cancelled,
training processes ended). Nothing is installed on another object; the watch is a daemon
thread owned by this class, stopped by ``stop()``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("desam_server")

__all__ = ["ParentWatch"]


def _terminate_self() -> None:
    signal.raise_signal(signal.SIGTERM)


class ParentWatch:
    """``parent_pid``: the process that must stay this process's parent; ``on_gone``
    (default: SIGTERM to this process) runs once, on the watch thread, when it is not."""

    def __init__(self, parent_pid: int, *, interval: float = 1.0,
                 on_gone: Callable[[], None] = _terminate_self) -> None:
        if os.name != "posix":
            raise ValueError("--exit-with-parent needs a POSIX system (Linux, macOS); on Windows stop the "
                             "service from the program that started it")
        if parent_pid != os.getppid():
            raise ValueError(f"--exit-with-parent {parent_pid}: this service's parent process is "
                             f"{os.getppid()}, not {parent_pid}")
        self.parent_pid = parent_pid
        self.interval = interval
        self._on_gone = on_gone
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="desam-parent-watch", daemon=True)

    def start(self) -> ParentWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.interval + 1.0)

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            if os.getppid() != self.parent_pid:
                log.warning("the process that started this service (%d) has exited: shutting down",
                            self.parent_pid)
                self._on_gone()
                return
