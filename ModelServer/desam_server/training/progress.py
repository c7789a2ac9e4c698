"""Progress bars (tqdm, on stderr) and epoch lines from training events, for the command
line and ``make decoders``."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("desam_server")

__all__ = ["TrainingProgress"]


class TrainingProgress:
    """tqdm bars from training events (process 0 only; none with --quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.phase = None

    def _bar(self, phase: str, total: int, unit: str):
        from tqdm import tqdm

        if self.phase != phase:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=total, unit=unit, desc=phase, file=sys.stderr, dynamic_ncols=True)
        return self.bar

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "data":
            log.info("data: %s", event["split"]["description"])
        if self.quiet:
            if kind == "epoch":
                log.info("epoch %d/%d: loss %.4f, validation Dice %.4f", event["epoch"], event["epochs"],
                         event["loss"], event["validation_dice"])
            return
        if kind == "precompute":
            bar = self._bar("precompute", event["total"], "slice")
            bar.n = event["done"]
            bar.refresh()
        elif kind == "start":
            self._bar("train", event["epochs"] * event["steps_per_epoch"], "step").update(
                event["resumed_from"] * event["steps_per_epoch"])
        elif kind == "step":
            bar = self._bar("train", event["epochs"] * event["steps"], "step")
            bar.update(1)
            bar.set_postfix(epoch=event["epoch"], loss=f"{event['loss']:.4f}")
        elif kind == "epoch" and self.bar is not None:
            self.bar.write(f"epoch {event['epoch']}/{event['epochs']}: loss {event['loss']:.4f}, "
                           f"validation Dice {event['validation_dice']:.4f} (best {event['best_validation_dice']:.4f}"
                           f" at epoch {event['best_epoch']})")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
