"""TLS for tether, on the standard library's :mod:`ssl` alone: contexts, handshakes, the relay that
carries a TLS session over a local socket, error messages that say what to fix, and telling TLS bytes
from tether's.

Where TLS sits, role by role (README, "TLS"):

- **tracker**: with a certificate, its port speaks TLS from the first byte (asyncio's
  ``create_server(ssl=...)``). TVM's servers and clients cannot speak TLS; ``--plain-port`` opens a second,
  plain port beside it for them. A separate port rather than one port for both: telling a TLS hello from
  TVM's magic is easy, but asyncio cannot start TLS on bytes it has already read, and one plain door on
  a TLS port would make the certificates decorative.
- **device server and proxy**: the session handshake (magic, ``client:KEY``) stays in the clear on the
  server's one port, then TLS starts, STARTTLS-like. A tether client asks with ``-tls=1`` in its key; a
  server with a certificate marks its answer ``-tls=1``. The same bytes pass through a proxy, which pairs
  on the key it reads in the clear and relays everything after it untouched: TLS runs end to end,
  client to device, with the device's certificate, whether the client came directly or through a
  proxy (a client cannot tell which a grant points at, so both must work alike). A server with a
  certificate serves TLS sessions only: TVM's clients get MISMATCH, a plain tether client an answer
  that makes it raise :class:`~tether.errors.TLSError`.
- After its TLS handshake the server sends one byte, :data:`READY`, inside TLS, and the client waits for
  it: TLS 1.3 tells a client that its certificate was refused only after the client's own handshake has
  finished, and a session must not start on a connection the server is about to drop.
- A session runs in a worker process that receives its socket with ``socket.send_fds``; TLS state cannot
  follow a socket into another process. :func:`relay` keeps the TLS connection in the server and gives the
  worker one end of a ``socketpair``: two threads pump between them, decrypting one way and encrypting
  the other (a :class:`TlsStream` on memory BIOs under a lock: OpenSSL forbids one connection's read and
  write on two threads at once). The client does the same, so the session code (``sendmsg``,
  ``sendfile``, ``recv_into``) runs unchanged on a plain socket at both ends.
- **proxy**: its web port serves ``wss://`` with a certificate, through the same relay (the clear end is
  an ordinary WebSocket peer of the proxy's loop); its TCP port stays as it is, for the reason above.

:class:`TLSConfig` names files (CA, certificate, key) and, for clients, the name expected in the server's
certificate; where an ``ssl.SSLContext`` is accepted instead, it is used as given.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias, cast

from ..errors import ConfigError, TLSError

try:
    import ssl
except ImportError:  # pragma: no cover - a Python built without OpenSSL (some devices): plain only
    ssl = None  # type: ignore[assignment]

__all__ = [
    "READY",
    "SSL_ERRORS",
    "TLS_OPTION",
    "TLSConfig",
    "TLSLike",
    "TlsListener",
    "TlsStream",
    "client_context",
    "dropped_after_handshake",
    "looks_like_tls",
    "relay",
    "server_context",
    "server_name",
    "start_client_tls",
    "start_server_tls",
    "tls_error",
    "wrap_client_socket",
]

logger = logging.getLogger(__name__)

#: The key option that asks for (client) or announces (server) TLS after the handshake: ``-tls=1``.
TLS_OPTION: Final = "tls"
#: What a server sends inside TLS once its handshake is done and the client is accepted.
READY: Final = b"\x01"
#: What ``except`` clauses catch as TLS failures (nothing on a Python without the ssl module).
SSL_ERRORS: Final[tuple[type[BaseException], ...]] = () if ssl is None else (ssl.SSLError,)
#: Largest plaintext chunk a relay moves per step, each way.
RELAY_CHUNK: Final = 1 << 20
#: Seconds a relay whose one direction ended waits for the other before forcing it.
CLOSE_TIMEOUT_S: Final = 5.0
_RECV_SIZE: Final = 1 << 18
_WRITE_SLICE: Final = 1 << 18
_PAIR_BUFFER: Final = 4 << 20
#: A fatal TLS alert (unexpected_message): the answer of a TLS port to a peer that does not speak TLS.
PLAIN_PEER_ALERT: Final = b"\x15\x03\x03\x00\x02\x02\x0a"
#: The answer of a TLS web port to a plain HTTP request.
_HTTP_TO_TLS_PORT: Final = (
    b"HTTP/1.1 400 This port speaks TLS: use wss:// (or https://)\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)
#: OpenSSL's verify codes for a certificate that does not name the host (DNS name, IP address).
_NAME_MISMATCH: Final = (62, 64)


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """TLS settings, as file paths (PEM).

    On a server: ``cert``/``key`` are its identity (the key may be inside the certificate file), and
    ``ca`` makes client certificates required, signed by that CA. On a client: ``ca`` is the CA that
    signed the server's certificate (default: the system's trusted CAs), ``cert``/``key`` a client
    certificate for servers that require one, ``server_name`` the name the server's certificate must
    hold (default: the host connected to; through a proxy, the device's name), and ``check_hostname=False``
    checks the chain only.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if self.key and not self.cert:
            raise ConfigError("a TLS key needs its certificate (--tls-cert)")


#: What clients accept for ``tls=``: file names, or a context built elsewhere.
TLSLike: TypeAlias = "TLSConfig | ssl.SSLContext"


def _require_ssl() -> None:
    if ssl is None:  # pragma: no cover - see the import
        raise ConfigError("this Python has no ssl module (built without OpenSSL): TLS is not available here")


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str | None) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"TLS certificate {cert}{f' and key {key}' if key else ''} do not load ({exc.reason or exc}): "
            "PEM files of one key pair?"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read TLS certificate or key: {exc.strerror or exc}: {exc.filename}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    try:
        ctx.load_verify_locations(ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"TLS CA file {ca} does not load ({exc.reason or exc}): a PEM certificate?") from None
    except OSError as exc:
        raise ConfigError(f"cannot read TLS CA file {ca}: {exc.strerror or exc}") from None


def server_context(cfg: TLSConfig) -> ssl.SSLContext:
    """A server's context: TLS 1.2 or later, Python's defaults for client authentication, the
    certificate and key of ``cfg``; client certificates required when ``cfg.ca`` is given.
    Raises :class:`ConfigError` naming a file that does not load."""
    if not cfg.cert:
        raise ConfigError("TLS on a server needs its certificate (--tls-cert, and --tls-key unless it holds the key)")
    _require_ssl()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cfg.cert, cfg.key)
    if cfg.ca:
        _load_ca(ctx, cfg.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(tls: TLSLike) -> ssl.SSLContext:
    """A client's context: ``tls`` itself when it is one; else TLS 1.2 or later, the server verified
    against ``ca`` (or the system's CAs), hostname checked unless turned off, a client certificate when
    given. Contexts are built once per configuration. Raises :class:`ConfigError`."""
    _require_ssl()
    if isinstance(tls, ssl.SSLContext):
        return tls
    return _client_context(tls)


@functools.lru_cache(maxsize=32)
def _client_context(cfg: TLSConfig) -> ssl.SSLContext:
    try:  # with a CA file, only that CA is trusted (not the system's too)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"TLS CA file {cfg.ca} does not load ({exc.reason or exc}): a PEM certificate?") from None
    except OSError as exc:
        raise ConfigError(f"cannot read TLS CA file {cfg.ca}: {exc.strerror or exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = cfg.check_hostname
    if cfg.cert:
        _load_chain(ctx, cfg.cert, cfg.key)
    return ctx


def server_name(tls: TLSLike, host: str) -> str:
    """The name the server's certificate must hold: ``tls.server_name``, else the host connected to."""
    return tls.server_name if isinstance(tls, TLSConfig) and tls.server_name else host


def looks_like_tls(data: bytes | bytearray) -> bool:
    """True when ``data`` starts like a TLS record (a handshake or an alert, version 3.x): what a TLS peer
    sends or answers where tether expects its own magic."""
    return len(data) >= 2 and data[0] in (0x15, 0x16) and data[1] == 0x03


_PLAIN_PEER: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"}
)
_CERT_REFUSED: Final = frozenset(
    {
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_DECRYPT_ERROR",
    }
)


def tls_error(exc: BaseException, where: str, tls: TLSLike | None = None) -> TLSError:
    """The :class:`TLSError` for ``exc``, raised while this side was a TLS client of ``where``, in words
    that say what to fix."""
    has_cert = isinstance(tls, TLSConfig) and bool(tls.cert)
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or str(exc)
        if exc.verify_code in _NAME_MISMATCH:
            return TLSError(
                f"{where}: its TLS certificate is not for the name checked ({message}): connect by a name the "
                "certificate holds, or give that name (TLSConfig(server_name=...), --tls-server-name)"
            )
        return TLSError(
            f"{where}: cannot verify its TLS certificate ({message}): give the CA that signed it "
            "(TLSConfig(ca=...), --tls-ca)"
        )
    reason = str(getattr(exc, "reason", None) or "")
    if "CERTIFICATE_REQUIRED" in reason or (reason == "SSLV3_ALERT_HANDSHAKE_FAILURE" and not has_cert):
        return TLSError(
            f"{where} requires a client certificate ({reason}): give one signed by a CA it trusts "
            "(TLSConfig(cert=..., key=...), --tls-cert/--tls-key)"
        )
    if reason in _CERT_REFUSED:
        what = "this side's client certificate" if has_cert else "the TLS handshake"
        return TLSError(
            f"{where} refused {what} ({reason}): use a certificate signed by the CA it trusts (its --tls-ca)"
        )
    if reason in _PLAIN_PEER:
        return TLSError(
            f"{where} does not speak TLS ({reason}): it is a plain port; connect without TLS, or to its TLS port"
        )
    if isinstance(exc, ssl.SSLEOFError | ConnectionError | EOFError):
        return TLSError(
            f"{where} closed the connection during the TLS handshake ({exc}): a plain tether tracker or proxy "
            "port does that to a TLS client; or it refused this side's certificate"
        )
    return TLSError(f"{where}: TLS failed: {exc}")


def dropped_after_handshake(where: str, tls: TLSLike | None) -> TLSError:
    """The :class:`TLSError` for a peer that closed right after the TLS handshake, before its first
    word: with TLS 1.3 that is how a server refuses a client's certificate (or its lack of one)."""
    has_cert = isinstance(tls, TLSConfig) and bool(tls.cert)
    what = (
        "refused this side's client certificate: use one signed by the CA it trusts (its --tls-ca)"
        if has_cert
        else "requires a client certificate: give one signed by a CA it trusts (TLSConfig(cert=..., key=...), "
        "--tls-cert/--tls-key)"
    )
    return TLSError(f"{where} closed the connection right after the TLS handshake: it probably {what}")


def wrap_client_socket(
    sock: socket.socket, tls: TLSLike, host: str, where: str, timeout: float | None
) -> ssl.SSLSocket:
    """TLS from the first byte on a connected blocking socket (a tracker's TLS port): the handshake done
    within ``timeout`` seconds, the socket returned blocking. Raises :class:`TLSError`; closes ``sock``
    on failure."""
    ctx = client_context(tls)
    try:
        tls_sock = ctx.wrap_socket(sock, server_hostname=server_name(tls, host), do_handshake_on_connect=False)
    except ssl.SSLError as exc:  # pragma: no cover - a context that cannot make a client socket
        sock.close()
        raise tls_error(exc, where, tls) from None
    try:
        tls_sock.settimeout(timeout)
        tls_sock.do_handshake()
        tls_sock.settimeout(None)
    except TimeoutError:
        tls_sock.close()
        raise TLSError(f"{where}: no TLS handshake within {timeout} s: is it a TLS port?") from None
    except (ssl.SSLError, OSError) as exc:
        tls_sock.close()
        raise tls_error(exc, where, tls) from None
    return tls_sock


class TlsStream:
    """TLS over a connected socket through memory BIOs: reads and writes may run on two threads.

    ``_ssl_lock`` guards the SSL object; ``_wire_lock`` keeps ciphertext leaving in the order it was
    produced (whoever drains the outgoing BIO sends what it drained before anyone drains again).
    """

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool = False, server_hostname: str = ""
    ) -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname or None
        )
        self._ssl_lock = threading.Lock()
        self._wire_lock = threading.Lock()
        self._eof = False

    def _wait(self, deadline: float | None) -> None:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("TLS handshake took too long")
            self.sock.settimeout(left)

    def handshake(self, deadline: float | None = None) -> None:
        """The TLS handshake, done by ``deadline`` (``time.monotonic()``) or TimeoutError; ssl.SSLError or
        OSError when it fails."""
        while True:
            try:
                with self._ssl_lock:
                    self._obj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                self._wait(deadline)
                data = self.sock.recv(_RECV_SIZE)
                if not data:
                    raise ConnectionResetError("the peer closed the connection during the TLS handshake") from None
                with self._ssl_lock:
                    self._incoming.write(data)
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    self._flush()  # the alert that tells the peer why
                raise
            else:
                self._flush()
                return

    def _flush(self) -> None:
        with self._wire_lock:
            with self._ssl_lock:
                data = self._outgoing.read()
            if data:
                self.sock.sendall(data)

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, deadline: float | None = None) -> int:
        """Decrypted bytes into ``buffer`` (as many records as are here, at least one byte); 0 at the end
        of the stream."""
        view = memoryview(buffer)
        size = nbytes or len(view)
        while True:
            got = 0
            with self._ssl_lock:
                try:
                    while got < size:  # several records per call when they are here
                        n = cast("int", self._obj.read(size - got, view[got:size]))  # a count, with a buffer
                        if not n:
                            break
                        got += n
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    self._eof = True
                pending = self._outgoing.pending
            if pending:  # e.g. a TLS 1.3 key update answered while reading
                self._flush()
            if got or self._eof:
                return got
            self._wait(deadline)
            data = self.sock.recv(_RECV_SIZE)
            with self._ssl_lock:
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
                    self._eof = True

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send ``data``, a slice at a time: the peer starts decrypting sooner, and OpenSSL's
        memory BIO grows by copying, which a megabyte of records in one go makes slow."""
        view = memoryview(data).cast("B")
        with self._wire_lock:
            for start in range(0, len(view), _WRITE_SLICE):
                with self._ssl_lock:
                    self._obj.write(view[start : start + _WRITE_SLICE])
                    out = self._outgoing.read()
                self.sock.sendall(out)

    # what a plain socket's user also calls (the WebSocket client wraps either)
    def settimeout(self, value: float | None, /) -> None:
        self.sock.settimeout(value)

    def shutdown(self, how: int, /) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close_notify(self) -> None:
        """Tell the peer that nothing more comes (TLS's close_notify); errors are ignored."""
        with contextlib.suppress(ssl.SSLError, OSError):
            with self._ssl_lock, contextlib.suppress(ssl.SSLWantReadError):
                self._obj.unwrap()
            self._flush()


def start_server_tls(
    sock: socket.socket, context: ssl.SSLContext, timeout: float | None, peer: str, *, ready: bool = True
) -> socket.socket:
    """The server's side of a session's TLS, after the handshake reply: TLS handshake (within ``timeout``
    seconds), :data:`READY` (unless ``ready=False``: TLS from the first byte, as for ``wss://``), then
    :func:`relay`. Returns the local socket that carries the session in the clear. Raises
    :class:`TLSError`; ``sock`` is closed then."""
    stream = TlsStream(sock, context, server_side=True)
    try:
        stream.handshake(None if timeout is None else time.monotonic() + timeout)
        if ready:
            stream.sendall(READY)
    except TimeoutError:
        sock.close()
        raise TLSError(f"no TLS handshake from {peer} within {timeout} s") from None
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        if reason == "HTTP_REQUEST" and not ready:  # ws:// or http:// to a wss:// port: say so, in HTTP
            with contextlib.suppress(OSError):
                sock.sendall(_HTTP_TO_TLS_PORT)
        sock.close()
        raise TLSError(f"TLS handshake with {peer} failed: {reason}") from None
    return relay(stream, f"tls {peer}")


def start_client_tls(sock: socket.socket, tls: TLSLike, host: str, where: str, timeout: float | None) -> socket.socket:
    """The client's side of a session's TLS, after a handshake reply marked ``-tls=1``: TLS handshake and
    the server's :data:`READY`, within ``timeout`` seconds, then :func:`relay`. Returns the local socket
    that carries the session in the clear. Raises :class:`TLSError`; ``sock`` is closed then."""
    stream = TlsStream(sock, client_context(tls), server_hostname=server_name(tls, host))
    deadline = None if timeout is None else time.monotonic() + timeout
    got = bytearray(1)
    try:
        stream.handshake(deadline)
        n = stream.recv_into(got, 1, deadline)
    except TimeoutError:
        sock.close()
        raise TLSError(f"{where}: TLS did not start within {timeout} s") from None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise tls_error(exc, where, tls) from None
    if n != 1 or bytes(got) != READY:
        sock.close()
        raise dropped_after_handshake(where, tls)
    return relay(stream, f"tls {where}")


class _Relay:
    """Two threads between a TLS stream and the inner end of a socketpair; the last one out closes both."""

    def __init__(self, stream: TlsStream, inner: socket.socket, label: str) -> None:
        self.stream = stream
        self.inner = inner
        self.label = label
        self.up_done = threading.Event()
        self.down_done = threading.Event()
        self._lock = threading.Lock()
        self._ended = 0

    def down(self) -> None:
        """Network to local: decrypt."""
        buf = bytearray(RELAY_CHUNK)
        view = memoryview(buf)
        try:
            while n := self.stream.recv_into(view):
                self.inner.sendall(view[:n])
        except (OSError, ssl.SSLError) as exc:
            logger.debug("%s: from the network: %s", self.label, exc)
        finally:
            with contextlib.suppress(OSError):
                self.inner.shutdown(socket.SHUT_RDWR)  # the local side reads EOF; up's recv returns
            self._end(self.down_done, self.up_done)

    def up(self) -> None:
        """Local to network: encrypt; close_notify at the local side's end."""
        buf = bytearray(RELAY_CHUNK)
        view = memoryview(buf)
        try:
            while n := self.inner.recv_into(view):
                self.stream.sendall(view[:n])
            self.stream.close_notify()
        except (OSError, ssl.SSLError) as exc:
            logger.debug("%s: to the network: %s", self.label, exc)
        finally:
            with contextlib.suppress(OSError):
                self.stream.sock.shutdown(socket.SHUT_WR)
            self._end(self.up_done, self.down_done)

    def _end(self, mine: threading.Event, other: threading.Event) -> None:
        mine.set()
        with self._lock:
            self._ended += 1
            last = self._ended == 2
        if last:
            self.stream.sock.close()
            self.inner.close()
            return
        if not other.wait(CLOSE_TIMEOUT_S):  # the peer never closed its side, or the local side stopped reading
            for sock in (self.stream.sock, self.inner):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def relay(stream: TlsStream, label: str = "tls") -> socket.socket:
    """A blocking ``AF_UNIX`` stream socket that carries ``stream`` in the clear, pumped by two daemon
    threads: it can be handed to another process (``socket.send_fds``) or used with ``sendmsg`` and
    ``sendfile``. When either side ends, both are shut down and closed (the TLS side after a
    close_notify)."""
    stream.sock.settimeout(None)
    outer, inner = socket.socketpair()
    for sock in (outer, inner):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, _PAIR_BUFFER)
    pump = _Relay(stream, inner, label)
    threading.Thread(target=pump.down, name="tether-tls-down", daemon=True).start()
    threading.Thread(target=pump.up, name="tether-tls-up", daemon=True).start()
    return outer


class TlsListener:
    """A TLS port on an asyncio loop, for protocols made by ``factory`` (asyncio's ``create_server``
    with ``ssl=`` would do, but leaves a peer that does not speak TLS hanging: OpenSSL waits for a
    5-byte record header, and TVM's magic is 4 bytes).

    Each accepted connection's first byte is peeked: a TLS handshake record (0x16) goes on to asyncio's
    TLS (``connect_accepted_socket``, handshake within ``handshake_timeout`` seconds); anything else gets
    a TLS alert (:data:`PLAIN_PEER_ALERT`, which tether's clients recognise: :func:`looks_like_tls`) and
    is closed. ``on_failure(addr, reason)`` hears of each connection refused this way or whose TLS
    handshake failed (a certificate refused); ``listener`` is bound and listening already.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listener: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        *,
        handshake_timeout: float = 10.0,
        on_failure: Callable[[str, str], None] | None = None,
    ) -> None:
        self.loop, self.listener, self.factory, self.context = loop, listener, factory, context
        self.handshake_timeout = handshake_timeout
        self.on_failure = on_failure
        self._peeking: dict[socket.socket, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: try again in a while, serve the others meanwhile
                logger.warning("TLS accept failed: %s", exc)
                self.loop.remove_reader(self.listener.fileno())
                self.loop.call_later(0.5, self._resume)
                return
            conn.setblocking(False)
            where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            self._peeking[conn] = self.loop.call_later(self.handshake_timeout, self._give_up, conn, where)
            self.loop.add_reader(conn.fileno(), self._first_byte, conn, where)

    def _resume(self) -> None:
        if self.listener.fileno() >= 0:
            self.loop.add_reader(self.listener.fileno(), self._accept)

    def _forget(self, conn: socket.socket) -> None:
        timer = self._peeking.pop(conn, None)
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(conn.fileno())

    def _give_up(self, conn: socket.socket, where: str) -> None:
        self._forget(conn)
        conn.close()
        self._failed(where, f"sent nothing within {self.handshake_timeout:g} s")

    def _failed(self, where: str, reason: str) -> None:
        if self.on_failure is not None:
            self.on_failure(where, reason)

    def _first_byte(self, conn: socket.socket, where: str) -> None:
        try:
            data = conn.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._forget(conn)
        if data[:1] == b"\x16":
            task = self.loop.create_task(self._start(conn, where))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if data:
            with contextlib.suppress(OSError):
                conn.recv(65536)  # what it sent (its magic): closing on unread bytes would reset the alert away
                conn.send(PLAIN_PEER_ALERT)
            self._failed(where, "does not speak TLS (closed with a TLS alert)")
        conn.close()

    async def _start(self, conn: socket.socket, where: str) -> None:
        try:
            await self.loop.connect_accepted_socket(
                self.factory, conn, ssl=self.context, ssl_handshake_timeout=self.handshake_timeout
            )
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as exc:
            conn.close()
            self._failed(where, f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}")
        except asyncio.CancelledError:  # close() while its handshake ran: the socket must not outlive it
            conn.close()
            raise

    def close(self) -> None:
        """Stop accepting; drop connections still being peeked at or in their TLS handshake."""
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for conn in list(self._peeking):
            self._forget(conn)
            conn.close()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until the handshakes cancelled by :meth:`close` have closed their sockets."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
