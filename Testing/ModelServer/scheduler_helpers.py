"""Shared by the scheduler tests: an encoder wrapper, a scheduler, waiting (the tiny
model and the volume are the ``scheduler_model`` / ``scheduler_volume`` fixtures of
conftest.py)."""

from __future__ import annotations

import threading
import time

from desam_server.engine import IntensityWindow
from desam_server.engine.feature_cache import FeatureCache, FeatureCacheSettings
from desam_server.engine.scheduler import EncodingScheduler

VOLUME = "PATIENT-Doe^Jane-1234-volume"
WINDOW = IntensityWindow(center=40.0, width=400.0)


class Encoder:
    """Wraps model.encode: counts passes and batch sizes, can block on a gate or fail,
    and passes the scheduler's ``between_steps`` on to the model."""

    def __init__(self, model, fail_times: int = 0, gate: threading.Event | None = None):
        self.model, self.fail_times, self.gate = model, fail_times, gate
        self.calls: list[int] = []
        self.entered = threading.Event()

    def __call__(self, x, between_steps=None):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(20)
        self.calls.append(x.shape[0])
        if self.fail_times > 0:
            self.fail_times -= 1
            raise RuntimeError("simulated encoder failure")
        return self.model.encode(x, between_steps=between_steps)


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.005) -> None:
    """Poll ``predicate`` every ``interval`` seconds until it holds; fail after ``timeout``
    seconds. (Polls over HTTP take a longer interval, leaving the service its CPU.)"""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(interval)


def close_while_held(sched, gate, *threads, timeout: float = 30.0) -> None:
    """Close ``sched`` while its worker is held at ``gate``: once the scheduler reports
    closed, open the gate and join the closer and ``threads``."""
    closer = threading.Thread(target=sched.close)
    closer.start()
    wait_until(lambda: sched.stats()["closed"])
    gate.set()
    for t in (closer, *threads):
        t.join(timeout)


def make(model, volume, tmp_path, storage_dtype="float16", **kw):
    cache = FeatureCache(FeatureCacheSettings(directory=tmp_path / "cache", storage_dtype=storage_dtype))
    encoder = kw.pop("encoder", None) or Encoder(model)
    sched = EncodingScheduler(model, cache, precision="fp32", encode_fn=encoder, **kw)
    sched.register_volume(VOLUME, volume, WINDOW)
    return sched, encoder, cache


def idle(sched) -> bool:
    s = sched.stats()
    return s["queued"] == 0 and s["running"] == 0


def order(sched):
    return [(axis, index, prio) for _, axis, index, prio in sched.history()]
