"""The service's state and operations, independent of HTTP.

``Service`` owns the model, the feature cache, the encoding scheduler, the volume store,
the label store, the loaded decoders (decoder files given at start, and the active
version of every structure in the decoder registry: ``versions``, a ``DecoderVersions``),
the job manager and the logits of recent answers. The routers only translate HTTP to
these methods; errors are ``errors.ServiceError`` subclasses.

Threads: the scheduler's worker runs every PyTorch computation -- encoder passes, and
the decoder passes that request threads and the job worker hand it (``scheduler.call``):
a click goes before queued encoding and a job's next slice, and runs inside a running
encoder pass at its next step; a job's slice serves waiting clicks between its own steps
(it gets ``scheduler.serve_urgent`` as its ``between_steps``). One compute thread keeps
one OpenMP team (see ``engine.scheduler_worker``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import wire
from ..decoder_registry import DecoderRegistry
from ..engine import IntensityWindow, SlicePredictor
from ..engine.feature_cache import FeatureCache
from ..engine.scheduler import EncodingScheduler, SchedulerClosedError, UnknownEncoderError
from ..io.slices import slice_view
from ..modeling.desam import DeSAM, ImageFeatures
from ..wire import axis_dimension
from .auto_runs import SliceAccess, run_auto
from .decoder_versions import DecoderVersions
from .decoders import DecoderSet, LoadedDecoder
from .errors import Conflict, NotFound, PayloadTooLarge, TooManyRequests, Unavailable, Unprocessable
from .jobs import AutoJob, AutoJobSpec, JobManager, PropagateJobSpec, SliceScore
from .label_store import LabelInfo, LabelStore, check_structure
from .prompting import LogitsStore, decode_slice_mask, mask_payload, mask_to_logits
from .propagation import StopRules, box_around, propagate
from .settings import ServiceSettings
from .training_cases import LabelProvider, cases_from_store, family_cases
from .training_jobs import TrainingJob, TrainingJobManager, TrainingOutputs, TrainingProcessSettings
from .volume_store import StoredVolume, VolumeStore

log = logging.getLogger(__name__)

__all__ = ["Service"]


def _given(value, default):
    return default if value is None else value


@dataclass(frozen=True)
class _Slice:
    stored: StoredVolume
    sid: str                       # the scheduler's id of (volume, window)
    window: IntensityWindow
    shape: tuple[int, int]         # H x W of a slice along the axis


#: Slices whose unpacked features (and the decoder work their prompts share, see
#: ``decoder_fast``) stay in memory for the next click: ~18 MB each with the embedding
#: only; with taps (DeSAM decoders; ViT-H: +60 MB) fewer, within HOT_BYTES of tensors.
#: Outside the feature cache's budgets.
HOT_SLICES = 4
HOT_BYTES = 256 << 20
#: The label store's folder under ``volume_dir`` (``label_store``).
LABELS_DIR = "labels"


class Service:
    """labels: where training cases' label volumes come from (``training_cases``; default:
    the label store, filled by ``PUT /volumes/{id}/labels/{structure}``);
    on_training_finished: gets a finished training job's ``TrainingOutputs``; what it
    returns is the job's ``installed`` (default: ``_install_trained``, which registers the
    best decoder as a new version of its structure and serves it)."""

    def __init__(self, settings: ServiceSettings, model: DeSAM, *, model_info: dict | None = None,
                 labels: LabelProvider | None = None,
                 on_training_finished: Callable[[TrainingOutputs], Any] | None = None) -> None:
        self.settings = settings
        self.model = model
        self.model_info = model_info or {}
        self.cache = FeatureCache(settings.cache)
        self.scheduler = EncodingScheduler(model, self.cache, encode_batch=settings.encode_batch,
                                           neighbours=settings.neighbours, precision=settings.precision)
        self.precision = self.scheduler.precision
        self.fast_path = settings.decoder_fast_path()
        self.labels = LabelStore(None if settings.volume_dir is None else settings.volume_dir / LABELS_DIR,
                                 max_pixels=settings.max_voxels)
        self.store = VolumeStore(settings.volume_dir, disk_bytes=settings.volume_disk_bytes,
                                 memory_bytes=settings.volume_memory_bytes, max_voxels=settings.max_voxels,
                                 on_evict=self._forget_volume, keep_longer=self.labels.has_labels)
        self.jobs = JobManager(self._run_job, max_jobs=settings.max_jobs, keep=settings.finished_jobs_kept)
        # Training cases' labels: the label store's by default (uploaded with PUT .../labels).
        self.label_provider: LabelProvider = labels or self.labels.get
        # CPU threads of the compute thread's PyTorch work (None on a GPU: training there
        # shares the device, not the cores).
        self._compute_threads = torch.get_num_threads() if model.device.type == "cpu" else None
        self.training = TrainingJobManager(settings.training_dir, TrainingProcessSettings(
            encoder=model.encoder_name, sam_checkpoint=settings.sam_checkpoint,
            encoder_weights_sha256=model.encoder_weights_sha256, device=str(model.device),
            encoder_precision=settings.precision, features_dir=settings.training_features_dir,
            threads=settings.training_process_threads()),
            keep=settings.training_jobs_kept, on_finished=on_training_finished or self._install_trained,
            on_process=self._share_cores_with_training)
        self.logits = LogitsStore()
        self._lock = threading.Lock()
        self._sessions: dict[str, set[str]] = {}      # volume id -> scheduler ids (one per window)
        self._waiting_prompts = 0
        self._hot: OrderedDict[tuple, ImageFeatures] = OrderedDict()  # recent clicked slices
        self._encoder_lock = threading.Lock()          # adapted encoders added to / removed from the scheduler
        self.decoders = DecoderSet(model, on_replace=self._forget_decoder, on_serve=self._serve_encoder)
        for path in settings.decoders:
            self.decoders.load(path)
        if settings.decoder_dir is not None:
            self.decoders.load_dir(settings.decoder_dir)
        # The registry's active versions, served beside the decoder files given at start
        # (which win over registry structures of the same name).
        self.versions = DecoderVersions(
            None if settings.registry_dir is None else DecoderRegistry(settings.registry_dir), self.decoders,
            file_decoders=frozenset(self.decoders.names()))
        self.started = time.time()
        self.closed = False

    # ---- volumes ----------------------------------------------------------------------------
    def upload(self, payload: bytes) -> tuple[dict, bool]:
        try:
            stored, created = self.store.put(payload)
        except wire.WireFormatError as exc:
            raise Unprocessable(f"volume payload rejected: {exc}") from None
        return {**stored.describe(), "on_disk": self.store.on_disk(stored.volume_id)}, created

    def delete_volume(self, volume_id: str) -> None:
        """Forget the volume and its labels; its active jobs end cancelled
        (``jobs.VOLUME_DELETED``). Also answers for labels whose volume left the disk."""
        self.jobs.cancel_volume(volume_id)
        removed = self.store.delete(volume_id)
        if not self.labels.delete_volume(volume_id) and not removed:
            raise NotFound(f"unknown volume {volume_id[:12]}")

    # ---- labels (training data) --------------------------------------------------------------
    def put_label(self, volume_id: str, structure: str, payload: bytes) -> tuple[LabelInfo, bool]:
        """Store the label of ``structure`` for an uploaded volume from a wire mask payload
        of the whole volume (axis 'k', offset 0, the volume's shape; its ``volume_id``, when
        the payload has one, must be this volume's); (info, created)."""
        check_structure(structure)
        with self.store.use(volume_id) as stored:
            shape = tuple(stored.array.shape)
        try:
            decoded = wire.decode_mask(payload, max_pixels=self.settings.max_voxels)
        except wire.PayloadTooLargeError as exc:
            raise PayloadTooLarge(f"label too large: {exc}") from None
        except wire.WireFormatError as exc:
            raise Unprocessable(f"label payload rejected: {exc}") from None
        bound = decoded.header.get("volume_id")
        if bound is not None and bound != volume_id:
            raise Unprocessable(f"the label payload belongs to volume {bound[:12]}, not to volume {volume_id[:12]}")
        if decoded.axis != "k" or decoded.offset != 0:
            raise Unprocessable(f"a label is the whole volume along axis 'k' at offset 0, got axis "
                                f"{decoded.axis!r} at offset {decoded.offset}")
        if tuple(decoded.mask.shape) != shape:
            raise Unprocessable(f"the label's shape {tuple(decoded.mask.shape)} does not match the volume's shape "
                                f"{shape} (K x J x I)")
        info, created = self.labels.put(volume_id, structure, decoded.mask)
        if not self.store.contains(volume_id):          # deleted meanwhile: no label without its volume
            self.labels.delete(volume_id, structure)
            raise NotFound(f"volume {volume_id[:12]} was deleted while its label was stored; nothing is kept")
        return info, created

    def list_labels(self, volume_id: str) -> tuple[list[LabelInfo], bool]:
        """The volume's labels and whether the service holds the volume; ``NotFound``
        when it has neither."""
        available = self.store.contains(volume_id)
        if not available and not self.labels.has_labels(volume_id):
            raise NotFound(f"unknown volume {volume_id[:12]}: upload it first")
        return self.labels.list(volume_id), available

    def delete_label(self, volume_id: str, structure: str) -> None:
        if not self.labels.delete(volume_id, structure):
            raise NotFound(f"volume {volume_id[:12]} has no label of {structure}")

    def _forget_volume(self, volume_id: str) -> None:
        with self._lock:
            sessions = self._sessions.pop(volume_id, set())
            for key in [key for key in self._hot if key[0] in sessions]:
                del self._hot[key]
        for sid in sessions:
            with contextlib.suppress(KeyError, SchedulerClosedError):
                self.scheduler.unregister_volume(sid)
        self.logits.discard_volume(volume_id)

    def _session(self, stored: StoredVolume, window: dict | None) -> tuple[str, IntensityWindow]:
        """The scheduler registration of (volume, window), made on first use."""
        if window is None:
            w = stored.default_window()
        else:
            try:
                w = IntensityWindow(center=float(window["center"]), width=float(window["width"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise Unprocessable(f"window: {exc}") from None
        sid = f"{stored.volume_id}|{w.center!r}|{w.width!r}"
        with self._lock:
            sessions = self._sessions.setdefault(stored.volume_id, set())
            if sid not in sessions:
                try:
                    self.scheduler.register_volume(sid, stored.array, w)
                except SchedulerClosedError:
                    raise Unavailable("the service is shutting down") from None
                sessions.add(sid)
        return sid, w

    @staticmethod
    def _check_slice(stored: StoredVolume, axis: str, index: int) -> tuple[int, int]:
        try:
            dimension = axis_dimension(axis)
        except ValueError as exc:
            raise Unprocessable(str(exc)) from None
        count = stored.array.shape[dimension]
        if not 0 <= index < count:
            raise Unprocessable(f"slice index {index} is outside 0..{count - 1} along axis {axis}")
        return wire.mask_slice_shape(stored.array.shape, axis)

    @contextlib.contextmanager
    def _slice(self, volume_id: str, axis: str, index: int, window: dict | None) -> Iterator[_Slice]:
        """The volume pinned, the slice checked, the (volume, window) session registered."""
        with self.store.use(volume_id) as stored:
            shape = self._check_slice(stored, axis, index)
            sid, w = self._session(stored, window)
            yield _Slice(stored, sid, w, shape)

    def _encoder_of(self, decoder: str | None) -> str | None:
        """The scheduler's encoder whose features ``decoder`` reads: None (the base
        encoder) for SAM's decoder and DeSAM decoders, the adapted encoder of a DB-SAM or
        SAM-Mix model. An unknown name is 422, not 404: the volume these requests address exists."""
        if decoder is None or decoder == "sam":
            return None
        try:
            return self.decoders.get(decoder).encoder
        except NotFound as exc:
            raise Unprocessable(str(exc)) from None

    def view(self, volume_id: str, axis: str, index: int, window: dict | None, decoder: str | None = None) -> dict:
        encoder = self._encoder_of(decoder)
        with self._slice(volume_id, axis, index, window) as s:
            self._scheduler_call(self.scheduler.set_view, s.sid, axis, index, encoder=encoder)
            return self._scheduler_call(self.scheduler.progress, s.sid, axis, encoder=encoder)

    def precompute(self, volume_id: str, axis: str, window: dict | None, cancel: bool = False,
                   decoder: str | None = None) -> dict:
        encoder = self._encoder_of(decoder)
        with self._slice(volume_id, axis, 0, window) as s:
            if cancel:
                self.scheduler.cancel_precompute(s.sid, axis)
            else:
                self._scheduler_call(self.scheduler.precompute, s.sid, axis, encoder=encoder)
            return self._scheduler_call(self.scheduler.progress, s.sid, axis, encoder=encoder)

    def progress(self, volume_id: str, axis: str, window: dict | None, decoder: str | None = None) -> dict:
        encoder = self._encoder_of(decoder)
        with self._slice(volume_id, axis, 0, window) as s:
            return self._scheduler_call(self.scheduler.progress, s.sid, axis, encoder=encoder)

    @staticmethod
    def _scheduler_call(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SchedulerClosedError:
            raise Unavailable("the service is shutting down") from None
        except UnknownEncoderError:  # its model was replaced or removed meanwhile
            raise Unavailable("the structure model changed during the request: try again", retry_after=1) from None

    # ---- features ---------------------------------------------------------------------------
    def _features(self, sid: str, axis: str, index: int, *, prompt: bool,
                  taps: bool = True, encoder: str | None = None) -> tuple[ImageFeatures, bool]:
        """The slice's features (``encoder``'s: None for the base encoder) and whether they
        were cached already. Prompts reuse the features object of the last HOT_SLICES
        clicked slices, so that work shared by all prompts on a slice
        (``ImageFeatures.decoder_state``) is done once."""
        hot = (sid, axis, index, taps, encoder)
        if prompt:
            with self._lock:
                features = self._hot.get(hot)
                if features is not None:
                    self._hot.move_to_end(hot)
                    return features, True
        features, cached = self._cached_features(sid, axis, index, prompt=prompt, taps=taps, encoder=encoder)
        if prompt:
            with self._lock:
                self._hot[hot] = features
                while len(self._hot) > HOT_SLICES or (len(self._hot) > 1 and self._hot_bytes() > HOT_BYTES):
                    self._hot.popitem(last=False)
        return features, cached

    def _hot_bytes(self) -> int:
        """Feature tensors held for recent clicks (the per-slice decoder state is ~14 MB more)."""
        return sum(t.numel() * t.element_size() for f in self._hot.values() for t in (f.embedding, *f.taps))

    def _cached_features(self, sid: str, axis: str, index: int, *, prompt: bool,
                         taps: bool, encoder: str | None) -> tuple[ImageFeatures, bool]:
        cached = self._scheduler_call(self.scheduler.is_cached, sid, axis, index, encoder=encoder)
        if not cached and prompt:
            with self._lock:
                if self._waiting_prompts >= self.settings.max_pending_prompts:
                    raise TooManyRequests(f"{self._waiting_prompts} prompts are waiting for the encoder "
                                          f"(limit {self.settings.max_pending_prompts})", retry_after=2)
                self._waiting_prompts += 1
        try:
            return self.scheduler.features(sid, axis, index, timeout=self.settings.click_timeout_s,
                                           taps=taps, encoder=encoder), cached
        except TimeoutError:
            raise Unavailable(f"the slice was not encoded within {self.settings.click_timeout_s:g} s: the encoder "
                              "is busy", retry_after=5) from None
        except SchedulerClosedError:
            raise Unavailable("the service is shutting down") from None
        except UnknownEncoderError:
            raise Unavailable("the structure model changed during the request: try again", retry_after=1) from None
        finally:
            if not cached and prompt:
                with self._lock:
                    self._waiting_prompts -= 1

    def _on_worker(self, fn, *, urgent: bool = True):
        """``fn()`` on the scheduler's worker thread (see the module's note on threads)."""
        try:
            return self.scheduler.call(fn, urgent=urgent)
        except SchedulerClosedError:
            raise Unavailable("the service is shutting down") from None

    # ---- prompted segmentation -----------------------------------------------------------------
    def prompt(self, volume_id: str, axis: str, index: int, *, points=None, labels=None, box=None,
               mask_input: dict | None = None, multimask: bool = True, decoder: str = "sam",
               window: dict | None = None) -> dict:
        if points is not None and len(points) > self.settings.max_points:
            raise Unprocessable(f"at most {self.settings.max_points} points per prompt, got {len(points)}")
        if (points is None) != (labels is None) or (points is not None and len(points) != len(labels)):
            raise Unprocessable("give one label (1 foreground, 0 background) per point: points and labels "
                                "must come together and have the same length")
        loaded = None if decoder == "sam" else self.decoders.get(decoder)  # held to the end: hot swap
        variant = self.model if loaded is None else loaded.model
        # SAM's prompted decoder: "sam" itself, and the adapted-encoder models (DB-SAM, SAM-Mix)
        sam_path = loaded is None or loaded.family != "desam"
        if not sam_path and mask_input is not None:
            raise Unprocessable("mask_input works with SAM's prompted decoder (decoder 'sam', or a DB-SAM / SAM-Mix "
                                "model), not with a DeSAM decoder")
        t0 = time.perf_counter()
        with self._slice(volume_id, axis, index, window) as s:
            stored, shape = s.stored, s.shape
            features, cached = self._features(s.sid, axis, index, prompt=True, taps=not sam_path,
                                              encoder=None if loaded is None else loaded.encoder)
            t1 = time.perf_counter()
            pts = None if points is None else np.asarray(points, dtype=np.float64).reshape(-1, 2)
            lab = None if labels is None else np.asarray(labels).reshape(-1)
            previous = previous_mask = None  # low-res logits of an earlier answer, or a binary mask
            if mask_input is not None:
                if mask_input.get("logits_id"):
                    previous = self.logits.get(mask_input["logits_id"], volume_id, axis, index)
                elif mask_input.get("mask"):
                    previous_mask = decode_slice_mask(mask_input["mask"], stored.array.shape, axis, index)
                else:
                    raise Unprocessable("mask_input needs logits_id or mask")

            def decode():  # on the scheduler's worker thread
                t2 = time.perf_counter()
                predictor = SlicePredictor(variant, precision=self.precision, fast=self.fast_path)
                predictor.set_features(features)
                refine = previous if previous_mask is None else mask_to_logits(previous_mask, self.model, features)
                try:
                    if sam_path:
                        out = predictor.predict(pts, lab, box=box, mask_input=refine, multimask_output=multimask)
                    else:
                        mask, iou = predictor.predict_desam(pts, lab, box=box)
                        out = mask[None], np.array([iou]), None
                except ValueError as exc:
                    raise Unprocessable(str(exc)) from None
                return out, t2, time.perf_counter()

            (masks, ious, low_res), t2, t3 = self._on_worker(decode)
            if loaded is not None and self.decoders.peek(decoder) is not loaded:
                self._forget_decoder(loaded)  # swapped while this prompt ran: drop what it left in hot slices
            answers = []
            for c in range(masks.shape[0]):
                logits_id = None if low_res is None else self.logits.put(volume_id, axis, index, low_res[c])
                answers.append({"mask": mask_payload(masks[c], axis, index, volume_id), "iou": float(ious[c]),
                                "area": int(masks[c].sum()), "logits_id": logits_id})
        t4 = time.perf_counter()
        return {"volume_id": volume_id, "axis": axis, "index": index, "shape": list(shape), "decoder": decoder,
                "masks": answers, "best": int(np.argmax(ious)),
                "timing": {"features_s": round(t1 - t0, 6), "cached": cached, "decode_wait_s": round(t2 - t1, 6),
                           "decode_s": round(t3 - t2, 6), "total_s": round(t4 - t0, 6)}}

    # ---- automatic segmentation jobs ---------------------------------------------------------------
    def submit_job(self, volume_id: str, *, axis: str, start: int | None, stop: int | None, mode: str,
                   decoder: str | None, window: dict | None, grid_size: int, iou_threshold: float,
                   min_region_area: int, box: list[float] | None = None, presence_threshold: float | None = None,
                   omega: float | None = None, largest_only: bool | None = None) -> AutoJob:
        """Check the request and queue an automatic job (``auto_runs``): the decoder must
        run the mode (``LoadedDecoder.automatic_modes``; "roi" also runs with "sam"), "roi"
        needs a box inside the slice; cam-box options left None are the SAM-Mix model's own
        (its file's ``inference``: what it was validated with)."""
        if mode == "roi" and decoder in (None, "sam"):
            name = "sam"
        elif mode in ("box", "grid"):
            name = self.decoders.require(decoder).name
        else:
            if decoder is None:
                raise Unprocessable(f"mode {mode!r} needs a decoder: name a "
                                    f"{'SAM-Mix model' if mode == 'cam-box' else 'model, or sam'}")
            name = decoder
        inference = {"threshold": 0.5, "omega": 0.5, "largest_only": True}
        if name != "sam":
            loaded = self.decoders.get(name)
            inference.update(loaded.metadata.get("inference") or {})
            if mode not in loaded.automatic_modes:
                raise Unprocessable(f"decoder {name!r} is a {loaded.family} model: its automatic modes are "
                                    f"{', '.join(loaded.automatic_modes)}, not {mode!r}")
        if (box is None) != (mode != "roi"):
            raise Unprocessable("mode 'roi' needs a box (x0, y0, x1, y1 in slice pixels)" if mode == "roi"
                                else f"a box is given with mode 'roi' only, not {mode!r}")
        with self._slice(volume_id, axis, 0, window) as s:
            count = s.stored.array.shape[axis_dimension(axis)]
            start = 0 if start is None else start
            stop = count if stop is None else stop
            if not 0 <= start < stop <= count:
                raise Unprocessable(f"slice range [{start}, {stop}) is not within [0, {count}) along axis {axis}")
            if box is not None:
                h, w = s.shape
                x0, y0, x1, y1 = box
                if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                    raise Unprocessable(f"box {list(box)} is not a box inside the {w} x {h} slice "
                                        "(0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
        spec = AutoJobSpec(volume_id=volume_id, axis=axis, start=start, stop=stop, mode=mode, decoder=name,
                           window=(s.window.center, s.window.width), grid_size=grid_size, iou_threshold=iou_threshold,
                           min_region_area=min_region_area, box=None if box is None else tuple(float(v) for v in box),
                           presence_threshold=_given(presence_threshold, inference["threshold"]),
                           omega=_given(omega, inference["omega"]),
                           largest_only=_given(largest_only, inference["largest_only"]))
        return self.jobs.submit(spec)

    def _run_job(self, job: AutoJob) -> bytes:
        job.check_cancelled()  # e.g. its volume deleted between the job's start and here
        if job.spec.kind == "propagate":
            return self._run_propagation(job)
        spec = job.spec
        # The version served when the job starts; held to its end (a swap meanwhile serves new work only).
        loaded = None if spec.decoder == "sam" else self.decoders.get(spec.decoder)
        window = {"center": spec.window[0], "width": spec.window[1]}
        with self._slice(spec.volume_id, spec.axis, spec.start, window) as s:
            sid, array = s.sid, s.stored.array
            slab = np.zeros((job.total, *s.shape), dtype=bool)
            access = SliceAccess(
                features=lambda axis, index, taps, encoder: self._features(sid, axis, index, prompt=False, taps=taps,
                                                                           encoder=encoder)[0],
                on_worker=lambda fn: self._on_worker(fn, urgent=False), serve_urgent=self.scheduler.serve_urgent,
                predictor=lambda model: SlicePredictor(model, precision=self.precision, fast=self.fast_path),
                slice=lambda axis, index: slice_view(array, axis, index))
            run_auto(job, loaded, self.model, access, slab)
        return wire.encode_mask(slab, axis=spec.axis, offset=spec.start, volume_id=spec.volume_id)

    # ---- propagation jobs ----------------------------------------------------------------------------
    def submit_propagation(self, volume_id: str, *, axis: str, index: int, mask: str, decoder: str = "sam",
                           start: int | None = None, stop: int | None = None, rules: StopRules | None = None,
                           window: dict | None = None) -> AutoJob:
        """Check the request (slice, bounds, decoder, the seed mask: a base64 wire mask of
        exactly slice ``index``, not empty) and queue a propagation job (``propagation``)."""
        if decoder != "sam":
            decoder = self.decoders.get(decoder).name      # 404 naming the loaded ones
        with self._slice(volume_id, axis, index, window) as s:
            count = s.stored.array.shape[axis_dimension(axis)]
            start = 0 if start is None else start
            stop = count if stop is None else stop
            if not 0 <= start < stop <= count:
                raise Unprocessable(f"slice range [{start}, {stop}) is not within [0, {count}) along axis {axis}")
            if not start <= index < stop:
                raise Unprocessable(f"the seed slice {index} is outside the range [{start}, {stop})")
            seed = decode_slice_mask(mask, s.stored.array.shape, axis, index, field="mask")
            if not seed.any():
                raise Unprocessable("the seed mask is empty: draw or segment the structure on the seed slice first")
        rules = rules or StopRules()
        spec = PropagateJobSpec(volume_id=volume_id, axis=axis, index=index, start=start, stop=stop, decoder=decoder,
                                window=(s.window.center, s.window.width), iou_threshold=rules.iou_threshold,
                                min_area=rules.min_area, min_area_ratio=rules.min_area_ratio,
                                max_area_ratio=rules.max_area_ratio, seed=seed)
        return self.jobs.submit(spec)

    def _run_propagation(self, job: AutoJob) -> bytes:
        spec: PropagateJobSpec = job.spec
        # The version served when the job starts; held to its end (as an automatic job's).
        loaded = None if spec.decoder == "sam" else self.decoders.get(spec.decoder)
        variant = self.model if loaded is None else loaded.model
        sam_path = loaded is None or loaded.family != "desam"
        encoder = None if loaded is None else loaded.encoder
        window = {"center": spec.window[0], "width": spec.window[1]}
        rules = StopRules(spec.iou_threshold, spec.min_area, spec.min_area_ratio, spec.max_area_ratio)
        with self._slice(spec.volume_id, spec.axis, spec.index, window) as s:
            predictor = SlicePredictor(variant, precision=self.precision, fast=self.fast_path)

            def predict(index: int, neighbour: np.ndarray) -> tuple[np.ndarray, float]:
                features, _ = self._features(s.sid, spec.axis, index, prompt=False, taps=not sam_path,
                                             encoder=encoder)
                job.check_cancelled()
                box = box_around(neighbour)

                def decode():  # on the scheduler's worker thread, after waiting clicks
                    predictor.set_features(features)
                    if sam_path:
                        masks, ious, _ = predictor.predict(box=box, multimask_output=False)
                        return masks[0], float(ious[0])
                    return predictor.predict_desam(box=box)

                return self._on_worker(decode, urgent=False)

            def on_slice(index: int, mask: np.ndarray, iou: float) -> None:
                job.add_slice(SliceScore(index, iou, int(mask.sum())))
                job.slices_with_mask += 1

            job.add_slice(SliceScore(spec.index, None, int(spec.seed.sum())))
            job.slices_with_mask = 1
            result = propagate(spec.seed, spec.index, spec.start, spec.stop, rules, predict, on_slice=on_slice,
                               on_progress=lambda done: setattr(job, "done", done), check=job.check_cancelled)
        job.reached = (result.first, result.last)
        log.info("job %s: propagation reached [%d, %d]; stopped at %s", job.id[:8], result.first, result.last,
                 "; ".join(result.stopped.values()))
        return wire.encode_mask(result.slab(), axis=spec.axis, offset=result.first, volume_id=spec.volume_id)

    # ---- decoder registry ----------------------------------------------------------------------
    def _serve_encoder(self, loaded: LoadedDecoder) -> None:
        """A model is about to be served: add its adapted encoder to the scheduler (once per
        encoder identity; DeSAM decoders use the base encoder)."""
        if loaded.encoder is None:
            return
        with self._encoder_lock:
            if loaded.encoder not in self.scheduler.encoders():
                try:
                    self.scheduler.add_encoder(loaded.encoder, loaded.model)
                except SchedulerClosedError:
                    raise Unavailable("the service is shutting down") from None

    def _forget_decoder(self, old: LoadedDecoder) -> None:
        """A decoder stopped being served: drop the hot slices' decoder work of its weights
        generation (requests still running on it hold their own references), and its
        adapted encoder when no served model uses it any more (its queued encoding is
        cancelled; its cached features age out)."""
        generation = old.model.generation
        with self._lock:
            stale = [key for key, f in self._hot.items() if f.decoder_state.generation == generation
                     or (old.encoder is not None and key[4] == old.encoder)]
            for key in stale:
                del self._hot[key]
        if old.encoder is None:
            return
        with self._encoder_lock:
            served = (self.decoders.peek(name) for name in self.decoders.names())
            if any(d is not None and d.encoder == old.encoder for d in served):
                return
            with contextlib.suppress(UnknownEncoderError):
                self.scheduler.remove_encoder(old.encoder)

    def _share_cores_with_training(self, running: bool) -> None:
        """While a training process runs, the compute thread uses only the cores the
        training process leaves (its OpenMP team would otherwise wait at every barrier for a
        thread that shares a core with training: clicks went from 22 to 515 ms on two
        cores); the full count comes back when the job ends."""
        if self._compute_threads is None:
            return
        threads = self._compute_threads
        if running:
            threads = max(1, threads - self.settings.training_process_threads())
        try:
            self._on_worker(lambda: torch.set_num_threads(threads))
        except Unavailable:  # shutting down
            pass

    def _install_trained(self, outputs) -> str:
        """A finished training job's best decoder becomes the active version of its
        structure (hot swap); returns 'structure vN'."""
        info = self.versions.install(outputs.best_path, curve_png=outputs.curve_path, activate=True)
        return f"{info.structure} {info.version}"

    # ---- training jobs ---------------------------------------------------------------------------
    def submit_training(self, structure: str, cases: list[dict], options: dict) -> TrainingJob:
        """Check the request (options, the encoder, each case's volume and label, the
        split and the batch) and start a training job; 422 / 404 / 409 with the reason."""
        from ..training.family import get_family
        from ..training.run import TrainingOptions, family_data

        try:
            parsed = TrainingOptions.from_json(options)
            family = get_family(parsed.config.family, parsed.config.family_options)
        except (ValueError, TypeError) as exc:
            raise Unprocessable(f"options: {exc}") from None
        if parsed.config.strategy not in family.strategies:
            raise Unprocessable(f"options: strategy {parsed.config.strategy!r} is not one of the {family.name} "
                                f"family's ({', '.join(family.strategies)})")
        if not cases:
            raise Unprocessable("no training cases: give at least one {volume_id, structure}")
        if self.model.encoder_weights_sha256 is None:
            raise Conflict("the service's encoder has random weights (no checkpoint): a decoder trained on its "
                           "features would be meaningless; start the service with real weights")
        self.training.check_idle()              # before loading every case (submit checks again)
        built = family_cases(cases_from_store(self.store, cases, self.label_provider, structure=structure), cases,
                             family=family.name, axis=parsed.axis)
        try:
            data = family_data(family, built, parsed)
        except ValueError as exc:
            raise Unprocessable(str(exc)) from None
        if len(data.train) < parsed.config.batch_size:
            raise Unprocessable(f"{len(data.train)} training slices are fewer than one batch of "
                                f"{parsed.config.batch_size}: lower batch_size or add cases")
        return self.training.submit(structure, built, parsed)

    # ---- info and lifecycle -----------------------------------------------------------------
    def info(self) -> dict:
        with self._lock:
            waiting = self._waiting_prompts
        scheduler = self.scheduler.stats()
        return {"model": {**self.model_info, "encoder": self.model.encoder_name,
                          "encoder_weights_sha256": self.model.encoder_weights_sha256,
                          "device": str(self.model.device), "precision": self.precision.name,
                          "bf16": self.precision.name == "bfloat16"},
                "decoders": self.decoders.describe(), "decoder_registry": self.versions.registry is not None,
                "cache": self.cache.stats(), "scheduler": scheduler,
                "queue_depth": scheduler["queued"] + scheduler["running"], "prompts_waiting": waiting,
                "volumes": self.store.stats(), "labels": self.labels.stats(), "jobs": self.jobs.stats(),
                "training": self.training.stats(), "logits_kept": len(self.logits), "hot_slices": len(self._hot),
                "settings": self.settings.public(), "uptime_s": round(time.time() - self.started, 1)}

    def close(self, timeout: float = 30.0) -> None:
        """Cancel jobs and training jobs (waiting for the running ones), stop the scheduler,
        release the cache."""
        if self.closed:
            return
        self.closed = True
        self.training.close(timeout)
        self.jobs.close(timeout)
        self.scheduler.close(timeout)
        self.cache.close()
        log.info("service stopped")
