"""EncodingScheduler preemption: passes given up for clicks, obsolete views, unregistering;
urgent calls served inside a running pass; nothing of the scheduler left on the model."""

from __future__ import annotations

import threading

import pytest
import torch

from desam_server.engine import SlicePredictor
from desam_server.engine.scheduler_worker import EncodePreempted

from scheduler_helpers import VOLUME, WINDOW, idle, make, order, wait_until


class Stall:
    """An ``encode_fn`` whose next pass holds at its first step (the pass has begun) until
    released, then goes on through the scheduler's ``between_steps``: a long pass the
    scheduler may give up. Counts the steps of every pass."""

    def __init__(self, model):
        self.model = model
        self.entered, self.release = threading.Event(), threading.Event()
        self.armed = True
        self.steps = 0

    def __call__(self, x, between_steps=None):
        def step():
            self.steps += 1
            if self.armed:
                self.armed = False
                self.entered.set()
                assert self.release.wait(20)
            if between_steps is not None:
                between_steps()

        return self.model.encode(x, between_steps=step)


def stalled(model, volume, tmp_path, **kw):
    stall = Stall(model)
    sched, _, cache = make(model, volume, tmp_path, encoder=stall, **kw)
    return sched, stall, cache


def test_a_click_preempts_a_pass_nobody_waits_for(scheduler_model, scheduler_volume, tmp_path):
    """The viewed slice's pass is given up at its next step when a click needs another
    slice; the click is served first and the view slice is encoded after."""
    sched, stall, _ = stalled(scheduler_model, scheduler_volume, tmp_path, neighbours=0)
    sched.set_view(VOLUME, "k", 3)
    assert stall.entered.wait(20)
    clicked = {}
    click = threading.Thread(target=lambda: clicked.update(f=sched.features(VOLUME, "k", 7, timeout=30)))
    click.start()
    wait_until(lambda: sched.stats()["queued_by_priority"].get("prompt") == 1)
    stall.release.set()
    click.join(30)
    assert isinstance(clicked["f"].embedding, torch.Tensor)
    wait_until(lambda: idle(sched))
    assert order(sched) == [("k", 3, "VIEW"), ("k", 7, "PROMPT"), ("k", 3, "VIEW")]
    stats = sched.stats()
    assert stats["preempted"] == 1 and stats["encoded"] == 2 and stats["errors"] == 0
    assert sched.progress(VOLUME, "k")["cached"] == 2
    sched.close()


def test_a_pass_someone_waits_for_is_not_preempted(scheduler_model, scheduler_volume, tmp_path):
    sched, stall, _ = stalled(scheduler_model, scheduler_volume, tmp_path, neighbours=0)
    got = {}
    first = threading.Thread(target=lambda: got.update(a=sched.features(VOLUME, "k", 3, timeout=30)))
    first.start()
    assert stall.entered.wait(20)
    second = threading.Thread(target=lambda: got.update(b=sched.features(VOLUME, "k", 7, timeout=30)))
    second.start()
    wait_until(lambda: sched.stats()["queued_by_priority"].get("prompt") == 1)
    stall.release.set()
    first.join(30)
    second.join(30)
    assert set(got) == {"a", "b"} and sched.stats()["preempted"] == 0
    assert order(sched) == [("k", 3, "PROMPT"), ("k", 7, "PROMPT")]
    sched.close()


@pytest.mark.parametrize("new_view,preempted", [(10, True), (4, False)])
def test_moving_the_view_away_preempts_the_obsolete_pass(scheduler_model, scheduler_volume, tmp_path, new_view,
                                                        preempted):
    """Slice 3 is being encoded for the view; the view moves. Far away (10, neighbours
    9..11): slice 3 is no longer wanted, its pass stops and it is dropped. Near (4,
    neighbours 3..5): it still is, and its pass completes."""
    sched, stall, _ = stalled(scheduler_model, scheduler_volume, tmp_path, neighbours=1)
    sched.set_view(VOLUME, "k", 3)
    assert stall.entered.wait(20)
    sched.set_view(VOLUME, "k", new_view)
    stall.release.set()
    wait_until(lambda: idle(sched))
    stats = sched.stats()
    assert stats["preempted"] == int(preempted)
    assert sched.is_cached(VOLUME, "k", 3) is not preempted
    encoded = {index for _, index, _ in order(sched)[1:]}
    assert encoded == ({9, 10, 11} if preempted else {4, 5})
    sched.close()


def test_an_urgent_call_runs_inside_the_running_pass_without_losing_it(scheduler_model, scheduler_volume, tmp_path):
    """A click's decoder pass runs on the worker at the running encoder pass's next step;
    the pass then continues and finishes (not preempted, nothing encoded twice)."""
    sched, stall, _ = stalled(scheduler_model, scheduler_volume, tmp_path, neighbours=0)
    seen, result = {}, {}

    def click():
        seen["thread"], seen["steps"] = threading.current_thread().name, stall.steps
        return 42

    sched.set_view(VOLUME, "k", 3)
    assert stall.entered.wait(20)
    caller = threading.Thread(target=lambda: result.update(value=sched.call(click)))
    caller.start()
    wait_until(lambda: sched.stats()["calls_waiting"]["urgent"] == 1)
    assert "value" not in result  # the worker is still held inside the pass's first step
    stall.release.set()
    caller.join(20)
    wait_until(lambda: idle(sched))
    assert result["value"] == 42 and seen["thread"] == "desam-encoder"
    assert 0 < seen["steps"] < stall.steps  # mid-pass: more steps ran after the call
    assert sched.is_cached(VOLUME, "k", 3) and sched.stats()["preempted"] == 0 and sched.stats()["encoded"] == 1
    sched.close()


def test_unregistering_a_volume_stops_its_pass_and_drops_the_request(scheduler_model, scheduler_volume, tmp_path):
    sched, stall, _ = stalled(scheduler_model, scheduler_volume, tmp_path, neighbours=0)
    sched.set_view(VOLUME, "k", 3)
    assert stall.entered.wait(20)
    sched.unregister_volume(VOLUME)
    stall.release.set()
    wait_until(lambda: idle(sched))
    stats = sched.stats()
    assert stats["preempted"] == 1 and stats["encoded"] == 0 and stats["volumes"] == 0
    sched.close()


def test_the_model_carries_no_scheduler_machinery(scheduler_model, scheduler_volume, tmp_path):
    """The scheduler stops passes through the ``between_steps`` it gives the encoder, so
    the model has no hooks, and a predictor on another thread encodes undisturbed while
    a preemption is pending on the worker."""
    modules = list(scheduler_model.modules())
    sched, stall, _ = stalled(scheduler_model, scheduler_volume, tmp_path, neighbours=0)
    sched.set_view(VOLUME, "k", 3)
    assert stall.entered.wait(20)
    sched.set_view(VOLUME, "k", 9)  # slice 3's pass is now unwanted: preemption asked for
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in modules)
    predictor = SlicePredictor(scheduler_model, precision="fp32")
    predictor.set_image(scheduler_volume[3], WINDOW)  # another thread's pass runs to the end
    assert predictor.features.embedding.shape[0] == 1
    stall.release.set()
    wait_until(lambda: idle(sched))
    assert sched.stats()["preempted"] == 1
    sched.close()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in modules)


def test_a_step_callback_that_raises_stops_the_encoder_there(scheduler_model):
    """``DeSAM.encode``'s between_steps is the only way in: raising from it ends the pass."""
    x = torch.zeros(1, 3, scheduler_model.img_size, scheduler_model.img_size)
    steps = []

    def stop_at_third():
        steps.append(1)
        if len(steps) == 3:
            raise EncodePreempted()

    with torch.no_grad(), pytest.raises(EncodePreempted):
        scheduler_model.encode(x, between_steps=stop_at_third)
    assert len(steps) == 3
