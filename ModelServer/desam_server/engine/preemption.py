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

Long work that is not an encoder pass (a slice of a batch-segmentation job: PRIM scores
81 prompts, PDMM decodes take ~0.5 s each on two CPU cores) offers the same service at
*serve points*: ``serve_point()`` between its steps, and ``install_serve_points`` on the
modules of a decoder. Those only serve; they never stop the work. Served work does not
serve again (no nesting).

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

__all__ = ["EncodePreempted", "install", "install_serve_points", "armed", "serve_point"]

_local = threading.local()


class EncodePreempted(BaseException):
    """The running encoder pass was given up for more urgent work."""


def serve_point() -> None:
    """Run the work waiting to be served, when this thread is inside ``armed`` with a
    ``serve`` callback and not already serving; else nothing."""
    armed_with = getattr(_local, "armed", None)
    if armed_with is None or armed_with[1] is None or getattr(_local, "serving", False):
        return
    _local.serving = True
    try:
        armed_with[1]()
    finally:
        _local.serving = False


def _check(module: nn.Module, args) -> None:
    armed_with = getattr(_local, "armed", None)
    if armed_with is None:
        return
    serve_point()
    if armed_with[0].is_set():
        raise EncodePreempted()


def _serve_hook(module: nn.Module, args) -> None:
    serve_point()


def install(encoder: nn.Module) -> list[RemovableHandle]:
    """Hooks on every module of ``encoder`` (the handles remove them again)."""
    return [module.register_forward_pre_hook(_check) for module in encoder.modules()]


def install_serve_points(module: nn.Module) -> None:
    """A serve point before each direct child of ``module`` runs (once per module; they
    stay while the module lives)."""
    if getattr(module, "_desam_serve_points", None) is None:
        module._desam_serve_points = [child.register_forward_pre_hook(_serve_hook) for child in module.children()]


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
