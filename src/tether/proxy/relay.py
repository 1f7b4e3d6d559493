"""The relay pump: bytes between two paired peers, verbatim, with back-pressure, on the event loop.

Each direction owns one buffer (up to ``CHUNK``, 1 MiB; allocated at its first read and grown while
reads fill it, so idle and chatty pairs stay small): a readiness event reads what the kernel holds into it
(``recv_into``) and hands that view straight to the other socket (``send``); a WebSocket side gets it as
one binary message (TVM's proxy does the same), a WebSocket's messages go to the other side as a byte
stream, and its pings are answered. Nothing is copied in Python and nothing is allocated per chunk on the
TCP path. A direction reads again only once the other socket took everything: a slow receiver leaves
the bytes in the kernel's socket buffers, TCP flow control slows the sender down, and the proxy holds
at most one chunk per direction (bounded memory, whatever the speeds).

``splice(2)`` (socket to pipe to socket, no copy through user space) was tried and measured slower on
loopback here (about 700 against 1,000+ MiB/s in the same blocking micro-benchmark, with larger socket
buffers helping the copying path only), so the relay copies.

Either side ending (EOF, reset, a WebSocket close) ends the pair: what was already read is delivered to
the other side (within ``DRAIN_TIMEOUT_S``), then both are closed. Nothing here looks inside the bytes:
TVM's session protocol and tether's native one travel alike.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Final

from ..protocol.websocket import FrameDecoder as WsDecoder
from ..protocol.websocket import Message, Opcode, WebSocketError, encode_close, encode_frame, encode_header

__all__ = ["CHUNK", "SOCKET_BUFFER", "Endpoint", "Relay"]

logger = logging.getLogger("tether.proxy")

#: Bytes read per event and direction (one WebSocket message each): the most the proxy holds per direction.
CHUNK: Final = 1 << 20
#: A direction's first buffer; it grows (x4, up to ``CHUNK``) while reads fill it.
FIRST_CHUNK: Final = 64 << 10
_EMPTY: Final = bytearray()
#: Queued bytes above which a WebSocket peer's pings go unanswered (it is not reading).
MAX_CONTROL_BACKLOG: Final = 64 << 10
#: Largest WebSocket message relayed (TVM's proxy, on tornado: 10 MiB); before pairing, a handshake's worth.
MAX_WS_MESSAGE: Final = 16 << 20
#: Socket buffers asked for on relayed sockets (fewer wake-ups per byte; the kernel doubles and caps it).
SOCKET_BUFFER: Final = 4 << 20
#: How long a closing pair may take to hand over what it already read.
DRAIN_TIMEOUT_S: Final = 10.0

_GONE: Final = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ESHUTDOWN, errno.ETIMEDOUT, errno.EHOSTUNREACH)


class Endpoint:
    """One side of a pair: a connected non-blocking socket, plain TCP or a WebSocket (server side).

    ``ws`` holds the WebSocket frame decoder (with whatever it buffered before pairing) or None for TCP.
    Writes go through :meth:`write`; a queue holds what the socket did not take yet.
    """

    __slots__ = ("closed", "fd", "label", "out", "out_bytes", "sock", "writing", "ws")

    def __init__(self, sock: socket.socket, label: str, ws: WsDecoder | None = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.label = label
        self.ws = ws
        self.out: collections.deque[memoryview] = collections.deque()
        self.out_bytes = 0
        self.writing = False
        self.closed = False

    @property
    def is_ws(self) -> bool:
        return self.ws is not None

    def frame(self, data: bytes | bytearray | memoryview) -> list[bytes | bytearray | memoryview]:
        """``data`` as this endpoint carries it: verbatim for TCP, one binary message for a WebSocket."""
        if self.ws is None:
            return [data]
        return [encode_header(Opcode.BINARY, len(data)), data]

    def pong(self, payload: bytes) -> list[bytes | bytearray | memoryview]:
        """The answer to a ping, or nothing when this peer has not been reading what it was sent: RFC 6455
        lets an endpoint answer only the latest of several pings, and a peer that pings without reading
        must not grow the queue."""
        return [] if self.out_bytes > MAX_CONTROL_BACKLOG else [encode_frame(Opcode.PONG, payload, mask=False)]

    def queue(self, parts: list[bytes | bytearray | memoryview]) -> None:
        for part in parts:
            if part:
                self.out.append(memoryview(part).cast("B"))
                self.out_bytes += len(part)

    def flush(self) -> bool:
        """Send what is queued; True when the queue is empty. Raises OSError when the peer is gone."""
        out = self.out
        while out:
            try:
                sent = self.sock.sendmsg(itertools.islice(out, 64)) if len(out) > 1 else self.sock.send(out[0])
            except (BlockingIOError, InterruptedError):
                return False
            self.out_bytes -= sent
            while sent:
                head = out[0]
                if sent >= len(head):
                    sent -= len(head)
                    out.popleft()
                else:
                    out[0] = head[sent:]
                    sent = 0
        return True

    def close(self, ws_code: int = 1000, reason: str = "") -> None:
        """Close the socket; a WebSocket peer first gets a close frame, if its socket takes it now."""
        if self.closed:
            return
        self.closed = True
        if self.ws is not None and not self.out:
            with contextlib.suppress(OSError):
                self.sock.send(encode_frame(Opcode.CLOSE, encode_close(ws_code, reason[:120]), mask=False))
        with contextlib.suppress(OSError):
            self.sock.close()


class _Direction:
    """Bytes from ``src`` to ``dst``. Subclasses move them; the base keeps the books."""

    __slots__ = ("dst", "eof", "loop", "moved", "relay", "src")

    def __init__(self, relay: Relay, src: Endpoint, dst: Endpoint) -> None:
        self.relay, self.src, self.dst, self.loop = relay, src, dst, relay.loop
        self.moved = 0
        self.eof = False

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def pending(self) -> bool:
        """True while bytes read from ``src`` still wait to reach ``dst``."""
        raise NotImplementedError


class _Pump(_Direction):
    """Reads ``src`` into its own buffer and hands the bytes to ``dst``; reads again once ``dst`` took them."""

    __slots__ = ("buf", "full", "reading", "view")

    def __init__(self, relay: Relay, src: Endpoint, dst: Endpoint) -> None:
        super().__init__(relay, src, dst)
        self.buf = _EMPTY  # allocated at the first read, grown while reads fill it (idle pairs cost nothing)
        self.view = memoryview(self.buf)
        self.full = True
        self.reading = False

    def start(self) -> None:
        self.read_on()

    def read_on(self) -> None:
        if not self.reading and not self.eof and not self.src.closed and not self.dst.out:
            self.reading = True
            self.loop.add_reader(self.src.fd, self._on_readable)

    def read_off(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src.fd)

    def _on_readable(self) -> None:
        src, dst, relay = self.src, self.dst, self.relay
        if len(self.buf) < CHUNK and self.full:
            self.buf = bytearray(min(CHUNK, max(FIRST_CHUNK, 4 * len(self.buf))))
            self.view = memoryview(self.buf)
        try:
            n = src.sock.recv_into(self.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            relay.end(src, _why(exc))
            return
        if n == 0:
            self.eof = True
            self.read_off()
            relay.end(src, "closed")
            return
        self.full = n == len(self.buf)
        data = self.view[:n]
        if src.ws is None and dst.ws is None and not dst.out:  # TCP to TCP, nothing queued: send it now
            self.moved += n
            try:
                sent = dst.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                relay.end(dst, _why(exc))
                return
            if sent < n:  # the rest leaves when dst can take it; until then this buffer is not reused
                relay.send(dst, [data[sent:]])
                if dst.out:
                    self.read_off()
            return
        if src.ws is None:
            self.moved += n
            relay.send(dst, dst.frame(data))
        else:
            try:
                messages = src.ws.feed(data)
            except WebSocketError as exc:
                relay.end(src, f"WebSocket error: {exc}", ws_code=exc.code)
                return
            if not self.deliver(messages):
                return
        if dst.out:
            self.read_off()  # the buffer is still being sent from: the relay resumes us once dst drained

    def deliver(self, messages: list[Message]) -> bool:
        """A WebSocket side's messages: data to ``dst``, pings answered; False once it closed."""
        src, dst, relay = self.src, self.dst, self.relay
        for msg in messages:
            if msg.opcode in (Opcode.BINARY, Opcode.TEXT):
                self.moved += len(msg.data)
                relay.send(dst, dst.frame(msg.data))
            elif msg.opcode == Opcode.PING:
                relay.send(src, src.pong(msg.data))
            elif msg.opcode == Opcode.CLOSE:
                self.eof = True
                self.read_off()
                relay.end(src, "WebSocket closed")
                return False
        return True

    def pending(self) -> bool:
        return self.dst.out_bytes > 0

    def stop(self) -> None:
        self.read_off()


class Relay:
    """A paired connection: ``a`` and ``b`` until either ends. ``on_done(relay, reason)`` runs once."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        a: Endpoint,
        b: Endpoint,
        on_done: Callable[[Relay, str], None],
    ) -> None:
        self.loop, self.a, self.b, self.on_done = loop, a, b, on_done
        self.ab = _Pump(self, a, b)
        self.ba = _Pump(self, b, a)
        self.started = time.monotonic()
        self.done = False
        self.reason = ""
        self.ws_code = 1000
        self._closing: asyncio.TimerHandle | None = None

    def start(self) -> None:
        for ep in (self.a, self.b):
            if ep.out:
                self._watch_writes(ep)
        self.ab.start()
        self.ba.start()

    @property
    def bytes_ab(self) -> int:
        return self.ab.moved

    @property
    def bytes_ba(self) -> int:
        return self.ba.moved

    def inject(self, src: Endpoint, data: bytes, messages: list[Message]) -> None:
        """What ``src`` sent right behind its handshake, read before the relay existed: deliver it first."""
        pump = self.ab if src is self.a else self.ba
        if data:
            pump.moved += len(data)
            self.send(pump.dst, pump.dst.frame(data))
        if messages:
            pump.deliver(messages)
        if pump.dst.out:
            pump.read_off()

    # -- writes ---------------------------------------------------------------------------------------

    def send(self, ep: Endpoint, parts: list[bytes | bytearray | memoryview]) -> None:
        if ep.closed:
            return
        ep.queue(parts)
        if not ep.writing:
            self._flush(ep)

    def _flush(self, ep: Endpoint) -> None:
        try:
            empty = ep.flush()
        except OSError as exc:
            self.end(ep, _why(exc))
            return
        if empty:
            if ep.writing:
                ep.writing = False
                self.loop.remove_writer(ep.fd)
            if self._closing is not None:
                self._maybe_finish()
        else:
            self._watch_writes(ep)
        if empty:
            (self.ba if ep is self.a else self.ab).read_on()

    def _watch_writes(self, ep: Endpoint) -> None:
        if not ep.writing:
            ep.writing = True
            self.loop.add_writer(ep.fd, self._flush, ep)

    # -- ending ------------------------------------------------------------------------------------

    def end(self, side: Endpoint, reason: str, ws_code: int = 1000) -> None:
        """``side`` ended or failed. After a clean end, what it sent is delivered first; then both close."""
        if self.done:
            return
        if self._closing is not None:  # already handing over: anything more ends it now
            self._finish()
            return
        self.reason, self.ws_code = f"{side.label}: {reason}", ws_code
        outgoing = self.ab if side is self.a else self.ba
        if reason in ("closed", "WebSocket closed") and outgoing.pending():
            self._closing = self.loop.call_later(DRAIN_TIMEOUT_S, self._finish)
            return
        self._finish()

    def _maybe_finish(self) -> None:
        if not (self.ab.pending() or self.ba.pending()):
            self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self._closing is not None:
            self._closing.cancel()
        for direction in (self.ab, self.ba):
            direction.stop()
        for ep in (self.a, self.b):
            if ep.writing:
                ep.writing = False
                self.loop.remove_writer(ep.fd)
            ep.close(self.ws_code, "peer closed")
        self.on_done(self, self.reason or "closed")


def _why(exc: OSError) -> str:
    if exc.errno in _GONE:
        return f"gone ({os.strerror(exc.errno or 0)})"
    return f"error ({exc})"
