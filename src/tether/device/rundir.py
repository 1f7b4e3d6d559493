"""Where one server instance keeps its sessions, and the cleanup after instances that died.

Layout:

- without ``--work-dir``: ``<tmp>/tether-server-XXXX/`` is the instance's directory (its sessions and its
  upload cache, removed when it stops);
- with ``--work-dir D``: ``D/cache/`` is the upload cache, kept across restarts and shared by every server
  on ``D`` (content-addressed, safe for several processes), and ``D/run-XXXX/`` holds one instance's
  sessions.

Each instance directory holds ``.lock``, locked (``flock``, exclusive) by its server. The lock's descriptor
is inherited by every process the server starts (the worker zygote, the session workers, their guards),
so the lock is held for as long as the server *or anything it started* lives, and released by the kernel
when the last of them exits, SIGKILL included. An instance directory whose lock can be taken therefore
belongs to nobody: a starting server removes such siblings (``tether-server-*`` in the temp directory,
``run-*`` in ``D``), and checks again after each of its sessions, so a predecessor killed while a session
ran is cleaned up once that session ends. A sibling without a lock file (being created, or a server of an
older version that may still run) is never touched. Without ``fcntl`` (Windows) there is no lock and no
cleanup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["RunDir"]

logger = logging.getLogger("tether.server")

LOCK_NAME = ".lock"
DEFAULT_PREFIX = "tether-server-"
RUN_PREFIX = "run-"

try:
    import fcntl

    _HAVE_FLOCK = True
except ImportError:  # pragma: no cover - Windows
    _HAVE_FLOCK = False


class RunDir:
    """This server instance's directory (``path``), its lock (``lock_fd``, to pass to child processes), and
    the upload cache's directory (``cache_dir``)."""

    def __init__(self, work_dir: str | None) -> None:
        if work_dir is None:
            self.parent, self.prefix = Path(tempfile.gettempdir()), DEFAULT_PREFIX
            self.cache_dir_in: Path | None = None  # inside the instance: gone with it
        else:
            self.parent, self.prefix = Path(work_dir), RUN_PREFIX
            self.parent.mkdir(parents=True, exist_ok=True)
            self.cache_dir_in = self.parent
        self.path = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.parent))
        self.lock_fd = _hold_lock(self.path)
        self.cache_dir = str((self.cache_dir_in or self.path) / "cache")

    def remove_dead_siblings(self) -> list[Path]:
        """Remove the instance directories next to this one that nothing alive holds; returns them."""
        removed = []
        with contextlib.suppress(OSError):
            for entry in self.parent.iterdir():
                if entry.name.startswith(self.prefix) and entry != self.path and _abandoned(entry):
                    shutil.rmtree(entry, ignore_errors=True)
                    if not entry.exists():
                        removed.append(entry)
        if removed:
            logger.info("removed %d directory(ies) of servers that are gone: %s", len(removed), removed)
        return removed

    def close(self) -> None:
        """Remove this instance's directory and release its lock (the server stopped)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _hold_lock(path: Path) -> int | None:
    """Create ``path/.lock`` already locked: locked under a temporary name, then renamed into place, so
    nobody ever sees it unlocked while this process lives."""
    if not _HAVE_FLOCK:  # pragma: no cover - Windows
        return None
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".lock-")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(tmp, path / LOCK_NAME)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _abandoned(entry: Path) -> bool:
    """True when ``entry`` has a lock file and no process holds its lock."""
    if not _HAVE_FLOCK or not entry.is_dir() or entry.is_symlink():
        return False
    try:
        fd = os.open(entry / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # none (being created; an older server's, maybe alive): not ours to judge
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # held: its server, or a session it started, still runs
    finally:
        os.close(fd)  # (a lock taken here is released with it)
    return True
