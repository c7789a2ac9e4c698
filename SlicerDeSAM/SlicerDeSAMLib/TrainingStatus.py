"""A training job's state as the Train panel shows it: built from the service's status
(GET /training/{id}) and its per-epoch metrics (GET /training/{id}/metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TrainingStatus"]

ACTIVE_STATES = ("queued", "running")


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class TrainingStatus:
    """``state``: queued, running, finished, failed or cancelled; ``phase``: setup,
    precompute or train; ``epoch`` / ``epochs``: the epoch in progress (the last one when
    ended); ``loss``: the last step's; ``validation_dice``: the last finished epoch's;
    ``seconds_left``: estimated from the finished epochs' durations (the service's own
    estimate before the first epoch ends); ``reason``: why it failed or was cancelled;
    ``installed``: the decoder version it installed (e.g. "liver v3")."""

    job_id: str
    structure: str
    state: str
    phase: str | None
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float | None
    validation_dice: float | None
    best_epoch: int | None
    best_validation_dice: float | None
    seconds_left: float | None
    precompute: tuple[int, int]
    reason: str | None
    installed: str | None
    metrics: tuple[dict, ...] = field(repr=False)
    raw: dict = field(repr=False)

    @classmethod
    def from_answers(cls, job: dict, metrics: list[dict]) -> TrainingStatus:
        epochs = int(job.get("epochs") or job.get("options", {}).get("config", {}).get("epochs") or 0)
        epoch, step, steps = int(job.get("epoch") or 0), int(job.get("step") or 0), int(job.get("steps") or 0)
        state = job["state"]
        dice = metrics[-1].get("validation_dice") if metrics else job.get("validation_dice")
        seconds_left = job.get("seconds_left")
        if state not in ACTIVE_STATES:
            seconds_left = None
        elif metrics and epochs:
            durations = [sum(float(m.get(k) or 0.0) for k in ("load_seconds", "compute_seconds", "validation_seconds"))
                         for m in metrics]
            per_epoch = sum(durations) / len(durations)
            in_progress = step / steps if epoch > len(metrics) and steps else 0.0
            seconds_left = max(0.0, (epochs - len(metrics) - in_progress) * per_epoch)
        pre = job.get("precompute") or {}
        installed = job.get("installed")
        if isinstance(installed, dict):
            installed = " ".join(str(installed[k]) for k in ("structure", "version") if k in installed)
        return cls(job_id=job["id"], structure=job.get("structure", ""), state=state, phase=job.get("phase"),
                   epoch=epoch, epochs=epochs, step=step, steps=steps, loss=job.get("loss"),
                   validation_dice=dice, best_epoch=job.get("best_epoch"),
                   best_validation_dice=job.get("best_validation_dice"), seconds_left=seconds_left,
                   precompute=(int(pre.get("done") or 0), int(pre.get("total") or 0)), reason=job.get("reason"),
                   installed=installed, metrics=tuple(metrics), raw=job)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def ended(self) -> bool:
        return not self.active

    @property
    def message(self) -> str:
        """One line for the panel's status label."""
        if self.state == "finished":
            best = (f"; best validation Dice {self.best_validation_dice:.3f} (epoch {self.best_epoch} of "
                    f"{self.epochs})" if self.best_validation_dice is not None else "")
            return f"Finished: {self.installed or 'the decoder'} installed{best}."
        if self.state == "failed":
            return f"Training failed: {self.reason or 'no reason given'}"
        if self.state == "cancelled":
            return f"Training cancelled: {self.reason or 'no reason given'}"
        if self.state == "queued":
            return "Queued: the service is copying the cases."
        if self.phase == "precompute":
            done, total = self.precompute
            return f"Encoding the training slices: {done} of {total}."
        if self.phase != "train" or not self.epoch:
            return "Starting: loading the model and the cases."
        parts = [f"Epoch {self.epoch}/{self.epochs}" + (f", step {self.step}/{self.steps}" if self.steps else "")]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.validation_dice is not None:
            parts.append(f"validation Dice {self.validation_dice:.3f}")
        if self.seconds_left is not None:
            parts.append(f"about {_duration(self.seconds_left)} left")
        return ", ".join(parts) + "."

    @property
    def fraction(self) -> float:
        """Progress of the whole job, 0..1, for a progress bar (precompute counts as the
        first tenth)."""
        if self.state == "finished":
            return 1.0
        done, total = self.precompute
        if self.phase != "train" or not self.epochs:
            return 0.1 * (done / total) if total else 0.0
        in_epoch = self.step / self.steps if self.steps else 0.0
        return min(1.0, 0.1 + 0.9 * (max(0, self.epoch - 1) + in_epoch) / self.epochs)
