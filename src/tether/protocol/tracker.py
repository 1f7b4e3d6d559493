"""Tracker messages as typed records, and the two ends of a tracker connection, sans I/O.

A tracker connection opens with ``RPC_TRACKER_MAGIC`` from the peer, echoed by the tracker; then each
side sends frames (see :mod:`.framing`) whose payload is one JSON value. Requests are JSON lists whose
first element is a :class:`TrackerCode`:

==========================  =============================================  ===========================
request                     wire form                                      reply
==========================  =============================================  ===========================
:class:`Ping`               ``[1]`` (+ ``{"hello": true}``)                 ``0`` (tether hello: ``[0, {...}]``)
:class:`Stop`               ``[2, stop_key]``                              ``0``, or ``-1`` (wrong key)
:class:`Put`                ``[3, key, [port, matchkey]]`` (+ addr|null,   ``0``
                            + tether: ``{"protocols", "labels"}``)
:class:`Request`            ``[4, key, user, priority]`` (+ options dict)  later: ``[0, [host, port, mk]]``
:class:`UpdateInfo`         ``[5, {"key": "server:K", "addr": [h, p]}]``   ``0``
:class:`Summary`            ``[6]`` (+ ``{"detail": true, "key"?: K}``)    ``[0, {queue_info, server_info}]``
:class:`GetPendingMatchkeys` ``[7]``                                       ``[mk, ...]``
:class:`Cancel` (tether)    ``[101, request_id]``                          ``0``, or ``-1`` (unknown id)
:class:`SessionEvent` (t.)  ``[102, {"event": "start"|"end", "matchkey"}]`` ``0``
:class:`Withdraw` (tether)  ``[103, matchkey]``                            ``0``, or ``-1`` (not offered)
:class:`Auth` (tether)      ``[104, step]``                                ``[0, step]``, or ``[-1, refusal]``
:class:`Control` (tether)   ``[105, {"poll": true}]`` (a server)           ``[0, [order, ...]]``
                            ``[105, {"canary": id, "ok", "detail"}]``      ``0``
:class:`Admin` (tether)     ``[106, {"op", "server", "reason"?}]``         ``[0, {...}]``, or ``[-1, refusal]``
==========================  =============================================  ===========================

tether's REQUEST options (a fifth element TVM's tracker ignores)::

    {"id": "r1", "protocol": "tether", "labels": {"gpu": "a100"}, "timeout": 30.0, "user": "alice",
     "unservable_after": 5.0}

A requested label matches a server's label of that name with that value; the value ``"*"``
(:data:`LABEL_ANY`) matches any value, as long as the server has the label (``{"backend.fakenpu": "*"}``:
a server with the ``fakenpu`` backend plug-in, whatever its version; :func:`labels_match`).

``unservable_after``: seconds after which a request that no registered server could ever serve (no
server of the key, none speaking the protocol, none with the labels) fails with the reason instead of
waiting for servers to appear.

A SESSION ``end`` may say how the session ended: ``"outcome"`` ("ok", "failed": its worker died or was
killed; "no_request": it ended before its first request) and ``"detail"`` (words). The tracker counts
failures per server (device health, :mod:`tether.tracker.health`).

CONTROL is how the tracker reaches a tether server, which polls it with its pending matchkeys: orders are
``{"op": "release", "matchkey": mk}`` (end that session now: an admin's ``release``) and ``{"op":
"canary", "id": n}`` (run the canary and report it with ``{"canary": n, "ok": ..., "detail": ...}``).
ADMIN ops (``cordon``, ``uncordon``, ``drain``, ``release``, ``check``) act on a server by id (``host:port``)
and answer its standing; with authentication on only an admin may send them, without it only a peer on
the tracker's host.

A tether REQUEST is answered ``[0, [host, port, matchkey], {"id": ..., "server": {...}}]`` on a grant,
``[-1, {"id": ..., "error": "timeout"|"cancelled"|"rejected"|"unservable", "message": ...}]`` otherwise. Replies to
one connection come in the order the tracker produced them, which is not the order of the requests: a
waiting REQUEST does not hold back the replies to later messages (TVM behaves the same).

With authentication on (``--auth-file``), a peer first proves who it is with two AUTH messages carrying the
steps of :mod:`tether.protocol.auth`; until then every message but PING and AUTH is answered
``[-1, {"error": "unauthenticated", "message": ...}]`` and the connection is closed, and a message its role
may not send gets ``"error": "forbidden"`` (:func:`raise_refusal` turns both into exceptions). A tether
hello (``[1, {"hello": true}]``) is answered ``[0, {"tether": version, "auth": true|false}]``.

JSON is written with ``json.dumps`` defaults (TVM's exact bytes: ``[0, ["127.0.0.1", 9090, "k:0.5"]]``)
except that non-ASCII stays literal, so the Java and C++ servers' substring search for their matchkey in
a GET_PENDING_MATCHKEYS reply finds it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from ..errors import AuthFailed, LocalProtocolError, PermissionDenied, RemoteProtocolError
from .constants import MAX_TRACKER_FRAME_BYTES, MAX_TRACKER_REPLY_BYTES, RPC_TRACKER_MAGIC, TrackerCode
from .framing import FrameDecoder, encode_frame, pack_i32

__all__ = [
    "ADMIN_OPS",
    "LABEL_ANY",
    "SESSION_END_OUTCOMES",
    "Admin",
    "Auth",
    "Control",
    "Cancel",
    "GetPendingMatchkeys",
    "Grant",
    "Ping",
    "Put",
    "Request",
    "RequestOptions",
    "SessionEvent",
    "Stop",
    "Summary",
    "TrackerClientStream",
    "TrackerMessage",
    "TrackerServerStream",
    "UpdateInfo",
    "Withdraw",
    "decode_message",
    "decode_value",
    "encode_message",
    "encode_value",
    "labels_match",
    "parse_request_reply",
    "raise_refusal",
]

MAGIC_BYTES: Final = pack_i32(RPC_TRACKER_MAGIC)

#: A requested label value that matches any value of the server's label of that name.
LABEL_ANY: Final = "*"


def labels_match(have: Mapping[str, str], want: Mapping[str, str]) -> bool:
    """Whether a server with labels ``have`` carries every label a request asks for in ``want``: the same
    value, or any value where ``want`` says :data:`LABEL_ANY`."""
    for name, value in want.items():
        got = have.get(name)
        if got is None or value not in (LABEL_ANY, got):
            return False
    return True


_dumps = json.JSONEncoder(ensure_ascii=False).encode


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


#: Strict JSON: no NaN/Infinity, no number that overflows to one (a NaN heartbeat made the timer spin).
_decode = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite).decode
_LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]", re.ASCII)


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness probe; tether servers send one per heartbeat period.

    With ``hello`` (wire ``[1, {"hello": true}]``) a tether tracker answers ``[0, {"tether": version}]``
    instead of ``0``: how a client learns, for the price of a ping, that tether's extensions are there
    (TVM's tracker ignores the extra element and answers ``0``).
    """

    hello: bool = False


@dataclass(frozen=True, slots=True)
class Stop:
    """Shut the tracker down if ``key`` is its stop key."""

    key: str


@dataclass(frozen=True, slots=True)
class Put:
    """Offer one free slot of ``key``, reachable at ``(custom_addr or peer IP, port)`` with ``matchkey``.

    ``protocols`` and ``labels`` (tether, a fifth element TVM's tracker ignores) describe this slot alone,
    overriding the connection's UPDATE_INFO: how a proxy offers servers of different kinds on one
    connection.
    """

    key: str
    port: int
    matchkey: str
    custom_addr: str | None = None
    protocols: frozenset[str] | None = None
    labels: Mapping[str, str] | None = field(default=None, hash=False)


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """tether's extras on a REQUEST. ``timeout`` is queue time in seconds (None: wait forever)."""

    request_id: str | None = None
    protocol: str = "tvm"
    labels: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    user: str | None = None
    #: Seconds after which the tracker fails the request if no registered server could serve it.
    unservable_after: float | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.protocol}
        if self.request_id is not None:
            out["id"] = self.request_id
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.timeout is not None:
            out["timeout"] = self.timeout
        if self.user is not None:
            out["user"] = self.user
        if self.unservable_after is not None:
            out["unservable_after"] = self.unservable_after
        return out


@dataclass(frozen=True, slots=True)
class Request:
    """Ask for a slot of ``key``; higher ``priority`` first. ``options`` is None for TVM clients."""

    key: str
    user: str = ""
    priority: float = 1
    options: RequestOptions | None = None


@dataclass(frozen=True, slots=True)
class UpdateInfo:
    """Describe this connection (``{"key": "server:K", "addr": [host|None, port]}`` plus any extra fields)."""

    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Summary:
    """Ask for the tracker's state; ``detail`` asks a tether tracker for holders, waiters and facts."""

    detail: bool = False
    #: With ``detail``: only this key's queue row and waiters, and the servers that serve it (what a client
    #: watching its own request needs, without the whole pool).
    key: str | None = None


@dataclass(frozen=True, slots=True)
class GetPendingMatchkeys:
    """Ask which matchkeys PUT on this connection are still free."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """tether: withdraw the waiting request with this id (sent on the connection that made it)."""

    request_id: str


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """tether: a server reports that the session of ``matchkey`` started or ended (and how)."""

    event: str
    matchkey: str
    peer: str | None = None
    outcome: str | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Control:
    """tether: a server polls for the tracker's orders, or reports a canary (see the module docstring)."""

    body: Mapping[str, Any] = field(hash=False)


#: ADMIN operations (:class:`Admin`); see :mod:`tether.tracker.health` for what each does.
ADMIN_OPS: Final = ("cordon", "uncordon", "drain", "release", "check")


@dataclass(frozen=True, slots=True)
class Admin:
    """tether: an admin's operation on one server (by its id, ``host:port``)."""

    op: str
    server: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Withdraw:
    """tether: take back the slot of ``matchkey`` offered on this connection (its server went away)."""

    matchkey: str


@dataclass(frozen=True, slots=True)
class Auth:
    """tether: one step of the authentication exchange (:mod:`tether.protocol.auth`)."""

    step: Mapping[str, Any] = field(hash=False)


TrackerMessage: TypeAlias = (
    Ping
    | Stop
    | Put
    | Request
    | UpdateInfo
    | Summary
    | GetPendingMatchkeys
    | Cancel
    | SessionEvent
    | Withdraw
    | Auth
    | Control
    | Admin
)


def encode_value(value: Any) -> bytes:
    """One JSON value as a complete frame."""
    return encode_frame(_dumps(value).encode("utf-8"))


def decode_value(payload: bytes) -> Any:
    """Parse one frame's JSON payload; :class:`RemoteProtocolError` when it is not JSON."""
    try:
        text = payload.decode("utf-8")
        value = _decode(text)
        if _LONE_SURROGATE.search(text):  # "\udc00": a str that cannot be written back as UTF-8 (SUMMARY)
            _dumps(value).encode("utf-8")
        return value
    except (ValueError, RecursionError) as exc:  # not UTF-8 or JSON, an int past 4,300 digits, deep nesting,
        # NaN or Infinity, a lone surrogate (UnicodeEncodeError is a ValueError)
        raise RemoteProtocolError(f"frame is not usable JSON ({str(exc)[:80]}): {payload[:64]!r}") from None


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise RemoteProtocolError(f"{what} must be a string, got {value!r:.80}")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} must be a JSON object, got {value!r:.80}")
    return value


def _port(value: Any) -> int:
    # Python servers send an int; C++/Java/iOS servers may send the port as a string (of ASCII digits:
    # str.isdigit() also holds for "²", which int() refuses, and int() of thousands of digits raises).
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 5:
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise RemoteProtocolError(f"bad port {value!r:.80}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite_number(value):
        raise RemoteProtocolError(f"{what} must be a finite number, got {value!r:.80}")
    return value


def _finite_number(value: float) -> bool:
    """math.isfinite, also for an int too large for a float (which it raises OverflowError on)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RemoteProtocolError(f"labels must map strings to strings, got {value!r:.80}")
    return value


def _parse_put(args: list[Any]) -> Put:
    if len(args) not in (3, 4, 5) or not isinstance(args[2], list) or len(args[2]) != 2:
        raise RemoteProtocolError("PUT is [3, key, [port, matchkey], addr?, options?]")
    addr = args[3] if len(args) >= 4 else None
    if addr is not None:
        addr = _str(addr, "PUT address")
    protocols: frozenset[str] | None = None
    labels: dict[str, str] | None = None
    if len(args) == 5 and args[4] is not None:
        opts = args[4]
        if not isinstance(opts, dict):
            raise RemoteProtocolError("PUT options must be a JSON object")
        if "protocols" in opts:
            raw = opts["protocols"]
            if not isinstance(raw, list) or not raw or not all(isinstance(p, str) for p in raw):
                raise RemoteProtocolError(f"PUT protocols must be a non-empty list of strings, got {raw!r:.80}")
            protocols = frozenset(raw)
        if "labels" in opts:
            labels = _labels(opts["labels"])
    return Put(_str(args[1], "PUT key"), _port(args[2][0]), _str(args[2][1], "PUT matchkey"), addr, protocols, labels)


def _parse_options(raw: Any) -> RequestOptions | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise RemoteProtocolError("REQUEST options must be a JSON object")
    rid = raw.get("id")
    user = raw.get("user")
    return RequestOptions(
        request_id=None if rid is None else _str(rid, "REQUEST id"),
        protocol=_str(raw.get("protocol", "tvm"), "REQUEST protocol"),
        labels=_labels(raw.get("labels", {})),
        timeout=_seconds(raw.get("timeout"), "REQUEST timeout"),
        user=None if user is None else _str(user, "REQUEST user"),
        unservable_after=_seconds(raw.get("unservable_after"), "REQUEST unservable_after"),
    )


def _seconds(value: Any, what: str) -> float | None:
    if value is None:
        return None
    seconds = _number(value, what)
    if seconds < 0:
        raise RemoteProtocolError(f"{what} must not be negative")
    return seconds


def _parse_request(args: list[Any]) -> Request:
    if len(args) not in (4, 5):
        raise RemoteProtocolError("REQUEST is [4, key, user, priority, options?]")
    user = "" if args[2] is None else _str(args[2], "REQUEST user")
    options = _parse_options(args[4]) if len(args) == 5 else None
    return Request(_str(args[1], "REQUEST key"), user, _number(args[3], "REQUEST priority"), options)


def _parse_update_info(args: list[Any]) -> UpdateInfo:
    if len(args) != 2 or not isinstance(args[1], dict):
        raise RemoteProtocolError("UPDATE_INFO is [5, {...}]")
    info = args[1]
    addr = info.get("addr")
    if addr is not None and (not isinstance(addr, list) or len(addr) != 2):
        raise RemoteProtocolError("UPDATE_INFO addr must be [host, port]")
    if "key" in info:
        _str(info["key"], "UPDATE_INFO key")
    return UpdateInfo(info)


def _parse_summary(args: list[Any]) -> Summary:
    opts = args[1] if len(args) > 1 else None
    if not isinstance(opts, dict):
        return Summary()
    key = opts.get("key")
    return Summary(bool(opts.get("detail")), None if key is None else _str(key, "SUMMARY key"))


def _parse_session(args: list[Any]) -> SessionEvent:
    if len(args) != 2 or not isinstance(args[1], dict):
        raise RemoteProtocolError("SESSION is [102, {event, matchkey}]")
    body = args[1]
    event = _str(body.get("event"), "SESSION event")
    if event not in ("start", "end"):
        raise RemoteProtocolError(f"SESSION event must be 'start' or 'end', got {event!r:.40}")
    peer = body.get("peer")
    outcome = body.get("outcome")
    if outcome is not None and outcome not in SESSION_END_OUTCOMES:
        raise RemoteProtocolError(f"SESSION outcome must be one of {', '.join(SESSION_END_OUTCOMES)}")
    detail = body.get("detail")
    return SessionEvent(
        event,
        _str(body.get("matchkey"), "SESSION matchkey"),
        None if peer is None else str(peer),
        outcome,
        None if detail is None else str(detail)[:500],
    )


#: What a server may say of a session that ended (SESSION ``outcome``).
SESSION_END_OUTCOMES: Final = ("ok", "failed", "no_request")


def _parse_admin(args: list[Any]) -> Admin:
    body = _object(args[1], "ADMIN body")
    op = _str(body.get("op"), "ADMIN op")
    if op not in ADMIN_OPS:
        raise RemoteProtocolError(f"ADMIN op must be one of {', '.join(ADMIN_OPS)}, got {op!r:.40}")
    reason = body.get("reason")
    return Admin(op, _str(body.get("server"), "ADMIN server")[:256], None if reason is None else str(reason)[:500])


def _arity(n: int, factory: Callable[[list[Any]], TrackerMessage]) -> Callable[[list[Any]], TrackerMessage]:
    def parse(args: list[Any]) -> TrackerMessage:
        if len(args) != n:
            raise RemoteProtocolError(f"{TrackerCode(args[0]).name} takes {n - 1} argument(s)")
        return factory(args)

    return parse


_PARSERS: dict[int, Callable[[list[Any]], TrackerMessage]] = {
    TrackerCode.PING: lambda args: Ping(len(args) > 1 and isinstance(args[1], dict) and bool(args[1].get("hello"))),
    TrackerCode.STOP: _arity(2, lambda args: Stop(_str(args[1], "STOP key"))),
    TrackerCode.PUT: _parse_put,
    TrackerCode.REQUEST: _parse_request,
    TrackerCode.UPDATE_INFO: _parse_update_info,
    TrackerCode.SUMMARY: _parse_summary,
    TrackerCode.GET_PENDING_MATCHKEYS: lambda args: GetPendingMatchkeys(),
    TrackerCode.CANCEL: _arity(2, lambda args: Cancel(_str(args[1], "CANCEL id"))),
    TrackerCode.SESSION: _parse_session,
    TrackerCode.WITHDRAW: _arity(2, lambda args: Withdraw(_str(args[1], "WITHDRAW matchkey"))),
    TrackerCode.AUTH: _arity(2, lambda args: Auth(_object(args[1], "AUTH step"))),
    TrackerCode.CONTROL: _arity(2, lambda args: Control(_object(args[1], "CONTROL body"))),
    TrackerCode.ADMIN: _arity(2, _parse_admin),
}


def decode_message(payload: bytes) -> TrackerMessage:
    """Parse one request frame's payload into a message.

    Raises :class:`RemoteProtocolError` for bad JSON, an unknown code, or arguments of the wrong shape.
    """
    args = decode_value(payload)
    if not isinstance(args, list) or not args:
        raise RemoteProtocolError(f"tracker message must be a non-empty JSON list, got {payload[:64]!r}")
    code = args[0]
    parser = _PARSERS.get(code) if type(code) is int else None
    if parser is None:
        raise RemoteProtocolError(f"unknown tracker code {code!r:.40}")
    return parser(args)


def _message_to_wire(msg: TrackerMessage) -> list[Any]:
    if isinstance(msg, Ping):
        return [TrackerCode.PING, {"hello": True}] if msg.hello else [TrackerCode.PING]
    if isinstance(msg, Stop):
        return [TrackerCode.STOP, msg.key]
    if isinstance(msg, Put):
        put: list[Any] = [TrackerCode.PUT, msg.key, [msg.port, msg.matchkey], msg.custom_addr]
        if msg.protocols is not None or msg.labels is not None:
            opts: dict[str, Any] = {}
            if msg.protocols is not None:
                opts["protocols"] = sorted(msg.protocols)
            if msg.labels is not None:
                opts["labels"] = dict(msg.labels)
            put.append(opts)
        return put
    if isinstance(msg, Request):
        wire: list[Any] = [TrackerCode.REQUEST, msg.key, msg.user, msg.priority]
        if msg.options is not None:
            wire.append(msg.options.to_wire())
        return wire
    if isinstance(msg, UpdateInfo):
        return [TrackerCode.UPDATE_INFO, msg.info]
    if isinstance(msg, Summary):
        if not msg.detail:
            return [TrackerCode.SUMMARY]
        return [TrackerCode.SUMMARY, {"detail": True} if msg.key is None else {"detail": True, "key": msg.key}]
    if isinstance(msg, GetPendingMatchkeys):
        return [TrackerCode.GET_PENDING_MATCHKEYS]
    if isinstance(msg, Cancel):
        return [TrackerCode.CANCEL, msg.request_id]
    if isinstance(msg, SessionEvent):
        body: dict[str, Any] = {"event": msg.event, "matchkey": msg.matchkey}
        if msg.peer is not None:
            body["peer"] = msg.peer
        if msg.outcome is not None:
            body["outcome"] = msg.outcome
        if msg.detail is not None:
            body["detail"] = msg.detail
        return [TrackerCode.SESSION, body]
    if isinstance(msg, Withdraw):
        return [TrackerCode.WITHDRAW, msg.matchkey]
    if isinstance(msg, Auth):
        return [TrackerCode.AUTH, dict(msg.step)]
    if isinstance(msg, Control):
        return [TrackerCode.CONTROL, dict(msg.body)]
    if isinstance(msg, Admin):
        admin: dict[str, Any] = {"op": msg.op, "server": msg.server}
        if msg.reason is not None:
            admin["reason"] = msg.reason
        return [TrackerCode.ADMIN, admin]
    raise LocalProtocolError(f"not a tracker message: {msg!r}")


def encode_message(msg: TrackerMessage) -> bytes:
    """A message as one complete frame (codes written as plain ints, as TVM does)."""
    wire = _message_to_wire(msg)
    wire[0] = int(wire[0])
    return encode_value(wire)


@dataclass(frozen=True, slots=True)
class Grant:
    """Where to connect after a REQUEST succeeded. ``extra`` is tether's third element, if any."""

    host: str
    port: int
    matchkey: str
    extra: dict[str, Any] = field(default_factory=dict)


def parse_request_reply(value: Any) -> Grant | dict[str, Any]:
    """Interpret a REQUEST reply: a :class:`Grant`, or the failure dict of a tether tracker.

    Raises :class:`RemoteProtocolError` when the reply has neither shape.
    """
    if isinstance(value, list) and len(value) >= 2 and value[0] == TrackerCode.SUCCESS:
        target = value[1]
        if isinstance(target, list) and len(target) == 3:
            extra = value[2] if len(value) > 2 and isinstance(value[2], dict) else {}
            return Grant(_str(target[0], "grant host"), _port(target[1]), _str(target[2], "grant matchkey"), extra)
    if isinstance(value, list) and len(value) == 2 and value[0] == TrackerCode.FAIL and isinstance(value[1], dict):
        return value[1]
    raise RemoteProtocolError(f"unexpected REQUEST reply {value!r:.200}")


#: A refusal's ``error`` -> the exception a client raises for it.
_REFUSALS = {"unauthenticated": AuthFailed, "refused": AuthFailed, "forbidden": PermissionDenied}


def raise_refusal(value: Any) -> None:
    """Raise :class:`AuthFailed` or :class:`PermissionDenied` when ``value`` is an authentication refusal
    (``[-1, {"error": "unauthenticated"|"refused"|"forbidden", "message": ...}]``); otherwise do nothing."""
    if isinstance(value, list) and len(value) == 2 and value[0] == TrackerCode.FAIL and isinstance(value[1], dict):
        error = _REFUSALS.get(value[1].get("error"))  # type: ignore[arg-type]
        if error is not None:
            raise error(str(value[1].get("message", "refused"))[:500])


class _MagicThenFrames:
    """Both ends of a tracker connection: 4 bytes of magic first, then ``[int32 len][JSON]`` frames."""

    __slots__ = ("_decoder", "_magic_buf")
    _wrong_magic = "wrong tracker magic {}"

    def __init__(self, limit: int) -> None:
        self._decoder = FrameDecoder(limit)
        self._magic_buf: bytearray | None = bytearray()

    def _payloads(self, data: bytes) -> list[bytes]:
        """The frame payloads completed by ``data``, once the magic is through."""
        if self._magic_buf is not None:
            self._magic_buf += data
            if len(self._magic_buf) < 4:
                return []
            magic = bytes(self._magic_buf[:4])
            if magic != MAGIC_BYTES:
                raise RemoteProtocolError(self._wrong_magic.format(magic.hex()))
            data = bytes(self._magic_buf[4:])
            self._magic_buf = None
            self._on_magic()
            if not data:
                return []
        return self._decoder.feed(data)

    def _on_magic(self) -> None:
        pass


class TrackerServerStream(_MagicThenFrames):
    """The tracker's end of one connection: expects the magic, then request frames.

    :meth:`receive_data` returns the messages completed by the bytes given; after the first call that
    completes the magic, :meth:`data_to_send` returns the magic echo (send it before any reply).
    Raises :class:`RemoteProtocolError` on a wrong magic, a bad frame or a bad message; the connection
    must then be closed.
    """

    __slots__ = ("_outgoing",)

    def __init__(self, limit: int = MAX_TRACKER_FRAME_BYTES) -> None:
        super().__init__(limit)
        self._outgoing = b""

    @property
    def incomplete(self) -> bool:
        """True while part of a magic or frame is buffered (the peer is mid-message)."""
        return self._magic_buf is not None or self._decoder.incomplete

    def _on_magic(self) -> None:
        self._outgoing = MAGIC_BYTES

    def receive_data(self, data: bytes) -> list[TrackerMessage]:
        return [decode_message(p) for p in self._payloads(data)]

    def data_to_send(self) -> bytes:
        out, self._outgoing = self._outgoing, b""
        return out


class TrackerClientStream(_MagicThenFrames):
    """A peer's end of a tracker connection: send :meth:`initial_bytes`, then frames; read JSON values.

    :meth:`receive_data` returns the reply values completed by the bytes given; the first 4 bytes must
    be the magic echo, else :class:`RemoteProtocolError` ("not a tracker").
    """

    __slots__ = ()
    _wrong_magic = "peer is not an RPC tracker (answered {})"

    def __init__(self, limit: int = MAX_TRACKER_REPLY_BYTES) -> None:
        super().__init__(limit)

    @staticmethod
    def initial_bytes() -> bytes:
        return MAGIC_BYTES

    @property
    def connected(self) -> bool:
        """True once the tracker echoed the magic."""
        return self._magic_buf is None

    def receive_data(self, data: bytes) -> list[Any]:
        return [decode_value(p) for p in self._payloads(data)]
