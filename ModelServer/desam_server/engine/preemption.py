"""Stopping an encoder pass part-way, between two of its modules.

An encoder pass cannot be interrupted from outside, and on a CPU it lasts seconds (1.7 s
for MobileSAM on two cores). When the scheduler's worker is encoding a slice nobody is
waiting for and a click arrives for another slice, the click would wait for the whole
pass. ``install`` puts a forward pre-hook on every module of the image encoder; on the
thread that entered ``armed(stop)``, a hook raises ``EncodePreempted`` once ``stop`` is
set, so the pass ends at the next module boundary (milliseconds). On any other thread
(a predictor encoding a slice directly) the hooks do nothing.

The same hooks also *serve* urgent work in the middle of a pass: ``armed``'s ``serve``
callback runs at every module boundary, and the scheduler uses it to run a click's
decoder pass on the worker thread there; the encoder pass continues where it stopped,
nothing is lost.

``EncodePreempted`` derives from ``BaseException`` so that code handling encoder *errors*
(``except Exception``) lets it through to the scheduler, which puts the job back in its
queue instead of failing it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["EncodePreempted", "install", "armed"]

_local = threading.local()


class EncodePreempted(BaseException):
    """The running encoder pass was given up for more urgent work."""


def _check(module: nn.Module, args) -> None:
    armed_with = getattr(_local, "armed", None)
    if armed_with is None:
        return
    stop, serve = armed_with
    if serve is not None:
        serve()
    if stop.is_set():
        raise EncodePreempted()


def install(encoder: nn.Module) -> list[RemovableHandle]:
    """Hooks on every module of ``encoder`` (the handles remove them again)."""
    return [module.register_forward_pre_hook(_check) for module in encoder.modules()]


@contextlib.contextmanager
def armed(stop: threading.Event, serve: Callable[[], None] | None = None) -> Iterator[None]:
    """Within the block, on this thread: a set ``stop`` ends the encoder pass at the next
    module; ``serve()`` is called at every module boundary before that check."""
    previous = getattr(_local, "armed", None)
    _local.armed = (stop, serve)
    try:
        yield
    finally:
        _local.armed = previous
