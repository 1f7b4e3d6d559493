"""The server's content-addressed file cache, shared by its sessions: what a device already holds.

A client that uploads with a sha256 gets the file checked against it (a mismatch is refused and
nothing is kept) and, once it matches, kept under ``<cache>/<sha256>`` (read-only) beyond the session.
A later session (the same client after a timeout, another tuner) asks for files by hash first
(``fetch``) and uploads only what the cache lacks. Nothing is trusted that was not hashed here.

Entries are hard links where the file system allows (a copy otherwise); the workspace side of a link
is only ever replaced, never written in place (:meth:`Workspace.open_for_write` unlinks first). The
cache keeps at most ``max_bytes``: the least recently used entries go first.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["ContentCache", "is_sha256"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


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

    def materialize(self, digest: str, target: Path) -> bool:
        """Put the cached file at ``target`` (a path inside a workspace); False when it is not cached."""
        entry = self._entry(digest)
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
        for item in os.scandir(self.root):
            if not is_sha256(item.name):
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
