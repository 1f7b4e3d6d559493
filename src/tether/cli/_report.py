"""How a command reports a failure: one line on stderr, and the exit code it means.

A device's error reads ``ModelRunError on HOST:PORT: message``; its traceback (and the rest of a
message of several lines) follows only with ``--verbose``.
"""

from __future__ import annotations

import sys

from ..errors import ConfigError, ConnectFailed, RemoteError, TLSError

__all__ = ["error_line", "exit_code", "fail"]


def exit_code(exc: BaseException) -> int:
    """2 for bad usage or an unreachable peer (TLS that fails is either), 1 for an operation that failed."""
    return 2 if isinstance(exc, ConfigError | ConnectFailed | TLSError) else 1


def error_line(exc: BaseException, device: str | None = None) -> str:
    """``exc`` in one line: a device's error as its type, the device and its message's first line."""
    if not isinstance(exc, RemoteError):
        return " ".join(str(exc).split()) or type(exc).__name__
    lines = [line.strip() for line in exc.remote_message.splitlines() if line.strip()] or [""]
    more = f" (+{len(lines) - 1} lines: --verbose)" if len(lines) > 1 else ""
    where = f" on {device}" if device else ""
    return f"{exc.remote_type}{where}: {lines[0]}{more}"


def fail(prog: str, exc: BaseException, *, verbose: bool = False, device: str | None = None) -> int:
    """Print ``prog: <one line>`` (``verbose``: a device's whole message and traceback after it) to
    stderr; returns the exit code."""
    print(f"{prog}: {error_line(exc, device)}", file=sys.stderr)
    if verbose and isinstance(exc, RemoteError):
        if "\n" in exc.remote_message.strip():
            print(exc.remote_message.rstrip(), file=sys.stderr)
        if exc.remote_traceback:
            print(f"--- traceback on the device ---\n{exc.remote_traceback.rstrip()}", file=sys.stderr)
    return exit_code(exc)
