"""The service's encoding scheduler: one worker thread runs every encoder pass.

One worker thread (``scheduler_worker.ComputeWorker``) owns the encoder (the expensive,
not thread-safe step); callers on other threads submit work and wait on futures. Work is
ranked (see ``scheduler_queue``): PROMPT (a click needs this slice now) > VIEW
(the slice on screen) > NEIGHBOUR (slices around it, nearest first: v+1, v-1, v+2, ...)
> BACKGROUND (precompute of a whole axis); first-in, first-out within equal rank.

API (all methods thread-safe; axis is 'k', 'j' or 'i' of a K x J x I array, ``wire.AXES``):

- ``register_volume(volume_id, array, window, encoder_weights_sha256=...)``: make a
  volume known (the array is kept by reference: do not modify it while registered).
  Re-registering an id cancels its queued view and precompute work.
  ``unregister_volume(volume_id)`` forgets it.
- ``features(volume_id, axis, index, timeout=None) -> ImageFeatures``: the slice's
  features from the cache at once, else queued at PROMPT priority (an already-queued
  request for the slice is raised to PROMPT, a running one is joined) and awaited. Raises
  ``TimeoutError`` after ``timeout`` seconds, the encoder's exception when the pass
  failed, ``SchedulerClosedError`` when the scheduler closes first; ``taps=False``: a
  cache hit comes without the taps (SAM's prompted decoder needs the embedding only).
- ``set_view(volume_id, axis, index)``: VIEW for the slice and NEIGHBOUR work for
  ``neighbours`` slices each side; queued view work of the previous view of that volume
  that lies outside the new neighbourhood is cancelled (stats 'cancelled_obsolete').
- ``precompute(volume_id, axis)`` / ``cancel_precompute(volume_id, axis=None)``:
  BACKGROUND work for every slice not cached yet, and its withdrawal.
- ``progress(volume_id, axis)``: {'total', 'cached', 'queued', 'running'};
  ``is_cached(volume_id, axis, index)``.
- ``call(fn, urgent=True)``: run other PyTorch work on the worker thread (urgent: at the
  running pass's next step), so that one thread runs every parallel operation;
  ``serve_urgent()``: from a long non-urgent call on the worker, run the urgent calls
  waiting now (pass it as the computation's ``between_steps``).
- ``pause()`` / ``resume()`` (hold the worker before its next batch), ``stats()``,
  ``history()`` (recent encodes, oldest first), ``close()``.
- ``add_encoder(name, model)`` / ``remove_encoder(name)``: adapted encoders (DB-SAM,
  SAM-Mix) served beside the base model's, each with its own cache identity
  (``encoder_set``). ``features``, ``is_cached``, ``set_view``, ``precompute`` and
  ``progress`` take ``encoder=name`` (None, the default: the base model). Removing an
  encoder cancels its queued work; waiters get ``UnknownEncoderError``.

Preemption: a pass that nobody waits for is given up at the encoder's next step (the
``between_steps`` the worker passes to ``DeSAM.encode``) when a click needs another slice,
when the view moves so far that the slice is no longer wanted, or at close; the request
goes back in the queue if still wanted (stats 'preempted'). A click therefore waits for at
most one encoder step (a block, or part of one), not a pass.

Results go through ``FeatureCache.get_or_compute`` under the slice's ``FeatureKey``:
callers get the stored form (bit-identical per key); a cached key is not encoded again.
With ``encode_batch`` > 1 the worker puts up to that many queued requests of one volume
and axis into one encoder pass (a PROMPT request only takes PROMPT ones along). Logs name volumes
by the first 12 characters of their id and never show voxel values.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout

from ..modeling.desam import DeSAM, ImageFeatures
from .encoder_set import EncoderEntry, EncoderSet, UnknownEncoderError
from .feature_cache import FeatureCache
from .feature_config import FeatureKey
from .preprocess import IntensityWindow
from .runtime import Precision, choose_precision
from .scheduler_encode import EncodeFn, run_pass
from .scheduler_queue import (
    EncodeRequest,
    Priority,
    RegisteredVolume,
    RequestQueue,
    RequestState,
    outward,
    same_pass,
    where,
)
from .scheduler_worker import ComputeWorker, SchedulerClosedError

log = logging.getLogger(__name__)

__all__ = ["EncodingScheduler", "Priority", "SchedulerClosedError", "UnknownEncoderError"]

COUNTERS = ("requests", "cache_hits", "joined", "raised", "encoded", "batches", "skipped_cached", "errors",
            "cancelled_obsolete", "cancelled_precompute", "cancelled_close", "cancelled_reregister", "preempted")


class EncodingScheduler:
    """Arguments: a DeSAM model (on its device), the ``FeatureCache``; ``encode_batch``:
    most requests per encoder pass; ``neighbours``: slices each side of the view to encode;
    ``precision``: the encoder's autocast ('auto', 'fp32', 'bf16', 'fp16'), as
    ``SlicePredictor``; ``encode_fn``: replaces ``model.encode`` (tests, profiling), called
    as ``encode_fn(x, between_steps=...)``."""

    def __init__(self, model: DeSAM, cache: FeatureCache, *, encode_batch: int = 1, neighbours: int = 8,
                 precision: str | Precision = "auto", encode_fn: EncodeFn | None = None,
                 history_size: int = 1024) -> None:
        if isinstance(encode_batch, bool) or not isinstance(encode_batch, int) or encode_batch < 1:
            raise ValueError(f"encode_batch must be an integer >= 1, got {encode_batch!r}")
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 0:
            raise ValueError(f"neighbours must be an integer >= 0, got {neighbours!r}")
        self.model = model
        self.cache = cache
        self.encode_batch = encode_batch
        self.neighbours = neighbours
        self.precision = precision if isinstance(precision, Precision) else choose_precision(model.device, precision)
        self._encoders = EncoderSet(model, encode_fn or model.encode)
        self._volumes: dict[str, RegisteredVolume] = {}
        self._queue = RequestQueue()
        self._cond = threading.Condition()
        self._paused = False
        self._closing = False
        self._history: collections.deque = collections.deque(maxlen=history_size)
        self._counters = collections.Counter(dict.fromkeys(COUNTERS, 0))
        self._encode_seconds = 0.0
        self._running: list[EncodeRequest] = []         # the batch in the encoder now
        self._worker = ComputeWorker(self._cond, next_pass=self._next_pass, run_pass=self._run_pass,
                                     finish_pass=self._finish_pass, device_type=model.device.type)

    def register_volume(self, volume_id: str, array, window: IntensityWindow, *,
                        encoder_weights_sha256: str | None = ...) -> None:
        """``encoder_weights_sha256`` defaults to the model's own (None: random weights)."""
        sha = self.model.encoder_weights_sha256 if encoder_weights_sha256 is ... else encoder_weights_sha256
        volume = RegisteredVolume.create(volume_id, array, window, sha)
        self._encoders.key(self._encoders.base, volume, 0, 0)  # validates the sha256 early
        with self._cond:
            self._check_open()
            old = self._volumes.get(volume_id)
            self._volumes[volume_id] = volume
            dropped = self._withdraw(old, view=True, background=None) if old else []
            self._counters["cancelled_reregister"] += len(dropped)
        self._cancel(dropped)
        log.debug("scheduler: volume %s registered, shape %s", volume.tag, array.shape)

    def unregister_volume(self, volume_id: str) -> None:
        """Forget a volume; queued view/precompute work is cancelled (waiters still get theirs)."""
        with self._cond:
            volume = self._volume(volume_id)
            del self._volumes[volume_id]
            dropped = self._withdraw(volume, view=True, background=None)
            self._preempt_unless(lambda request: request.volume is not volume or request.waiters > 0)
        self._cancel(dropped)

    # ---- requests --------------------------------------------------------------------------------
    def features(self, volume_id: str, axis: str, index: int, timeout: float | None = None, *,
                 taps: bool = True, encoder: str | None = None) -> ImageFeatures:
        with self._cond:
            volume = self._volume(volume_id)
            dimension, index = where(volume, axis, index)
            key = self._key(encoder, volume, dimension, index)
        packed = self.cache.lookup(key)
        # Unpacking (16-bit -> float32) is parallel work: the worker thread does it.
        cached = None if packed is None else self.call(lambda: self.cache.unpack(packed, self.model.device,
                                                                                 taps=taps))
        if cached is None and self._worker.on_worker_thread():
            raise RuntimeError("features() on the worker thread: only for a cached slice")
        with self._cond:
            self._counters["requests"] += 1
            if cached is not None:
                self._counters["cache_hits"] += 1
                return cached
            self._check_open()
            request = self._queue.get(key)
            if request is None:
                self._encoders.get(encoder)  # not removed while unlocked
                request = EncodeRequest(key, volume, dimension, waiters=1, encoder=encoder)
                self._queue.add(request)
                self._cond.notify_all()
            else:
                self._counters["joined"] += 1
                if request.state is RequestState.QUEUED and request.priority()[0] != Priority.PROMPT:
                    self._counters["raised"] += 1
                request.waiters += 1
                self._queue.reschedule(request)
            if request.state is RequestState.QUEUED:  # not the running pass: that one may have to give way
                self._preempt_unless(lambda running: running.waiters > 0)
        try:
            result = request.future.result(timeout)
        except FutureTimeout:
            with self._cond:
                request.waiters -= 1
                unwanted = not self._queue.reschedule(request)
            if unwanted:
                request.future.cancel()
            raise TimeoutError(f"slice {index} along axis {axis} was not encoded within {timeout} s") from None
        # A copy per caller: each gets its own per-slice decoder state.
        return ImageFeatures(embedding=result.embedding, taps=list(result.taps), input_size=result.input_size,
                             original_size=result.original_size)

    def is_cached(self, volume_id: str, axis: str, index: int, *, encoder: str | None = None) -> bool:
        """Whether the slice's features are in the cache now (no encoder work queued)."""
        with self._cond:
            volume = self._volume(volume_id)
            dimension, index = where(volume, axis, index)
            key = self._key(encoder, volume, dimension, index)
        return self.cache.contains(key)

    def set_view(self, volume_id: str, axis: str, index: int, *, encoder: str | None = None) -> None:
        """The viewed slice and its neighbours, for ``encoder``'s features (a view for
        another encoder replaces the volume's view)."""
        with self._cond:
            self._check_open()
            volume = self._volume(volume_id)
            dimension, index = where(volume, axis, index)
            entry = self._encoders.get(encoder)
            wanted = {}
            for rank, i in outward(index, self.neighbours, volume.array.shape[dimension]):
                wanted[self._encoders.key(entry, volume, dimension, i)] = rank
            volume.view = (dimension, index)
            dropped = []
            for request in list(volume.view_requests):
                if request.key not in wanted or request.state is not RequestState.QUEUED:
                    request.view_rank = None
                    volume.view_requests.discard(request)
                    if not self._queue.reschedule(request):
                        dropped.append(request)
            self._counters["cancelled_obsolete"] += len(dropped)
            for key, rank in sorted(wanted.items(), key=lambda kv: kv[1]):
                request = self._queue.get(key)
                if request is None:
                    if self.cache.contains(key):
                        continue
                    request = EncodeRequest(key, volume, dimension, view_rank=rank, encoder=encoder)
                    self._queue.add(request)
                elif request.state is RequestState.QUEUED:
                    request.view_rank = rank
                    if request.waiters == 0:
                        request.entry = None  # a fresh entry: outward order, behind older equals
                    self._queue.reschedule(request)
                else:
                    request.view_rank = rank  # running: keeps its place if preempted
                volume.view_requests.add(request)
            self._preempt_unless(lambda request: request.priority() is not None)
            self._cond.notify_all()
        self._cancel(dropped)

    def precompute(self, volume_id: str, axis: str, *, encoder: str | None = None) -> int:
        """Queue every uncached slice of the axis in the background (``encoder``'s features);
        returns the count."""
        with self._cond:
            self._check_open()
            volume = self._volume(volume_id)
            dimension, _ = where(volume, axis, 0)
            entry = self._encoders.get(encoder)
            volume.background_axes.add(dimension)
            count = 0
            for i in range(volume.array.shape[dimension]):
                key = self._encoders.key(entry, volume, dimension, i)
                request = self._queue.get(key)
                if request is None:
                    if self.cache.contains(key):
                        continue
                    self._queue.add(EncodeRequest(key, volume, dimension, background=True, encoder=encoder))
                elif request.state is RequestState.QUEUED and not request.background:
                    request.background = True
                    self._queue.reschedule(request)
                else:
                    continue
                count += 1
            self._cond.notify_all()
        log.debug("scheduler: precompute of %s axis %s, %d slices", volume.tag, axis, count)
        return count

    def cancel_precompute(self, volume_id: str, axis: str | None = None) -> int:
        """Withdraw queued background work of the volume (one axis, or all). Returns how
        many requests were cancelled (those also wanted by a prompt or the view stay)."""
        with self._cond:
            volume = self._volume(volume_id)
            dimension = None if axis is None else where(volume, axis, 0)[0]
            dropped = self._withdraw(volume, view=False, background=dimension)
            self._counters["cancelled_precompute"] += len(dropped)
        self._cancel(dropped)
        return len(dropped)

    def progress(self, volume_id: str, axis: str, *, encoder: str | None = None) -> dict:
        with self._cond:
            volume = self._volume(volume_id)
            dimension, _ = where(volume, axis, 0)
            entry = self._encoders.get(encoder)
            requests = [r for r in self._queue.requests.values()
                        if r.volume is volume and r.dimension == dimension and r.encoder == encoder]
        total = volume.array.shape[dimension]
        cached = sum(self.cache.contains(self._encoders.key(entry, volume, dimension, i)) for i in range(total))
        return {"total": total, "cached": cached,
                "queued": sum(r.state is RequestState.QUEUED for r in requests),
                "running": sum(r.state is RequestState.RUNNING for r in requests)}

    # ---- adapted encoders -----------------------------------------------------------------------
    def add_encoder(self, name: str, model, *, encode_fn: EncodeFn | None = None) -> None:
        """Serve ``model``'s encoder under ``name`` beside the base one (see ``EncoderSet.add``:
        same device, an identity of its own)."""
        with self._cond:
            self._check_open()
            self._encoders.add(name, model, encode_fn)

    def remove_encoder(self, name: str) -> int:
        """Stop serving encoder ``name``: its queued requests are cancelled (waiters get
        ``UnknownEncoderError``) and a running pass of it is given up; its cached features
        stay in the cache (they age out, or serve the encoder when it is added again).
        Returns how many queued requests were cancelled."""
        with self._cond:
            self._encoders.remove(name)
            dropped = [r for r in self._queue.queued() if r.encoder == name]
            for request in dropped:
                request.view_rank = None
                request.background = False
                request.volume.view_requests.discard(request)
                self._queue.finish(request)
            self._preempt_unless(lambda request: request.encoder != name)
        self._cancel(dropped, UnknownEncoderError(f"encoder {name!r} was removed"))
        return len(dropped)

    def encoders(self) -> list[str]:
        """Names of the added encoders (the base model's is not listed)."""
        with self._cond:
            return self._encoders.names()

    # ---- other work on the worker thread --------------------------------------------------------
    def call(self, fn: Callable, *, urgent: bool = True):
        """``fn()`` on the worker thread (see ``ComputeWorker.call``)."""
        return self._worker.call(fn, urgent=urgent)

    def serve_urgent(self) -> None:
        """On the worker thread, inside a long non-urgent call: run the urgent calls waiting
        now. Give it to that computation as its ``between_steps``. Elsewhere: nothing."""
        self._worker.serve_urgent()

    # ---- control ---------------------------------------------------------------------------------
    def pause(self) -> None:  # the worker finishes its batch, then waits for resume()
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking work, cancel queued requests (waiters: SchedulerClosedError), join."""
        with self._cond:
            self._closing = True
            dropped = self._queue.drain()
            for volume in self._volumes.values():
                volume.view_requests.clear()
            self._counters["cancelled_close"] += len(dropped)
            self._preempt_unless(lambda request: request.waiters > 0)
            self._worker.stop()
        self._cancel(dropped, SchedulerClosedError("the encoding scheduler was closed"))
        self._worker.join(timeout)

    def __enter__(self) -> EncodingScheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        calls = self._worker.waiting_calls()
        with self._cond:
            requests = list(self._queue.requests.values())
            by_priority = collections.Counter(r.priority()[0].name.lower() for r in requests
                                              if r.state is RequestState.QUEUED)
            return {**self._counters, "queued": sum(by_priority.values()),
                    "queued_by_priority": dict(by_priority),
                    "running": sum(r.state is RequestState.RUNNING for r in requests),
                    "calls_waiting": calls, "volumes": len(self._volumes), "encode_batch": self.encode_batch,
                    "precision": self.precision.name, "encode_seconds": round(self._encode_seconds, 6),
                    "encoders": self._encoders.names(),
                    "paused": self._paused, "closed": self._closing, "worker_alive": self._worker.alive}

    def history(self) -> list[tuple[str, str, int, str]]:
        """Recent encodes, oldest first: (volume id, axis, index, priority at start)."""
        with self._cond:
            return list(self._history)

    # ---- the worker's passes (ComputeWorker's three callables) --------------------------------------
    def _next_pass(self) -> list[EncodeRequest] | None:
        """The next pass's requests, marked running (lock held); None when paused or idle."""
        if self._paused or not self._queue.has_work():
            return None
        batch = self._queue.pop_batch(self.encode_batch, same_pass)
        for request in batch:
            self._history.append((request.key.volume_id, request.key.axis, request.key.slice_index,
                                  request.priority()[0].name))
        self._running = batch
        return batch

    def _run_pass(self, batch: list[EncodeRequest], between_steps: Callable[[], None]) -> None:
        with self._cond:
            try:
                entry: EncoderEntry | None = self._encoders.get(batch[0].encoder)
            except UnknownEncoderError:
                entry = None
        if entry is None:  # removed between the pass's choice and its start
            error = UnknownEncoderError(f"encoder {batch[0].encoder!r} was removed")
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        outcome = run_pass(batch, model=entry.model, encode=entry.encode, precision=self.precision,
                           cache=self.cache, between_steps=between_steps)
        with self._cond:
            self._encode_seconds += outcome.seconds
            self._counters["encoded"] += outcome.encoded
            self._counters["batches"] += int(outcome.encoded > 0)
            self._counters["skipped_cached"] += outcome.skipped_cached
            self._counters["errors"] += outcome.errors

    def _finish_pass(self, batch: list[EncodeRequest], preempted: bool, error: BaseException | None) -> None:
        """Requests of a preempted pass go back in the queue while wanted (by a waiter, or
        with their volume still registered); others are done. An ``error`` that escaped the
        pass fails the requests it left unsettled."""
        if error is not None:
            pending = [r for r in batch if not r.future.done()]
            for request in pending:
                request.future.set_exception(error)
            with self._cond:
                self._counters["errors"] += len(pending)
        dropped = []
        with self._cond:
            self._running = []
            for request in batch:
                if preempted and not request.future.done():
                    self._counters["preempted"] += 1
                    request.state = RequestState.QUEUED
                    kept = request.waiters > 0 or self._volumes.get(request.key.volume_id) is request.volume
                    if not self._closing and kept and self._queue.reschedule(request):
                        continue
                    self._queue.finish(request)
                    dropped.append(request)
                else:
                    self._queue.finish(request)
                request.volume.view_requests.discard(request)
        self._cancel(dropped, SchedulerClosedError("the encoding scheduler was closed") if self._closing else None)

    # ---- internals --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closing:
            raise SchedulerClosedError("the encoding scheduler is closed")

    def _key(self, encoder: str | None, volume: RegisteredVolume, dimension: int, index: int) -> FeatureKey:
        """The slice's cache key for ``encoder`` (lock held)."""
        return self._encoders.key(self._encoders.get(encoder), volume, dimension, index)

    def _volume(self, volume_id: str) -> RegisteredVolume:
        volume = self._volumes.get(volume_id)
        if volume is None:
            raise KeyError(f"unknown volume {str(volume_id)[:12]!r}: register it with register_volume() first")
        return volume

    def _preempt_unless(self, keep: Callable[[EncodeRequest], bool]) -> None:
        """Stop the running pass unless ``keep`` holds for one of its requests (lock held)."""
        if self._running and not any(keep(request) for request in self._running):
            self._worker.preempt()

    def _withdraw(self, volume: RegisteredVolume, *, view: bool, background) -> list[EncodeRequest]:
        """Remove view reasons (``view``) and background reasons (a dimension, or None for
        all) from the volume's queued requests; returns requests left without a reason.
        Caller holds the lock."""
        dropped = []
        if view:
            volume.view = None
        if background is None:
            volume.background_axes.clear()
        else:
            volume.background_axes.discard(background)
        for request in self._queue.queued():
            if request.volume is not volume:
                continue
            if view and request.view_rank is not None:
                request.view_rank = None
                volume.view_requests.discard(request)
            if request.background and (background is None or request.dimension == background):
                request.background = False
            if not self._queue.reschedule(request):
                dropped.append(request)
        return dropped

    @staticmethod
    def _cancel(requests: list[EncodeRequest], error: BaseException | None = None) -> None:
        for request in requests:
            if error is not None and request.waiters > 0:
                request.future.set_exception(error)
            else:
                request.future.cancel()
