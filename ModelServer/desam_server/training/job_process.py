"""The process a training job of the service runs in: ``python -m
desam_server.training.job_process JOB_DIR``.

The service starts it (``api.training_jobs``) so that a crash or an out-of-memory kill of
training never takes the serving process down. It reads ``JOB_DIR/job.json`` and the case
files (``job_spec``), builds the service's model (same encoder and weights: the hash must
match), lowers its priority and CPU threads, and calls ``run.run_training`` with the
decoder files going to ``JOB_DIR/output``.

Protocol with the service:

- events: one JSON object per line on the standard output (what ``run_training`` emits:
  'data', 'precompute', 'precomputed', 'start', 'step', 'epoch'), then exactly one final
  event: 'finished' (best_epoch, best_validation_dice, epochs), 'cancelled' (reason, epoch:
  the last finished epoch) or 'failed' (reason). Anything else the process or a library
  prints goes to the standard error, with the log lines;
- stop: SIGTERM, or the end of the standard input (the service went away), is seen
  before the next training step or precompute slice; the run ends 'cancelled'.

Exit status: 0 finished, 2 cancelled, 1 failed (a process that dies without a final
event, killed or crashed, is reported failed by the service from its exit status).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

__all__ = ["main", "EXIT_FINISHED", "EXIT_FAILED", "EXIT_CANCELLED", "FINAL_EVENTS"]

EXIT_FINISHED, EXIT_FAILED, EXIT_CANCELLED = 0, 1, 2
FINAL_EVENTS = ("finished", "failed", "cancelled")

log = logging.getLogger("desam_server.training.job")


def _finite(value):
    """JSON without NaN or infinity (a diverged loss reads null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class _Events:
    """Writes events as JSON lines to the file descriptor the standard output had."""

    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        line = json.dumps(_finite(event), allow_nan=False)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()


class _StopFlag:
    """Set by SIGTERM or by the end of the standard input; ``reason`` says which."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = "cancelled on request"

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()


def _watch_stdin(stop: _StopFlag) -> None:
    """The service holds our standard input open while it lives: its end means the
    service went away, and a job nobody watches stops."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    stop.set("the service went away")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m desam_server.training.job_process JOB_DIR", file=sys.stderr)
        return EXIT_FAILED
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set("cancelled on request"))
    # The events keep the standard output's descriptor; whatever else writes there goes to
    # the standard error, so that a library's print cannot break the event stream.
    events = _Events(os.dup(1))
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    threading.Thread(target=_watch_stdin, args=(stop,), name="desam-stdin", daemon=True).start()
    job_dir = Path(argv[0])
    try:
        result = _run(job_dir, events, stop)
    except BaseException as exc:  # noqa: BLE001 - every ending is reported as an event
        return _report_exception(exc, events, stop)
    events({"event": "finished", "best_epoch": result.best_epoch, "best_validation_dice": result.best_dice,
            "epochs": len(result.history), "resumed_from": result.resumed_from})
    log.info("finished: best epoch %d, validation Dice %.4f", result.best_epoch, result.best_dice)
    return EXIT_FINISHED


def _report_exception(exc: BaseException, events: _Events, stop: _StopFlag) -> int:
    from .features import PrecomputeCancelled
    from .trainer import TrainingCancelled

    if isinstance(exc, (TrainingCancelled, PrecomputeCancelled)) or (stop() and isinstance(exc, KeyboardInterrupt)):
        epoch = exc.epoch if isinstance(exc, TrainingCancelled) else 0
        events({"event": "cancelled", "reason": stop.reason, "epoch": epoch})
        log.info("cancelled (%s) after epoch %d", stop.reason, epoch)
        return EXIT_CANCELLED
    reason = f"{exc.__class__.__name__}: {exc}"
    log.error("failed: %s", reason, exc_info=not isinstance(exc, ValueError))
    events({"event": "failed", "reason": reason})
    return EXIT_FAILED


def _run(job_dir: Path, events: _Events, stop: _StopFlag):
    from .job_spec import OUTPUT_DIR, read_cases, read_spec

    spec = read_spec(job_dir)
    if spec.nice and hasattr(os, "nice"):
        os.nice(spec.nice)
    import torch

    torch.set_num_threads(max(1, spec.threads))
    from ..loading import build_model
    from .run import TrainingOptions, run_training

    log.info("job %s: %d case(s) of %s, encoder %s on %s, %d CPU thread(s)", spec.job_id[:12], len(spec.cases),
             spec.structure, spec.encoder, spec.device, torch.get_num_threads())
    options = TrainingOptions.from_json(spec.options)
    model, _ = build_model(spec.encoder, None if spec.sam_checkpoint is None else Path(spec.sam_checkpoint), None,
                           spec.device)
    if model.encoder_weights_sha256 != spec.encoder_weights_sha256:
        raise RuntimeError("the job process loaded other encoder weights than the service's (the checkpoint "
                           "changed on disk?): restart the service")
    cases = read_cases(job_dir, spec.cases)

    def on_event(event: dict) -> None:
        events(event)
        if event["event"] == "epoch":
            log.info("epoch %d/%d: loss %.4f, validation Dice %.4f", event["epoch"], event["epochs"], event["loss"],
                     event["validation_dice"])
        elif event["event"] in ("precomputed", "start"):
            log.info("%s: %s", event["event"], {k: v for k, v in event.items() if k not in ("event", "data")})

    return run_training(model, cases, options, output_dir=job_dir / OUTPUT_DIR, features_dir=Path(spec.features_dir),
                        events=on_event, should_stop=stop, resume=False, encoder_precision=spec.encoder_precision,
                        features_bytes=spec.features_bytes)


if __name__ == "__main__":
    sys.exit(main())
