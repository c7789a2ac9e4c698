"""The training loop: one process, or one of several under torchrun (DDP).

Per epoch: the training slices in a seeded order (a function of seed and epoch only, so a
resumed run repeats an uninterrupted one), global batches of ``batch_size`` (each process
takes its share; a last incomplete batch is dropped so that all processes see equal
batches), one optimizer step per batch, then validation Dice on the whole validation
volumes (process 0), the decoder files and the resumable state. Files in ``output_dir``:

- ``best.safetensors`` / ``last.safetensors``: decoder files of the best and the last epoch
  (the family's format, with the training record in their metadata);
- ``state.pt``: what resuming needs (``train_state``); ``history.json``; ``curve.png``.

Every write is atomic. ``events(dict)`` gets 'start', 'step' and 'epoch' events;
``should_stop()`` is asked before every step and stops the run within one step
(``TrainingCancelled``; the last finished epoch stays resumable).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from ..atomic import atomic_write_bytes
from ..engine.runtime import cpu_has_native_bf16
from ..io.slices import slice_view
from .config import TrainConfig
from .curve import write_curve
from .distributed import DistributedContext
from .evaluate import volume_dice
from .family import ModelFamily, TrainItem
from .samples import TrainingData
from .slice_images import SliceReader, check_reader
from .train_state import TrainStateError, load_state, save_state

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainResult", "TrainingCancelled", "EventSink", "validation_dice"]

EventSink = Callable[[dict], None]


class TrainingCancelled(Exception):
    """The run stopped on request; ``epoch`` is the last finished epoch (0: none)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"cancelled after epoch {epoch}")
        self.epoch = epoch


@dataclass
class TrainResult:
    output_dir: Path
    best_path: Path
    last_path: Path
    best_epoch: int
    best_dice: float
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    #: the model trained (the family's ``prepare_model`` result), with the last epoch's weights
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_dice": self.best_dice, "epochs": len(self.history),
                "resumed_from": self.resumed_from, "history": self.history}


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda":
        if precision in ("auto", "bf16"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if precision == "bf16" and dtype != torch.bfloat16:
                raise ValueError("bf16 was asked for but this GPU does not support it")
            return torch.autocast("cuda", dtype=dtype), dtype
        if precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16), torch.float16
        return contextlib.nullcontext(), torch.float32
    if precision == "bf16" or (precision == "auto" and cpu_has_native_bf16()):
        return torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16
    if precision == "fp16":
        raise ValueError("fp16 training needs a CUDA device; use fp32 or bf16 on a CPU")
    return contextlib.nullcontext(), torch.float32


def validation_dice(model, family: ModelFamily, data: TrainingData, reader: SliceReader, strategy: str,
                    options: dict) -> tuple[float, list[float]]:
    """Mean Dice over the validation volumes (3-D Dice, MONAI's, over each volume's
    validation slices, empty slices included; a volume without the structure predicted
    empty scores 1) of ``family.predict`` with ``strategy`` and ``options``, and the
    per-volume values. ``reader`` gives what the family reads (``check_reader``)."""
    check_reader(family, reader)
    per_volume = []
    axis = data.split.axis
    for portion in data.validation:
        case = data.cases[portion.case]
        predicted, truth = [], []
        for index in portion.indices:
            loaded = reader.load(case, axis, index, model.device)
            predicted.append(family.predict(model, loaded, strategy, options))
            truth.append(np.asarray(slice_view(case.mask, axis, index)))
        per_volume.append(volume_dice(np.stack(predicted), np.stack(truth)))
    return float(np.mean(per_volume)), per_volume


def _sample_seed(seed: int, epoch: int, position: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + position) % (2**63)


class Trainer:
    def __init__(self, model, family: ModelFamily, data: TrainingData, reader: SliceReader,
                 config: TrainConfig, output_dir: Path, *, events: EventSink | None = None,
                 should_stop: Callable[[], bool] | None = None, distributed: DistributedContext | None = None) -> None:
        self.model = model
        self.family = family
        self.data = data
        check_reader(family, reader)
        self.reader = reader
        self.config = config
        self.output_dir = Path(output_dir)
        self.events = events or (lambda event: None)
        self.should_stop = should_stop or (lambda: False)
        self.ctx = distributed or DistributedContext()
        if config.batch_size % self.ctx.world_size:
            raise ValueError(f"batch_size {config.batch_size} must be a multiple of the number of processes "
                             f"({self.ctx.world_size})")
        self.device = model.device
        self.paths = {name: self.output_dir / name for name in
                      ("best.safetensors", "last.safetensors", "state.pt", "history.json", "curve.png")}

    # ---- the record written into decoder files and reports --------------------------------------
    def _identity(self) -> dict:
        """What must match for a state to be resumed."""
        return {"config": self.config.to_json(), "data": self.data.summary(), "world_size": self.ctx.world_size,
                "encoder": self.model.encoder_name, "encoder_weights_sha256": self.model.encoder_weights_sha256}

    def _windows(self) -> list[dict]:
        originals = {p.case for p in (*self.data.split.train, *self.data.split.validation)}
        seen = []
        for n in sorted(originals):
            w = self.data.cases[n].window.to_json()
            if w not in seen:
                seen.append(w)
        return seen

    def _record(self, history: list[dict], best_epoch: int, best_dice: float) -> dict:
        return {"family": self.family.name, "strategy": self.config.strategy, "axis": self.data.split.axis,
                "windows": self._windows(), "config": self.config.to_json(), "data": self.data.summary(),
                "world_size": self.ctx.world_size, "best_epoch": best_epoch, "best_validation_dice": best_dice,
                "epochs": [{"epoch": h["epoch"], "loss": h["loss"], "validation_dice": h["validation_dice"]}
                           for h in history]}

    # ---- pieces -------------------------------------------------------------------------
    def _steps_per_epoch(self) -> int:
        n, b = len(self.data.train), self.config.batch_size
        if n < b:
            raise ValueError(f"{n} training slices are fewer than one batch of {b}: lower batch_size")
        return n // b

    def _items(self, refs) -> list[TrainItem]:
        out = []
        for ref in refs:
            case = self.data.cases[ref.case]
            loaded = self.reader.load(case, ref.axis, ref.index, self.device)
            mask = np.asarray(slice_view(case.mask, ref.axis, ref.index))
            if self.family.input_kind == "image":
                out.append(TrainItem(None, mask, ref.positive, image=loaded, segmented=ref.segmented))
            else:
                out.append(TrainItem(loaded, mask, ref.positive, segmented=ref.segmented))
        return out

    def validate(self) -> tuple[float, list[float]]:
        """``validation_dice`` of the model with the run's strategy and validation options."""
        return validation_dice(self.model, self.family, self.data, self.reader, self.config.strategy,
                               self.config.prediction_options())

    def _save_files(self, history, best_epoch, best_dice, *, is_best: bool) -> None:
        record = self._record(history, best_epoch, best_dice)
        structure = self.data.structure
        self.family.save(self.model, self.paths["last.safetensors"], structure=structure, training=record)
        if is_best:
            self.family.save(self.model, self.paths["best.safetensors"], structure=structure, training=record)
        atomic_write_bytes(self.paths["history.json"], json.dumps(
            {"record": record, "history": history}, indent=1).encode())
        write_curve(self.paths["curve.png"], history,
                    title=f"{structure}: {self.family.name} {self.config.strategy}")

    # ---- the run ----------------------------------------------------------------------------
    def run(self, *, resume: bool = True) -> TrainResult:
        cfg, ctx = self.config, self.ctx
        self.output_dir.mkdir(parents=True, exist_ok=True)
        module = self.family.training_module(self.model, cfg.strategy)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = self.family.optimizer(params, cfg.learning_rate)
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.epochs, power=cfg.poly_power)
        autocast, dtype = _autocast(self.device, cfg.precision)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        history: list[dict] = []
        best_epoch, best_dice, start_epoch = 0, -1.0, 1
        identity = self._identity()
        if resume and self.paths["state.pt"].exists():
            state = load_state(self.paths["state.pt"])
            if state.get("identity") != identity:
                raise TrainStateError("the output folder holds a run with other settings or data: choose another "
                                      "folder, or start over without resuming")
            self.family.load_trainable_state(self.model, state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            history, best_epoch, best_dice = state["history"], state["best_epoch"], state["best_dice"]
            start_epoch = state["epoch"] + 1
        resumed_from = start_epoch - 1
        wrapped = DistributedDataParallel(module, broadcast_buffers=False) if ctx.enabled else module
        steps = self._steps_per_epoch()
        self.events({"event": "start", "epochs": cfg.epochs, "steps_per_epoch": steps, "resumed_from": resumed_from,
                     "world_size": ctx.world_size, "data": self.data.summary()})
        step_seconds: list[float] = []
        validation_seconds: list[float] = []
        for epoch in range(start_epoch, cfg.epochs + 1):
            order = torch.randperm(len(self.data.train), generator=torch.Generator().manual_seed(
                _sample_seed(cfg.seed, epoch, 0))).tolist()
            losses, load_time, compute_time = [], 0.0, 0.0
            for step in range(steps):
                if ctx.any_true(self.should_stop(), self.device):
                    raise TrainingCancelled(epoch - 1)
                t0 = time.perf_counter()
                positions = list(range(step * cfg.batch_size, (step + 1) * cfg.batch_size))[ctx.rank::ctx.world_size]
                items = self._items([self.data.train[order[p]] for p in positions])
                generators = [torch.Generator().manual_seed(_sample_seed(cfg.seed, epoch, p + 1)) for p in positions]
                t1 = time.perf_counter()
                with autocast:
                    loss, _ = self.family.loss(wrapped, items, cfg.strategy, generators)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                self.family.after_step(self.model)
                t2 = time.perf_counter()
                load_time += t1 - t0
                compute_time += t2 - t1
                losses.append(ctx.mean(float(loss.detach()), self.device))
                step_seconds.append(t2 - t0)
                left = self._seconds_left(step_seconds, validation_seconds,
                                          steps_left=(cfg.epochs - epoch) * steps + steps - step - 1,
                                          validations_left=cfg.epochs - epoch + 1)
                self.events({"event": "step", "epoch": epoch, "epochs": cfg.epochs, "step": step + 1,
                             "steps": steps, "loss": losses[-1], "seconds_left": left})
            scheduler.step()
            t_val = time.perf_counter()
            if ctx.is_main:
                dice, per_volume = self.validate()
            validation_seconds.append(time.perf_counter() - t_val)
            if ctx.is_main:
                entry = {"epoch": epoch, "loss": float(np.mean(losses)), "validation_dice": dice,
                         "validation_dice_per_volume": per_volume, "learning_rate": optimizer.param_groups[0]["lr"],
                         "load_seconds": round(load_time, 4), "compute_seconds": round(compute_time, 4),
                         "validation_seconds": round(validation_seconds[-1], 4), "steps": steps}
                history.append(entry)
                is_best = dice > best_dice
                if is_best:
                    best_epoch, best_dice = epoch, dice
                self._save_files(history, best_epoch, best_dice, is_best=is_best)
                save_state(self.paths["state.pt"], {
                    "identity": identity, "epoch": epoch, "trainable": self.family.trainable_state(self.model),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "history": history, "best_epoch": best_epoch,
                    "best_dice": best_dice})
                self.events({"event": "epoch", **entry, "epochs": cfg.epochs, "best_epoch": best_epoch,
                             "best_validation_dice": best_dice,
                             "seconds_left": self._seconds_left(step_seconds, validation_seconds,
                                                                steps_left=(cfg.epochs - epoch) * steps,
                                                                validations_left=cfg.epochs - epoch)})
            ctx.barrier()
        return TrainResult(self.output_dir, self.paths["best.safetensors"], self.paths["last.safetensors"],
                           best_epoch, best_dice, history, resumed_from, self.model)

    def _seconds_left(self, step_seconds: list[float], validation_seconds: list[float], *, steps_left: int,
                      validations_left: int) -> float | None:
        """Estimated seconds to the end: recent mean step time x steps left, plus mean
        validation time (before the first: two steps' worth) x validations left."""
        if not step_seconds:
            return None
        recent = step_seconds[-20:]
        per_step = sum(recent) / len(recent)
        per_validation = sum(validation_seconds) / len(validation_seconds) if validation_seconds else 2 * per_step
        return round(steps_left * per_step + validations_left * per_validation, 1)
