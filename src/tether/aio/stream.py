"""A blocking byte stream over one TCP socket, for the client side (scripts, notebooks, the CLI)."""

from __future__ import annotations

import contextlib
import select
import socket
import time

from ..errors import ConnectionClosed
from .net import DEFAULT_KEEPALIVE, Keepalive, connect_tcp, format_hostport
from .tls import SSL_ERRORS, TLSLike, tls_error, wrap_client_socket

__all__ = ["BlockingStream"]


class BlockingStream:
    """Send whole buffers, receive what has arrived, with an optional deadline per receive.

    Raises :class:`ConnectionClosed` on EOF or reset, :class:`TimeoutError` when a deadline passes.
    """

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        timeout: float | None = 5.0,
        keepalive: Keepalive | None = DEFAULT_KEEPALIVE,
        tls: TLSLike | None = None,
    ) -> BlockingStream:
        """Connect; with ``tls``, TLS from the first byte (the handshake within ``timeout`` too):
        :class:`~tether.errors.TLSError` when it fails."""
        sock = connect_tcp(host, port, timeout, keepalive)
        if tls is not None:
            sock = wrap_client_socket(sock, tls, host, format_hostport(host, port), timeout)
        return cls(sock)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ConnectionClosed("stream is closed")
        return self._sock

    def send(self, data: bytes) -> None:
        sock = self._socket()
        sock.settimeout(None)
        try:
            sock.sendall(data)
        except OSError as exc:
            raise ConnectionClosed(f"send failed: {exc}") from exc

    def recv(self, deadline: float | None = None, size: int = 65536) -> bytes:
        """Block until some bytes arrive (at most ``size``), or until ``deadline`` (``time.monotonic()``)."""
        sock = self._socket()
        if deadline is None:
            sock.settimeout(None)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("deadline passed")
            sock.settimeout(remaining)
        try:
            data = sock.recv(size)
        except TimeoutError:
            raise
        except SSL_ERRORS as exc:  # a TLS alert: a client certificate the server refused or wanted
            raise tls_error(exc, _peer(sock)) from exc
        except OSError as exc:
            raise ConnectionClosed(f"receive failed: {exc}") from exc
        if not data:
            raise ConnectionClosed("peer closed the connection")
        return data

    def peer_closed(self) -> bool:
        """True when the peer has closed the connection (an end of stream or a reset is waiting to be
        read), without waiting and without consuming anything: a connection a server closed while it
        sat idle is seen before a request is sent on it."""
        sock = self._sock
        if sock is None:
            return True
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, InterruptedError, TimeoutError):
            return False
        except (OSError, ValueError):
            return True

    def interrupt(self) -> None:
        """Shut the socket down (both ways) so that a receive blocked in another thread returns now."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> BlockingStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return "the peer"
    return format_hostport(str(host), int(port))
