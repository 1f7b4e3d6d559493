"""What a tuning run has done so far: tasks, trials, best latency per task, devices, queue wait, failures
by kind, time left. Fed by a meta_schedule measure callback (every measured batch) and by the runner (each
candidate's device and queue wait); read as one line of text per batch or as a dict for the report."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

from ..client.batch import ERROR_KINDS, Measurement

__all__ = ["ProgressCallback", "TaskState", "TuneProgress", "failure_kind"]

logger = logging.getLogger(__name__)


def failure_kind(error: str) -> str:
    """A runner's error message as one word: TetherRunner's kinds (load, run, timeout, lost, no_device,
    wrong_answer), else ``timeout`` or ``run`` from RPCRunner's text."""
    if error.startswith("TetherRunner: "):
        word = error[len("TetherRunner: ") :].split(":", 1)[0]
        if word in ERROR_KINDS:
            return word
    lowered = error.lower()
    if "timeout" in lowered or "timed out" in lowered:
        return "timeout"
    if "connect" in lowered or "tracker" in lowered:
        return "no_device"
    return "run"


def _short(message: str, limit: int = 600) -> str:
    """A long message (a worker's traceback) as its first line and its end, where the error is."""
    if len(message) <= limit:
        return message
    first = message.splitlines()[0][:120]
    return f"{first} ... {message[-(limit - len(first) - 5) :]}"


@dataclass
class TaskState:
    name: str
    trials: int = 0
    best_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trials": self.trials,
            "best_ms": None if self.best_s is None else self.best_s * 1e3,
        }


@dataclass
class TuneProgress:
    """Counters of one run; thread-safe. ``trials`` is what this run was asked to measure."""

    trials: int
    on_line: Callable[[str], None] | None = None
    status: Callable[[], str] | None = None
    clock: Callable[[], float] = time.monotonic
    tasks: list[TaskState] = field(default_factory=list)
    done: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    #: the last message of each kind of failure (its first line and its end when long)
    last_errors: dict[str, str] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)
    waited_s: float = 0.0
    started: float = 0.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.started = self.clock()

    def measured(self, m: Measurement) -> None:
        """TetherRunner's hook: one candidate's device and queue wait."""
        with self._lock:
            if m.device:
                self.devices.add(m.device)
            self.waited_s += m.waited_s

    def batch(self, task_id: int, name: str, build_errors: list[str | None], runs: list[Any]) -> None:
        """One measured batch of ``task_id``: build errors (None: built) and runner results."""
        with self._lock:
            while len(self.tasks) <= task_id:
                self.tasks.append(TaskState(f"task {len(self.tasks)}"))
            task = self.tasks[task_id]
            task.name = name or task.name
            task.trials += len(runs)
            self.done += len(runs)
            for build_error, result in zip(build_errors, runs, strict=False):
                if build_error is not None:
                    self.failures["build"] = self.failures.get("build", 0) + 1
                    self.last_errors["build"] = _short(build_error)
                    continue
                if result.error_msg is not None:
                    kind = failure_kind(str(result.error_msg))
                    self.failures[kind] = self.failures.get(kind, 0) + 1
                    self.last_errors[kind] = _short(str(result.error_msg))
                    continue
                secs = [float(s) for s in result.run_secs]
                if secs:
                    mean = sum(secs) / len(secs)
                    if task.best_s is None or mean < task.best_s:
                        task.best_s = mean
            line = self._line(task)
        if self.on_line is not None:
            self.on_line(line)

    def left_s(self) -> float | None:
        if self.done == 0:
            return None
        spent = self.clock() - self.started
        return spent / self.done * max(0, self.trials - self.done)

    def _line(self, task: TaskState) -> str:
        best = "-" if task.best_s is None else f"{task.best_s * 1e3:.4g} ms"
        left = self.left_s()
        parts = [
            f"trials {self.done}/{self.trials}",
            f"{task.name} ({task.trials} trials, best {best})",
            f"devices {len(self.devices)}" if self.devices else "",
            f"queue wait {self.waited_s:.1f} s" if self.devices else "",
            "failures " + ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items())) if self.failures else "",
            f"~{left:.0f} s left" if left is not None else "",
        ]
        if self.status is not None:
            try:
                parts.append(self.status())
            except Exception as exc:  # a progress line never stops the run
                parts.append(f"(tracker: {type(exc).__name__})")
        return "tune: " + " | ".join(p for p in parts if p)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "trials_done": self.done,
                "tasks": [t.to_dict() for t in self.tasks],
                "failures": dict(self.failures),
                "last_errors": dict(self.last_errors),
                "devices": sorted(self.devices),
                "queue_wait_s": self.waited_s,
            }


@derived_object
class ProgressCallback(PyMeasureCallback):  # type: ignore[misc]
    """A measure callback that hands every batch to a :class:`TuneProgress`."""

    def __init__(self, progress: TuneProgress) -> None:
        super().__init__()
        self.progress = progress

    def apply(
        self, task_scheduler: Any, task_id: int, measure_candidates: Any, builder_results: Any, runner_results: Any
    ) -> None:
        try:
            name = str(task_scheduler.tasks_[task_id].ctx.task_name)
            errors = [None if b.error_msg is None else str(b.error_msg) for b in builder_results]
            self.progress.batch(task_id, name, errors, list(runner_results))
        except Exception:  # never let the progress stop the tuning
            logger.exception("tune progress")
