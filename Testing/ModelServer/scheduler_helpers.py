"""Shared by the scheduler tests: a tiny model, a volume, an encoder wrapper, waiting."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from desam_server.engine import IntensityWindow
from desam_server.engine.feature_cache import FeatureCache, FeatureCacheSettings
from desam_server.engine.scheduler import EncodingScheduler
from desam_server.modeling import build_desam

VOLUME = "PATIENT-Doe^Jane-1234-volume"
WINDOW = IntensityWindow(center=40.0, width=400.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_desam("tiny")


@pytest.fixture(scope="module")
def volume():
    r = np.random.default_rng(7)
    vol = r.normal(0, 120, size=(12, 64, 80)).astype(np.int16)
    vol[:, 20:40, 30:60] += 200
    return vol


class Encoder:
    """Wraps model.encode: counts passes and batch sizes, can block on a gate or fail."""

    def __init__(self, model, fail_times: int = 0, gate: threading.Event | None = None):
        self.model, self.fail_times, self.gate = model, fail_times, gate
        self.calls: list[int] = []
        self.entered = threading.Event()

    def __call__(self, x):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(20)
        self.calls.append(x.shape[0])
        if self.fail_times > 0:
            self.fail_times -= 1
            raise RuntimeError("simulated encoder failure")
        return self.model.encode(x)


def wait_until(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


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
