"""A session's workspace: one directory, and no path that leads out of it.

A client names files relative to the workspace. Absolute paths, ``..`` components and symlinks that
resolve outside are refused with :class:`~tether.errors.WorkspaceError` (TVM's server joins the path
onto its temp dir and lets ``../`` through).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import WorkspaceError

__all__ = ["Workspace"]

#: Linux's limits on a path and on one of its names, in bytes (PATH_MAX counts the final NUL).
_PATH_MAX = 4096
_NAME_MAX = 255


class Workspace:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def resolve(self, name: str, must_exist: bool = False) -> Path:
        """The real path of ``name`` inside the workspace."""
        if not isinstance(name, str) or not name or "\x00" in name:
            raise WorkspaceError(f"bad path {name!r}", "WorkspaceError")
        try:
            os.fsencode(name)
        except UnicodeError:  # a lone surrogate from the client's JSON: no file can have that name
            raise WorkspaceError(f"path {name!r:.200} cannot be a file name here", "WorkspaceError") from None
        pure = PurePosixPath(name.replace("\\", "/"))
        if pure.is_absolute() or Path(name).is_absolute() or Path(name).drive:
            raise WorkspaceError(f"path {name!r} is absolute: name files relative to the workspace", "WorkspaceError")
        if ".." in pure.parts:
            raise WorkspaceError(f"path {name!r} leaves the workspace ('..')", "WorkspaceError")
        path = (self.root / pure).resolve()
        if path != self.root and self.root not in path.parents:
            raise WorkspaceError(f"path {name!r} resolves outside the workspace (a symlink)", "WorkspaceError")
        raw = os.fsencode(path)  # what the file system cannot take is the client's mistake (ENAMETOOLONG)
        if len(raw) >= _PATH_MAX or any(len(part) > _NAME_MAX for part in raw.split(b"/")):
            raise WorkspaceError(f"path {name!r:.200} is too long for the file system", "WorkspaceError")
        if must_exist and not path.exists():
            raise WorkspaceError(f"no such file in the workspace: {name!r}", "WorkspaceError")
        return path

    def open_for_write(self, path: Path) -> Any:
        """Create or truncate ``path``, a result of :meth:`resolve`, and its parent directories."""
        if path == self.root or path.is_dir():
            raise WorkspaceError(f"{path.name!r} is a directory", "WorkspaceError")
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # replaced, never truncated in place: it may be a hard link into the server's cache
        # O_NOFOLLOW: a symlink planted between resolve() and open() is not followed
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
        return os.fdopen(fd, "wb")

    def remove(self, name: str) -> None:
        path = self.resolve(name, must_exist=True)
        if path == self.root:
            raise WorkspaceError("refusing to remove the workspace itself", "WorkspaceError")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    def clear(self) -> None:
        """Remove everything inside the workspace (the workspace itself stays)."""
        for entry in os.scandir(self.root):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()

    def usage(self) -> int:
        """Bytes of the regular files in the workspace (each hard-linked file once), symlinks not followed."""
        total, seen = 0, set()
        stack = [str(self.root)]
        while stack:
            with contextlib.suppress(OSError), os.scandir(stack.pop()) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            if (st.st_dev, st.st_ino) not in seen:
                                seen.add((st.st_dev, st.st_ino))
                                total += st.st_size
        return total

    def listdir(self, name: str = ".") -> list[dict[str, Any]]:
        path = self.resolve(name, must_exist=True)
        if not path.is_dir():
            raise WorkspaceError(f"{name!r} is not a directory", "WorkspaceError")
        entries = []
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            kind = "link" if entry.is_symlink() else "dir" if entry.is_dir() else "file"
            size = entry.stat(follow_symlinks=False).st_size if kind == "file" else 0
            entries.append({"name": entry.name, "type": kind, "size": size})
        return entries
