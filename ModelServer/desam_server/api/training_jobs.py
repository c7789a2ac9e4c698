"""Training jobs: one decoder training at a time, each in a process of its own.

The serving process never trains: a job's cases are written into the job's folder
(``training.job_spec``) and ``python -m desam_server.training.job_process`` runs the
training there, so that a crash or an out-of-memory kill of training leaves clicks
answered. The process runs at a lower priority with fewer CPU threads than the machine
has (``TrainingProcessSettings``). Its events (JSON lines on its standard output) update
the job's status and metrics and are kept, numbered, for the event streams; its standard
error is the job's log.

States: queued (the folder is being written), running, then finished, failed or
cancelled, with ``reason`` saying why for the last two. One active (queued or running)
job per service -- the service has one device -- a second is a 409 naming the first.
Cancel sends SIGTERM, which the process sees before its next step; after
``cancel_grace_s`` it is killed. A process that ends without its final event (crashed,
killed) makes the job failed with its exit status or signal as the reason. A finished
job's decoder files go to ``on_finished(TrainingOutputs)`` (the service registers the
decoder there); what it returns is the job's ``installed``.

Ended jobs are kept until ``keep`` newer ones have ended; their folders go with them, and
all of them when the service closes (``on_finished`` copies what it keeps): a job does not
outlive the service that started it (nor does its process: it stops when the service's
end of its standard input closes). The service holds a lock on each of its folders
(``.lock``, flock), so that at start it removes the folders a crashed service left behind
and never those of another service sharing ``root``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..training.cases import Case
from ..training.job_process import FINAL_EVENTS
from ..training.job_spec import CASES_DIR, OUTPUT_DIR, JobSpec, write_cases, write_spec
from ..training.run import TrainingOptions
from .errors import Conflict, NotFound

log = logging.getLogger(__name__)

__all__ = ["TrainingState", "TrainingJob", "TrainingJobManager", "TrainingOutputs", "TrainingProcessSettings",
           "ACTIVE_TRAINING", "ENDED_TRAINING", "CANCELLED_ON_REQUEST", "SHUTTING_DOWN"]

CANCELLED_ON_REQUEST = "cancelled on request"
SHUTTING_DOWN = "the service shut down"
#: Log lines and events a job keeps (the oldest go first).
LOG_LINES = 2000
EVENTS_KEPT = 4096


class TrainingState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_TRAINING = (TrainingState.QUEUED, TrainingState.RUNNING)
ENDED_TRAINING = (TrainingState.FINISHED, TrainingState.FAILED, TrainingState.CANCELLED)


@dataclass(frozen=True)
class TrainingProcessSettings:
    """What a job process gets beside its cases: the service's model (encoder, checkpoint
    or None for the catalog's cached weights, their hash, device, encoder precision), the
    training features' folder and byte budget, its PyTorch CPU threads and niceness, and
    the seconds a cancelled process has before it is killed."""

    encoder: str
    sam_checkpoint: Path | None
    encoder_weights_sha256: str | None
    device: str
    encoder_precision: str
    features_dir: Path
    features_bytes: int = 20 * 2**30
    threads: int = 1
    nice: int = 10
    cancel_grace_s: float = 30.0


@dataclass(frozen=True)
class TrainingOutputs:
    """A finished job's files (in its folder, removed when the job is forgotten)."""

    job_id: str
    structure: str
    best_path: Path
    last_path: Path
    curve_path: Path
    history_path: Path
    best_epoch: int
    best_validation_dice: float


LOCK_FILE = ".lock"


def _lock(folder: Path) -> int:
    """An exclusive flock on ``folder/.lock``, held while the descriptor is open."""
    fd = os.open(folder / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _unlocked(folder: Path) -> bool:
    """Whether no process holds ``folder``'s lock (a folder without one was never used)."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _remove_folder(job: TrainingJob) -> None:
    if job.folder is not None:
        shutil.rmtree(job.folder, ignore_errors=True)
    if job.lock_fd is not None:
        os.close(job.lock_fd)
        job.lock_fd = None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@dataclass(eq=False)
class TrainingJob:
    """A training job: what it trains, its state and progress, its metrics (one entry per
    epoch), its log and its numbered events."""

    structure: str
    cases: int
    options: dict
    device: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: TrainingState = TrainingState.QUEUED
    phase: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    reason: str | None = None
    data: dict | None = None
    precompute: dict | None = None
    epoch: int = 0
    epochs: int | None = None
    step: int = 0
    steps: int | None = None
    loss: float | None = None
    validation_dice: float | None = None
    best_epoch: int | None = None
    best_validation_dice: float | None = None
    seconds_left: float | None = None
    installed: Any = None
    history: list[dict] = field(default_factory=list, repr=False)
    log: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LOG_LINES), repr=False)
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=EVENTS_KEPT), repr=False)
    seq: int = 0
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)
    cancel_reason: str | None = None
    folder: Path | None = field(default=None, repr=False)
    process: subprocess.Popen | None = field(default=None, repr=False)
    final_event: dict | None = field(default=None, repr=False)
    lock_fd: int | None = field(default=None, repr=False)

    def status(self) -> dict:
        elapsed = None
        if self.started is not None:
            elapsed = round((self.ended or time.time()) - self.started, 3)
        return {"id": self.id, "state": self.state.value, "phase": self.phase, "structure": self.structure,
                "cases": self.cases, "device": self.device, "options": self.options, "created": self.created,
                "started": self.started, "ended": self.ended, "elapsed_s": elapsed, "data": self.data,
                "precompute": self.precompute, "epoch": self.epoch, "epochs": self.epochs, "step": self.step,
                "steps": self.steps, "loss": self.loss, "validation_dice": self.validation_dice,
                "best_epoch": self.best_epoch, "best_validation_dice": self.best_validation_dice,
                "seconds_left": self.seconds_left, "reason": self.reason,
                "cancel_requested": self.cancel_requested.is_set(), "installed": self.installed}


class TrainingJobManager:
    """root: the jobs' folders (one per job, named by its id); process: what the job
    processes get; keep: ended jobs remembered; on_finished: called with a finished
    job's ``TrainingOutputs`` on the job's own thread (an exception fails the job);
    on_process: called with True when a job process has started and False when its job
    has ended (the service gives up CPU threads to it meanwhile)."""

    def __init__(self, root: Path, process: TrainingProcessSettings, *, keep: int,
                 on_finished: Callable[[TrainingOutputs], Any] | None = None,
                 on_process: Callable[[bool], None] | None = None) -> None:
        self.root = Path(root)
        self.process = process
        self.keep = keep
        self.on_finished = on_finished
        self.on_process = on_process
        self._lock = threading.Condition()
        self._jobs: dict[str, TrainingJob] = {}
        self._ended: collections.deque[str] = collections.deque()
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._counters = collections.Counter(dict.fromkeys((s.value for s in ENDED_TRAINING), 0))
        self.root.mkdir(parents=True, exist_ok=True)
        left = [p for p in self.root.iterdir() if p.is_dir() and _unlocked(p)]
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        if left:
            log.info("training: removed %d job folder(s) left by an earlier run", len(left))

    # ---- requests ---------------------------------------------------------------------------
    def submit(self, structure: str, cases: Sequence[Case], options: TrainingOptions) -> TrainingJob:
        """Queue a job (409 while another is active or the service is closing) and start
        writing its folder and its process on a thread of its own."""
        with self._lock:
            self.check_idle()
            job = TrainingJob(structure=structure, cases=len(cases), options=options.to_json(),
                              device=self.process.device)
            job.folder = self.root / job.id
            self._jobs[job.id] = job
            thread = threading.Thread(target=self._run, args=(job, list(cases), options),
                                      name=f"desam-training-{job.id[:8]}", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            self._note(job, f"queued: {len(cases)} case(s) of {structure}")
        thread.start()
        log.info("training job %s queued: %d case(s)", job.id[:12], len(cases))
        return job

    def check_idle(self) -> None:
        """409 while a job is active (naming it) or the service is closing."""
        with self._lock:
            if self._closing:
                raise Conflict("the service is shutting down")
            for other in self._jobs.values():
                if other.state in ACTIVE_TRAINING:
                    raise Conflict(f"training job {other.id} is {other.state.value} on {other.device}: one training "
                                   "job per device at a time; wait for it or cancel it first")

    def get(self, job_id: str) -> TrainingJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"unknown training job {job_id[:32]!r} (ended jobs are forgotten after {self.keep} "
                           "newer ones)")
        return job

    def list(self) -> list[TrainingJob]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def status(self, job_id: str) -> dict:
        job = self.get(job_id)
        with self._lock:
            return job.status()

    def metrics(self, job_id: str) -> list[dict]:
        job = self.get(job_id)
        with self._lock:
            return list(job.history)

    def log_lines(self, job_id: str, lines: int) -> list[str]:
        job = self.get(job_id)
        with self._lock:
            return list(job.log)[-lines:] if lines > 0 else []

    def events_after(self, job_id: str, seq: int) -> tuple[list[tuple[int, dict]], dict | None]:
        """The job's kept events numbered above ``seq``, and its status once it has ended
        (None while it is active)."""
        job = self.get(job_id)
        with self._lock:
            new = [(n, event) for n, event in job.events if n > seq]
            return new, (job.status() if job.state in ENDED_TRAINING else None)

    def snapshot(self, job_id: str) -> tuple[int, dict]:
        """(the number of the job's last event, its status), taken together."""
        job = self.get(job_id)
        with self._lock:
            return job.seq, job.status()

    def cancel(self, job_id: str, reason: str = CANCELLED_ON_REQUEST) -> TrainingJob:
        """Ask the job to stop (idempotent: an ended job stays as it is, a second request
        keeps the first reason). A running process gets SIGTERM, and SIGKILL after
        ``cancel_grace_s``."""
        job = self.get(job_id)
        with self._lock:
            if job.state not in ACTIVE_TRAINING or job.cancel_requested.is_set():
                return job
            job.cancel_reason = reason
            job.cancel_requested.set()
            self._note(job, f"cancel requested ({reason})")
            process = job.process
        if process is not None:
            self._terminate(job, process)
        return job

    def active_count(self) -> int:
        with self._lock:
            return sum(j.state in ACTIVE_TRAINING for j in self._jobs.values())

    def stats(self) -> dict:
        with self._lock:
            states = collections.Counter(j.state for j in self._jobs.values())
            return {"queued": states[TrainingState.QUEUED], "running": states[TrainingState.RUNNING],
                    "kept": len(self._jobs), "ended_total": dict(self._counters)}

    def wait(self, job_id: str, timeout: float | None = None) -> TrainingJob:
        """Block until the job has ended (tests, command line)."""
        job = self.get(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while job.state in ACTIVE_TRAINING:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"training job {job_id[:12]} still {job.state.value} after {timeout} s")
                self._lock.wait(left)
        return job

    def close(self, timeout: float | None = 60.0) -> None:
        """Cancel the active jobs and wait for their processes (killed after the grace)."""
        with self._lock:
            self._closing = True
            active = [j for j in self._jobs.values() if j.state in ACTIVE_TRAINING]
            threads = list(self._threads)
        for job in active:
            self.cancel(job.id, SHUTTING_DOWN)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._lock:
            ended = [j for j in self._jobs.values() if j.state in ENDED_TRAINING]
        for job in ended:
            _remove_folder(job)

    # ---- the job's thread ----------------------------------------------------------------------
    def _note(self, job: TrainingJob, text: str) -> None:
        """A line of the service's own in the job's log (caller holds the lock)."""
        job.log.append(f"{time.strftime('%H:%M:%S')} service: {text}")

    def _publish(self, job: TrainingJob, event: dict) -> None:
        """Caller holds the lock."""
        job.seq += 1
        job.events.append((job.seq, event))
        self._lock.notify_all()

    def _terminate(self, job: TrainingJob, process: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)

        def kill_late() -> None:
            if process.poll() is None:
                with self._lock:
                    self._note(job, f"the job process did not stop within {self.process.cancel_grace_s:g} s: killed")
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

        timer = threading.Timer(self.process.cancel_grace_s, kill_late)
        timer.daemon = True
        timer.start()

    def _spec(self, job: TrainingJob, entries: list[dict]) -> JobSpec:
        p = self.process
        return JobSpec(job_id=job.id, structure=job.structure, encoder=p.encoder,
                       sam_checkpoint=None if p.sam_checkpoint is None else str(p.sam_checkpoint),
                       encoder_weights_sha256=p.encoder_weights_sha256, device=p.device,
                       encoder_precision=p.encoder_precision, features_dir=str(p.features_dir),
                       features_bytes=p.features_bytes, threads=p.threads, nice=p.nice, options=job.options,
                       cases=entries)

    def _run(self, job: TrainingJob, cases: list[Case], options: TrainingOptions) -> None:
        try:
            folder = job.folder
            folder.mkdir(parents=True)
            job.lock_fd = _lock(folder)
            write_spec(folder, self._spec(job, write_cases(folder, cases)))
            cases.clear()                                 # the arrays are on disk now
            self._start_process(job)
        except Exception as exc:  # noqa: BLE001 - the job fails, the service goes on
            self._end(job, TrainingState.FAILED, f"the job could not start: {exc.__class__.__name__}: {exc}")
            return
        if job.process is None:                       # cancelled while queued
            self._end(job, TrainingState.CANCELLED, job.cancel_reason)
            return
        self._follow(job)

    def _start_process(self, job: TrainingJob) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.process.threads),
               "MKL_NUM_THREADS": str(self.process.threads), "PYTHONUNBUFFERED": "1"}
        with self._lock:
            if job.cancel_requested.is_set():
                return
            # Own session: a Ctrl-C at the service's terminal reaches the service, which then
            # cancels the job, not the job process directly.
            job.process = subprocess.Popen(
                [sys.executable, "-m", "desam_server.training.job_process", str(job.folder)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=job.folder, env=env,
                start_new_session=True)
            job.state, job.started, job.phase = TrainingState.RUNNING, time.time(), "setup"
            self._note(job, f"job process started (pid {job.process.pid}, {self.process.threads} CPU thread(s))")
            self._publish(job, {"event": "status", **job.status()})
        log.info("training job %s running (pid %d)", job.id[:12], job.process.pid)
        if self.on_process is not None:
            self.on_process(True)

    def _follow(self, job: TrainingJob) -> None:
        process = job.process
        errors = threading.Thread(target=self._read_log, args=(job, process.stderr), daemon=True,
                                  name=f"desam-training-log-{job.id[:8]}")
        errors.start()
        for raw in process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                with self._lock:
                    job.log.append(raw.decode("utf-8", "replace").rstrip())
                continue
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                self._on_event(job, event)
        code = process.wait()
        errors.join(10)
        with contextlib.suppress(OSError):
            process.stdin.close()
        process.stdout.close()
        final = job.final_event
        if final is not None and final["event"] == "finished":
            self._install(job, final)
        elif (final is not None and final["event"] == "cancelled") or job.cancel_requested.is_set():
            reason = job.cancel_reason or (final or {}).get("reason") or CANCELLED_ON_REQUEST
            if final is None:
                reason += f" (the job process ended by {self._exit(code)})"
            self._end(job, TrainingState.CANCELLED, reason)
        elif final is not None:
            self._end(job, TrainingState.FAILED, final.get("reason") or "the job process reported a failure")
        else:
            self._end(job, TrainingState.FAILED, f"the job process ended without a result: {self._exit(code)}"
                      + (" (out of memory?)" if code == -signal.SIGKILL else "") + "; its log has the details")

    @staticmethod
    def _exit(code: int) -> str:
        return f"signal {_signal_name(-code)}" if code < 0 else f"exit status {code}"

    def _read_log(self, job: TrainingJob, stream) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                with self._lock:
                    job.log.append(line)
        stream.close()

    def _on_event(self, job: TrainingJob, event: dict) -> None:
        kind = event["event"]
        with self._lock:
            if kind in FINAL_EVENTS:
                job.final_event = event             # the service decides the job's ending (``_follow``)
                return
            if kind == "data":
                job.data = {k: v for k, v in event.items() if k != "event"}
            elif kind == "precompute":
                job.phase = "precompute"
                job.precompute = {"done": event.get("done"), "total": event.get("total")}
            elif kind == "start":
                job.phase, job.epochs, job.steps = "train", event.get("epochs"), event.get("steps_per_epoch")
            elif kind == "step":
                job.phase = "train"
                job.epoch, job.step, job.steps = event.get("epoch", job.epoch), event.get("step", 0), event.get("steps")
                job.loss, job.seconds_left = event.get("loss"), event.get("seconds_left")
            elif kind == "epoch":
                job.history.append({k: v for k, v in event.items() if k not in ("event", "best_epoch",
                                                                                  "best_validation_dice",
                                                                                  "seconds_left", "epochs")})
                job.epoch, job.loss = event.get("epoch", job.epoch), event.get("loss")
                job.validation_dice = event.get("validation_dice")
                job.best_epoch, job.best_validation_dice = event.get("best_epoch"), event.get("best_validation_dice")
                job.seconds_left = event.get("seconds_left")
            self._publish(job, event)

    def _install(self, job: TrainingJob, final: dict) -> None:
        output = job.folder / OUTPUT_DIR
        outputs = TrainingOutputs(job_id=job.id, structure=job.structure, best_path=output / "best.safetensors",
                                  last_path=output / "last.safetensors", curve_path=output / "curve.png",
                                  history_path=output / "history.json", best_epoch=int(final["best_epoch"]),
                                  best_validation_dice=final["best_validation_dice"])
        installed = None
        if self.on_finished is not None:
            try:
                installed = self.on_finished(outputs)
            except Exception as exc:  # noqa: BLE001 - the job fails, the service goes on
                log.warning("training job %s: its decoder could not be installed (%s)", job.id[:12],
                            exc.__class__.__name__)
                self._end(job, TrainingState.FAILED, "training finished but its decoder could not be installed: "
                          f"{getattr(exc, 'message', None) or f'{exc.__class__.__name__}: {exc}'}")
                return
        with self._lock:
            job.installed = installed
            job.best_epoch, job.best_validation_dice = outputs.best_epoch, outputs.best_validation_dice
        self._end(job, TrainingState.FINISHED, None)

    def _end(self, job: TrainingJob, state: TrainingState, reason: str | None) -> None:
        if job.folder is not None:
            shutil.rmtree(job.folder / CASES_DIR, ignore_errors=True)   # copies of volumes and labels
        with self._lock:
            job.state, job.reason, job.ended = state, reason, time.time()
            job.seconds_left = None if state is not TrainingState.FINISHED else 0.0
            self._counters[state.value] += 1
            self._note(job, f"{state.value}" + (f": {reason}" if reason else ""))
            self._publish(job, {"event": state.value, **job.status()})
            self._ended.append(job.id)
            doomed = []
            while len(self._ended) > self.keep:
                old = self._jobs.pop(self._ended.popleft(), None)
                if old is not None:
                    doomed.append(old)
        for old in doomed:
            _remove_folder(old)
        log.info("training job %s %s", job.id[:12], state.value)
        if job.process is not None and self.on_process is not None:
            self.on_process(False)
