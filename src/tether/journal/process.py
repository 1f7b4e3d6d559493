"""The journal's writer process: :class:`RemoteStore` runs :class:`~tether.journal.store.LocalStore` in a
child (``python -m tether.journal.process``), so the tracker's process spends on its history only what it
takes to hand a batch over a pipe: the folding, JSON and SQLite work hold another interpreter's lock, not the
one the tracker's event loop needs (``tether tracker --db``, see :class:`~tether.journal.writer.Journal`'s
``process``).

The pipe carries length-prefixed frames (4 bytes, big-endian) of pickles, one request and one reply at a time,
between this process and the child it started (nothing else can write to that pipe):

- ``("write", now, [(kind, wall, key, server, user, fields), ...])`` -> ``("ok", written: bool)``
- ``("prune", now)`` -> ``("ok", more: bool)``
- ``("finish", now)`` -> ``("ok", True)``, then the child exits.

The child starts with ``("ready", pid)`` or ``("error", message)``. It ignores SIGINT and SIGTERM (a Ctrl-C
or a service manager's stop reaches the whole process group: the tracker then writes what is queued and
finishes the run itself) and exits when its input ends, so a tracker killed outright leaves no writer
behind. A child that dies or stops answering is replaced at the next batch (at most once a second); the batch
it held is counted as failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import IO, Any, Final

from ..loglimit import PeerLogLimit
from ..tracker.events import TrackerEvent
from .schema import JournalError, open_writer
from .store import LocalStore, StoreLimits

__all__ = ["RemoteStore", "main"]

logger = logging.getLogger("tether.journal")

_HEADER: Final = struct.Struct(">I")
#: Seconds the child may take to start (import, open the file) and to finish its run.
START_TIMEOUT_S: Final = 30.0
EXIT_TIMEOUT_S: Final = 10.0
RESPAWN_EVERY_S: Final = 1.0


def _send(out: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_HEADER.pack(len(data)) + data)
    out.flush()


def _receive(inp: IO[bytes]) -> Any:
    """The next message, or None when the pipe ended."""
    header = inp.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = inp.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)  # the other end is this tracker or the child it started


class WriterLost(Exception):
    """The writer process ended or answered nonsense."""


class RemoteStore:
    """:class:`~tether.journal.store.Store` in a child process (see the module). Starts the child at once and
    raises :class:`JournalError` when it cannot open the journal; errors afterwards are logged through
    ``errors`` and reported as a failed write."""

    def __init__(self, path: str, run_id: int, limits: StoreLimits, errors: PeerLogLimit) -> None:
        self.path, self.run_id, self.limits, self._errors = path, run_id, limits, errors
        self._proc: subprocess.Popen[bytes] | None = None
        self._last_spawn = float("-inf")
        self._spawn()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _spawn(self) -> None:
        self._last_spawn = time.monotonic()
        settings = {
            "path": self.path,
            "run_id": self.run_id,
            "retention_days": self.limits.retention_days,
            "max_events": self.limits.max_events,
            "max_sessions": self.limits.max_sessions,
            "log_level": logging.getLogger("tether").getEffectiveLevel(),
        }
        env = dict(os.environ)
        # the child imports this tether, wherever it was imported from (an installed copy or a source tree)
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether.journal.process", json.dumps(settings)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        try:
            hello = _receive(proc.stdout)
        except Exception as exc:
            hello = ("error", f"unreadable answer ({exc})")
        if not (isinstance(hello, tuple) and hello and hello[0] == "ready"):
            self._reap(proc)
            why = hello[1] if isinstance(hello, tuple) and len(hello) > 1 else "the writer process did not start"
            raise JournalError(str(why))
        self._proc = proc
        logger.debug("journal %s: writer process %d", self.path, proc.pid)

    def _call(self, message: Any) -> Any:
        if self._proc is None:
            if time.monotonic() - self._last_spawn < RESPAWN_EVERY_S:
                raise WriterLost("the writer process is being replaced")
            self._spawn()
            logger.warning("journal %s: a new writer process (%d)", self.path, self.pid)
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            _send(proc.stdin, message)
            reply = _receive(proc.stdout)
        except (OSError, pickle.PickleError, EOFError) as exc:
            raise WriterLost(str(exc)) from exc
        if not (isinstance(reply, tuple) and len(reply) == 2 and reply[0] == "ok"):
            raise WriterLost(f"the writer process ended (exit status {proc.poll()})" if reply is None else "bad reply")
        return reply[1]

    def _lost(self, what: str, exc: Exception) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            self._reap(proc)
        if self._errors.allow("process"):
            logger.error("journal %s: %s not done: %s", self.path, what, exc)

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def write(self, events: Sequence[TrackerEvent], now: float) -> bool:
        batch = [(e.kind, e.wall, e.key, e.server, e.user, dict(e.fields)) for e in events]
        try:
            return bool(self._call(("write", now, batch)))
        except WriterLost as exc:
            self._lost(f"{len(events)} event(s) written", exc)
            return False

    def prune(self, now: float) -> bool:
        try:
            return bool(self._call(("prune", now)))
        except WriterLost as exc:
            self._lost("pruning", exc)
            return False

    def finish(self, now: float) -> None:
        try:
            self._call(("finish", now))
        except WriterLost as exc:
            self._lost("the run's end", exc)
            return
        proc, self._proc = self._proc, None
        if proc is not None:
            self._reap(proc)


def main(argv: list[str]) -> int:
    """The child: ``python -m tether.journal.process SETTINGS_JSON`` (started by :class:`RemoteStore`)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    settings = json.loads(argv[0])
    logging.basicConfig(
        level=settings.get("log_level", logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s[writer]: %(message)s",
        stream=sys.stderr,
    )
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # only frames go to the pipe
    path = settings["path"]
    try:
        conn = open_writer(path)
    except JournalError as exc:
        _send(out, ("error", str(exc)))
        return 1
    limits = StoreLimits(settings["retention_days"], settings["max_events"], settings["max_sessions"])
    errors = PeerLogLimit(lines=3, window_s=60.0, logger=logger, about="journal errors")
    store = LocalStore(conn, path, int(settings["run_id"]), limits, errors)
    _send(out, ("ready", os.getpid()))
    while True:
        message = _receive(inp)
        if message is None:  # the tracker is gone: end the run as well as we can
            store.finish(time.time())
            return 0
        op = message[0]
        if op == "write":
            ok = store.write([TrackerEvent(*fields) for fields in message[2]], message[1])
            _send(out, ("ok", ok))
        elif op == "prune":
            _send(out, ("ok", store.prune(message[1])))
        elif op == "finish":
            store.finish(message[1])
            _send(out, ("ok", True))
            return 0
        else:
            _send(out, ("error", f"unknown request {op!r}"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
