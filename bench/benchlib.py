"""What the benches share: their servers' processes, CPU pinning, percentiles and the report's JSON.

Standard library and psutil only; psutil is imported where it is used, so that a process that only serves
(``proxy_bench.py --serve-asyncio-relay``, whose memory is measured) does not load it. The benches run as
``python bench/<name>.py``, which puts this folder on ``sys.path``: ``import benchlib``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

RESULTS = Path(__file__).resolve().parent / "results"

_LISTENING = re.compile(r"(?:listening on|bind to) \S*:(\d+)")


# -- server processes ----------------------------------------------------------------------------


@dataclass(eq=False)
class Proc:
    """One server process (a proxy, a tracker, a device server); ``log`` keeps its last lines of output."""

    name: str
    proc: subprocess.Popen[str]
    port: int
    log: collections.deque[str]

    @property
    def pid(self) -> int:
        return self.proc.pid


def _drain(proc: subprocess.Popen[str], log: collections.deque[str], port: list[int], found: threading.Event) -> None:
    """Read a server's output for as long as it runs (a full pipe would block it); note its port."""
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line.rstrip())
        match = _LISTENING.search(line)
        if match and not found.is_set():
            port.append(int(match.group(1)))
            found.set()
    found.set()  # it exited


def stop_group(proc: subprocess.Popen[Any]) -> None:
    """Stop a process started in its own session: its process group and every descendant, by pid (TVM's
    PopenWorker too); SIGTERM, then SIGKILL."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # its own session: the group id is its pid
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
        _, descendants = psutil.wait_procs(descendants, timeout=3)
        if proc.poll() is not None and not descendants:
            return


def start_server(
    name: str,
    argv: list[str],
    timeout: float = 60,
    *,
    new_session: bool = True,
    stdin: int = subprocess.DEVNULL,
    stop: Callable[[subprocess.Popen[str]], None] = stop_group,
    log_sep: str = " | ",
    env: dict[str, str] | None = None,
) -> Proc:
    """Start a server (by default in a new session, stdin from /dev/null), its output drained by a thread;
    its port is read from its first ``listening on``/``bind to`` line. If none comes within ``timeout`` s,
    ``stop`` stops it and the error quotes its last lines, joined by ``log_sep``."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=stdin,
        text=True,
        cwd=tempfile.gettempdir(),
        start_new_session=new_session,
        env=env,
    )
    log: collections.deque[str] = collections.deque(maxlen=50)
    port: list[int] = []
    found = threading.Event()
    threading.Thread(target=_drain, args=(proc, log, port, found), daemon=True).start()
    if not found.wait(timeout) or not port:
        stop(proc)
        raise RuntimeError(f"{name} did not start within {timeout} s (exit code {proc.poll()}): " + log_sep.join(log))
    return Proc(name, proc, port[0], log)


@contextlib.contextmanager
def running(
    name: str, argv: list[str], *, stop: Callable[[subprocess.Popen[str]], None] = stop_group, **options: Any
) -> Iterator[Proc]:
    """``start_server(name, argv, stop=stop, **options)`` for the block; ``stop`` stops it after."""
    server = start_server(name, argv, stop=stop, **options)
    try:
        yield server
    finally:
        stop(server.proc)


def retry(call: Callable[[], T], timeout: float, errors: type[Exception] | tuple[type[Exception], ...]) -> T:
    """``call()``, again every 50 ms while it raises ``errors``, until it returns; after ``timeout`` s, its
    error (TVM's servers log their port before they listen)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except errors:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- CPUs and statistics -------------------------------------------------------------------------


@contextlib.contextmanager
def pinned(pids: list[int], cpu: int | None) -> Iterator[None]:
    """Every thread of these processes and their descendants on one CPU for the block, then as before
    (None: as they are).

    The client and its servers on one CPU: a round trip is their CPU work plus the context switches. Apart,
    it also pays waking idle CPUs, which in a VM can be a hypervisor exit of tens of microseconds, or not,
    depending on where the scheduler put them: bimodal, and noisy on a shared machine."""
    import psutil

    saved: list[tuple[int, set[int]]] = []
    if cpu is not None:
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                procs += [proc, *proc.children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                for thread in proc.threads():
                    with contextlib.suppress(OSError):
                        saved.append((thread.id, os.sched_getaffinity(thread.id)))
                        os.sched_setaffinity(thread.id, {cpu})
    try:
        yield
    finally:
        for tid, cpus in saved:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def pct(samples: list[float], p: float) -> float:
    """The ``p``-th percentile, interpolated between the closest ranks."""
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# -- the report ----------------------------------------------------------------------------------


def machine_info(**versions: str) -> dict[str, Any]:
    """The machine and Python, then ``versions`` (the packages a bench compares), in that order."""
    import psutil

    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "memory_gib": psutil.virtual_memory().total / (1 << 30),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def timed_run(run: Callable[[argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """``run(args)``'s report, with the seconds it took as ``total_s``."""
    started = time.perf_counter()
    report = run(args)
    report["total_s"] = time.perf_counter() - started
    return report


def write_report(report: dict[str, Any], path: Path | None, prefix: str) -> None:
    """Every number as JSON to ``path``, or to bench/results/<prefix>-<timestamp>.json."""
    path = path or RESULTS / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path} ({report['total_s']:.0f} s)")
