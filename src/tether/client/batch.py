"""Measure many candidates on the pool: what an auto-tuner needs from it.

::

    from tether.client.batch import Candidate, MeasureSettings, measure_candidates

    results = measure_candidates(("127.0.0.1", 9190), "rasp4", [Candidate("c0.so", options=...), ...],
                                 MeasureSettings(number=3, repeat=1, timeout=10), devices=2)
    for r in results:
        print(r.name, r.median if r.ok else r.error)

``devices`` threads each lease one device from the tracker and keep it for as many candidates as they can
take from one shared queue (no session per candidate). A candidate's file goes to the device once: it is
named by its sha256 in the session, and the server's content-addressed cache keeps it for later sessions
(:meth:`Session.upload_cached`). Each candidate ends exactly once, measured or with a typed
:class:`CandidateError`:

=============== ==========================================================================================
``load``        the backend could not load it (:class:`ModelLoadError`)
``run``         it raised while running (:class:`ModelRunError`, bad inputs)
``timeout``     uploading, loading, checking and measuring it took longer than ``MeasureSettings.timeout``: the device
                ended that session's worker (:class:`RunTimeout`); the thread leases a device again
``wrong_answer`` its outputs differ from the candidate's ``expected`` ones beyond ``rtol``/``atol``
``no_device``   no device of the key (and labels) was granted within ``queue_timeout``
``lost``        the session broke under it (a server died, a connection reset) more than ``retries`` times
=============== ==========================================================================================

Only transport failures (:class:`TransportError`: a lost session, a refused or failed connection) are
retried, on whichever device is free next; everything else would only say the same thing again.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..aio.tls import TLSLike
from ..errors import (
    ConnectionClosed,
    ModelLoadError,
    ProtocolError,
    RemoteError,
    RunTimeout,
    SessionTimeout,
    TetherError,
    TLSError,
    TrackerError,
    TransportError,
)
from .api import Tracker, connect_tracker
from .session import Session, file_digest

__all__ = [
    "Candidate",
    "CandidateError",
    "ERROR_KINDS",
    "MeasureSettings",
    "Measurement",
    "compare_outputs",
    "device_name",
    "measure_candidates",
    "submit_candidates",
]

logger = logging.getLogger(__name__)

ERROR_KINDS = ("load", "run", "timeout", "wrong_answer", "no_device", "lost")


@dataclass(frozen=True)
class Candidate:
    """One artifact to measure: a file path or its bytes (then give ``suffix``, e.g. ``".so"``).

    ``backend``/``options`` are what :meth:`Session.load_model` takes (tvm: ``function``, ``inputs``,
    ``outputs``); ``inputs`` are sent once and kept on the device, others are generated there with the
    settings' ``fill``; ``expected`` outputs by name turn a mismatch into ``wrong_answer``."""

    artifact: str | os.PathLike[str] | bytes
    name: str = ""
    backend: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    inputs: Mapping[str, Any] | None = None
    expected: Mapping[str, Any] | None = None
    suffix: str = ""

    def label(self, index: int) -> str:
        if self.name:
            return self.name
        return f"#{index}" if isinstance(self.artifact, bytes) else Path(self.artifact).name

    def remote_suffix(self) -> str:
        if self.suffix or isinstance(self.artifact, bytes):
            return self.suffix
        return Path(self.artifact).suffix


@dataclass(frozen=True)
class MeasureSettings:
    """TVM's evaluator knobs, and the batch's limits (seconds)."""

    number: int = 3
    repeat: int = 1
    min_repeat_ms: float = 0.0
    warmup: int = 1
    cooldown_ms: float = 0.0
    #: evict the CPU caches before each repeat (meta_schedule's ``enable_cpu_cache_flush``)
    flush_cache: bool = False
    fill: str = "random"
    seed: int | None = 0
    #: times the measurement is done, each on freshly filled inputs (meta_schedule's ``alloc_repeat``):
    #: ``repeat`` samples each, all returned
    input_sets: int = 1
    rtol: float = 1e-4
    atol: float = 1e-5
    #: one candidate's upload, load, check and measurement together (None or 0: no limit); past it the
    #: device ends the running request and its worker (:class:`RunTimeout`)
    timeout: float | None = 60.0
    #: seconds any one send or receive may go without progress before the session counts as lost (a
    #: device that froze); requests with a time limit wait that limit plus a grace instead
    io_timeout: float | None = 60.0
    #: how long a thread waits for a device; past it the thread ends (the last one: ``no_device``)
    queue_timeout: float | None = 60.0
    #: transport failures a candidate may meet before it ends ``lost``
    retries: int = 2
    #: each lease's own session timeout (0: none)
    session_timeout: float = 0.0
    priority: float = 1
    user: str = ""


@dataclass(frozen=True)
class CandidateError:
    """Why a candidate has no measurement: ``kind`` is one of :data:`ERROR_KINDS`; ``type`` the error's class."""

    kind: str
    type: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.type}: {self.message}"


@dataclass
class Measurement:
    """One candidate's outcome: ``samples`` (seconds per run, one per repeat) or ``error``."""

    index: int
    name: str
    samples: list[float] = field(default_factory=list)
    number: int = 0
    load_s: float | None = None
    device: str = ""
    attempts: int = 0
    #: bytes sent for its artifact (0: the session or the server's cache already held it)
    sent_bytes: int = 0
    error: CandidateError | None = None
    #: seconds the device it ran on was waited for in the tracker's queue (counted on the first candidate
    #: measured in each lease, 0 on the others: the sum over a batch is its queue time)
    waited_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "samples_s": self.samples,
            "number": self.number,
            "load_s": self.load_s,
            "device": self.device,
            "attempts": self.attempts,
            "sent_bytes": self.sent_bytes,
            "waited_s": self.waited_s,
            "error": None if self.error is None else {"kind": self.error.kind, **_error_fields(self.error)},
        }


def _error_fields(error: CandidateError) -> dict[str, str]:
    return {"type": error.type, "message": error.message}


def device_name(address: str, labels: Mapping[str, str]) -> str:
    """How results name a device: its address, and its labels when it has any (``host:port [soc=a]``)."""
    if not labels:
        return address
    return f"{address} [" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "]"


def compare_outputs(outputs: Mapping[str, Any], expected: Mapping[str, Any], rtol: float, atol: float) -> str | None:
    """Why ``outputs`` are wrong, or None when each expected output matches within the tolerances."""
    import numpy as np

    for name, value in expected.items():
        if name not in outputs:
            return f"output {name!r} missing (device gave {sorted(outputs)})"
        got, want = np.asarray(outputs[name]), np.asarray(value)
        if got.shape != want.shape:
            return f"output {name!r}: shape {got.shape}, expected {want.shape}"
        if not np.allclose(got, want, rtol=rtol, atol=atol):
            diff = float(np.max(np.abs(got.astype("float64") - want.astype("float64"))))
            return f"output {name!r}: max |diff| {diff:.3g} beyond rtol {rtol:g}, atol {atol:g}"
    return None


class _Failed(Exception):
    """A candidate's final, typed failure (not retried)."""

    def __init__(self, kind: str, exc: BaseException | str, type_name: str = "") -> None:
        message = exc if isinstance(exc, str) else (exc.remote_message if isinstance(exc, RemoteError) else str(exc))
        super().__init__(message)
        name = type_name or (exc.remote_type if isinstance(exc, RemoteError) else type(exc).__name__)
        self.error = CandidateError(kind, name, message)


class _Lease:
    """One device held by one thread: its tracker connection, session, and what the session holds."""

    def __init__(self, tracker: Tracker, session: Session) -> None:
        self.tracker = tracker
        self.session = session
        info = session.info()
        self.max_payload: int | None = info.get("max_payload")
        self.device = device_name(session.address, info.get("labels") or {})
        self.files: dict[str, str] = {}  # sha256 -> name in the workspace
        self.waited_s = 0.0  # in the tracker's queue for it; handed to the first candidate measured


class _Batch:
    def __init__(
        self,
        tracker: tuple[str, int],
        key: str,
        candidates: Sequence[Candidate],
        settings: MeasureSettings,
        *,
        devices: int,
        labels: Mapping[str, str] | None,
        on_result: Callable[[Measurement], None] | None,
        tls: TLSLike | None = None,
    ) -> None:
        self.tls = tls
        self.host, self.port = tracker
        self.key = key
        self.candidates = list(candidates)
        self.settings = settings
        self.labels = dict(labels or {})
        self.on_result = on_result
        self.futures: list[concurrent.futures.Future[Measurement]] = [
            concurrent.futures.Future() for _ in self.candidates
        ]
        self.attempts = [0] * len(self.candidates)
        self.digests: list[str | None] = [None] * len(self.candidates)
        self.queue: deque[int] = deque(range(len(self.candidates)))
        self.lock = threading.Lock()
        self.left = len(self.candidates)
        self.alive = min(devices, len(self.candidates))
        self.waiting: set[Tracker] = set()
        self.threads = [
            threading.Thread(target=self._worker, name=f"tether-batch-{i}", daemon=True) for i in range(self.alive)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    # -- bookkeeping ---------------------------------------------------------------------------

    def _take(self) -> int | None:
        with self.lock:
            return self.queue.popleft() if self.queue else None

    def _finish(self, index: int, result: Measurement, attempts: int | None = None) -> None:
        result.attempts = self.attempts[index] + 1 if attempts is None else attempts
        with self.lock:
            self.left -= 1
            everything_done = self.left == 0
            waiting = list(self.waiting) if everything_done else []
        for tracker in waiting:  # threads still waiting for a device: nothing is left for them
            tracker.interrupt()
        if self.on_result is not None:
            try:
                self.on_result(result)
            except Exception:
                logger.exception("on_result failed for candidate %d", index)
        self.futures[index].set_result(result)

    def _retry_or_lose(self, index: int, exc: BaseException, device: str) -> None:
        """A transport failure under ``index``: back to the front of the queue, or ``lost``."""
        self.attempts[index] += 1
        failures = self.attempts[index]
        if failures > self.settings.retries:
            error = CandidateError("lost", type(exc).__name__, f"{exc} ({failures} sessions lost under it)")
            result = Measurement(index, self.candidates[index].label(index), device=device, error=error)
            self._finish(index, result, attempts=failures)
            return
        logger.info("candidate %d: %s on %s; retrying", index, exc, device)
        with self.lock:
            self.queue.appendleft(index)

    def _thread_done(self, why: BaseException | None) -> None:
        """A thread leaves; the last one out ends what is still queued with ``no_device``."""
        with self.lock:
            self.alive -= 1
            orphans = list(self.queue) if self.alive == 0 else []
            if orphans:
                self.queue.clear()
        for index in orphans:
            name = type(why).__name__ if why is not None else "RequestTimeout"
            message = str(why) if why is not None else "no device left to measure it"
            error = CandidateError("no_device", name, message)
            self._finish(index, Measurement(index, self.candidates[index].label(index), error=error))

    # -- one thread ----------------------------------------------------------------------------

    def _lease(self, tracker: Tracker | None) -> _Lease:
        """A session on a free device of the key; raises TrackerError (no device) or TransportError."""
        s = self.settings
        if tracker is None or tracker.client.closed:
            tracker = connect_tracker(self.host, self.port, tls=self.tls)
        with self.lock:
            self.waiting.add(tracker)
            finished = self.left == 0
        asked = time.monotonic()
        try:
            if finished:
                raise ConnectionClosed("the batch is finished")
            session = tracker.request(
                self.key,
                priority=s.priority,
                session_timeout=s.session_timeout,
                timeout=s.queue_timeout,
                labels=self.labels or None,
                user=s.user,
            )
        except BaseException:
            tracker.close()
            raise
        finally:
            with self.lock:
                self.waiting.discard(tracker)
        session.io_timeout = s.io_timeout
        try:
            lease = _Lease(tracker, session)
        except BaseException:
            session.close()
            tracker.close()
            raise
        lease.waited_s = time.monotonic() - asked
        return lease

    def _worker(self) -> None:
        lease: _Lease | None = None
        why: BaseException | None = None
        lease_failures = 0
        try:
            while True:
                with self.lock:
                    if not self.queue:
                        return
                if lease is None or lease.session.closed:
                    tracker = lease.tracker if lease is not None else None
                    lease = None
                    try:
                        lease = self._lease(tracker)
                        lease_failures = 0
                    except TrackerError as exc:  # no device in time: this thread is done
                        why = exc
                        return
                    except TLSError as exc:  # a configuration to fix: no device will do better
                        why = exc
                        return
                    except TransportError as exc:  # a granted server that is gone, the tracker restarting
                        with self.lock:
                            if self.left == 0:
                                return
                        lease_failures += 1
                        if lease_failures > max(self.settings.retries, 3):
                            why = exc
                            return
                        time.sleep(min(0.1 * 2**lease_failures, 2.0))  # back off before asking again
                        continue
                index = self._take()
                if index is None:
                    return
                try:
                    result = self._measure(lease, index)
                except _Failed as failed:
                    self._finish(index, Measurement(index, self.candidates[index].label(index), device=lease.device,
                                                    error=failed.error))  # fmt: skip
                except (TransportError, SessionTimeout) as exc:
                    lease.session.close()
                    self._retry_or_lose(index, exc, lease.device)
                except BaseException as exc:  # a bug on this side: the candidate must still end
                    lease.session.close()
                    logger.exception("candidate %d failed on this side", index)
                    error = _Failed("run", exc).error
                    self._finish(index, Measurement(index, self.candidates[index].label(index), error=error))
                else:
                    result.waited_s, lease.waited_s = lease.waited_s, 0.0
                    self._finish(index, result)
        finally:
            if lease is not None:
                lease.session.close()
                lease.tracker.close()
            self._thread_done(why)

    def _digest(self, index: int) -> str:
        digest = self.digests[index]
        if digest is None:
            digest = self.digests[index] = file_digest(self.candidates[index].artifact)
        return digest

    def _timed_out(self, exc: RunTimeout) -> _Failed:
        message = f"the candidate outlived its {self.settings.timeout or 0:g} s time limit: {exc.remote_message}"
        return _Failed("timeout", message, "RunTimeout")

    def _measure(self, lease: _Lease, index: int) -> Measurement:
        c, s, sess = self.candidates[index], self.settings, lease.session
        result = Measurement(index, c.label(index), device=lease.device)
        deadline = time.monotonic() + s.timeout if s.timeout else None

        def left() -> float | None:
            return None if deadline is None else max(deadline - time.monotonic(), 0.001)

        try:
            digest = self._digest(index)
        except OSError as exc:
            raise _Failed("load", exc) from None
        remote = lease.files.get(digest)
        if remote is None:
            remote = f"cas/{digest}{c.remote_suffix()}"
            try:
                size = len(c.artifact) if isinstance(c.artifact, bytes) else os.path.getsize(c.artifact)
                if lease.max_payload is not None and size + 4096 > lease.max_payload:
                    why = f"the artifact's {size} bytes exceed the server's payload limit ({lease.max_payload})"
                    raise _Failed("load", why, "PayloadTooLarge")
                if sess.upload_cached(c.artifact, remote, digest):
                    result.sent_bytes = size
            except SessionTimeout:
                raise
            except (RemoteError, ProtocolError, OSError) as exc:  # a full disk there, a file gone here
                raise _Failed("load", exc) from None
            lease.files[digest] = remote
        try:
            model = sess.load_model(remote, c.backend, timeout=left(), **dict(c.options))
        except ModelLoadError as exc:
            raise _Failed("load", exc) from None
        except RunTimeout as exc:
            raise self._timed_out(exc) from None
        except SessionTimeout:
            raise  # the lease's own time ran out: not the candidate's doing
        except RemoteError as exc:
            raise _Failed("load", exc) from None
        result.load_s = model.load_s
        kept = {}
        try:
            kept = {name: sess.tensor(value) for name, value in (c.inputs or {}).items()}
            if c.expected is not None:
                outputs = model.run(kept, fill=s.fill, seed=s.seed, timeout=left())
                wrong = compare_outputs(outputs, c.expected, s.rtol, s.atol)
                if wrong is not None:
                    raise _Failed("wrong_answer", wrong, "WrongAnswer")
            for round_ in range(max(s.input_sets, 1)):
                timing = model.benchmark(
                    kept,
                    number=s.number,
                    repeat=s.repeat,
                    min_repeat_ms=s.min_repeat_ms,
                    cooldown_ms=s.cooldown_ms,
                    warmup=s.warmup,
                    fill=s.fill,
                    seed=None if s.seed is None else s.seed + round_,
                    flush_cache=s.flush_cache,
                    timeout=left(),
                )
                result.samples.extend(timing.samples)
                result.number = timing.number
        except RunTimeout as exc:
            raise self._timed_out(exc) from None
        except (TypeError, ValueError) as exc:  # inputs that cannot travel
            raise _Failed("run", exc) from None
        except RemoteError as exc:
            if isinstance(exc, SessionTimeout):
                raise
            raise _Failed("run", exc) from None
        finally:
            if not sess.closed:
                try:
                    for tensor in kept.values():
                        tensor.free()
                    model.close()
                except TetherError:  # cleanup never changes the outcome; a broken session is re-leased
                    pass
        return result


def submit_candidates(
    tracker: tuple[str, int],
    key: str,
    candidates: Sequence[Candidate],
    settings: MeasureSettings | None = None,
    *,
    devices: int = 1,
    labels: Mapping[str, str] | None = None,
    on_result: Callable[[Measurement], None] | None = None,
    tls: TLSLike | None = None,
) -> list[concurrent.futures.Future[Measurement]]:
    """Start measuring in the background; one future per candidate, in order, each set as it ends. ``tls``:
    TLS to the tracker and the devices (:func:`~tether.client.api.connect_tracker`)."""
    if devices < 1:
        raise ValueError("devices must be at least 1")
    batch = _Batch(
        tracker,
        key,
        candidates,
        settings or MeasureSettings(),
        devices=devices,
        labels=labels,
        on_result=on_result,
        tls=tls,
    )
    batch.start()
    return batch.futures


def measure_candidates(
    tracker: tuple[str, int],
    key: str,
    candidates: Sequence[Candidate],
    settings: MeasureSettings | None = None,
    *,
    devices: int = 1,
    labels: Mapping[str, str] | None = None,
    on_result: Callable[[Measurement], None] | None = None,
    tls: TLSLike | None = None,
) -> list[Measurement]:
    """Measure every candidate on up to ``devices`` devices of ``key`` at once; results in order."""
    futures = submit_candidates(
        tracker, key, candidates, settings, devices=devices, labels=labels, on_result=on_result, tls=tls
    )
    return [f.result() for f in futures]
