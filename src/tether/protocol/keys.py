"""Handshake key strings: ``role:name [-opt=value ...]``.

TVM's forms: a client sends ``client:<matchkey>`` (``client:<key>`` without a tracker), optionally followed
by `` -timeout=N`` (int or float seconds); a server or proxy answers ``server:<key>``. Names may contain
``:`` (``127.0.0.1:5555``) and may be empty: ``tvm.rpc.Server()``'s key is ``""``, so ``tvm.rpc.connect``
sends ``client:`` or ``client: -timeout=10`` and TVM's server answers ``server:``. The string is read as
TVM's server reads it (``arr = key.split()``): the first whitespace-separated token is ``role:name`` (role
before its *first* colon, the name is the rest of it, possibly empty), every later token an option. TVM's
proxy matches peers on ``key[7:].split()[0]`` instead and forwards the whole string, options included:
:attr:`PeerKey.raw` keeps it verbatim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import LocalProtocolError, RemoteProtocolError
from .constants import TETHER_OPTION

__all__ = [
    "PROXY_PREFIX",
    "SERVER_PREFIX",
    "PeerKey",
    "format_peer_key",
    "parse_peer_key",
    "proxied_keys",
    "server_key_name",
]

_ROLES = ("client", "server")

#: Longest session timeout honoured (about 115 days); larger values mean the same.
MAX_SESSION_TIMEOUT_S = 1e7

#: A server's UPDATE_INFO key is ``server:<key>``; a proxy registers ``server:proxy[k1,k2]``.
SERVER_PREFIX = "server:"
PROXY_PREFIX = "server:proxy["


def server_key_name(info_key: str) -> str | None:
    """``K`` for ``server:K`` (everything after the prefix: keys may hold ``:``); None for a proxy or other."""
    if info_key.startswith(SERVER_PREFIX) and not info_key.startswith(PROXY_PREFIX):
        return info_key[len(SERVER_PREFIX) :]
    return None


def proxied_keys(info_key: str) -> list[str]:
    """The keys a proxy serves, from its ``server:proxy[k1,k2]`` info key (empty for anything else)."""
    if info_key.startswith(PROXY_PREFIX) and info_key.endswith("]"):
        return [k for k in info_key[len(PROXY_PREFIX) : -1].split(",") if k]
    return []


@dataclass(frozen=True, slots=True)
class PeerKey:
    """A parsed handshake key."""

    role: str
    name: str
    options: dict[str, str] = field(default_factory=dict, hash=False)
    raw: str = ""

    @property
    def session_timeout(self) -> float | None:
        """``-timeout=N`` in seconds; None when absent or zero (TVM: zero means no limit)."""
        text = self.options.get("timeout")
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError as exc:
            raise RemoteProtocolError(f"bad -timeout={text!r} in key {self.raw!r}") from exc
        if not math.isfinite(value) or value < 0:
            raise RemoteProtocolError(f"bad -timeout={text!r} in key {self.raw!r}")
        return min(value, MAX_SESSION_TIMEOUT_S) or None

    @property
    def is_tether(self) -> bool:
        """True when the peer announced tether's native protocol (``-tether=1``)."""
        return self.options.get(TETHER_OPTION, "0") not in ("", "0")


def parse_peer_key(raw: str) -> PeerKey:
    """Parse ``role:name [-k=v ...]`` (``name`` may be empty: ``client: -timeout=10``); raise
    :class:`RemoteProtocolError` when it is not one."""
    tokens = raw.split()
    head, sep, name = tokens[0].partition(":") if tokens else ("", "", "")
    if not sep or head not in _ROLES:
        raise RemoteProtocolError(f"key {raw!r:.200} does not start with 'client:' or 'server:'")
    options: dict[str, str] = {}
    for token in tokens[1:]:
        if not token.startswith("-") or len(token) < 2:
            raise RemoteProtocolError(f"bad option {token!r:.80} in key {raw!r:.200}")
        opt, _, value = token[1:].partition("=")
        options[opt] = value
    return PeerKey(head, name, options, raw)


def format_peer_key(role: str, name: str, options: dict[str, str] | None = None) -> str:
    """Build a key string; the inverse of :func:`parse_peer_key` for well-formed input."""
    if role not in _ROLES:
        raise LocalProtocolError(f"role must be one of {_ROLES}, not {role!r}")
    if name and name.split() != [name]:
        raise LocalProtocolError(f"key name {name!r} must contain no whitespace")
    parts = [f"{role}:{name}"]
    for opt, value in (options or {}).items():
        if not opt or opt.split() != [opt] or "=" in opt or (value and value.split() != [value]):
            raise LocalProtocolError(f"bad key option {opt!r}={value!r}")
        parts.append(f"-{opt}={value}" if value != "" else f"-{opt}")
    return " ".join(parts)
