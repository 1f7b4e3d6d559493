"""Authentication, sans I/O: named tokens, roles, and a mutual HMAC challenge-response.

Credentials
    A keyring file (``--auth-file``) holds one credential a line: ``name role secret [max_priority=N]``;
    ``#`` starts a comment. Roles: ``admin`` (everything, STOP included), ``server`` (offers slots),
    ``user`` (requests slots; ``max_priority`` caps the priority its requests may ask for). A client's
    token is ``name:secret`` (``TETHER_TOKEN`` or ``--token``). Secrets are at least 16 characters;
    ``tether token NAME ROLE`` writes a line with a fresh one.

The exchange (four steps; the initiator is the peer that connected)::

    I -> R  {"auth": 1, "name": N, "nonce": Ni}
    R -> I  {"nonce": Nr}
    I -> R  {"proof": HMAC(secret, T + "initiator")}
    R -> I  {"ok": true, "proof": HMAC(secret, T + "responder"), "name": N, "role": ROLE}
            or {"error": "refused", "message": ...}

    T = "tether-auth-1" NUL context NUL N NUL Ni NUL Nr NUL   (context: "tracker", "server" or "proxy")

Both nonces are 32 random bytes (hex) drawn for this exchange, so a recorded exchange proves nothing
later (replay) and neither side can choose the whole input of the other's HMAC. The initiator proves
first (as SCRAM does): a responder answers an unknown name exactly as a wrong secret, and anyone who
can reach a tracker gets no proof to brute-force offline. The responder's proof shows the initiator it
reached a holder of its secret, not an impostor (a fake server receives no model and answers nothing).
Comparisons are :func:`hmac.compare_digest`. The secret never leaves the process; nothing here logs.

How the steps travel depends on the connection (each role's module says): tracker frames
(``[104, step]``), or on a device/proxy connection after the TVM handshake, :func:`encode_step` frames
(``int32 length`` + JSON, at most :data:`MAX_STEP_BYTES`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ..errors import AuthFailed, ConfigError, RemoteProtocolError

__all__ = [
    "AUTH_OPTION",
    "AuthSettings",
    "MAX_STEP_BYTES",
    "MIN_SECRET_CHARS",
    "OFF",
    "TOKEN_ENV",
    "TOKEN_OPTION",
    "Credential",
    "Initiator",
    "Keyring",
    "Network",
    "Responder",
    "Role",
    "Token",
    "address_in",
    "decode_step",
    "encode_step",
    "new_secret",
    "parse_networks",
    "parse_token",
    "step_length",
    "token_from_env",
]

#: A server whose handshake reply carries ``-auth=1`` requires the exchange before the session.
AUTH_OPTION: Final = "auth"
#: A server parking at a proxy with ``-token=1`` proves its own token to the proxy after its handshake.
TOKEN_OPTION: Final = "token"
#: A responder with authentication off answers a hello ``{"error": "off"}``: go on without.
OFF: Final = "off"
#: Clients read their token here when none is given.
TOKEN_ENV: Final = "TETHER_TOKEN"
MIN_SECRET_CHARS: Final = 16
#: Largest encoded step accepted (a step is a few hundred bytes).
MAX_STEP_BYTES: Final = 4096
_VERSION = b"tether-auth-1"
_NONCE_BYTES = 32
#: Compared against when a name is unknown, so an unknown name costs what a known one does.
_DUMMY_SECRET = secrets.token_bytes(32)


class Role(enum.Enum):
    """What a credential may do. ``admin`` may do all; ``server`` offers slots; ``user`` requests them."""

    USER = "user"
    SERVER = "server"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        """True when this role may act as ``needed`` (admin may act as anything, server and user only as
        themselves)."""
        return self is needed or self is Role.ADMIN


@dataclass(frozen=True, slots=True)
class Credential:
    """One keyring entry. ``max_priority`` (users): the highest priority their requests get."""

    name: str
    role: Role
    secret: str = field(repr=False)
    max_priority: float | None = None


@dataclass(frozen=True, slots=True)
class Token:
    """What a client presents: its name and secret (never printed)."""

    name: str
    secret: str = field(repr=False)


def _valid_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= 64
        and name.isascii()
        and all(c.isalnum() or c in "-_.@" for c in name)
    )


def _check_name(name: str, where: str) -> None:
    if not _valid_name(name):
        raise ConfigError(f"{where}: a token name is 1-64 ASCII letters, digits or -_.@, got {name[:64]!r}")


def _check_secret(secret: str, where: str) -> None:
    if len(secret) < MIN_SECRET_CHARS or any(c.isspace() for c in secret) or not secret.isascii():
        raise ConfigError(
            f"{where}: a secret must be at least {MIN_SECRET_CHARS} ASCII characters without spaces "
            "(`tether token NAME ROLE` makes one)"
        )


def parse_token(text: str, where: str = "token") -> Token:
    """``name:secret`` -> :class:`Token`; :class:`ConfigError` (never quoting the secret) when malformed."""
    name, sep, secret = text.strip().partition(":")
    if not sep:
        raise ConfigError(f"{where}: a token is NAME:SECRET")
    _check_name(name, where)
    _check_secret(secret, where)
    return Token(name, secret)


def token_from_env(token: Token | str | None = None) -> Token | None:
    """``token`` if given (parsed when a string), else ``$TETHER_TOKEN`` if set, else None."""
    if isinstance(token, Token):
        return token
    if token:
        return parse_token(token)
    text = os.environ.get(TOKEN_ENV)
    return parse_token(text, TOKEN_ENV) if text else None


def new_secret() -> str:
    """A fresh secret: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


class Keyring:
    """Named credentials, from an ``--auth-file``. Lookups are by name."""

    def __init__(self, credentials: Iterable[Credential] = ()) -> None:
        self._by_name: dict[str, Credential] = {}
        for cred in credentials:
            if cred.name in self._by_name:
                raise ConfigError(f"token name {cred.name!r} appears twice")
            self._by_name[cred.name] = cred

    @classmethod
    def parse(cls, text: str, source: str = "auth file") -> Keyring:
        """Parse keyring text; :class:`ConfigError` names the line (never the secret) of the first error."""
        creds = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"{source} line {number}"
            fields = line.split()
            if len(fields) < 3:
                raise ConfigError(f"{where}: expected `name role secret [max_priority=N]`")
            name, role_text, secret, *extra = fields
            _check_name(name, where)
            try:
                role = Role(role_text)
            except ValueError:
                raise ConfigError(f"{where}: role must be admin, server or user, got {role_text[:20]!r}") from None
            _check_secret(secret, where)
            max_priority = None
            for option in extra:
                opt, _, value = option.partition("=")
                if opt != "max_priority":
                    raise ConfigError(f"{where}: unknown option {opt[:30]!r} (known: max_priority=N)")
                try:
                    max_priority = float(value)
                except ValueError:
                    raise ConfigError(f"{where}: max_priority must be a number") from None
            creds.append(Credential(name, role, secret, max_priority))
        if not creds:
            raise ConfigError(f"{source}: no credentials (one `name role secret` a line)")
        return cls(creds)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read an auth file; :class:`ConfigError` when it cannot be read or parsed."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read auth file {os.fspath(path)!r}: {exc}") from None
        return cls.parse(text, f"auth file {os.fspath(path)!r}")

    def get(self, name: str) -> Credential | None:
        return self._by_name.get(name)

    def __len__(self) -> int:
        return len(self._by_name)

    def roles(self) -> dict[str, int]:
        """How many credentials of each role (for the startup line)."""
        out: dict[str, int] = {}
        for cred in self._by_name.values():
            out[cred.role.value] = out.get(cred.role.value, 0) + 1
        return out


def _transcript(context: str, name: str, nonce_i: str, nonce_r: str) -> bytes:
    return b"\0".join(s.encode() for s in (_VERSION.decode(), context, name, nonce_i, nonce_r)) + b"\0"


def _mac(secret: bytes, transcript: bytes, side: bytes) -> str:
    return hmac.new(secret, transcript + side, hashlib.sha256).hexdigest()


def _nonce(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) != 2 * _NONCE_BYTES:
        raise AuthFailed(f"bad {what} in the authentication exchange")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise AuthFailed(f"bad {what} in the authentication exchange") from None
    return value.lower()


def _same_mac(proof: object, expected: str) -> bool:
    """Constant-time equality of a received proof with ours; anything but 64 ASCII characters is unequal
    (``hmac.compare_digest`` refuses non-ASCII strings)."""
    return (
        isinstance(proof, str)
        and len(proof) == len(expected)
        and proof.isascii()
        and hmac.compare_digest(proof, expected)
    )


def _field(step: Mapping[str, Any], name: str) -> Any:
    if not isinstance(step, Mapping) or name not in step:
        raise AuthFailed(f"authentication step without {name!r}")
    return step[name]


class Initiator:
    """The connecting side: :meth:`hello`, then :meth:`answer` the challenge, then :meth:`finish`.

    Raises :class:`AuthFailed` when the peer refuses, or cannot prove it knows the secret.
    """

    def __init__(self, token: Token, context: str) -> None:
        self._token = token
        self._context = context
        self._nonce = secrets.token_hex(_NONCE_BYTES)
        self._transcript: bytes | None = None

    def hello(self) -> dict[str, Any]:
        return {"auth": 1, "name": self._token.name, "nonce": self._nonce}

    def answer(self, challenge: Mapping[str, Any]) -> dict[str, Any]:
        _raise_refusal(challenge)
        nonce_r = _nonce(_field(challenge, "nonce"), "nonce")
        if hmac.compare_digest(nonce_r, self._nonce):
            raise AuthFailed("the peer echoed our own nonce (a reflection attempt)")
        self._transcript = _transcript(self._context, self._token.name, self._nonce, nonce_r)
        return {"proof": _mac(self._token.secret.encode(), self._transcript, b"initiator")}

    def finish(self, verdict: Mapping[str, Any]) -> Role:
        """Check the responder's proof; the role it granted."""
        _raise_refusal(verdict)
        assert self._transcript is not None, "answer() first"
        proof = _field(verdict, "proof")
        expected = _mac(self._token.secret.encode(), self._transcript, b"responder")
        if not _same_mac(proof, expected):
            raise AuthFailed(
                f"the {self._context} could not prove it knows token {self._token.name!r}: "
                "it is not the one your token was issued for (an impostor?), or its auth file changed"
            )
        try:
            return Role(verdict.get("role"))
        except ValueError:
            raise AuthFailed(f"the {self._context} granted an unknown role") from None


def _raise_refusal(step: Any) -> None:
    if isinstance(step, Mapping) and "error" in step:
        message = step.get("message")
        raise AuthFailed(str(message)[:300] if message else "authentication refused")


class Responder:
    """The accepting side: :meth:`challenge` the hello, then :meth:`verify` the proof.

    :meth:`verify` returns the verified :class:`Credential` and the verdict step to send; on a wrong
    proof or an unknown name it raises :class:`AuthFailed` (send :meth:`refusal` then close).
    """

    def __init__(self, keyring: Keyring, context: str) -> None:
        self._keyring = keyring
        self._context = context
        self._nonce = secrets.token_hex(_NONCE_BYTES)
        self._name: str | None = None
        self._nonce_i: str | None = None
        self.claimed: str | None = None

    def challenge(self, hello: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(hello, Mapping) or hello.get("auth") != 1:
            raise AuthFailed("expected an authentication hello")
        name = _field(hello, "name")
        if not _valid_name(name):
            raise AuthFailed("bad token name in the authentication hello")
        self._name = self.claimed = name
        self._nonce_i = _nonce(_field(hello, "nonce"), "nonce")
        return {"nonce": self._nonce}

    def verify(self, answer: Mapping[str, Any]) -> tuple[Credential, dict[str, Any]]:
        if self._name is None or self._nonce_i is None:
            raise AuthFailed("authentication proof before the hello")
        proof = _field(answer, "proof")
        cred = self._keyring.get(self._name)
        secret = cred.secret.encode() if cred is not None else _DUMMY_SECRET
        transcript = _transcript(self._context, self._name, self._nonce_i, self._nonce)
        expected = _mac(secret, transcript, b"initiator")
        good = _same_mac(proof, expected)
        if cred is None or not good:
            raise AuthFailed(f"token {self._name[:64]!r} is unknown here or its secret is wrong")
        verdict = {
            "ok": True,
            "proof": _mac(secret, transcript, b"responder"),
            "name": cred.name,
            "role": cred.role.value,
        }
        return cred, verdict

    @staticmethod
    def refusal(message: str) -> dict[str, Any]:
        return {"error": "refused", "message": message}


# -- steps on a byte stream (device server, proxy) ------------------------------------------------


def encode_step(step: Mapping[str, Any]) -> bytes:
    """One step as ``int32 little-endian length`` + compact JSON."""
    body = json.dumps(step, separators=(",", ":")).encode()
    return struct.pack("<i", len(body)) + body


def step_length(head: bytes) -> int:
    """The body length a 4-byte step head announces; :class:`RemoteProtocolError` when out of range."""
    length: int = struct.unpack("<i", head)[0]
    if not 0 < length <= MAX_STEP_BYTES:
        raise RemoteProtocolError(f"authentication step of {length} bytes (at most {MAX_STEP_BYTES})")
    return length


def decode_step(body: bytes) -> dict[str, Any]:
    """A step's JSON object; :class:`RemoteProtocolError` when it is not one."""
    try:
        value = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        raise RemoteProtocolError("authentication step is not JSON") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError("authentication step must be a JSON object")
    return value


# -- a role's settings ----------------------------------------------------------------------------


class AuthSettings:
    """What a device server or proxy knows of authentication: the keyring read from ``path`` (None: off)
    and the ``--allow-tvm`` networks. :meth:`reload` reads the file again (SIGHUP)."""

    def __init__(self, path: str | None, allow_tvm: Iterable[str] = ()) -> None:
        self.path = path
        self.keyring = Keyring.load(path) if path else None
        self.allow_tvm = parse_networks(allow_tvm)

    def reload(self) -> int | None:
        """Read the file again: how many credentials it holds now (None: authentication is off). Raises
        :class:`ConfigError` when it does not parse; the old keyring then stays."""
        if not self.path:
            return None
        self.keyring = Keyring.load(self.path)
        return len(self.keyring)

    def tvm_allowed(self, host: str) -> bool:
        return address_in(host, self.allow_tvm)

    def describe(self, off: str, tvm_peers: str) -> str:
        """The startup line: ``off`` without a keyring, else the count and where ``tvm_peers`` may come from."""
        if self.keyring is None:
            return off
        nets = ", ".join(str(n) for n in self.allow_tvm) or "none"
        return f"authentication on ({len(self.keyring)} credential(s)); {tvm_peers} allowed from: {nets}"


# -- networks allowed to skip authentication (TVM peers) ------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """``--allow-tvm`` values (CIDR or single addresses, comma or space separated) as networks."""
    out: list[Network] = []
    for item in items:
        for part in item.replace(",", " ").split():
            try:
                out.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ConfigError(f"--allow-tvm: {part!r} is not an address or network (CIDR)") from None
    return tuple(out)


def address_in(host: str, networks: Iterable[Network]) -> bool:
    """True when ``host`` (an IP address, IPv4-mapped IPv6 included) lies in one of ``networks``."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)
