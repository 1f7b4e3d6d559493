"""The tracker's asyncio driver: sockets in, :class:`~tether.tracker.core.TrackerCore` calls out.

One ``asyncio.Protocol`` per connection; each reply is one ``transport.write`` (length and body
together) on a ``TCP_NODELAY`` socket, and ``TCP_QUICKACK`` is set while a peer is mid-frame, so a
TVM client that writes length and body in two sends is not held up by delayed ACKs. A peer that sends
garbage gets one log line and a closed connection; nothing it sends can stop the tracker.

Bounds kept here, where connections are accepted: at most ``max_connections_per_peer`` open from one
address (the next is closed at once), and at most ``max_connections`` in all (by default the file
descriptor limit less a reserve): past it the connections that hold nothing, idle longest, are closed to
make room, so a new peer is still answered when silent sockets fill the table. When ``accept`` fails for
want of descriptors anyway (EMFILE: descriptors used elsewhere in the process), the same happens and
asyncio accepts again a second later. The handshake and idle deadlines live in the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ..aio.loop_thread import LoopThread
from ..aio.net import Keepalive, bind_listener, format_hostport, quickack, tune_socket
from ..aio.tls import TlsListener, server_context
from ..errors import AuthError, ConfigError, RemoteProtocolError
from ..loglimit import PeerLogLimit
from ..protocol.auth import Keyring, parse_networks
from ..protocol.tracker import TrackerServerStream
from .access import Access
from .config import TrackerConfig
from .core import TrackerCore
from .registry import Connection

if TYPE_CHECKING:
    from ..journal import Journal

__all__ = ["PeerLogLimit", "TrackerServer", "TrackerThread", "run_tracker"]

logger = logging.getLogger("tether.tracker")

#: Linux copies NODELAY and the keepalive settings from a listening socket to the sockets it accepts,
#: so they are set once on the listener there; elsewhere on every accepted socket.
_OPTIONS_INHERITED = sys.platform == "linux"

#: A peer that lets this many reply bytes pile up unread is dropped (SUMMARY floods, dead readers).
MAX_UNREAD_REPLY_BYTES = 16 * 1024 * 1024


class _TrackerProtocol(asyncio.Protocol):
    __slots__ = ("_conn", "_core", "_greet", "_host", "_server", "_sock", "_stream", "_transport")

    def __init__(self, server: TrackerServer) -> None:
        self._server = server
        self._core = server.core
        self._transport: asyncio.Transport | None = None
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._stream = TrackerServerStream(server.config.max_frame_bytes)
        self._greet = True  # until the magic echo has been sent
        self._host: str | None = None  # the peer's address while it counts against the limits

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername") or ("?", 0)
        host = str(peer[0])
        if not self._server.admit(host):
            self._transport.abort()
            return
        self._host = host
        if sock is not None:
            self._sock = sock
            if not _OPTIONS_INHERITED:
                tune_socket(sock, self._server.keepalive)
        self._conn = self._core.connect(self, host, int(peer[1]))

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
                    self._core.greeted(conn)
            for msg in messages:
                self._core.receive(conn, msg)
                if conn.is_closed():  # a STOP, or a liveness drop
                    return
        except RemoteProtocolError as exc:
            if self._server.log_limit.allow(conn.host):
                logger.warning("closing %s: %s", conn.address, exc)
            self._drop()
            return
        except AuthError as exc:  # the refusal is sent: let it reach the peer, then close
            if self._server.log_limit.allow(conn.host):
                logger.warning("refused %s: %s", conn.address, exc)
            self._core.disconnect(conn)
            self.close()
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
        self._release()
        self._server.forget(self)

    def _release(self) -> None:
        if self._host is not None:
            self._server.release(self._host)
            self._host = None

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

    def close(self, abort: bool = False) -> None:
        self._release()  # its descriptor is about to be free: room for the next peer
        if self._transport is not None:
            if abort:
                self._transport.abort()
            else:
                self._transport.close()

    def _drop(self) -> None:
        if self._conn is not None:
            self._core.disconnect(self._conn)
        if self._transport is not None:
            self._transport.abort()


class TrackerServer:
    """A tracker bound to a socket, served on the running event loop.

    ``await start()`` binds (raising :class:`ConfigError` when no port is free), then ``host``/``port``
    tell where; ``await serve_until_stopped()`` returns after :meth:`stop` or a STOP message.
    """

    def __init__(self, config: TrackerConfig | None = None, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config or TrackerConfig()
        cfg = self.config
        keyring = Keyring.load(cfg.auth_file) if cfg.auth_file else None
        access = Access(keyring, parse_networks(cfg.allow_tvm))
        kwargs: dict[str, Any] = {"wakeup": self._wakeup, "on_stop": self.stop, "access": access}
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
        #: one line per refused connection, a few per window in a flood
        self.refusal_log = PeerLogLimit(logger=logger, about="refused connections")
        #: connections admitted and not closed, in all and per peer address
        self.open_connections = 0
        self._per_host: dict[str, int] = {}
        #: ``config.max_connections``, or what the file descriptor limit allows (0: no limit); set by start()
        self.max_connections = 0
        self._listen_fd: int | None = None
        self._emfile_at = float("-inf")  # loop time of the last EMFILE handled
        self._prev_handler: Any = None
        #: With TLS: the port served in the clear (``TrackerConfig.plain_port``), else None.
        self.plain_port: int | None = None
        self._tls_listener: TlsListener | None = None
        #: The history journal (``tether tracker --db``; :mod:`tether.journal`), set before start(); None without
        self.journal: Journal | None = None

    @property
    def stop_key(self) -> str:
        return self.core.stop_key

    def reload_auth(self) -> None:
        """Read ``auth_file`` again (SIGHUP); a file that does not parse leaves the keyring as it was.
        Call from the loop's thread."""
        if not self.config.auth_file:
            return
        try:
            keyring = Keyring.load(self.config.auth_file)
        except ConfigError as exc:
            logger.error("auth file not reloaded, the old keyring stays: %s", exc)
            return
        closed = self.core.reload_keyring(keyring)
        logger.info("auth file reloaded: %d credential(s), %d connection(s) closed", len(keyring), closed)

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
        self.max_connections = connection_limit(cfg)
        self._listen_fd = sock.fileno()
        self._prev_handler = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._on_loop_exception)
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

    # -- connection limits -------------------------------------------------------------------------

    def admit(self, host: str) -> bool:
        """Whether a new connection from ``host`` may stay (False: the caller closes it). At the total
        limit, connections holding nothing make room (:meth:`TrackerCore.shed_idle`)."""
        cfg = self.config
        n = self._per_host.get(host, 0)
        if cfg.max_connections_per_peer and n >= cfg.max_connections_per_peer:
            if self.refusal_log.allow(host):
                logger.warning(
                    "refused a connection from %s: %d already open from that address (--max-connections-per-peer)",
                    host,
                    n,
                )
            return False
        limit = self.max_connections
        if limit and self.open_connections >= limit:
            # a few more at once: a flood of connects does not pay for a scan of every connection each
            self.core.shed_idle(self.open_connections - limit + 1 + limit // 64)
            if self.open_connections >= limit:
                if self.refusal_log.allow(host):
                    logger.warning(
                        "refused a connection from %s: %d connections open (the limit), each a server or a waiter",
                        host,
                        self.open_connections,
                    )
                return False
        self._per_host[host] = n + 1
        self.open_connections += 1
        return True

    def release(self, host: str) -> None:
        """A connection admitted from ``host`` is closing."""
        self.open_connections -= 1
        n = self._per_host.get(host, 0) - 1
        if n > 0:
            self._per_host[host] = n
        else:
            self._per_host.pop(host, None)

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc, sock = context.get("exception"), context.get("socket")
        if (
            isinstance(exc, OSError)
            and exc.errno in (errno.EMFILE, errno.ENFILE)
            and sock is not None
            and sock.fileno() == self._listen_fd
        ):
            # asyncio reports it once per connection it tried to accept in that round (up to the backlog):
            # make room once per round
            now = loop.time()
            if now - self._emfile_at < 0.5:
                return
            self._emfile_at = now
            closed = self.core.shed_idle(max(8, self.open_connections // 8))  # an emergency: room for many
            if self.refusal_log.allow("accept"):
                logger.warning(
                    "accept failed (%s) with %d connections open: %d holding nothing closed; accepting again in 1 s",
                    exc.strerror,
                    self.open_connections,
                    closed,
                )
            return
        if self._prev_handler is not None:
            self._prev_handler(loop, context)
        else:
            loop.default_exception_handler(context)

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
        if self._loop is not None and self._loop.get_exception_handler() == self._on_loop_exception:
            self._loop.set_exception_handler(self._prev_handler)
        if self._server is not None:
            self._server.close()
        if self._tls_listener is not None:
            self._tls_listener.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._tls_listener.wait_closed(), 2.0)
        for proto in list(self._protocols):
            proto.close()  # gracefully: a last reply (STOP's) still goes out
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while self._protocols and loop.time() < deadline:  # closing transports let go of their sockets
            await asyncio.sleep(0.01)
        for proto in list(self._protocols):  # a TLS goodbye that did not finish: its socket must not leak
            proto.close(abort=True)
        await asyncio.sleep(0)
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


def connection_limit(config: TrackerConfig) -> int:
    """Connections the tracker keeps open at once: ``config.max_connections``, else the soft
    RLIMIT_NOFILE less ``config.fd_reserve`` (at least 1); 0 when neither limits them."""
    if config.max_connections:
        return config.max_connections
    try:
        import resource
    except ImportError:  # not a Unix
        return 0
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(1, soft - config.fd_reserve)


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
