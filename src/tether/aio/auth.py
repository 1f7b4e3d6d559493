"""The authentication exchange (:mod:`tether.protocol.auth`) on a blocking socket, after a TVM handshake.

Steps travel as :func:`~tether.protocol.auth.encode_step` frames; every read is exact (what follows the
exchange belongs to the session) and ends by ``deadline`` (``time.monotonic()``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Any

from ..errors import AuthError, AuthFailed, ConfigError, ConnectionClosed
from ..protocol.auth import (
    OFF,
    AuthSettings,
    Initiator,
    Keyring,
    Responder,
    Role,
    Token,
    decode_step,
    encode_step,
    step_length,
)

__all__ = ["prove_token", "recv_step", "reload_auth_file", "send_step", "verify_peer"]


def send_step(sock: socket.socket, step: dict[str, Any]) -> None:
    sock.sendall(encode_step(step))


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the authentication exchange took too long")
        sock.settimeout(remaining)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionClosed("the peer closed the connection during authentication")
        buf += chunk
    return bytes(buf)


def recv_step(sock: socket.socket, deadline: float) -> dict[str, Any]:
    """One whole step before ``deadline``; :class:`RemoteProtocolError` when it is malformed."""
    return decode_step(_recv_exact(sock, step_length(_recv_exact(sock, 4, deadline)), deadline))


def prove_token(sock: socket.socket, token: Token, context: str, deadline: float) -> Role | None:
    """The initiator's side: prove ``token`` and check the peer's proof; the role granted, or None when the
    peer has authentication off (it answers the hello ``{"error": "off"}``). Raises
    :class:`~tether.errors.AuthFailed` on a refusal or a peer that cannot prove it knows the secret."""
    exchange = Initiator(token, context)
    send_step(sock, exchange.hello())
    challenge = recv_step(sock, deadline)
    if challenge.get("error") == OFF:
        return None
    send_step(sock, exchange.answer(challenge))
    return exchange.finish(recv_step(sock, deadline))


def verify_peer(sock: socket.socket, keyring: Keyring, context: str, deadline: float, needed: Role) -> str:
    """The responder's side: the verified name of a peer whose role allows ``needed``. Sends the refusal
    and raises :class:`~tether.errors.AuthError` otherwise."""
    exchange = Responder(keyring, context)
    try:
        send_step(sock, exchange.challenge(recv_step(sock, deadline)))
        cred, verdict = exchange.verify(recv_step(sock, deadline))
        if not cred.role.allows(needed):
            raise AuthFailed(f"token {cred.name!r} has role {cred.role.value}; this needs {needed.value}")
    except AuthError as exc:
        with contextlib.suppress(OSError):
            send_step(sock, Responder.refusal(str(exc)))
        raise
    send_step(sock, verdict)
    return cred.name


def reload_auth_file(auth: AuthSettings, log: logging.Logger) -> None:
    """SIGHUP at a device server or proxy: the auth file again, one log line either way (a file that does
    not parse leaves the old keyring)."""
    try:
        count = auth.reload()
    except ConfigError as exc:
        log.error("auth file not reloaded, the old keyring stays: %s", exc)
        return
    if count is not None:
        log.info("auth file reloaded: %d credential(s)", count)
