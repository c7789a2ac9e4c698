"""EncodingScheduler preemption: passes given up for clicks, obsolete views, unregistering;
urgent calls served inside a running pass; the hooks inert outside the worker."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from desam_server.engine import preemption
from scheduler_helpers import VOLUME, idle, make, model, order, volume, wait_until  # noqa: F401


class Stall:
    """Holds the next encoder pass inside the encoder (after its first module began)
    until released: a long pass the scheduler may give up."""

    def __init__(self, model):
        self.entered, self.release = threading.Event(), threading.Event()
        self.armed = True
        self.handle = model.image_encoder.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.release.wait(20)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.handle.remove()


def test_a_click_preempts_a_pass_nobody_waits_for(model, volume, tmp_path):
    """The viewed slice's pass is given up at the next module when a click needs
    another slice; the click is served first and the view slice is encoded after."""
    sched, _, cache = make(model, volume, tmp_path, neighbours=0)
    with Stall(model) as stall:
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


def test_a_pass_someone_waits_for_is_not_preempted(model, volume, tmp_path):
    sched, _, _ = make(model, volume, tmp_path, neighbours=0)
    got = {}
    with Stall(model) as stall:
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
def test_moving_the_view_away_preempts_the_obsolete_pass(model, volume, tmp_path, new_view, preempted):
    """Slice 3 is being encoded for the view; the view moves. Far away (10, neighbours
    9..11): slice 3 is no longer wanted, its pass stops and it is dropped. Near (4,
    neighbours 3..5): it still is, and its pass completes."""
    sched, _, _ = make(model, volume, tmp_path, neighbours=1)
    with Stall(model) as stall:
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


def test_preemption_hooks_act_only_on_the_armed_thread(model):
    """A predictor encoding on another thread is never stopped by the scheduler's event."""
    event = threading.Event()
    event.set()
    handles = preemption.install(model.image_encoder)
    x = torch.zeros(1, 3, model.img_size, model.img_size)
    try:
        with torch.no_grad():
            model.encode(x)  # not armed here
            with preemption.armed(event), pytest.raises(preemption.EncodePreempted):
                model.encode(x)
            model.encode(x)  # disarmed again
    finally:
        for handle in handles:
            handle.remove()


def test_an_urgent_call_runs_inside_the_running_pass_without_losing_it(model, volume, tmp_path):
    """A click's decoder pass runs on the worker at the running encoder pass's next module;
    the pass then continues and finishes (not preempted, nothing encoded twice)."""
    sched, encoder, _ = make(model, volume, tmp_path, neighbours=0)
    modules = []
    counting = [m.register_forward_pre_hook(lambda *_: modules.append(1)) for m in model.image_encoder.modules()]
    seen, result = {}, {}

    def click():
        seen["thread"], seen["modules"] = threading.current_thread().name, len(modules)
        return 42

    try:
        with Stall(model) as stall:
            sched.set_view(VOLUME, "k", 3)
            assert stall.entered.wait(20)
            caller = threading.Thread(target=lambda: result.update(value=sched.call(click)))
            caller.start()
            time.sleep(0.2)
            assert "value" not in result  # the worker is still inside the stalled module
            stall.release.set()
            caller.join(20)
            wait_until(lambda: idle(sched))
    finally:
        for handle in counting:
            handle.remove()
    assert result["value"] == 42 and seen["thread"] == "desam-encoder"
    assert 0 < seen["modules"] < len(modules)  # mid-pass: more modules ran after the call
    assert sched.is_cached(VOLUME, "k", 3) and sched.stats()["preempted"] == 0 and encoder.calls == [1]
    sched.close()


def test_unregistering_a_volume_stops_its_pass_and_drops_the_job(model, volume, tmp_path):
    sched, _, _ = make(model, volume, tmp_path, neighbours=0)
    with Stall(model) as stall:
        sched.set_view(VOLUME, "k", 3)
        assert stall.entered.wait(20)
        sched.unregister_volume(VOLUME)
        stall.release.set()
        wait_until(lambda: idle(sched))
    stats = sched.stats()
    assert stats["preempted"] == 1 and stats["encoded"] == 0 and stats["volumes"] == 0
    sched.close()
