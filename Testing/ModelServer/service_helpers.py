"""Helpers for the service tests: a tiny-model service, its app, a live uvicorn server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import uvicorn

from desam_server import wire
from desam_server.api import Service, ServiceSettings, create_app
from desam_server.engine.feature_config import FeatureCacheSettings
from desam_server.modeling import build_desam
from desam_server.modeling.checkpoint import save_decoder

SPACING, ORIGIN, DIRECTION = (0.8, 0.8, 2.5), (-100.0, -120.0, 30.0), np.eye(3)


def tiny_settings(tmp: Path, *, checkpoint: Path | None = None, decoder: bool = True, **overrides) -> ServiceSettings:
    """Settings for a tiny-encoder service under ``tmp`` (no environment, no config file; its
    decoder registry ``tmp/registry``, empty unless the test registers decoders there;
    training jobs' folders and features under ``tmp`` too)."""
    decoders = ()
    if decoder:
        torch.manual_seed(1)
        model = build_desam("tiny", sam_checkpoint=checkpoint)
        path = tmp / "phantom.safetensors"
        if not path.exists():
            save_decoder(model, path, structure="phantom", training={"note": "test decoder"})
        decoders = (path,)
    base = ServiceSettings.load(environ={}, volume_dir=str(tmp / "volumes"), encoder="tiny", device="cpu",
                                precision="fp32")
    cache = FeatureCacheSettings(directory=tmp / "features", host_bytes=64 << 20, disk_bytes=256 << 20)
    overrides = {"registry_dir": tmp / "registry", "training_dir": tmp / "training-jobs",
                 "training_features_dir": tmp / "training-features", **overrides}
    return replace(base, decoders=decoders, cache=cache, sam_checkpoint=checkpoint, **overrides)


def tiny_factory(settings: ServiceSettings) -> Service:
    model = build_desam("tiny", sam_checkpoint=settings.sam_checkpoint)
    return Service(settings, model, model_info={"encoder": "tiny", "weights": "test"})


def phantom_volume(k: int = 6, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """An int16 K x J x I CT-like volume: air, a body ellipse, an organ ellipse, noise."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    vol = np.full((k, h, w), -1000, np.int16)
    for z in range(k):
        body = ((yy - h / 2) / (h * 0.45)) ** 2 + ((xx - w / 2) / (w * 0.45)) ** 2 <= 1
        organ = ((yy - h / 2) / (h * 0.2)) ** 2 + ((xx - w * 0.55 - z) / (w * 0.15)) ** 2 <= 1
        vol[z][body] = 0
        vol[z][organ] = 60
    return (vol + r.normal(0, 8, vol.shape)).astype(np.int16)


def payload_of(vol: np.ndarray) -> bytes:
    return wire.encode_volume(vol, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)


def id_of(vol: np.ndarray) -> str:
    return wire.volume_id(vol, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)


class FinishedRequests:
    """Wraps an ASGI app and records each HTTP request (method, path) once the app is done
    with it, answered or not: a test can wait until the service has handled a request
    whose client went away."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seen: list[tuple[str, str]] = []

    def wrap(self, app):
        async def recorded(scope, receive, send):
            try:
                await app(scope, receive, send)
            finally:
                if scope["type"] == "http":
                    with self._cond:
                        self._seen.append((scope["method"], scope["path"]))
                        self._cond.notify_all()
        return recorded

    def count(self, method: str, path: str) -> int:
        with self._cond:
            return self._seen.count((method, path))

    def wait_for(self, method: str, path: str, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` requests ``method path`` have finished; fail after ``timeout`` s."""
        with self._cond:
            reached = self._cond.wait_for(lambda: self._seen.count((method, path)) >= count, timeout)
        assert reached, f"{method} {path} not finished {count} times within {timeout} s"


@contextlib.contextmanager
def live_server(settings: ServiceSettings, factory=tiny_factory, *, finished: FinishedRequests | None = None):
    """A real uvicorn server on 127.0.0.1 (a free port) in a thread; yields (url, app).
    With ``settings.tls`` it serves https with the settings' certificate and key; with
    ``finished``, that records the requests the app has handled."""
    app = create_app(replace(settings, host="127.0.0.1", port=0), factory)
    tls = {"ssl_certfile": settings.tls_certfile, "ssl_keyfile": settings.tls_keyfile} if settings.tls else {}
    asgi = app if finished is None else finished.wrap(app)
    config = uvicorn.Config(asgi, host="127.0.0.1", port=0, log_level="warning", lifespan="on", **tls)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"{'https' if settings.tls else 'http'}://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(tmp_path: Path, *args: str, env_extra: dict | None = None) -> subprocess.Popen:
    """``desam-server serve`` with the tiny random encoder on the CPU as a child process
    (its volumes, features and decoder registry under ``tmp_path``; ``args`` are more flags); stdout and
    stderr joined, text. The caller stops it."""
    env = {**os.environ, "DESAM_CACHE_DIR": str(tmp_path / "features"),
           "DESAM_REGISTRY_DIR": str(tmp_path / "registry"), "DESAM_TRAINING_DIR": str(tmp_path / "training-jobs"),
           **(env_extra or {})}
    cmd = [sys.executable, "-m", "desam_server.cli", "serve", "--encoder", "tiny", "--device", "cpu",
           "--volume-dir", str(tmp_path / "volumes"), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop_process(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """SIGTERM (uvicorn shuts the service down gracefully, then re-raises the signal), wait
    for the exit (killed after ``timeout`` seconds); returns (exit status, output)."""
    try:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    return proc.returncode, out


def decoder_files(tmp: Path, structure: str, count: int = 2, *, encoder_weights_sha256: str | None = None,
                  training: dict | None = None) -> list[Path]:
    """``count`` decoder files of ``structure`` for the tiny encoder with random weights (as
    ``tiny_factory`` builds it), told apart by their answers: PDMM's output head is negated
    in every other one (the masks flip). ``encoder_weights_sha256``: claim other encoder weights."""
    torch.manual_seed(3)
    model = build_desam("tiny")
    model.encoder_weights_sha256 = encoder_weights_sha256
    paths = []
    for n in range(count):
        path = tmp / f"{structure}-{n + 1}.safetensors"
        save_decoder(model, path, structure=structure, training={"epochs": n + 1, **(training or {})})
        with torch.no_grad():
            model.pdmm.head.weight.neg_()
        paths.append(path)
    return paths
