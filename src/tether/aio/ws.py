"""A blocking WebSocket client on the standard library, and a bridge that makes one look like a socket.

Devices behind NAT or an HTTP-only firewall reach a proxy through ``ws://`` or ``wss://``; everything
above this module still wants a plain stream socket. :func:`ws_open_socket` connects and returns one
end of a ``socketpair`` whose other end two threads pump to and from the WebSocket, one binary message
per chunk read.

TLS goes through :class:`ssl.SSLObject` over memory BIOs under a lock, not ``wrap_socket``: OpenSSL
forbids ``SSL_read`` and ``SSL_write`` on one connection from two threads at once, and the bridge
reads and writes from two threads.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import ssl
import threading
from typing import Protocol

from ..errors import ConnectFailed, ConnectionClosed
from ..protocol.websocket import (
    DEFAULT_MAX_MESSAGE,
    CloseCode,
    FrameDecoder,
    Message,
    Opcode,
    WebSocketError,
    build_upgrade_request,
    check_upgrade_response,
    encode_close,
    encode_frame,
    find_head_end,
    new_client_key,
    parse_close,
    parse_ws_url,
)
from .net import connect_tcp, format_hostport
from .tls import TlsStream

__all__ = [
    "CLOSE_TIMEOUT",
    "WebSocketConnection",
    "ws_bridge",
    "ws_connect",
    "ws_open_socket",
]

logger = logging.getLogger(__name__)

#: Seconds to wait for the peer's side of a closing handshake before dropping the connection.
CLOSE_TIMEOUT = 5.0
#: Largest chunk the bridge reads from its local socket: one WebSocket message each.
BRIDGE_CHUNK = 1 << 20
_RECV_SIZE = 1 << 18
_PAIR_BUFFER = 4 << 20  # socketpair buffers: fewer wake-ups per MiB pumped


class _Stream(Protocol):
    """What :class:`WebSocketConnection` needs from its transport (a socket, or :class:`TlsStream`)."""

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int: ...
    def sendall(self, data: bytes, /) -> None: ...
    def settimeout(self, value: float | None, /) -> None: ...
    def shutdown(self, how: int, /) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int: ...


class WebSocketConnection:
    """One WebSocket over a connected stream, after the opening handshake.

    :meth:`send` may be called from any thread; :meth:`recv` from one thread at a time. ``client``
    picks the masking rules (a client masks what it sends and expects unmasked frames). ``unused`` is
    whatever arrived after the handshake's head: the first frames.

    After a close, ``close_code`` and ``close_reason`` hold what the peer's CLOSE frame said (``None``
    and ``""`` when it had no status or never came).
    """

    def __init__(
        self,
        sock: socket.socket | TlsStream,
        *,
        client: bool = True,
        unused: bytes = b"",
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self._sock: _Stream = sock
        self._mask = client
        self._decoder = FrameDecoder(expect_masked=not client, max_message=max_message)
        self._pending: collections.deque[Message] = collections.deque()
        self._rbuf = bytearray(_RECV_SIZE)
        # Outgoing frames: a writer holding _send_lock drains _queue; control replies from the reading
        # thread are queued and never wait for a writer stuck on a full socket.
        self._send_lock = threading.Lock()
        self._queue: collections.deque[bytes] = collections.deque()
        self._state_lock = threading.Lock()
        self._close_sent = False
        self._close_received = False
        self._eof = False
        self._closing = False  # close() called
        self._closed = False  # close() done
        self._reading = False
        self.close_code: int | None = None
        self.close_reason = ""
        if unused:
            self._pending.extend(self._decoder.feed(unused))

    # -- sending ----------------------------------------------------------------------------------

    def _enqueue(self, frame: bytes, closing: bool = False) -> bool:
        """Queue ``frame`` unless a CLOSE went first (nothing may follow it); ``closing`` marks the CLOSE."""
        with self._state_lock:
            if self._close_sent:
                return False
            self._close_sent = closing
            self._queue.append(frame)
            return True

    def _drain(self, wait: bool = True) -> None:
        """Write the queue; with ``wait=False`` leave it to a writer already at it (it checks the queue
        again after releasing the lock, so nothing is stranded)."""
        if not self._send_lock.acquire(blocking=wait):
            return
        while True:
            try:
                while self._queue:
                    self._sock.sendall(self._queue.popleft())
            finally:
                self._send_lock.release()
            if not self._queue or not self._send_lock.acquire(blocking=False):
                return

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one BINARY message. Raises :class:`ConnectionClosed` once closing or broken."""
        frame = encode_frame(Opcode.BINARY, data, mask=self._mask)  # masking outside any lock
        if not self._enqueue(frame):
            raise ConnectionClosed("websocket is closing")
        try:
            self._drain()
        except OSError as exc:
            raise ConnectionClosed(f"websocket send failed: {exc}") from exc

    def _send_control(self, opcode: Opcode, payload: bytes, wait: bool) -> None:
        """Best effort: a broken connection shows up on the next receive."""
        if self._enqueue(encode_frame(opcode, payload, mask=self._mask), closing=opcode == Opcode.CLOSE):
            try:
                self._drain(wait)
            except OSError as exc:
                logger.debug("websocket: cannot send %s: %s", opcode.name, exc)

    def send_close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start (or answer) the closing handshake: send CLOSE once, best effort; send nothing after it."""
        self._send_control(Opcode.CLOSE, encode_close(code, reason), wait=True)

    # -- receiving --------------------------------------------------------------------------------

    def recv(self) -> bytes | None:
        """The next BINARY or TEXT message's payload (TEXT as its UTF-8 bytes).

        Answers PINGs on its own. Returns None at the end: the peer's CLOSE (answered with a CLOSE) or
        EOF. Raises :class:`WebSocketError` when the peer breaks the protocol (after sending a CLOSE
        with its code) and :class:`ConnectionClosed` when the connection breaks.
        """
        self._reading = True
        try:
            return self._recv()
        finally:
            self._reading = False

    def _recv(self) -> bytes | None:
        while True:
            while self._pending:
                msg = self._pending.popleft()
                if msg.opcode in (Opcode.BINARY, Opcode.TEXT):
                    return msg.data
                if msg.opcode == Opcode.PING:
                    self._send_control(Opcode.PONG, msg.data, wait=False)  # never blocks the reader
                elif msg.opcode == Opcode.CLOSE:
                    self._close_received = True
                    self.close_code, self.close_reason = parse_close(msg.data)
                    self._pending.clear()
                    code = self.close_code if self.close_code is not None else CloseCode.NORMAL
                    self.send_close(code)  # no-op when ours went first
                    return None
            if self._close_received or self._eof or self._closed:
                return None
            try:
                n = self._sock.recv_into(self._rbuf)
            except OSError as exc:
                if self._closing:  # close() from another thread shut the socket
                    return None
                raise ConnectionClosed(f"websocket receive failed: {exc}") from exc
            if not n:
                self._eof = True
                return None
            try:
                with memoryview(self._rbuf) as view:
                    self._pending.extend(self._decoder.feed(view[:n]))
            except WebSocketError as exc:
                self.send_close(exc.code, exc.message)
                self.abort()
                raise

    # -- closing ----------------------------------------------------------------------------------

    def abort(self) -> None:
        """Shut the connection down at once, both ways (a blocked :meth:`recv` returns)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "", timeout: float = CLOSE_TIMEOUT) -> None:
        """Close (idempotent): send CLOSE if not yet sent, wait up to ``timeout`` for the peer's CLOSE
        (unless another thread is reading), then close the socket."""
        with self._state_lock:
            if self._closing:
                return
            self._closing = True
        self.send_close(code, reason)
        if not self._reading and not self._close_received and not self._eof:
            with contextlib.suppress(OSError, WebSocketError, ConnectionClosed):
                self._sock.settimeout(timeout)
                while self._recv() is not None:
                    pass  # data still in flight before the peer's CLOSE
        self._closed = True
        self.abort()
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def __enter__(self) -> WebSocketConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ws_connect(
    url: str,
    timeout: float = 10.0,
    *,
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> WebSocketConnection:
    """Open a WebSocket to ``url`` (``ws://`` or ``wss://``); ``timeout`` bounds each step of the connect.

    ``wss`` verifies the server against ``ssl_context`` (default: :func:`ssl.create_default_context`).
    Raises :class:`ValueError` for a bad URL, :class:`ConnectFailed` when the TCP connect, the TLS
    handshake or the HTTP exchange fails at the transport level, and :class:`RemoteProtocolError`
    (:class:`HttpError` for a non-101 status) when the server answers something other than a valid
    upgrade.
    """
    tls, host, port, path = parse_ws_url(url)
    sock = connect_tcp(host, port, timeout)
    stream: socket.socket | TlsStream = sock
    try:
        sock.settimeout(timeout)
        if tls:
            context = ssl_context if ssl_context is not None else ssl.create_default_context()
            tls_stream = TlsStream(sock, context, server_hostname=host)
            try:
                tls_stream.handshake()
            except (OSError, ssl.SSLError) as exc:
                raise ConnectFailed(f"TLS handshake with {format_hostport(host, port)} failed: {exc}") from exc
            stream = tls_stream
        if port != (443 if tls else 80):
            host_header = format_hostport(host, port)
        else:
            host_header = f"[{host}]" if ":" in host else host
        key = new_client_key()
        head = bytearray()
        try:
            stream.sendall(build_upgrade_request(host_header, path, key, headers))
            chunk = bytearray(4096)
            while (end := find_head_end(head)) < 0:
                n = stream.recv_into(chunk)
                if not n:
                    raise ConnectFailed(f"{url} closed the connection during the websocket handshake")
                head += chunk[:n]
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"websocket handshake with {url} failed: {exc}") from exc
        check_upgrade_response(head[:end], key)
        stream.settimeout(None)
        return WebSocketConnection(stream, client=True, unused=bytes(head[end:]))
    except BaseException:
        sock.close()
        raise


class _Bridge:
    """Two threads between a WebSocket and the inner end of a socketpair; the last one out closes both."""

    def __init__(self, conn: WebSocketConnection, inner: socket.socket) -> None:
        self.conn = conn
        self.inner = inner
        self.up_done = threading.Event()
        self.down_done = threading.Event()
        self._lock = threading.Lock()
        self._ended = 0

    def up(self) -> None:
        """Local socket to WebSocket: each chunk read becomes one message."""
        try:
            while True:
                data = self.inner.recv(BRIDGE_CHUNK)
                if not data:
                    break
                self.conn.send(data)
        except (OSError, ConnectionClosed) as exc:
            logger.debug("ws bridge: upstream ended: %s", exc)
        finally:
            self.conn.send_close()
            self._end(self.up_done, self.down_done)

    def down(self) -> None:
        """WebSocket to local socket."""
        try:
            while (data := self.conn.recv()) is not None:
                self.inner.sendall(data)
        except (OSError, ConnectionClosed, WebSocketError) as exc:
            logger.debug("ws bridge: downstream ended: %s", exc)
        finally:
            with contextlib.suppress(OSError):
                self.inner.shutdown(socket.SHUT_RDWR)  # the caller sees EOF; up's recv returns
            self._end(self.down_done, self.up_done)

    def _end(self, mine: threading.Event, other: threading.Event) -> None:
        mine.set()
        with self._lock:
            self._ended += 1
            last = self._ended == 2
        if last:
            self.conn.close()
            self.inner.close()
            return
        if not other.wait(CLOSE_TIMEOUT):
            # The peer never finished its side of the close, or the caller stopped reading: force it.
            self.conn.abort()
            with contextlib.suppress(OSError):
                self.inner.shutdown(socket.SHUT_RDWR)


def ws_bridge(conn: WebSocketConnection) -> socket.socket:
    """A blocking stream socket that carries ``conn``: bytes written to it leave as binary messages,
    messages received are readable from it.

    When either side ends (EOF, CLOSE, error) both are shut down and closed: the returned socket reads
    EOF, the WebSocket gets a CLOSE. The socket is an ``AF_UNIX`` stream, so it can be handed to another
    process (``socket.send_fds``) or used with ``sendfile``.
    """
    outer, inner = socket.socketpair()
    for sock in (outer, inner):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, _PAIR_BUFFER)
    bridge = _Bridge(conn, inner)
    threading.Thread(target=bridge.up, name="ws-bridge-up", daemon=True).start()
    threading.Thread(target=bridge.down, name="ws-bridge-down", daemon=True).start()
    return outer


def ws_open_socket(url: str, timeout: float = 10.0, *, ssl_context: ssl.SSLContext | None = None) -> socket.socket:
    """:func:`ws_connect` to ``url`` and :func:`ws_bridge` it: a plain socket tunnelled over a WebSocket."""
    return ws_bridge(ws_connect(url, timeout, ssl_context=ssl_context))
