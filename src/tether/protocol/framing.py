"""Length-prefixed frames and TVM's data-plane handshake, sans I/O.

Tracker frames (TVM's control plane)::

    +----------------------+---------------------------+
    | int32 LE  length  n  | n bytes: UTF-8 JSON value |
    +----------------------+---------------------------+

``n`` must be in ``1..limit`` (TVM: 1 MiB). The decoder raises :class:`FrameTooLarge` as soon as the
4-byte header is seen, before any payload is buffered.

Handshake (data plane, client to server or proxy)::

    +-------------------+-------------------+----------------------------------------+
    | int32 LE RPC_MAGIC | int32 LE  keylen | keylen bytes: UTF-8 key ("client:K ...") |
    +-------------------+-------------------+----------------------------------------+

Reply (server or proxy to client)::

    +----------------+------------------------------------------------------------+
    | int32 LE code  | SUCCESS only: int32 LE keylen, keylen bytes of the peer key |
    +----------------+------------------------------------------------------------+

Lengths count bytes of the UTF-8 encoding (TVM counts characters, wrong for non-ASCII keys).
The decoders here accept input split at any byte boundary; whatever follows a completed handshake is
kept in ``unused`` for the session layer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ..errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from .constants import MAX_HANDSHAKE_KEY_BYTES, MAX_TRACKER_FRAME_BYTES, RPC_MAGIC, HandshakeCode

__all__ = [
    "FrameDecoder",
    "HandshakeDecoder",
    "HandshakeReply",
    "HandshakeReplyDecoder",
    "encode_frame",
    "encode_handshake",
    "encode_handshake_reply",
    "pack_i32",
]

_I32: Final = struct.Struct("<i")
_unpack_i32 = _I32.unpack_from


def pack_i32(value: int) -> bytes:
    """Encode one int32 little-endian."""
    return _I32.pack(value)


def encode_frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its int32 LE length: one buffer, ready for a single write."""
    if not payload:
        raise LocalProtocolError("a frame cannot be empty")
    return _I32.pack(len(payload)) + payload


class FrameDecoder:
    """Split a byte stream into ``[int32 len][payload]`` frames.

    Call :meth:`feed` with whatever arrived; it returns the payloads completed by it, in order.
    Raises :class:`FrameTooLarge` when a header announces ``<= 0`` or more than ``limit`` bytes; the
    stream cannot continue after that.
    """

    __slots__ = ("_buf", "_limit", "_need")

    def __init__(self, limit: int = MAX_TRACKER_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._need = 0  # payload length of the frame in progress; 0 while reading a header

    @property
    def incomplete(self) -> bool:
        """True while part of a frame (header or payload) has arrived and the rest has not."""
        return self._need > 0 or len(self._buf) > 0

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; return the payloads it completed."""
        buf = self._buf
        if not buf and not self._need:
            # Fast path: frames aligned with reads, nothing buffered.
            out: list[bytes] = []
            pos, end, limit = 0, len(data), self._limit
            while end - pos >= 4:
                (n,) = _unpack_i32(data, pos)
                if n <= 0 or n > limit:
                    raise FrameTooLarge(n, limit)
                if end - pos - 4 < n:
                    break
                out.append(bytes(data[pos + 4 : pos + 4 + n]))
                pos += 4 + n
            if pos < end:
                buf += data[pos:]
                self._advance_header()
            return out
        buf += data
        return self._drain()

    def _advance_header(self) -> None:
        buf = self._buf
        if not self._need and len(buf) >= 4:
            (n,) = _unpack_i32(buf, 0)
            if n <= 0 or n > self._limit:
                raise FrameTooLarge(n, self._limit)
            self._need = n
            del buf[:4]

    def _drain(self) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buf
        while True:
            self._advance_header()
            need = self._need
            if not need or len(buf) < need:
                return out
            out.append(bytes(buf[:need]))
            del buf[:need]
            self._need = 0


def encode_handshake(key: str) -> bytes:
    """Client hello: ``RPC_MAGIC``, key length in bytes, UTF-8 key."""
    raw = key.encode("utf-8")
    if len(raw) > MAX_HANDSHAKE_KEY_BYTES:
        raise LocalProtocolError(f"handshake key of {len(raw)} bytes exceeds {MAX_HANDSHAKE_KEY_BYTES}")
    return _I32.pack(RPC_MAGIC) + _I32.pack(len(raw)) + raw


def encode_handshake_reply(code: HandshakeCode, key: str | None = None) -> bytes:
    """Server reply: the code, then on SUCCESS the server's key (``server:K``)."""
    if code is HandshakeCode.SUCCESS:
        if key is None:
            raise LocalProtocolError("a SUCCESS reply carries the server key")
        raw = key.encode("utf-8")
        return _I32.pack(code) + _I32.pack(len(raw)) + raw
    return _I32.pack(code)


class _PrefixedReader:
    """Shared state for the two handshake decoders: a buffer and a done flag."""

    __slots__ = ("_buf", "_done", "unused")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done = False
        #: Bytes received after the handshake completed; they belong to the session.
        self.unused = b""

    def _key_at(self, offset: int) -> tuple[str, int] | None:
        """Decode ``[int32 len][key]`` at ``offset``; return (key, end) once all of it is here."""
        buf = self._buf
        if len(buf) < offset + 4:
            return None
        (n,) = _unpack_i32(buf, offset)
        if n < 0 or n > MAX_HANDSHAKE_KEY_BYTES:
            raise FrameTooLarge(n, MAX_HANDSHAKE_KEY_BYTES)
        end = offset + 4 + n
        if len(buf) < end:
            return None
        try:
            return bytes(buf[offset + 4 : end]).decode("utf-8"), end
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError("handshake key is not UTF-8") from exc

    def needed(self, prefix: int = 4) -> int:
        """Bytes still missing from what is known so far (header first, then the key): feeding exactly
        this many lets a reader stop at the handshake's last byte."""
        if self._done:
            return 0
        if len(self._buf) < prefix + 4:
            return prefix + 4 - len(self._buf)
        (n,) = _unpack_i32(self._buf, prefix)
        if n < 0 or n > MAX_HANDSHAKE_KEY_BYTES:
            raise FrameTooLarge(n, MAX_HANDSHAKE_KEY_BYTES)
        return prefix + 4 + int(n) - len(self._buf)

    def _finish(self, end: int) -> None:
        self._done = True
        self.unused = bytes(self._buf[end:])
        self._buf.clear()


class HandshakeDecoder(_PrefixedReader):
    """Server side: read a client's hello. :meth:`feed` returns the key once complete, else None.

    Raises :class:`RemoteProtocolError` on a wrong magic (as soon as 4 bytes are in) and
    :class:`FrameTooLarge` on a key length above the limit.
    """

    __slots__ = ()

    def feed(self, data: bytes) -> str | None:
        if self._done:
            raise LocalProtocolError("handshake already complete")
        self._buf += data
        if len(self._buf) >= 4:
            (magic,) = _unpack_i32(self._buf, 0)
            if magic != RPC_MAGIC:
                raise RemoteProtocolError(f"wrong magic 0x{magic & 0xFFFFFFFF:x}, expected 0x{RPC_MAGIC:x}")
        got = self._key_at(4)
        if got is None:
            return None
        key, end = got
        self._finish(end)
        return key


@dataclass(frozen=True, slots=True)
class HandshakeReply:
    """A server's or proxy's answer: the code, and its key on SUCCESS."""

    code: HandshakeCode
    key: str | None = None


class HandshakeReplyDecoder(_PrefixedReader):
    """Client side: read the server's reply. :meth:`feed` returns it once complete, else None."""

    __slots__ = ()

    def feed(self, data: bytes) -> HandshakeReply | None:
        if self._done:
            raise LocalProtocolError("handshake reply already complete")
        self._buf += data
        if len(self._buf) < 4:
            return None
        (raw,) = _unpack_i32(self._buf, 0)
        try:
            code = HandshakeCode(raw)
        except ValueError as exc:
            raise RemoteProtocolError(f"unknown handshake reply code 0x{raw & 0xFFFFFFFF:x}") from exc
        if code is not HandshakeCode.SUCCESS:
            self._finish(4)
            return HandshakeReply(code)
        got = self._key_at(4)
        if got is None:
            return None
        key, end = got
        self._finish(end)
        return HandshakeReply(code, key)
