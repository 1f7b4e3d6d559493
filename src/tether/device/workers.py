"""Session worker processes, seen from the server: start them, know when they are ready, when they exit.

Two ways to start one:

- **fork** (default where the OS has it): a *zygote* process imports the runtimes once (numpy,
  onnxruntime, tvm: a second or more), then forks a worker per request in milliseconds. Each worker
  starts its own session, so killing its process group kills whatever the session started. The zygote
  reports exits the moment SIGCHLD arrives. A zygote that dies is started again.
- **spawn** (``--no-fork``, like TVM's flag): a fresh interpreter per worker, which imports the runtimes
  itself.

Both run :mod:`tether.device.worker` with the server's own interpreter flags and ``sys.path`` (a zipapp
under ``python -S -I`` finds tether only through it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from ..errors import TetherError

__all__ = ["Worker", "WorkerPool", "describe_exit"]

logger = logging.getLogger("tether.server")

_READY_TIMEOUT_S = 120.0


@dataclass(eq=False)
class Worker:
    """One worker process; ``control`` carries its ``ready`` line and then its one job."""

    pid: int
    control: socket.socket
    proc: subprocess.Popen[bytes] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    exited: threading.Event = field(default_factory=threading.Event)
    code: int | None = None

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if it is still running after ``timeout`` seconds."""
        if self.proc is not None:
            try:
                self.code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
            self.exited.set()
            return self.code
        return self.code if self.exited.wait(timeout) else None

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return not self.exited.is_set()

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (it leads its own session)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


class WorkerPool:
    """Starts workers for one server and keeps track of every one until it is reaped."""

    def __init__(self, preload: list[str], cwd: str, fork: bool = True) -> None:
        self.preload = preload
        self.cwd = cwd
        self.fork = fork and hasattr(os, "fork") and hasattr(socket, "send_fds")
        self._lock = threading.Lock()
        self._fork_lock = threading.Lock()
        self._workers: dict[int, Worker] = {}
        self._stopping = False
        self._zygote: subprocess.Popen[bytes] | None = None
        self._zygote_control: socket.socket | None = None
        self._forked: queue.Queue[int] = queue.Queue()

    # -- processes -----------------------------------------------------------------------------

    def _command(self, control_fd: int, zygote: bool) -> list[str]:
        flags = [
            f
            for f, on in (("-S", sys.flags.no_site), ("-I", sys.flags.isolated), ("-E", sys.flags.ignore_environment))
            if on
        ]
        boot = (
            "import sys, json; sys.path[:0] = [p for p in json.loads(sys.argv[1]) if p not in sys.path];"
            "from tether.device.worker import main; sys.exit(main(sys.argv[2:]))"
        )
        cwd = os.getcwd()
        paths = [p for p in sys.path if p and p != cwd]  # not the server's working directory (``-m``'s entry)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        return [
            sys.executable,
            *flags,
            "-c",
            boot,
            json.dumps(paths),
            "--control-fd",
            str(control_fd),
            "--preload",
            ",".join(self.preload),
            "--log-level",
            level if isinstance(level, str) else "INFO",
            *(["--zygote"] if zygote else []),
        ]

    def _spawn(self, zygote: bool) -> tuple[subprocess.Popen[bytes], socket.socket]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                self._command(child.fileno(), zygote),
                pass_fds=(child.fileno(),),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        return proc, parent

    def _ensure_zygote(self) -> socket.socket:
        """The zygote's control socket, starting the zygote (and waiting for its imports) if needed."""
        if self._zygote is not None and self._zygote.poll() is None and self._zygote_control is not None:
            return self._zygote_control
        if self._zygote is not None:
            logger.warning("the worker zygote exited (code %s); starting another", self._zygote.poll())
            self._close_zygote()
        proc, control = self._spawn(zygote=True)
        control.settimeout(_READY_TIMEOUT_S)
        try:
            line = _read_line(control)
        except OSError:
            line = b""
        if not line:
            proc.kill()
            proc.wait()
            control.close()
            raise TetherError("the worker zygote did not start")
        control.settimeout(None)
        self._zygote, self._zygote_control = proc, control
        self._forked = queue.Queue()
        threading.Thread(
            target=self._read_zygote, args=(control, self._forked), daemon=True, name="tether-zygote"
        ).start()
        return control

    def _read_zygote(self, control: socket.socket, forked: queue.Queue[int]) -> None:
        buf = b""
        while True:
            try:
                data = control.recv(65536)
            except OSError:
                data = b""
            if not data:
                forked.put(-1)  # wakes a fork() waiting on a zygote that died
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "forked" in message:
                    forked.put(int(message["forked"]))
                elif "exit" in message:
                    with self._lock:
                        worker = self._workers.get(int(message["exit"]))
                    if worker is not None:
                        worker.code = int(message["code"])
                        worker.exited.set()

    def _close_zygote(self) -> None:
        if self._zygote_control is not None:
            self._zygote_control.close()
            self._zygote_control = None
        if self._zygote is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._zygote.pid, signal.SIGKILL)
            self._zygote.wait()
            self._zygote = None

    def _stopped(self) -> bool:
        with self._lock:
            return self._stopping

    def start(self) -> Worker:
        """A new worker; :attr:`Worker.ready` is set once it waits for its job."""
        with self._lock:
            if self._stopping:
                raise TetherError("the server is stopping")
        if self.fork:
            worker = self._fork()
        else:
            proc, control = self._spawn(zygote=False)
            worker = Worker(proc.pid, control, proc)
            with self._lock:
                self._workers[worker.pid] = worker
        if self._stopped():  # stop() may have taken its list of workers while this one started
            worker.kill()
            self.reap(worker)
            raise TetherError("the server is stopping")
        threading.Thread(target=_await_ready, args=(worker,), daemon=True, name="tether-worker-ready").start()
        return worker

    def _fork(self) -> Worker:
        with self._fork_lock:
            control = self._ensure_zygote()
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                socket.send_fds(control, [b'{"fork": true}'], [child.fileno()])
            except OSError as exc:
                parent.close()
                raise TetherError(f"the worker zygote is gone: {exc}") from exc
            finally:
                child.close()
            try:
                pid = self._forked.get(timeout=30)
            except queue.Empty:
                pid = -1
            if pid < 0:
                parent.close()
                raise TetherError("the worker zygote did not fork")
            worker = Worker(pid, parent)
            with self._lock:
                self._workers[pid] = worker
            return worker

    def reap(self, worker: Worker) -> int | None:
        """Wait (up to 5 s) for a worker that was killed or has exited; forget it."""
        code = worker.wait(5)
        worker.control.close()
        with self._lock:
            self._workers.pop(worker.pid, None)
        return code

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            workers = list(self._workers.values())
        for worker in workers:
            worker.kill()
        for worker in workers:
            self.reap(worker)
        with self._fork_lock:
            self._close_zygote()


def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        data = sock.recv(4096)
        if not data:
            return b""
        line += data
    return line


def _await_ready(worker: Worker) -> None:
    try:
        worker.control.settimeout(_READY_TIMEOUT_S)
        line = _read_line(worker.control)
        if line and json.loads(line.split(b"\n", 1)[0]).get("ready"):
            worker.ready.set()
    except (OSError, ValueError):
        pass


def describe_exit(code: int) -> str | None:
    """Why a worker ended, when that is news to the client (None for a normal end or a timeout exit)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the session's worker process was killed by {name}"
    if code not in (0, 124):
        return f"the session's worker process exited with code {code}"
    return None
