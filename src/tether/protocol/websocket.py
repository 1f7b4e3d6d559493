"""WebSocket (RFC 6455) framing and the HTTP/1.1 upgrade handshake, sans I/O.

Frame layout (network byte order)::

    +-----+------+------+------+--------+----------------------+-----------------+-----------+
    | FIN | RSV  |opcode| MASK | len7   | len16 / len64 (opt.) | mask key (opt.) | payload   |
    | 1 b | 3 b  | 4 b  | 1 b  | 7 b    | if len7 is 126 / 127 | 4 bytes if MASK | len bytes |
    +-----+------+------+------+--------+----------------------+-----------------+-----------+

A client masks every frame it sends (a fresh random key per frame) and a server never does; each
side rejects frames whose mask bit says otherwise. No extension is negotiated, so every RSV bit must
be clear. Control frames (CLOSE, PING, PONG) carry at most 125 bytes, are never fragmented, and may
arrive between the fragments of a data message.

:class:`FrameDecoder` accepts input split at any byte boundary, assembles fragmented messages and
hands control frames back as soon as they arrive. Protocol violations raise :class:`WebSocketError`
carrying the close code to send before dropping the connection (1002 protocol error, 1007 invalid
UTF-8, 1009 message too big). The size limit is checked from each frame header, before its payload
is buffered.

The handshake helpers build and check the HTTP requests and responses; a server-side refusal raises
:class:`HttpError`, whose :meth:`HttpError.response` is the reply to write before closing.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final
from urllib.parse import urlsplit

from ..errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    # framing
    "WS_GUID",
    "Opcode",
    "CloseCode",
    "Message",
    "FrameDecoder",
    "WebSocketError",
    "accept_key",
    "apply_mask",
    "encode_close",
    "encode_frame",
    "encode_header",
    "parse_close",
    # handshake, server side
    "HttpError",
    "UpgradeRequest",
    "build_http_response",
    "build_upgrade_response",
    "find_head_end",
    "parse_upgrade_request",
    # handshake, client side
    "build_upgrade_request",
    "check_upgrade_response",
    "new_client_key",
    "parse_ws_url",
]

WS_GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Largest payload of a control frame (RFC 6455 5.5).
MAX_CONTROL_PAYLOAD: Final = 125
#: Default limit on an assembled message.
DEFAULT_MAX_MESSAGE: Final = 64 << 20
#: Default limit on an HTTP head (request or response line and headers).
DEFAULT_MAX_HEAD: Final = 16384


class Opcode(enum.IntEnum):
    """Frame opcodes; every other value is reserved and rejected."""

    CONT = 0
    TEXT = 1
    BINARY = 2
    CLOSE = 8
    PING = 9
    PONG = 10


class CloseCode(enum.IntEnum):
    """The close codes tether sends (RFC 6455 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011


_OPCODES: Final = frozenset(int(op) for op in Opcode)
_CONTROL: Final = frozenset((Opcode.CLOSE, Opcode.PING, Opcode.PONG))


class WebSocketError(RemoteProtocolError):
    """The peer broke RFC 6455; ``code`` is the close code to send before dropping the connection."""

    def __init__(self, code: int = CloseCode.PROTOCOL_ERROR, message: str = "websocket protocol error") -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message


class HttpError(RemoteProtocolError):
    """An HTTP exchange that cannot become a WebSocket.

    Server side, :meth:`response` is the reply to send (``status`` with its standard reason phrase,
    ``reason`` as a plain-text body, ``headers`` added). Client side, ``status`` is what the server
    answered instead of 101.
    """

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})

    def response(self) -> bytes:
        """The complete HTTP response refusing the request."""
        return build_http_response(
            self.status, _phrase(self.status), (self.reason + "\n").encode(), extra_headers=self.headers
        )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def accept_key(client_key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``: base64(SHA-1(key + GUID))."""
    digest = hashlib.sha1((client_key + WS_GUID).encode("ascii"), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


# -- masking --------------------------------------------------------------------------------------

# XOR with a 4-byte key: each of the four byte lanes goes through one 256-byte translation table, on
# strided slices of up to _MASK_CHUNK bytes (C loops throughout; 2-3x faster than a big-int XOR and
# cache-friendly). Tiny payloads take the big-int path, which has less per-call overhead.
_XOR_TABLES: Final = tuple(bytes(i ^ k for i in range(256)) for k in range(256))
_MASK_CHUNK: Final = 1 << 18  # a multiple of 4, so the key phase is the same at every chunk start
_SMALL_MASK: Final = 512


def _mask_inplace(buf: bytearray, start: int, key: bytes) -> None:
    """XOR ``buf[start:]`` with ``key`` repeated, the key's first byte at ``start``."""
    end = len(buf)
    n = end - start
    if n <= 0:
        return
    if n <= _SMALL_MASK:
        rep = key * (n // 4) + key[: n % 4]
        buf[start:] = (int.from_bytes(buf[start:], "little") ^ int.from_bytes(rep, "little")).to_bytes(n, "little")
        return
    tables = [_XOR_TABLES[k] for k in key]
    for base in range(start, end, _MASK_CHUNK):
        stop = min(base + _MASK_CHUNK, end)
        for lane, table in enumerate(tables):
            buf[base + lane : stop : 4] = buf[base + lane : stop : 4].translate(table)


def apply_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """``data`` XOR ``key`` repeated (masking and unmasking are the same operation)."""
    if len(key) != 4:
        raise LocalProtocolError(f"a mask key has 4 bytes, not {len(key)}")
    buf = bytearray(data)
    _mask_inplace(buf, 0, key)
    return bytes(buf)


# -- encoding -------------------------------------------------------------------------------------

_H16: Final = struct.Struct("!BBH")
_H64: Final = struct.Struct("!BBQ")


def encode_header(opcode: int, length: int, mask_key: bytes | None = None, fin: bool = True) -> bytes:
    """A frame header: 2, 4 or 10 bytes, then the 4-byte ``mask_key`` when given."""
    if opcode not in _OPCODES:
        raise LocalProtocolError(f"unknown websocket opcode {opcode}")
    if length < 0 or length >= 1 << 63:
        raise LocalProtocolError(f"frame length {length} out of range")
    if opcode in _CONTROL and (length > MAX_CONTROL_PAYLOAD or not fin):
        raise LocalProtocolError("a control frame is unfragmented and carries at most 125 bytes")
    b0 = (0x80 if fin else 0) | opcode
    mask_bit = 0
    if mask_key is not None:
        if len(mask_key) != 4:
            raise LocalProtocolError(f"a mask key has 4 bytes, not {len(mask_key)}")
        mask_bit = 0x80
    if length < 126:
        head = bytes((b0, mask_bit | length))
    elif length < 1 << 16:
        head = _H16.pack(b0, mask_bit | 126, length)
    else:
        head = _H64.pack(b0, mask_bit | 127, length)
    return head + mask_key if mask_key is not None else head


def encode_frame(opcode: int, payload: bytes | bytearray | memoryview, *, mask: bool, fin: bool = True) -> bytes:
    """One frame, header and payload, ready for a single write.

    ``mask=True`` (client side) masks with a fresh ``os.urandom(4)`` key.
    """
    n = memoryview(payload).nbytes
    if not mask:
        return b"".join((encode_header(opcode, n, None, fin), payload))
    key = os.urandom(4)
    header = encode_header(opcode, n, key, fin)
    buf = bytearray(header)
    buf += payload
    _mask_inplace(buf, len(header), key)
    return bytes(buf)


def encode_close(code: int = CloseCode.NORMAL, reason: str = "") -> bytes:
    """The payload of a CLOSE frame: the code (2 bytes), then ``reason`` in UTF-8.

    The reason is cut (on a character boundary) to fit the 125-byte control payload.
    """
    if not _valid_close_code(code):
        raise LocalProtocolError(f"close code {code} cannot be sent")
    raw = reason.encode("utf-8")
    if len(raw) > MAX_CONTROL_PAYLOAD - 2:
        raw = raw[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + raw


def _valid_close_code(code: int) -> bool:
    """Codes allowed on the wire: 1000-1003, 1007-1014 and the registered/private 3000-4999."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """``(code, reason)`` of a CLOSE payload; ``(None, "")`` when empty (no status).

    Raises :class:`WebSocketError` (1002) for a 1-byte payload or a code that may not be sent, and
    (1007) for a reason that is not UTF-8.
    """
    if not payload:
        return None, ""
    if len(payload) < 2:
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    if not _valid_close_code(code):
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebSocketError(CloseCode.INVALID_DATA, "close reason is not UTF-8") from exc
    return code, reason


# -- decoding -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """A complete message (data messages assembled from their fragments) or one control frame.

    ``data`` stays bytes for TEXT messages too (validated as UTF-8).
    """

    opcode: int
    data: bytes


class FrameDecoder:
    """Split a WebSocket byte stream into :class:`Message` objects.

    ``expect_masked`` is True on the server side (clients must mask) and False on the client side.
    :meth:`feed` returns the messages completed by its input; raises :class:`WebSocketError` on a
    violation, after which the stream cannot continue. Input after a CLOSE frame is ignored.
    """

    __slots__ = ("_buf", "_closed", "_expect_masked", "_frag", "_frag_opcode", "_frame", "_max")

    def __init__(self, *, expect_masked: bool, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._expect_masked = expect_masked
        self._max = max_message
        self._closed = False
        # Frame in progress once its header is parsed: (fin, opcode, payload length, mask key or None).
        self._frame: tuple[bool, int, int, bytes | None] | None = None
        self._frag = bytearray()  # payload of the fragmented data message so far
        self._frag_opcode: int | None = None  # its opcode (TEXT or BINARY) while one is open

    @property
    def buffered(self) -> int:
        """Bytes held: unparsed input plus the fragments of an open message."""
        return len(self._buf) + len(self._frag)

    @property
    def closed(self) -> bool:
        """True once a CLOSE frame was decoded (input after it is ignored)."""
        return self._closed

    @property
    def max_message(self) -> int:
        """The largest message accepted; may be changed between feeds (a proxy raises it once paired)."""
        return self._max

    @max_message.setter
    def max_message(self, value: int) -> None:
        self._max = value

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Consume ``data``; return the messages (and control frames) it completed, in order."""
        if self._closed:
            return []
        self._buf += data
        out: list[Message] = []
        while True:
            if self._frame is None and not self._parse_header():
                break
            frame = self._frame
            assert frame is not None
            fin, opcode, length, key = frame
            buf = self._buf
            if len(buf) < length:
                break
            self._frame = None
            payload: bytearray | None = None
            if key is not None:
                payload = buf[:length]  # a copy, unmasked in place
                _mask_inplace(payload, 0, key)
            msg = self._complete(fin, opcode, buf, length, payload)
            del buf[:length]
            if msg is not None:
                out.append(msg)
                if msg.opcode == Opcode.CLOSE:
                    buf.clear()  # nothing may follow a CLOSE
                    break
        return out

    def _complete(
        self, fin: bool, opcode: int, buf: bytearray, length: int, unmasked: bytearray | None
    ) -> Message | None:
        """Handle one whole frame whose payload is ``unmasked`` or else ``buf[:length]``."""
        if opcode in _CONTROL:
            data = bytes(unmasked) if unmasked is not None else bytes(buf[:length])
            if opcode == Opcode.CLOSE:
                parse_close(data)  # validates
                self._closed = True
            return Message(opcode, data)
        if opcode == Opcode.CONT:
            frag = self._frag
            if unmasked is not None:
                frag += unmasked
            else:
                with memoryview(buf) as view:
                    frag += view[:length]
            if not fin:
                return None
            data = bytes(frag)
            frag.clear()
            first = self._frag_opcode
            assert first is not None
            opcode = first
            self._frag_opcode = None
        elif not fin:
            self._frag_opcode = opcode
            if unmasked is not None:
                self._frag += unmasked
            else:
                with memoryview(buf) as view:
                    self._frag += view[:length]
            return None
        elif unmasked is not None:
            data = bytes(unmasked)
        else:
            with memoryview(buf) as view:
                data = bytes(view[:length])
        if opcode == Opcode.TEXT:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise WebSocketError(CloseCode.INVALID_DATA, "text message is not UTF-8") from exc
        return Message(opcode, data)

    def _parse_header(self) -> bool:
        """Parse the next frame header if all of it is here; consume it and set ``_frame``."""
        buf = self._buf
        if len(buf) < 2:
            return False
        b0, b1 = buf[0], buf[1]
        fin = bool(b0 & 0x80)
        opcode = b0 & 0x0F
        masked = bool(b1 & 0x80)
        length = b1 & 0x7F
        if b0 & 0x70:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
        if opcode not in _OPCODES:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {opcode}")
        if masked != self._expect_masked:
            raise WebSocketError(
                CloseCode.PROTOCOL_ERROR,
                "client frames must be masked" if self._expect_masked else "server frames must not be masked",
            )
        if opcode in _CONTROL:
            if not fin:
                raise WebSocketError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise WebSocketError(CloseCode.PROTOCOL_ERROR, "control frame payload over 125 bytes")
        elif opcode == Opcode.CONT:
            if self._frag_opcode is None:
                raise WebSocketError(CloseCode.PROTOCOL_ERROR, "continuation frame without a message to continue")
        elif self._frag_opcode is not None:
            raise WebSocketError(CloseCode.PROTOCOL_ERROR, "new data frame inside a fragmented message")
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return False
            (length,) = struct.unpack_from("!H", buf, 2)
            pos = 4
        elif length == 127:
            if len(buf) < 10:
                return False
            (length,) = struct.unpack_from("!Q", buf, 2)
            if length >> 63:
                raise WebSocketError(CloseCode.PROTOCOL_ERROR, "64-bit frame length with the top bit set")
            pos = 10
        if opcode not in _CONTROL:
            total = length + (len(self._frag) if opcode == Opcode.CONT else 0)
            if total > self._max:
                raise WebSocketError(
                    CloseCode.MESSAGE_TOO_BIG, f"message of {total} bytes or more exceeds the {self._max}-byte limit"
                )
        key: bytes | None = None
        if masked:
            if len(buf) < pos + 4:
                return False
            key = bytes(buf[pos : pos + 4])
            pos += 4
        del buf[:pos]
        self._frame = (fin, opcode, length, key)
        return True


# -- HTTP upgrade ---------------------------------------------------------------------------------


def find_head_end(buf: bytes | bytearray, limit: int = DEFAULT_MAX_HEAD) -> int:
    """Index just past the ``\\r\\n\\r\\n`` ending an HTTP head, or -1 while it has not arrived.

    Raises :class:`HttpError` (431) when ``limit`` bytes hold no end of head.
    """
    end = buf.find(b"\r\n\r\n", 0, limit)
    if end >= 0:
        return end + 4
    if len(buf) >= limit:
        raise HttpError(431, f"HTTP head longer than {limit} bytes")
    return -1


def _parse_head(head: bytes | bytearray) -> tuple[str, dict[str, str]]:
    """The start line and the headers (names lower-cased; repeated headers joined with ``, ``)."""
    text = bytes(head).decode("latin-1")
    lines = text.split("\r\n")
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise HttpError(400, "empty HTTP head")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise HttpError(400, f"malformed header line {line[:80]!r}")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return lines[0], headers


def _tokens(value: str | None) -> set[str]:
    """A comma-separated token list, lower-cased."""
    if not value:
        return set()
    return {token.strip().lower() for token in value.split(",") if token.strip()}


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A valid WebSocket upgrade request (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    key: str


def parse_upgrade_request(head: bytes | bytearray) -> UpgradeRequest:
    """Check a client's HTTP head (through the blank line) as an RFC 6455 opening handshake.

    Raises :class:`HttpError`: 405 for a method other than GET; 426 for a plain request without an
    ``Upgrade`` header or with a ``Sec-WebSocket-Version`` other than 13 (the response names the
    version or protocol to use); 400 for anything else malformed.
    """
    start, headers = _parse_head(head)
    parts = start.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise HttpError(400, f"malformed request line {start[:80]!r}")
    method, path, version = parts
    if method != "GET":
        raise HttpError(405, f"method {method[:20]!r} not allowed: a websocket upgrade is a GET", {"Allow": "GET"})
    if version != "HTTP/1.1":
        raise HttpError(400, f"{version[:20]!r} cannot upgrade to a websocket (HTTP/1.1 needed)")
    if not path.startswith("/"):
        raise HttpError(400, f"request target {path[:80]!r} is not an absolute path")
    upgrade = headers.get("upgrade")
    if upgrade is None:
        raise HttpError(
            426, "this endpoint speaks WebSocket only", {"Upgrade": "websocket", "Connection": "Upgrade, close"}
        )
    if "websocket" not in _tokens(upgrade):
        raise HttpError(400, f"Upgrade: {upgrade[:80]!r} is not websocket")
    if "upgrade" not in _tokens(headers.get("connection")):
        raise HttpError(400, "Connection header lacks the upgrade token")
    if "host" not in headers:
        raise HttpError(400, "missing Host header")
    ws_version = headers.get("sec-websocket-version", "").strip()
    if ws_version != "13":
        raise HttpError(
            426, f"unsupported Sec-WebSocket-Version {ws_version[:20]!r} (13 needed)", {"Sec-WebSocket-Version": "13"}
        )
    key = headers.get("sec-websocket-key", "").strip()
    if not key:
        raise HttpError(400, "missing Sec-WebSocket-Key")
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HttpError(400, "Sec-WebSocket-Key is not base64") from exc
    if len(raw) != 16:
        raise HttpError(400, f"Sec-WebSocket-Key decodes to {len(raw)} bytes, not 16")
    return UpgradeRequest(method, path, headers, key)


def _check_header_text(*values: str) -> None:
    for value in values:
        if "\r" in value or "\n" in value:
            raise LocalProtocolError(f"line break in HTTP header text {value[:80]!r}")


def _format_headers(headers: dict[str, str]) -> str:
    _check_header_text(*headers, *headers.values())
    return "".join(f"{name}: {value}\r\n" for name, value in headers.items())


def build_upgrade_response(req: UpgradeRequest) -> bytes:
    """The server's ``101 Switching Protocols`` for a valid request (no subprotocol, no extension)."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(req.key)}\r\n"
        "\r\n"
    ).encode("ascii")


def build_http_response(
    status: int,
    reason: str,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    extra_headers: dict[str, str] | None = None,
) -> bytes:
    """A complete HTTP/1.1 response with ``Content-Length`` and ``Connection: close``."""
    _check_header_text(reason, content_type)
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "Connection": "close"}
    headers.update(extra_headers or {})
    return f"HTTP/1.1 {status} {reason}\r\n{_format_headers(headers)}\r\n".encode("latin-1") + body


def new_client_key() -> str:
    """A fresh ``Sec-WebSocket-Key``: 16 random bytes in base64."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def build_upgrade_request(host: str, path: str, key: str, extra_headers: dict[str, str] | None = None) -> bytes:
    """The client's opening handshake. ``host`` is the ``Host`` value (``host[:port]``, IPv6 bracketed)."""
    if not path.startswith("/") or " " in path:
        raise LocalProtocolError(f"bad websocket request path {path!r}")
    _check_header_text(host, path, key)
    headers = {
        "Host": host,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
    }
    headers.update(extra_headers or {})
    return f"GET {path} HTTP/1.1\r\n{_format_headers(headers)}\r\n".encode("latin-1")


def check_upgrade_response(head: bytes | bytearray, key: str) -> None:
    """Check the server's answer to :func:`build_upgrade_request` with ``key``.

    Raises :class:`HttpError` when the status is not 101, :class:`WebSocketError` when the 101 lacks
    the upgrade headers, carries a wrong ``Sec-WebSocket-Accept`` or names an extension we did not
    offer, :class:`RemoteProtocolError` when the head is not HTTP at all.
    """
    try:
        start, headers = _parse_head(head)
    except HttpError as exc:
        raise RemoteProtocolError(f"malformed HTTP response to the websocket upgrade: {exc.reason}") from None
    version, _, rest = start.partition(" ")
    status_text, _, _ = rest.partition(" ")
    three_digits = len(status_text) == 3 and status_text.isascii() and status_text.isdigit()  # "4²6".isdigit() too
    if not version.startswith("HTTP/") or not three_digits:
        raise RemoteProtocolError(f"not an HTTP response to the websocket upgrade: {start[:80]!r}")
    status = int(status_text)
    if status != 101:
        raise HttpError(status, f"websocket upgrade refused: {start[:200]}", headers)
    if "websocket" not in _tokens(headers.get("upgrade")):
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"101 response without Upgrade: websocket ({start})")
    if "upgrade" not in _tokens(headers.get("connection")):
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"101 response without Connection: upgrade ({start})")
    got = headers.get("sec-websocket-accept", "").strip()
    if got != accept_key(key):
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"wrong Sec-WebSocket-Accept {got[:40]!r} ({start})")
    if headers.get("sec-websocket-extensions", "").strip():
        raise WebSocketError(CloseCode.PROTOCOL_ERROR, f"server chose extensions that were not offered ({start})")


def parse_ws_url(url: str) -> tuple[bool, str, int, str]:
    """``ws://host[:port]/path?query`` or ``wss://...`` to ``(tls, host, port, path_with_query)``.

    Default ports are 80 and 443; IPv6 literals are bracketed in the URL and bare in the result.
    Raises :class:`ValueError` for another scheme, a missing host, a bad port, credentials or a
    fragment.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a websocket URL {url!r}: the scheme must be ws:// or wss://")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port in websocket URL {url!r}") from exc
    host = parts.hostname
    if not host:
        raise ValueError(f"websocket URL {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"websocket URL {url!r} carries credentials, which are not supported")
    if parts.fragment or url.strip().endswith("#"):
        raise ValueError(f"websocket URL {url!r} has a fragment")
    tls = scheme == "wss"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return tls, host, port if port is not None else (443 if tls else 80), path
