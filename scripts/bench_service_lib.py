"""Helpers of scripts/bench_service.py: the service as a child process, weights, data, stats.

- ``ServiceProcess``: ``desam-server serve`` on 127.0.0.1 (a free port) with a temporary
  volume dir and feature-cache dir, its log in a file; always terminated on exit
  (SIGTERM, then SIGKILL after a grace period or a second Ctrl-C).
- ``model_files``: the SAM checkpoint to pass (None: the catalog's, for MobileSAM and
  LiteMedSAM; else random weights written to a file, because ``serve`` refuses an encoder
  that has a catalog entry but no local weights) and a DeSAM decoder file written from
  untrained weights (timing only: the arithmetic of a trained one, meaningless masks).
- ``cranium``: the sample head CT as the client sees it; ``phantom``: the synthetic CT of
  scripts/bench_wire.py; ``summary``: p50/p95/mean of a list of times.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SlicerDeSAM"))
from SlicerDeSAMLib.ServerClient import ServerClient, ServerError  # noqa: E402 - after the path above

CATALOG_WEIGHTS = ("mobile_sam", "lite_medsam")
#: Environment of the bench that must not reach the child (it sets its own or needs none).
DROPPED_ENV = ("DESAM_CONFIG", "DESAM_TOKEN", "DESAM_TOKEN_FILE", "DESAM_CACHE_DIR", "DESAM_VOLUME_DIR",
               "DESAM_HOST", "DESAM_PORT", "DESAM_DECODERS", "DESAM_DECODER_DIR")


def summary(values) -> dict:
    """p50 / p95 / mean / min / max (in the values' unit) and n; empty -> {'n': 0}."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def load() -> list[float]:
    """The 1/5/15-minute load averages: other work on the machine skews every number."""
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """``with ServiceProcess(encoder, workdir, ...) as svc: svc.client...``; ``startup_s``:
    spawn to first healthy answer. ``env``: extra DESAM_* settings for the child."""

    def __init__(self, encoder: str, workdir: Path, *, sam_checkpoint: Path | None = None,
                 decoder: Path | None = None, env: dict | None = None, ready_timeout: float = 300.0) -> None:
        self.encoder, self.workdir = encoder, Path(workdir)
        self.sam_checkpoint, self.decoder = sam_checkpoint, decoder
        self.extra_env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.client: ServerClient | None = None
        self.log_path = self.workdir / "server.log"
        self.startup_s = float("nan")

    def command(self, port: int) -> list[str]:
        exe = Path(sys.executable).with_name("desam-server")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "desam_server.cli"]
        cmd += ["serve", "--host", "127.0.0.1", "--port", str(port), "--encoder", self.encoder, "--device", "cpu",
                "--volume-dir", str(self.workdir / "volumes"), "--log-level", "warning"]
        if self.sam_checkpoint is not None:
            cmd += ["--sam-checkpoint", str(self.sam_checkpoint)]
        if self.decoder is not None:
            cmd += ["--decoder", str(self.decoder)]
        return cmd

    def __enter__(self) -> ServiceProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        env.update({"DESAM_CACHE_DIR": str(self.workdir / "features"), **self.extra_env})
        port = free_port()
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            # A session of its own: the terminal's Ctrl-C reaches only the bench, which then
            # stops the child itself (gracefully) in __exit__.
            self.proc = subprocess.Popen(self.command(port), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.client = ServerClient(f"http://127.0.0.1:{port}", timeout=300.0)
            deadline = time.monotonic() + self.ready_timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"desam-server serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    self.client.wait_until_ready(timeout=1.0, poll=0.1)
                    break
                except (ServerError, TimeoutError, OSError):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the service was not ready in {self.ready_timeout:g} s:\n"
                                           f"{self.log_tail()}") from None
            self.startup_s = time.perf_counter() - t0
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, grace: float = 45.0) -> None:
        """SIGTERM (uvicorn shuts the service down: jobs cancelled, the encoder's pass
        finished), SIGKILL after ``grace`` seconds or on a further Ctrl-C."""
        if self.client is not None:
            self.client.close()
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(grace)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_problems(self) -> list[str]:
        """WARNING/ERROR lines of the child's log other than the expected random-weights note."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines()
                if ("WARNING" in line or "ERROR" in line or "Traceback" in line) and "weight is random" not in line]


def wait_idle(client: ServerClient, timeout: float = 600.0, poll: float = 0.1) -> dict:
    """Until the encoder queue is empty and the cache has no disk write in flight; /info."""
    deadline = time.monotonic() + timeout
    while True:
        info = client.info()
        if info["queue_depth"] == 0 and info["cache"]["disk_writes_in_progress"] == 0 and \
                info["cache"]["inflight"] == 0:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service was still busy after {timeout:g} s")
        time.sleep(poll)


def model_files(encoder: str, workdir: Path) -> tuple[Path | None, Path, bool]:
    """(sam_checkpoint for ``serve`` or None, decoder file, pretrained?) -- see the module docstring."""
    import torch

    from desam_server.modeling import build_desam
    from desam_server.modeling.checkpoint import SAM_PARTS, save_decoder
    from desam_server.weights import fetch_weights, get_entry

    workdir.mkdir(parents=True, exist_ok=True)
    decoder = workdir / f"bench_{encoder}.safetensors"
    if encoder in CATALOG_WEIGHTS:
        model = build_desam(encoder, sam_checkpoint=fetch_weights(encoder),
                            sam_checkpoint_sha256=get_entry(encoder).sha256)
        checkpoint, pretrained = None, True
    else:
        torch.manual_seed(0)
        random = build_desam(encoder)
        checkpoint, pretrained = workdir / f"random_{encoder}.pth", False
        torch.save({k: v for k, v in random.state_dict().items() if k.split(".", 1)[0] in SAM_PARTS}, checkpoint)
        del random
        model = build_desam(encoder, sam_checkpoint=checkpoint)
    save_decoder(model, decoder, structure="bench", training={"note": "untrained, timing only"})
    return checkpoint, decoder, pretrained


@dataclass
class Cranium:
    array: np.ndarray           # K x J x I int16 HU
    head: np.ndarray            # K x J x I bool
    geometry: dict              # spacing / origin / direction, as upload_volume takes them
    window: tuple[float, float]
    reference_slice: int

    def centroid(self, k: int) -> tuple[float, float]:
        """(x, y) slice pixels of the head on slice k (the slice centre when it has none)."""
        ys, xs = np.nonzero(self.head[k])
        if xs.size == 0:
            return self.array.shape[2] / 2, self.array.shape[1] / 2
        return float(xs.mean()), float(ys.mean())


def cranium() -> Cranium:
    from desam_server.io import read_volume
    from desam_server.samples import fetch_cranium

    sample = fetch_cranium()
    volume = read_volume(sample.volume)
    g = volume.geometry
    return Cranium(array=np.ascontiguousarray(volume.array, np.int16),
                   head=read_volume(sample.head_mask).array > 0,
                   geometry=dict(spacing=g.spacing, origin=g.origin, direction=np.asarray(g.direction)),
                   window=tuple(sample.window), reference_slice=sample.reference_slice)


def phantom(slices: int) -> tuple[np.ndarray, dict]:
    """The synthetic 512 x 512 chest CT of scripts/bench_wire.py (smooth anatomy + noise)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_wire import GEOMETRY, ct_phantom

    return ct_phantom((slices, 512, 512)), dict(GEOMETRY)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt so that every ``finally`` (child cleanup) runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def workdir(prefix: str = "desam-bench-service-") -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)
