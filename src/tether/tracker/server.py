"""The tracker's asyncio driver: sockets in, :class:`~tether.tracker.core.TrackerCore` calls out.

One ``asyncio.Protocol`` per connection; each reply is one ``transport.write`` (length and body
together) on a ``TCP_NODELAY`` socket, and ``TCP_QUICKACK`` is set while a peer is mid-frame, so a
TVM client that writes length and body in two sends is not held up by delayed ACKs. A peer that sends
garbage gets one log line and a closed connection; nothing it sends can stop the tracker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from ..aio.loop_thread import LoopThread
from ..aio.net import Keepalive, bind_listener, format_hostport, quickack, tune_socket
from ..aio.tls import TlsListener, server_context
from ..errors import RemoteProtocolError
from ..protocol.tracker import TrackerServerStream
from .config import TrackerConfig
from .core import TrackerCore
from .registry import Connection

__all__ = ["TrackerServer", "TrackerThread", "run_tracker"]

logger = logging.getLogger("tether.tracker")

#: Linux copies NODELAY and the keepalive settings from a listening socket to the sockets it accepts,
#: so they are set once on the listener there; elsewhere on every accepted socket.
_OPTIONS_INHERITED = sys.platform == "linux"

#: A peer that lets this many reply bytes pile up unread is dropped (SUMMARY floods, dead readers).
MAX_UNREAD_REPLY_BYTES = 16 * 1024 * 1024


class _TrackerProtocol(asyncio.Protocol):
    __slots__ = ("_conn", "_core", "_greet", "_server", "_sock", "_stream", "_transport")

    def __init__(self, server: TrackerServer) -> None:
        self._server = server
        self._core = server.core
        self._transport: asyncio.Transport | None = None
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._stream = TrackerServerStream(server.config.max_frame_bytes)
        self._greet = True  # until the magic echo has been sent

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername") or ("?", 0)
        if sock is not None:
            self._sock = sock
            if not _OPTIONS_INHERITED:
                tune_socket(sock, self._server.keepalive)
        self._conn = self._core.connect(self, str(peer[0]), int(peer[1]))

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is None or conn.is_closed():
            return
        try:
            messages = self._stream.receive_data(data)
            if self._greet:
                greeting = self._stream.data_to_send()
                if greeting:
                    self._greet = False
                    self.send(greeting)
            for msg in messages:
                self._core.receive(conn, msg)
                if conn.is_closed():  # a STOP, or a liveness drop
                    return
        except RemoteProtocolError as exc:
            if self._server.log_limit.allow(conn.host):
                logger.warning("closing %s: %s", conn.address, exc)
            self._drop()
            return
        except Exception:
            if self._server.log_limit.allow(conn.host):
                logger.exception("closing %s: internal error while handling its message", conn.address)
            self._drop()
            return
        if self._sock is not None and self._stream.incomplete:
            quickack(self._sock)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._core.disconnect(self._conn)
        self._server.forget(self)

    # Link, for the core

    def send(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        # what was still unread before this reply: one big reply (a SUMMARY of a large pool) is fine,
        # replies piling up unread are not
        if transport.get_write_buffer_size() - len(data) > MAX_UNREAD_REPLY_BYTES:
            assert self._conn is not None
            logger.warning(
                "closing %s: %d reply bytes left unread", self._conn.address, transport.get_write_buffer_size()
            )
            transport.abort()  # connection_lost() then withdraws its slots and requests

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _drop(self) -> None:
        if self._conn is not None:
            self._core.disconnect(self._conn)
        if self._transport is not None:
            self._transport.abort()


@dataclass(slots=True)
class _Window:
    start: float
    logged: int = 0
    left_out: int = 0


class PeerLogLimit:
    """At most ``lines`` log lines per ``window_s`` seconds for each peer host; a line past the limit is
    counted, and the first line of the next window says how many were left out. A fuzzer or a broken
    peer that sends bad frames on connection after connection costs one line per frame at first, then a
    few per window. At most ``max_hosts`` hosts are remembered (the oldest window is forgotten first)."""

    def __init__(
        self,
        lines: int = 5,
        window_s: float = 10.0,
        *,
        max_hosts: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lines, self.window_s, self.max_hosts, self._clock = lines, window_s, max_hosts, clock
        self._hosts: dict[str, _Window] = {}

    def allow(self, host: str) -> bool:
        """True when a line about ``host`` may be logged now."""
        now = self._clock()
        window = self._hosts.get(host)
        if window is None or now - window.start >= self.window_s:
            if window is not None:
                del self._hosts[host]
                if window.left_out:
                    logger.warning("%d more line(s) about bad input from %s were left out", window.left_out, host)
            if len(self._hosts) >= self.max_hosts:
                del self._hosts[next(iter(self._hosts))]
            self._hosts[host] = window = _Window(now)
        if window.logged < self.lines:
            window.logged += 1
            return True
        window.left_out += 1
        return False


class TrackerServer:
    """A tracker bound to a socket, served on the running event loop.

    ``await start()`` binds (raising :class:`ConfigError` when no port is free), then ``host``/``port``
    tell where; ``await serve_until_stopped()`` returns after :meth:`stop` or a STOP message.
    """

    def __init__(self, config: TrackerConfig | None = None, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config or TrackerConfig()
        kwargs: dict[str, Any] = {"wakeup": self._wakeup, "on_stop": self.stop}
        if clock is not None:
            kwargs["clock"] = clock
        self.core = TrackerCore(self.config, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._protocols: set[_TrackerProtocol] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._stopped: asyncio.Event | None = None
        self.host = self.config.host
        self.port = 0
        cfg = self.config
        self.keepalive = Keepalive(cfg.keepalive_idle_s, cfg.keepalive_interval_s, cfg.keepalive_probes)
        self.log_limit = PeerLogLimit()
        #: With TLS: the port served in the clear (``TrackerConfig.plain_port``), else None.
        self.plain_port: int | None = None
        self._tls_listener: TlsListener | None = None

    @property
    def stop_key(self) -> str:
        return self.core.stop_key

    @property
    def address(self) -> str:
        return format_hostport(self.host, self.port)

    async def start(self) -> None:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        sock = bind_listener(cfg.host, cfg.port, cfg.port_end, cfg.backlog)
        tune_socket(sock, self.keepalive)  # inherited by accepted sockets on Linux
        sockname = sock.getsockname()
        self.host, self.port = str(sockname[0]), int(sockname[1])
        plain: socket.socket | None = sock
        if cfg.tls is not None:
            plain = self._start_tls(sock)  # the TLS port; the plain one, if any, is served below
        if plain is not None:
            self._server = await self._loop.create_server(self._new_protocol, sock=plain, backlog=cfg.backlog)

    def _start_tls(self, sock: socket.socket) -> socket.socket | None:
        """Serve TLS on ``sock``; the plain listener of ``plain_port`` (None without one)."""
        cfg = self.config
        assert cfg.tls is not None and self._loop is not None
        try:
            context = server_context(cfg.tls)
            plain = None
            if cfg.plain_port is not None:
                plain = bind_listener(cfg.host, cfg.plain_port, None, cfg.backlog)
                tune_socket(plain, self.keepalive)
                self.plain_port = int(plain.getsockname()[1])
        except BaseException:
            sock.close()
            raise
        self._tls_listener = TlsListener(self._loop, sock, self._new_protocol, context, on_failure=self._tls_failed)
        return plain

    def _tls_failed(self, where: str, reason: str) -> None:
        if self.log_limit.allow(where.rpartition(":")[0]):
            logger.info("refused %s on the TLS port: %s", where, reason)

    def _new_protocol(self) -> _TrackerProtocol:
        proto = _TrackerProtocol(self)
        self._protocols.add(proto)
        return proto

    def forget(self, proto: _TrackerProtocol) -> None:
        self._protocols.discard(proto)

    async def serve_until_stopped(self) -> None:
        assert self._stopped is not None, "start() first"
        await self._stopped.wait()
        await self._shutdown()

    def stop(self) -> None:
        """Ask the tracker to stop (from the loop's thread); ``serve_until_stopped`` then returns."""
        if self._stopped is not None:
            self._stopped.set()

    async def _shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close()
        if self._tls_listener is not None:
            self._tls_listener.close()
        for proto in list(self._protocols):
            proto.close()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        logger.info("tracker on %s stopped", self.address)

    # timers: one handle, re-armed to the core's earliest deadline

    def _wakeup(self, when: float) -> None:
        if self._loop is None or (self._timer_at is not None and self._timer_at <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_later(max(0.0, when - self.core.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        try:
            nxt = self.core.on_timer()
        except Exception:
            logger.exception("tracker timer failed")
            nxt = self.core.clock() + 1.0
        if nxt is not None:
            self._wakeup(nxt)


async def run_tracker(config: TrackerConfig, ready: Callable[[TrackerServer], None] | None = None) -> None:
    """Bind, call ``ready(server)``, serve until stopped (STOP message or :meth:`TrackerServer.stop`)."""
    server = TrackerServer(config)
    await server.start()
    if ready is not None:
        ready(server)
    await server.serve_until_stopped()


class TrackerThread(LoopThread[TrackerServer]):
    """A tracker on its own event loop in a background thread: for tests, notebooks and the demo.

    ``with TrackerThread(TrackerConfig(port=0)) as t: ...`` then ``t.host``, ``t.port``. Raises
    :class:`ConfigError` from the constructor when it cannot bind.
    """

    def __init__(self, config: TrackerConfig | None = None, start_timeout: float = 10.0) -> None:
        super().__init__(TrackerServer(config or TrackerConfig(port=0)), "tether-tracker", start_timeout)

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def core(self) -> TrackerCore:
        return self.server.core
