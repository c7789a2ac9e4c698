"""The training-curve PNG: loss and validation Dice per epoch (matplotlib's object API
on an Agg canvas: no pyplot state, no display)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_write_bytes

__all__ = ["write_curve"]


def write_curve(path: Path, history: Sequence[dict], *, title: str) -> None:
    """history: one dict per epoch with 'epoch', 'loss' and 'validation_dice'."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(7, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_dice = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o", color="tab:red")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(alpha=0.3)
    ax_dice.plot(epochs, [h["validation_dice"] for h in history], marker="o", color="tab:blue")
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("validation Dice")
    ax_dice.set_ylim(0, 1)
    ax_dice.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())
