"""LocalServer: the real ``desam-server serve`` (tiny encoder, CPU, everything under
tmp_path) started as a child, its log captured, ready on its URL, stopped; a missing
executable, a child that exits at once and a taken port give clear messages."""

from __future__ import annotations

import atexit
import os
import signal
import socket
import sys

import pytest

from SlicerDeSAMLib.DeSAMError import DeSAMError
from SlicerDeSAMLib.LocalServer import LocalServer
from SlicerDeSAMLib.ServerClient import ServerClient, ServerError

from service_helpers import free_port


def service_environment(tmp_path) -> dict:
    """The environment of a tiny service whose files stay under ``tmp_path``."""
    return {**os.environ, "DESAM_CACHE_DIR": str(tmp_path / "features"),
            "DESAM_REGISTRY_DIR": str(tmp_path / "registry"), "DESAM_TRAINING_DIR": str(tmp_path / "training-jobs"),
            "DESAM_TRAINING_FEATURES_DIR": str(tmp_path / "training-features")}


def tiny_server(tmp_path, *more: str, port: int | None = None) -> LocalServer:
    args = ("--encoder", "tiny", "--device", "cpu", "--volume-dir", str(tmp_path / "volumes"), *more)
    return LocalServer(sys.executable, args, env=service_environment(tmp_path), port=port or free_port(),
                       prefix=("-m", "desam_server.cli"))


def test_start_wait_log_and_stop_the_real_service(tmp_path):
    server = tiny_server(tmp_path)
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.command[1:4] == ["-m", "desam_server.cli", "serve"]
    watch = ["--exit-with-parent", str(os.getpid())] if os.name == "posix" else []
    assert server.command[-4 - len(watch):] == ["--host", "127.0.0.1", "--port", str(server.port), *watch]
    server.start()
    try:
        assert server.is_running() and server.pid
        health = server.wait_until_ready(timeout=180)
        assert health["status"] == "ok"
        assert ServerClient(server.url).info()["model"]["encoder"] == "tiny"
        with pytest.raises(DeSAMError, match="already running"):
            server.start()
        log = server.log_tail()
        assert any("starting the DeSAM service" in line for line in log), log
        assert len(server.log_tail(1)) == 1 and server.log_tail(0) == []
    finally:
        code = server.stop(timeout=30)
    assert not server.is_running() and code is not None
    assert server.returncode == code
    with pytest.raises(ServerError) as gone:
        ServerClient(server.url, timeout=5).health()
    assert gone.value.status == 0
    assert server.stop() == code          # idempotent
    assert "exited" in server.exit_message() or "signal" in server.exit_message()


def test_stop_removes_the_atexit_fallback(tmp_path, monkeypatch):
    registered, unregistered = [], []
    monkeypatch.setattr(atexit, "register", lambda fn, *a, **k: registered.append(fn) or fn)
    monkeypatch.setattr(atexit, "unregister", unregistered.append)
    server = tiny_server(tmp_path)
    server.start()
    try:
        assert registered == [server._stop_at_exit]
    finally:
        server.stop(timeout=30)
    assert unregistered == [server._stop_at_exit]
    assert not server.is_running()


def test_the_atexit_fallback_ends_the_child(tmp_path):
    server = tiny_server(tmp_path)
    server.start()
    try:
        server._stop_at_exit()             # what atexit runs when the caller never called stop()
        assert not server.is_running()
    finally:
        server.stop()


def test_for_url_takes_host_port_and_scheme():
    server = LocalServer.for_url("desam-server", "http://localhost:9000", ["--device", "cuda"])
    assert (server.host, server.port, server.url) == ("localhost", 9000, "http://localhost:9000")
    assert LocalServer.for_url("desam-server", "https://127.0.0.1").url == "https://127.0.0.1:8765"
    with pytest.raises(DeSAMError, match="must be http://host:port"):
        LocalServer.for_url("desam-server", "127.0.0.1:8765")


def test_missing_executable_is_a_clear_message(tmp_path):
    missing = LocalServer(tmp_path / "nowhere" / "desam-server")
    with pytest.raises(DeSAMError) as error:
        missing.start()
    assert str(error.value).startswith(f"The DeSAM service executable {str(tmp_path / 'nowhere' / 'desam-server')!r} "
                                       "does not exist.")
    assert "Server panel" in str(error.value) and not missing.is_running()
    with pytest.raises(DeSAMError, match="was not found on PATH"):
        LocalServer("desam-server-that-is-not-installed").start()
    plain = tmp_path / "desam-server"
    plain.write_text("not a program")
    plain.chmod(0o644)
    with pytest.raises(DeSAMError, match="is not executable"):
        LocalServer(plain).start()


def test_a_child_that_exits_at_once_reports_its_last_lines(tmp_path):
    server = tiny_server(tmp_path, "--encoder", "no_such_encoder")
    with pytest.raises(DeSAMError) as error:
        server.start(startup_check_s=60)
    message = str(error.value)
    assert message.startswith("The local DeSAM service exited with status 2; its last output:"), message
    assert "no_such_encoder" in message
    assert not server.is_running()


def test_a_taken_port_is_refused_before_starting(tmp_path):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        server = tiny_server(tmp_path, port=port)
        with pytest.raises(DeSAMError) as error:
            server.start()
    assert str(error.value).startswith(f"Port {port} on 127.0.0.1 is already in use")
    assert server.pid is None


def test_a_parent_that_exits_without_stop_ends_the_child(tmp_path):
    """A process that started the service and exits without calling stop(): the atexit
    fallback ends the child."""
    import subprocess
    import textwrap

    server = tiny_server(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        from SlicerDeSAMLib.LocalServer import LocalServer
        server = LocalServer({server.executable!r}, {server.args!r}, env={server.env!r}, port={server.port},
                             prefix={server.prefix!r})
        server.start()
        print(server.pid, flush=True)
        sys.exit(0)
    """)
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert parent.returncode == 0, parent.stderr
    pid = int(parent.stdout.split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return                              # ended with its parent
    os.kill(pid, signal.SIGKILL)            # don't leave it behind
    pytest.fail(f"the service (process {pid}) outlived the process that started it")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (an exited child not yet reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_parent_ends_the_child(tmp_path):
    """Slicer killed (SIGKILL: no atexit, no aboutToQuit): the service, started with
    --exit-with-parent, notices its parent is gone and shuts itself down."""
    import subprocess
    import textwrap
    import time

    server = tiny_server(tmp_path)
    script = textwrap.dedent(f"""
        import time
        from SlicerDeSAMLib.LocalServer import LocalServer
        server = LocalServer({server.executable!r}, {server.args!r}, env={server.env!r}, port={server.port},
                             prefix={server.prefix!r})
        server.start()
        print(server.pid, flush=True)
        server.wait_until_ready(timeout=180)
        print("ready", flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    pid = None
    try:
        pid = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "ready"
        assert ServerClient(server.url).health()["status"] == "ok"
        parent.kill()
        parent.wait(30)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid), f"the service (process {pid}) outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_exit_with_parent_refuses_a_process_that_is_not_the_parent():
    from desam_server.parent_watch import ParentWatch

    with pytest.raises(ValueError, match="parent process is"):
        ParentWatch(os.getpid())
