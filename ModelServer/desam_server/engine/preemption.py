"""Stopping an encoder pass part-way, between two of its modules.

An encoder pass cannot be interrupted from outside, and on a CPU it lasts seconds (1.7 s
for MobileSAM on two cores). When the scheduler's worker is encoding a slice nobody is
waiting for and a click arrives for another slice, the click would wait for the whole
pass. ``install`` puts a forward pre-hook on every module of the image encoder; on the
thread that entered ``armed(stop)``, a hook raises ``EncodePreempted`` once ``stop`` is
set, so the pass ends at the next module boundary (milliseconds). On any other thread
(a predictor encoding a slice directly) the hooks do nothing.

The same hooks also *pause* a pass while ``armed``'s ``go`` event is clear: the scheduler
clears it while a click is decoding, so on a CPU the click does not share the cores with
the encoder; the pass continues where it stopped, nothing is lost.

``EncodePreempted`` derives from ``BaseException`` so that code handling encoder *errors*
(``except Exception``) lets it through to the scheduler, which puts the job back in its
queue instead of failing it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["EncodePreempted", "install", "armed"]

_local = threading.local()


class EncodePreempted(BaseException):
    """The running encoder pass was given up for more urgent work."""


#: Longest pause of a pass for one click: a click that never ends must not stop encoding.
MAX_PAUSE_S = 5.0


def _check(module: nn.Module, args) -> None:
    armed_with = getattr(_local, "armed", None)
    if armed_with is None:
        return
    stop, go = armed_with
    if go is not None and not go.is_set():
        go.wait(MAX_PAUSE_S)
    if stop.is_set():
        raise EncodePreempted()


def install(encoder: nn.Module) -> list[RemovableHandle]:
    """Hooks on every module of ``encoder`` (the handles remove them again)."""
    return [module.register_forward_pre_hook(_check) for module in encoder.modules()]


@contextlib.contextmanager
def armed(stop: threading.Event, go: threading.Event | None = None) -> Iterator[None]:
    """Within the block, on this thread: a set ``stop`` ends the encoder pass at the next
    module; a clear ``go`` holds it there until set again (at most MAX_PAUSE_S per module)."""
    previous = getattr(_local, "armed", None)
    _local.armed = (stop, go)
    try:
        yield
    finally:
        _local.armed = previous
