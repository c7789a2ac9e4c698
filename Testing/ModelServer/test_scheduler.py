"""EncodingScheduler: priorities, neighbour order, cancellation, de-duplication, results
equal to SlicePredictor's, errors, close(), progress, batching."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from desam_server.engine import SlicePredictor
from desam_server.engine.scheduler import SchedulerClosedError
from desam_server.engine.scheduler_queue import outward
from desam_server.io.slices import slice_view

from scheduler_helpers import VOLUME, WINDOW, Encoder, close_while_held, idle, make, order, wait_until


def test_outward_order_clips_at_edges():
    assert [i for _, i in outward(5, 3, 12)] == [5, 6, 4, 7, 3, 8, 2]
    assert list(outward(1, 3, 12)) == [(0, 1), (1, 2), (2, 0), (3, 3), (4, 4)]
    assert [i for _, i in outward(11, 2, 12)] == [11, 10, 9]


def test_priority_order(scheduler_model, scheduler_volume, tmp_path):
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path, neighbours=2)
    sched.pause()
    sched.precompute(VOLUME, "k")
    sched.set_view(VOLUME, "k", 6)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("f", sched.features(VOLUME, "k", 0, timeout=30)))
    t.start()
    wait_until(lambda: sched.stats()["queued_by_priority"].get("prompt") == 1)
    assert sched.stats()["queued_by_priority"] == {"prompt": 1, "view": 1, "neighbour": 4, "background": 6}
    sched.resume()
    t.join(30)
    wait_until(lambda: idle(sched))
    assert order(sched) == ([("k", 0, "PROMPT"), ("k", 6, "VIEW")]
                            + [("k", i, "NEIGHBOUR") for i in (7, 5, 8, 4)]
                            + [("k", i, "BACKGROUND") for i in (1, 2, 3, 9, 10, 11)])
    assert result["f"].embedding.shape[0] == 1
    assert sched.stats()["raised"] == 1
    sched.close()


def test_neighbours_outward_near_the_edge(scheduler_model, scheduler_volume, tmp_path):
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path, neighbours=3)
    sched.pause()
    sched.set_view(VOLUME, "j", 1)
    sched.resume()
    wait_until(lambda: idle(sched))
    assert order(sched) == [("j", 1, "VIEW")] + [("j", i, "NEIGHBOUR") for i in (2, 0, 3, 4)]
    sched.close()


def test_moving_the_view_cancels_obsolete_work(scheduler_model, scheduler_volume, tmp_path):
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path, neighbours=2)
    sched.pause()
    sched.set_view(VOLUME, "k", 3)        # 3, 4, 2, 5, 1
    sched.set_view(VOLUME, "k", 5)        # 5, 6, 4, 7, 3: drops 2 and 1
    assert sched.stats()["cancelled_obsolete"] == 2
    sched.precompute(VOLUME, "i")
    sched.set_view(VOLUME, "i", 40)       # a new axis: drops all five k jobs
    assert sched.stats()["cancelled_obsolete"] == 7
    sched.set_view(VOLUME, "i", 10)       # i 38..42 were also precompute work: demoted, kept
    stats = sched.stats()
    assert stats["cancelled_obsolete"] == 7
    assert stats["queued_by_priority"] == {"view": 1, "neighbour": 4, "background": 75}
    sched.cancel_precompute(VOLUME)
    assert sched.stats()["cancelled_precompute"] == 75
    assert sched.progress(VOLUME, "i")["queued"] == 5
    sched.resume()
    wait_until(lambda: idle(sched))
    assert order(sched) == [("i", 10, "VIEW")] + [("i", i, "NEIGHBOUR") for i in (11, 9, 12, 8)]
    sched.close()


def test_concurrent_requests_encode_once(scheduler_model, scheduler_volume, tmp_path):
    sched, encoder, _ = make(scheduler_model, scheduler_volume, tmp_path, neighbours=0)
    sched.pause()
    sched.set_view(VOLUME, "k", 5)
    sched.precompute(VOLUME, "k")
    barrier = threading.Barrier(8, timeout=20)
    results, errors = [], []

    def request():
        barrier.wait()
        try:
            results.append(sched.features(VOLUME, "k", 5, timeout=30))
        except Exception as exc:  # noqa: BLE001 - any failure is reported below
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: sched.stats()["joined"] == 8)
    sched.cancel_precompute(VOLUME)
    sched.resume()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 8
    assert len(encoder.calls) == 1
    for r in results[1:]:
        assert torch.equal(r.embedding, results[0].embedding)
    assert sched.stats()["encoded"] == 1
    sched.close()


@pytest.mark.parametrize("storage_dtype", ["float32", "float16"])
def test_features_equal_set_image(scheduler_model, scheduler_volume, tmp_path, storage_dtype):
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path, storage_dtype=storage_dtype)
    predictor = SlicePredictor(scheduler_model, precision="fp32")
    for axis, index in (("k", 4), ("j", 30), ("i", 79)):
        got = sched.features(VOLUME, axis, index, timeout=30)
        predictor.set_image(slice_view(scheduler_volume, axis, index), WINDOW)
        want = predictor.features
        assert got.input_size == want.input_size and got.original_size == want.original_size
        for x, y in zip([got.embedding, *got.taps], [want.embedding, *want.taps], strict=True):
            assert x.dtype == torch.float32 and x.shape == y.shape
            if storage_dtype == "float32":
                assert torch.equal(x, y)
            else:
                assert torch.allclose(x, y, rtol=1e-3, atol=1e-4)
    again = sched.features(VOLUME, "i", 79)
    assert sched.stats()["cache_hits"] == 1 and torch.equal(again.embedding, got.embedding)
    sched.close()


def test_errors_reach_the_caller_and_the_worker_survives(scheduler_model, scheduler_volume, tmp_path, caplog):
    sched, encoder, _ = make(scheduler_model, scheduler_volume, tmp_path,
                             encoder=Encoder(scheduler_model, fail_times=1))
    with caplog.at_level(logging.DEBUG, logger="desam_server"):
        with pytest.raises(RuntimeError, match="simulated encoder failure"):
            sched.features(VOLUME, "k", 2, timeout=30)
        assert sched.stats()["errors"] == 1 and sched.stats()["worker_alive"]
        assert sched.features(VOLUME, "k", 2, timeout=30).embedding.shape[0] == 1
    assert len(encoder.calls) == 2
    assert VOLUME not in caplog.text and "failed" in caplog.text  # ids truncated to 12 chars
    sched.close()


def test_bad_requests(scheduler_model, scheduler_volume, tmp_path):
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path)
    with pytest.raises(KeyError, match="register_volume"):
        sched.features("nope", "k", 0)
    with pytest.raises(IndexError, match="outside 0..11"):
        sched.features(VOLUME, "k", 12)
    with pytest.raises(IndexError):
        sched.set_view(VOLUME, "i", -1)
    with pytest.raises(ValueError, match="axis"):
        sched.precompute(VOLUME, "x")
    with pytest.raises(ValueError, match="axis"):  # one vocabulary: names, not array dimensions
        sched.precompute(VOLUME, 0)
    with pytest.raises(ValueError):
        sched.register_volume("flat", scheduler_volume[0], WINDOW)
    sched.pause()
    with pytest.raises(TimeoutError):
        sched.features(VOLUME, "k", 3, timeout=0.05)
    assert sched.stats()["queued"] == 0  # the abandoned request left nothing behind
    sched.close()


def test_close_cancels_queued_work_and_finishes_the_running_batch(scheduler_model, scheduler_volume, tmp_path):
    gate = threading.Event()
    sched, encoder, _ = make(scheduler_model, scheduler_volume, tmp_path,
                             encoder=Encoder(scheduler_model, gate=gate))
    outcome = {}

    def ask(name, index):
        try:
            outcome[name] = sched.features(VOLUME, "k", index, timeout=30)
        except SchedulerClosedError as exc:
            outcome[name] = exc

    running = threading.Thread(target=ask, args=("running", 0))
    running.start()
    assert encoder.entered.wait(20)
    sched.precompute(VOLUME, "k")
    waiting = threading.Thread(target=ask, args=("waiting", 7))
    waiting.start()
    wait_until(lambda: sched.stats()["queued_by_priority"].get("prompt") == 1)
    close_while_held(sched, gate, running, waiting)
    assert isinstance(outcome["running"].embedding, torch.Tensor)
    assert isinstance(outcome["waiting"], SchedulerClosedError)
    stats = sched.stats()
    assert stats["cancelled_close"] == 11 and not stats["worker_alive"] and stats["encoded"] == 1
    with pytest.raises(SchedulerClosedError):
        sched.features(VOLUME, "k", 5)
    with pytest.raises(SchedulerClosedError):
        sched.set_view(VOLUME, "k", 5)


def test_progress(scheduler_model, scheduler_volume, tmp_path):
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path)
    sched.features(VOLUME, "k", 3, timeout=30)
    sched.pause()
    assert sched.precompute(VOLUME, "k") == 11
    assert sched.progress(VOLUME, "k") == {"total": 12, "cached": 1, "queued": 11, "running": 0}
    assert sched.progress(VOLUME, "j") == {"total": 64, "cached": 0, "queued": 0, "running": 0}
    sched.resume()
    wait_until(lambda: idle(sched))
    assert sched.progress(VOLUME, "k") == {"total": 12, "cached": 12, "queued": 0, "running": 0}
    assert sched.precompute(VOLUME, "k") == 0
    sched.close()


def test_batched_encoding(scheduler_model, scheduler_volume, tmp_path):
    sched, encoder, _ = make(scheduler_model, scheduler_volume, tmp_path, storage_dtype="float32",
                             encode_batch=4)
    sched.pause()
    sched.precompute(VOLUME, "k")
    sched.precompute(VOLUME, "j")
    sched.resume()
    wait_until(lambda: idle(sched))
    assert encoder.calls[:3] == [4, 4, 4] and sum(encoder.calls) == 12 + 64
    stats = sched.stats()
    assert stats["encoded"] == 76 and stats["batches"] == len(encoder.calls)
    predictor = SlicePredictor(scheduler_model, precision="fp32")
    predictor.set_image(slice_view(scheduler_volume, "k", 5), WINDOW)
    got = sched.features(VOLUME, "k", 5)
    assert torch.allclose(got.embedding, predictor.features.embedding, rtol=1e-4, atol=1e-5)
    sched.close()
