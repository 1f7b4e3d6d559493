"""Sockets: listeners on a port range, client connects that try every address, TCP options.

The only module (with :mod:`.stream`) that creates sockets. Every tether socket gets ``TCP_NODELAY``
(TVM's missing NODELAY plus delayed ACKs cost ~44 ms per tracker reply) and keepalive, so a peer that
vanishes without a FIN is noticed by the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import sys
import time
from dataclasses import dataclass

from ..errors import ConfigError, ConnectFailed

__all__ = [
    "Keepalive",
    "bind_listener",
    "connect_tcp",
    "finish_sending",
    "format_hostport",
    "parse_hostport",
    "quickack",
    "tune_socket",
]

logger = logging.getLogger(__name__)

_HAS_QUICKACK = hasattr(socket, "TCP_QUICKACK")


@dataclass(frozen=True, slots=True)
class Keepalive:
    """TCP keepalive timing in seconds: idle before the first probe, between probes, probes before reset."""

    idle: int = 30
    interval: int = 10
    probes: int = 3


DEFAULT_KEEPALIVE = Keepalive()


def tune_socket(sock: socket.socket, keepalive: Keepalive | None = DEFAULT_KEEPALIVE) -> None:
    """NODELAY always; keepalive with the given timing where the platform allows it."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", keepalive.idle),
        ("TCP_KEEPINTVL", keepalive.interval),
        ("TCP_KEEPCNT", keepalive.probes),
    ):
        opt = getattr(socket, name, None)
        if opt is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)


def quickack(sock: socket.socket) -> None:
    """Ask Linux to ACK the next segment at once (the flag does not stick; call per read).

    A peer that writes a length and then its body in two sends, without NODELAY (TVM's clients), holds
    the body back until the length is ACKed; a delayed ACK makes that 40 ms. Call this while a
    frame is incomplete.
    """
    if _HAS_QUICKACK:
        with contextlib.suppress(OSError):  # the socket closed under us
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def format_hostport(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Parse ``host:port``, ``[v6]:port`` or (with a default) a bare host.

    Raises :class:`ConfigError` for an empty host, a port that is empty after its colon (``host:``), not
    a number, or outside 0..65535.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ConfigError(f"bad address {text!r}: missing ']'")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"bad address {text!r}: expected ':PORT' after ']'")
        has_port, port_text = bool(rest), rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        has_port = True
    else:
        host, port_text, has_port = text, "", False
    if not host:
        raise ConfigError(f"address {text!r} has no host (HOST:PORT)")
    if not has_port:
        if default_port is None:
            raise ConfigError(f"address {text!r} needs a port (HOST:PORT)")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()):  # "²".isdigit() holds, int("²") raises
        what = "an empty port" if not port_text else f"port {port_text!r}, not a number"
        raise ConfigError(f"address {text!r} has {what} (HOST:PORT)")
    if len(port_text) > 5 or not 0 <= int(port_text) <= 65535:  # int() of thousands of digits raises
        raise ConfigError(f"port {port_text:.20} out of range 0..65535 in {text!r:.200}")
    return host, int(port_text)


def bind_listener(
    host: str,
    port: int,
    port_end: int | None = None,
    backlog: int = 4096,
    reuse_addr: bool = True,
) -> socket.socket:
    """A listening socket on the first free port of ``[port, port_end)`` (``port`` alone if the range is empty).

    ``port=0`` binds a port the OS picks. Raises :class:`ConfigError` when no port of the range is free
    or the host does not resolve.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve listen host {host!r}: {exc}") from exc
    family, _, _, _, sockaddr = infos[0]
    ports = [port] if port == 0 or port_end is None or port_end <= port else list(range(port, port_end))
    if not 0 <= ports[0] <= ports[-1] <= 65535:
        raise ConfigError(f"ports must be in 0..65535, not {_port_text(ports)}")
    for candidate in ports:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if reuse_addr and sys.platform != "win32":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host in ("", "::") else 1)
            sock.bind((sockaddr[0], candidate, *sockaddr[2:]))
            sock.listen(backlog)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise ConfigError(f"cannot listen on {format_hostport(host, candidate)}: {exc.strerror}") from exc
    raise ConfigError(f"{_port_text(ports)} on {host} {'is' if len(ports) == 1 else 'are all'} in use")


def _port_text(ports: list[int]) -> str:
    """``port 9090``, or ``ports 9190..9198 (9 of them)`` for a range."""
    if len(ports) == 1:
        return f"port {ports[0]}"
    return f"ports {ports[0]}..{ports[-1]} ({len(ports)} of them)"


def connect_tcp(
    host: str, port: int, timeout: float | None = 5.0, keepalive: Keepalive | None = DEFAULT_KEEPALIVE
) -> socket.socket:
    """Connect to ``host:port``, trying every address ``getaddrinfo`` gives (IPv4 and IPv6 alike).

    ``timeout`` bounds each attempt in seconds; the socket comes back blocking with no timeout.
    Raises :class:`ConnectFailed` naming every address tried.
    """
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectFailed(f"cannot resolve {host!r}: {exc}") from exc
    errors = []
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            errors.append(f"{format_hostport(str(sockaddr[0]), port)}: {exc.strerror or exc}")
            continue
        sock.settimeout(None)
        tune_socket(sock, keepalive)
        return sock
    raise ConnectFailed(f"cannot connect to {format_hostport(host, port)} ({'; '.join(errors)})")


_SIOCOUTQ = 0x5411  # Linux: bytes written and not yet acknowledged by the peer (TIOCOUTQ's value)


def finish_sending(sock: socket.socket, limit_s: float = 2.0) -> None:
    """Half-close ``sock`` and wait (at most ``limit_s`` seconds) until the peer's kernel has acknowledged
    everything written to it; the caller closes it afterwards.

    For a last word (a timeout error) followed by the end of the process: closing a socket that still
    holds unread input (a request that came in meanwhile) makes the kernel reset the connection and drop
    whatever it had not sent yet, so the peer got "connection reset" instead of the error. Bytes the peer
    acknowledged stay readable there whatever follows. Without ``SIOCOUTQ`` (not Linux) it waits
    ``min(limit_s, 0.2)`` seconds instead.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)  # a FIN after the data: the peer sees the end once it has read it
    deadline = time.monotonic() + limit_s
    if not sys.platform.startswith("linux"):
        time.sleep(min(limit_s, 0.2))
        return
    import fcntl

    while True:
        try:
            left = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return
        if left <= 0 or time.monotonic() >= deadline:
            return
        time.sleep(0.002)  # a kernel counter has no readiness event: poll it, bounded by the deadline
