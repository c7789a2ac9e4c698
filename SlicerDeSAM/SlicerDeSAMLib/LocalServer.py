"""Start and stop a local DeSAM service (``desam-server serve``) as a child process.

The service lives in its own Python environment (torch and the model are never inside
Slicer); the Server panel starts it from the ``desam-server`` executable the user
configured. Its output (stdout and stderr joined) is read line by line by a reader thread
into a bounded buffer the panel shows. The child is ended by ``stop()``: the widget calls
it when Slicer quits (``slicer.app.aboutToQuit``), and ``start()`` registers an
``atexit`` fallback owned by this object, removed again by ``stop()``; on POSIX the
service is started with ``--exit-with-parent`` so that it also ends when Slicer crashes
or is killed.

Standard library only; no Qt. ``start()`` and ``stop()`` return within about a second
(``stop`` waits up to ``timeout`` for the child); ``wait_until_ready`` polls the service
and belongs on the worker thread.
"""

from __future__ import annotations

import atexit
import collections
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence

from .DeSAMError import DeSAMError
from .ServerClient import ServerClient, ServerError

__all__ = ["LocalServer"]

#: Variables of Slicer's own Python that must not leak into the service's Python.
_PYTHON_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONNOUSERSITE", "PYTHONEXECUTABLE")


class LocalServer:
    """``executable``: the ``desam-server`` program (a path, or a name on PATH); ``args``:
    ``serve``'s options (e.g. ``--encoder vit_b --device cuda``); ``env``: the child's whole
    environment (inside Slicer ``slicer.util.startupEnvironment()``, which has none of
    Slicer's launcher settings), default this process's environment without Slicer's Python
    variables; ``host``, ``port``: where it listens (passed as ``--host``/``--port``, after
    ``args``); ``prefix``: arguments before ``serve`` (``("-m", "desam_server.cli")`` when
    ``executable`` is a Python interpreter); ``log_lines``: lines of output kept.
    The command: ``executable *prefix serve *args --host HOST --port PORT``."""

    def __init__(self, executable: str | os.PathLike, args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 8765,
                 scheme: str = "http", prefix: Sequence[str] = (), log_lines: int = 2000) -> None:
        self.executable = os.fspath(executable)
        self.args = tuple(str(a) for a in args)
        self.prefix = tuple(str(a) for a in prefix)
        self.env = None if env is None else dict(env)
        self.host, self.port, self.scheme = host, int(port), scheme
        self._log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._log_lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._atexit_registered = False

    @classmethod
    def for_url(cls, executable: str | os.PathLike, url: str, args: Sequence[str] = (),
                env: Mapping[str, str] | None = None, **kwargs) -> LocalServer:
        """A local service for the Server panel's URL (``http(s)://host:port``; port 8765
        when the URL has none)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DeSAMError(f"The service URL must be http://host:port, got {url!r}.")
        return cls(executable, args, env, host=parts.hostname, port=parts.port or 8765, scheme=parts.scheme,
                   **kwargs)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def command(self) -> list[str]:
        """On POSIX with ``--exit-with-parent`` this process's id: the service ends itself
        when this process is gone, even when it crashed or was killed before ``stop()``."""
        watch = ["--exit-with-parent", str(os.getpid())] if os.name == "posix" else []
        return [self._resolve(), *self.prefix, "serve", *self.args, "--host", self.host, "--port", str(self.port),
                *watch]

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        """The child's exit status once it has ended (negative: the signal that ended it)."""
        return None if self._process is None else self._process.poll()

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 200) -> list[str]:
        with self._log_lock:
            items = list(self._log)
        return items[-lines:] if lines > 0 else []

    # ---- start ----------------------------------------------------------------------------------
    def _resolve(self) -> str:
        found = shutil.which(self.executable)
        if found is None:
            if os.path.isfile(self.executable):
                where = "is not executable"
            elif os.path.dirname(self.executable):
                where = "does not exist"
            else:
                where = "was not found on PATH"
            raise DeSAMError(f"The DeSAM service executable {self.executable!r} {where}. Install the service "
                             "(README: 'Installing the service') and set the path of its desam-server program in "
                             "the Server panel.")
        return found

    def _environment(self) -> dict[str, str]:
        if self.env is not None:
            return dict(self.env)
        return {k: v for k, v in os.environ.items() if k not in _PYTHON_VARIABLES}

    def _port_taken(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def start(self, startup_check_s: float = 0.5) -> None:
        """Start the child; raise ``DeSAMError`` when the executable is missing, the port is
        already taken, or the child ends within ``startup_check_s`` seconds (the message has
        its last log lines). Returns once it runs; the service then loads its model (see
        ``wait_until_ready``)."""
        if self.is_running():
            raise DeSAMError(f"The local DeSAM service is already running (process {self.pid}, {self.url}).")
        command = self.command
        if self._port_taken():
            raise DeSAMError(f"Port {self.port} on {self.host} is already in use: a DeSAM service (or another "
                             f"program) is already listening at {self.url}. Press Test connection to use it, or "
                             "choose another port.")
        with self._log_lock:
            self._log.clear()
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True      # Ctrl-C in Slicer's terminal is not the service's
        try:
            self._process = subprocess.Popen(command, env=self._environment(), stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                             encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        except OSError as exc:
            raise DeSAMError(f"The DeSAM service executable {self.executable!r} could not be started: "
                             f"{exc.strerror or exc}.") from None
        self._reader = threading.Thread(target=self._read, args=(self._process,), name="desam-server output",
                                        daemon=True)
        self._reader.start()
        atexit.register(self._stop_at_exit)
        self._atexit_registered = True
        deadline = time.monotonic() + startup_check_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        if self._process.poll() is not None:
            message = self.exit_message()
            self.stop()
            raise DeSAMError(message)

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            with self._log_lock:
                self._log.append(line.rstrip("\r\n"))
        process.stdout.close()

    def exit_message(self, lines: int = 12) -> str | None:
        """None while it runs (or never ran); else why it ended, with its last log lines."""
        if self._process is None or self._process.poll() is None:
            return None
        if self._reader is not None:
            self._reader.join(2.0)              # the last lines the child wrote
        code = self._process.returncode
        how = (f"was ended by signal {signal.Signals(-code).name}" if code < 0 and os.name != "nt"
               else f"exited with status {code}")
        tail = self.log_tail(lines)
        last = ("; its last output:\n" + "\n".join(tail)) if tail else " without any output"
        return f"The local DeSAM service {how}{last}"

    def wait_until_ready(self, timeout: float = 300.0, client: ServerClient | None = None) -> dict:
        """Poll the service's /health until it answers (it loads its model first); raise
        ``DeSAMError`` at once if the child ends meanwhile, or after ``timeout`` seconds.
        Worker-thread safe. ``client``: to use a token or CA file."""
        client = client or ServerClient(self.url, timeout=5.0)
        deadline = time.monotonic() + timeout
        while True:
            if not self.is_running():
                raise DeSAMError(self.exit_message() or "The local DeSAM service is not running.")
            try:
                return client.health()
            except ServerError as exc:
                if exc.status not in (0, 503):
                    raise DeSAMError.from_server_error(exc, self.url, "The local DeSAM service") from None
            if time.monotonic() > deadline:
                raise DeSAMError(f"The local DeSAM service did not answer at {self.url} within {timeout:g} s; "
                                 "its last output:\n" + "\n".join(self.log_tail(12)))
            time.sleep(0.25)

    # ---- stop -----------------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> int | None:
        """End the child: SIGTERM (the service shuts down gracefully: it cancels a running
        training job and waits for it), then kill after ``timeout`` seconds; on Windows
        ``terminate()``. Returns its exit status (None if it never ran). Idempotent."""
        process = self._process
        if self._atexit_registered:
            atexit.unregister(self._stop_at_exit)
            self._atexit_registered = False
        if process is None:
            return None
        if process.poll() is None:
            try:
                if os.name == "nt":
                    process.terminate()
                else:
                    process.send_signal(signal.SIGTERM)
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)
            except ProcessLookupError:
                pass
        if self._reader is not None:
            self._reader.join(5.0)
        return process.returncode

    def _stop_at_exit(self) -> None:
        self.stop(timeout=10.0)
