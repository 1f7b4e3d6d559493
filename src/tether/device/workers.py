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

    def __init__(self, preload: list[str], cwd: str, fork: bool = True, keep_fds: tuple[int, ...] = ()) -> None:
        self.preload = preload
        self.cwd = cwd
        #: Descriptors every worker process inherits (the server's run-directory lock).
        self.keep_fds = keep_fds
        self.fork = fork and hasattr(os, "fork") and hasattr(socket, "send_fds")
        self._lock = threading.Lock()
        self._fork_lock = threading.Lock()
        self._workers: dict[int, Worker] = {}
        self._stopping = False
        self._zygote: subprocess.Popen[bytes] | None = None
        self._zygote_control: socket.socket | None = None
        #: Fork requests waiting for the zygote's reply, by request id: the new worker's control socket
        #: and where to hand the registered :class:`Worker`.
        self._pending: dict[int, tuple[socket.socket, queue.Queue[Worker | None]]] = {}
        self._fork_ids = 0

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
                pass_fds=(child.fileno(), *self.keep_fds),
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
        threading.Thread(target=self._read_zygote, args=(control,), daemon=True, name="tether-zygote").start()
        return control

    def _read_zygote(self, control: socket.socket) -> None:
        """Register forked workers (before any exit of theirs can be read) and record exits."""
        buf = b""
        mine: set[int] = set()
        while True:
            try:
                data = control.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                message = json.loads(line)
                if "forked" in message:
                    pid = int(message["forked"])
                    with self._lock:
                        pending = self._pending.pop(int(message.get("id", -1)), None)
                        if pending is not None:
                            worker = Worker(pid, pending[0])
                            self._workers[pid] = worker
                            mine.add(pid)
                    if pending is None:  # its request gave up waiting: nobody will use it
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(pid, signal.SIGKILL)
                    else:
                        pending[1].put(worker)
                elif "exit" in message:
                    pid = int(message["exit"])
                    mine.discard(pid)
                    with self._lock:
                        ended = self._workers.get(pid)
                    if ended is not None:
                        ended.code = int(message["code"])
                        ended.exited.set()
        # the zygote is gone: wake waiting forks, and watch its orphans some other way
        with self._lock:
            pending_now = list(self._pending.values())
            self._pending.clear()
            orphans = [self._workers[pid] for pid in mine if pid in self._workers]
        for parent, waiting in pending_now:
            parent.close()
            waiting.put(None)
        for worker in orphans:
            threading.Thread(target=_watch_orphan, args=(worker,), daemon=True, name="tether-orphan").start()

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
            self._fork_ids += 1
            request_id = self._fork_ids
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reply: queue.Queue[Worker | None] = queue.Queue()
        with self._lock:
            self._pending[request_id] = (parent, reply)
        try:
            socket.send_fds(control, [json.dumps({"fork": True, "id": request_id}).encode()], [child.fileno()])
        except OSError as exc:
            with self._lock:
                self._pending.pop(request_id, None)
            parent.close()
            raise TetherError(f"the worker zygote is gone: {exc}") from exc
        finally:
            child.close()
        try:
            worker = reply.get(timeout=30)
        except queue.Empty:
            worker = None
        if worker is None:
            with self._lock:
                gave_up = self._pending.pop(request_id, None) is not None
            if gave_up:
                parent.close()
            raise TetherError("the worker zygote did not fork")
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


def _watch_orphan(worker: Worker) -> None:
    """A forked worker whose zygote died: nobody can collect its status; notice when it is gone."""
    logger.warning("worker %d lost its zygote; watching it until it exits", worker.pid)
    pidfd = None
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(worker.pid)
    try:
        while not worker.exited.is_set():
            if pidfd is not None:
                import select

                if select.select([pidfd], [], [], 1.0)[0]:
                    break
            else:
                try:
                    os.kill(worker.pid, 0)
                except ProcessLookupError:
                    break
                worker.exited.wait(0.2)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    if not worker.exited.is_set():
        worker.code = 0  # its status went with the zygote
        worker.exited.set()


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
