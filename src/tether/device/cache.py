"""The server's content-addressed file cache, shared by its sessions: what a device already holds.

A client that uploads with a sha256 gets the file checked against it (a mismatch is refused and
nothing is kept) and, once it matches, kept under ``<cache>/<sha256>`` (read-only) beyond the session.
A later session (the same client after a timeout, another tuner) asks for files by hash first
(``fetch``) and uploads only what the cache lacks. Nothing is trusted that was not hashed here.

Entries are hard links where the file system allows (a copy otherwise); the workspace side of a link
is only ever replaced, never written in place (:meth:`Workspace.open_for_write` unlinks first). The
cache keeps at most ``max_bytes``: the least recently used entries go first. An entry is hashed again
each time it is handed out (what a session's code may have done to it as the server's user is caught).
A session can fetch any cached file whose sha256 it knows: sessions on one server trust each other that far.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

__all__ = ["ContentCache", "is_sha256"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Temporary files older than this (seconds) were left by a worker that died while storing.
STALE_TEMP_S = 3600


def is_sha256(text: object) -> bool:
    return isinstance(text, str) and _SHA256.fullmatch(text) is not None


class ContentCache:
    """Files by sha256 in one directory; safe for several worker processes at once (atomic renames)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def _entry(self, digest: str) -> Path:
        if not is_sha256(digest):
            raise ValueError(f"not a sha256 hex digest: {digest!r:.80}")
        return self.root / digest

    def has(self, digest: str) -> bool:
        return self._entry(digest).is_file()

    def store(self, digest: str, source: Path) -> None:
        """Keep ``source`` (already hashed to ``digest``) in the cache, then trim it to ``max_bytes``."""
        entry = self._entry(digest)
        if entry.exists():
            os.utime(entry)
            return
        if source.stat().st_size > self.max_bytes:
            return
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".in-")
        os.close(fd)
        try:
            os.unlink(tmp)
            try:
                os.link(source, tmp)
            except OSError:  # another file system, or no hard links: a copy
                shutil.copyfile(source, tmp)
            os.chmod(tmp, 0o444)
            os.replace(tmp, entry)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self.trim()

    def size(self, digest: str) -> int | None:
        """The bytes of a cached entry, None when it is not cached."""
        try:
            return self._entry(digest).stat().st_size
        except (OSError, ValueError):
            return None

    def materialize(self, digest: str, target: Path) -> bool:
        """Put the cached file at ``target`` (a path inside a workspace); False when it is not cached.

        The entry is hashed again first: code run by an earlier session (as the server's user) could have
        rewritten it, and a changed entry is dropped rather than handed to another session."""
        entry = self._entry(digest)
        try:
            with open(entry, "rb") as file:
                hasher = hashlib.sha256()
                while chunk := file.read(1 << 20):
                    hasher.update(chunk)
        except FileNotFoundError:
            return False
        if hasher.hexdigest() != digest:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
            return False
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(entry, target)
        except FileNotFoundError:
            return False
        except OSError:
            try:
                shutil.copyfile(entry, target)
            except FileNotFoundError:
                return False
        with contextlib.suppress(OSError):
            os.utime(entry)  # recently used: trimmed last
        return True

    def trim(self) -> None:
        """Remove the least recently used entries until the cache holds at most ``max_bytes``."""
        entries = []
        total = 0
        stale = time.time() - STALE_TEMP_S
        for item in os.scandir(self.root):
            if not is_sha256(item.name):
                with contextlib.suppress(OSError):  # a worker that died between mkstemp and the rename
                    if item.name.startswith(".in-") and item.stat(follow_symlinks=False).st_mtime < stale:
                        os.unlink(item.path)
                continue
            with contextlib.suppress(FileNotFoundError):
                st = item.stat(follow_symlinks=False)
                entries.append((st.st_mtime, st.st_size, item.path))
                total += st.st_size
        entries.sort()
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            total -= size
