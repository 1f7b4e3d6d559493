"""WebSocket codec (RFC 6455) and the blocking client/bridge: round trips split at arbitrary byte
boundaries, every protocol violation with its close code, and interop with tornado both ways."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import itertools
import os
import queue
import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tether.aio.ws import WebSocketConnection, ws_bridge, ws_connect, ws_open_socket
from tether.errors import ConnectFailed, ConnectionClosed, LocalProtocolError, RemoteProtocolError
from tether.protocol.websocket import (
    WS_GUID,
    FrameDecoder,
    HttpError,
    Message,
    Opcode,
    UpgradeRequest,
    WebSocketError,
    accept_key,
    apply_mask,
    build_http_response,
    build_upgrade_request,
    build_upgrade_response,
    check_upgrade_response,
    encode_close,
    encode_frame,
    encode_header,
    find_head_end,
    new_client_key,
    parse_close,
    parse_upgrade_request,
    parse_ws_url,
)

WAIT = 10.0  # seconds for any single cross-thread hand-off; a pass takes milliseconds


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the given offsets (clipped, sorted; duplicates give empty pieces)."""
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_all(decoder: FrameDecoder, data: bytes, cuts: list[int]) -> list[Message]:
    out: list[Message] = []
    for chunk in pieces(data, cuts):
        out += decoder.feed(chunk)
    return out


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


# -- handshake keys and URLs ----------------------------------------------------------------------


def test_accept_key_matches_rfc_6455_example() -> None:
    assert WS_GUID == "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    # RFC 6455 section 1.3 (and tornado's compute_accept_value) give this value.
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_new_client_key_is_16_random_bytes() -> None:
    keys = {new_client_key() for _ in range(8)}
    assert len(keys) == 8
    assert all(len(base64.b64decode(k, validate=True)) == 16 for k in keys)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://example.com/ws", (False, "example.com", 80, "/ws")),
        ("ws://example.com", (False, "example.com", 80, "/")),
        ("wss://example.com", (True, "example.com", 443, "/")),
        ("wss://example.com:8443/a/b?key=x&y=1", (True, "example.com", 8443, "/a/b?key=x&y=1")),
        ("WS://Host:9/", (False, "host", 9, "/")),
        ("ws://[::1]:8888/ws", (False, "::1", 8888, "/ws")),
        ("wss://[2001:db8::1]/", (True, "2001:db8::1", 443, "/")),
        ("ws://127.0.0.1:9190?x", (False, "127.0.0.1", 9190, "/?x")),
    ],
)
def test_parse_ws_url(url: str, expected: tuple[bool, str, int, str]) -> None:
    assert parse_ws_url(url) == expected


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("http://example.com/", "ws:// or wss://"),
        ("https://example.com/", "ws:// or wss://"),
        ("example.com:80", "ws:// or wss://"),
        ("ws:///path", "no host"),
        ("ws://host:99999/", "bad port"),
        ("ws://host:port/", "bad port"),
        ("ws://user:pw@host/", "credentials"),
        ("ws://host/#frag", "fragment"),
    ],
)
def test_parse_ws_url_rejects(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_ws_url(url)


# -- frame encoding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "size"), [(0, 2), (1, 2), (125, 2), (126, 4), (127, 4), (65535, 4), (65536, 10), (1 << 40, 10)]
)
def test_header_sizes(length: int, size: int) -> None:
    header = encode_header(Opcode.BINARY, length)
    assert len(header) == size
    assert header[0] == 0x82
    assert len(encode_header(Opcode.BINARY, length, b"abcd")) == size + 4
    assert encode_header(Opcode.BINARY, length, b"abcd")[-4:] == b"abcd"
    assert encode_header(Opcode.TEXT, length, fin=False)[0] == 0x01


def test_header_golden_bytes() -> None:
    # RFC 6455 5.7 examples.
    assert encode_frame(Opcode.TEXT, b"Hello", mask=False) == bytes.fromhex("810548656c6c6f")
    assert encode_header(Opcode.TEXT, 5, bytes.fromhex("37fa213d")) + apply_mask(
        b"Hello", bytes.fromhex("37fa213d")
    ) == bytes.fromhex("818537fa213d7f9f4d5158")
    assert encode_frame(Opcode.PING, b"Hello", mask=False) == bytes.fromhex("890548656c6c6f")
    assert encode_header(Opcode.BINARY, 256) == bytes.fromhex("827e0100")
    assert encode_header(Opcode.BINARY, 65536) == bytes.fromhex("827f0000000000010000")


@pytest.mark.parametrize(
    ("opcode", "length", "key", "fin"),
    [
        (3, 0, None, True),
        (Opcode.PING, 126, None, True),
        (Opcode.CLOSE, 2, None, False),
        (Opcode.BINARY, -1, None, True),
        (Opcode.BINARY, 1, b"abc", True),
    ],
)
def test_header_refuses_invalid(opcode: int, length: int, key: bytes | None, fin: bool) -> None:
    with pytest.raises(LocalProtocolError):
        encode_header(opcode, length, key, fin)


def naive_mask(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


@given(st.binary(max_size=2000), st.binary(min_size=4, max_size=4))
def test_apply_mask_matches_definition(data: bytes, key: bytes) -> None:
    assert apply_mask(data, key) == naive_mask(data, key)
    assert apply_mask(apply_mask(data, key), key) == data
    assert apply_mask(memoryview(bytearray(data)), key) == naive_mask(data, key)


@pytest.mark.parametrize("n", [511, 512, 513, (1 << 18) - 1, 1 << 18, (1 << 18) + 3, (3 << 18) + 2])
def test_apply_mask_across_chunk_boundaries(n: int) -> None:
    data = random.Random(n).randbytes(n)
    key = b"\x01\x80\xfe\x37"
    masked = apply_mask(data, key)
    assert masked[-7:] == naive_mask(data[-7:], key[(n - 7) % 4 :] + key[: (n - 7) % 4])
    assert masked[:9] == naive_mask(data[:9], key)
    assert apply_mask(masked, key) == data


def test_masked_frames_use_fresh_keys() -> None:
    a = encode_frame(Opcode.BINARY, b"x" * 10, mask=True)
    b = encode_frame(Opcode.BINARY, b"x" * 10, mask=True)
    assert a[1] == 0x80 | 10
    assert a[2:6] != b[2:6]  # 2**-32 flake odds
    assert apply_mask(a[6:], a[2:6]) == b"x" * 10


def test_close_payloads() -> None:
    assert encode_close() == b"\x03\xe8"
    assert parse_close(encode_close(4000, "bye")) == (4000, "bye")
    assert parse_close(b"") == (None, "")
    long = encode_close(1000, "é" * 100)
    assert len(long) <= 125
    assert parse_close(long) == (1000, "é" * 61)
    for code in (999, 1004, 1005, 1006, 1015, 2999, 5000):
        with pytest.raises(LocalProtocolError):
            encode_close(code)


# -- decoding: round trips ------------------------------------------------------------------------

SIZES = st.one_of(
    st.integers(0, 300),
    st.sampled_from([125, 126, 127, 65535, 65536, 65537, 200000]),
    st.integers(0, 200000),
)
CONTROL = st.builds(Message, st.sampled_from([Opcode.PING, Opcode.PONG]), st.binary(max_size=125))


@st.composite
def data_message(draw: st.DrawFn) -> Message:
    if draw(st.booleans()):
        text = draw(st.text(max_size=300)) if draw(st.booleans()) else "aé€😀" * (draw(SIZES) // 10)
        return Message(Opcode.TEXT, text.encode("utf-8"))
    n = draw(SIZES)
    return Message(Opcode.BINARY, random.Random(draw(st.integers(0, 2**32))).randbytes(n))


@st.composite
def stream(draw: st.DrawFn, mask: bool) -> tuple[bytes, list[Message]]:
    """Frames for a few messages, fragmented at random (text split inside characters too), with control
    frames between messages and between fragments; and the messages a decoder must return."""
    frames: list[bytes] = []
    expected: list[Message] = []

    def controls() -> None:
        for msg in draw(st.lists(CONTROL, max_size=2)):
            frames.append(encode_frame(msg.opcode, msg.data, mask=mask))
            expected.append(msg)

    for msg in draw(st.lists(data_message(), max_size=5)):
        controls()
        parts = pieces(msg.data, draw(st.lists(st.integers(0, len(msg.data)), max_size=4)))
        for i, part in enumerate(parts):
            opcode = msg.opcode if i == 0 else Opcode.CONT
            frames.append(encode_frame(opcode, part, mask=mask, fin=i == len(parts) - 1))
            if i < len(parts) - 1:
                controls()
        expected.append(msg)
    controls()
    if draw(st.booleans()):
        close = encode_close(draw(st.sampled_from([1000, 1001, 4000])), draw(st.text(max_size=20)))
        frames.append(encode_frame(Opcode.CLOSE, close, mask=mask))
        expected.append(Message(Opcode.CLOSE, close))
        frames.append(b"\xff\xff garbage after CLOSE is ignored")
    return b"".join(frames), expected


@settings(max_examples=150, deadline=None)
@given(st.data(), st.booleans(), st.lists(st.integers(min_value=0), max_size=30))
def test_round_trip_at_any_chunk_boundaries(data: st.DataObject, mask: bool, cuts: list[int]) -> None:
    raw, expected = data.draw(stream(mask))
    decoder = FrameDecoder(expect_masked=mask)
    assert feed_all(decoder, raw, cuts) == expected
    if not (expected and expected[-1].opcode == Opcode.CLOSE):
        assert decoder.buffered == 0
    assert decoder.feed(b"") == []


def test_round_trip_byte_by_byte() -> None:
    raw = b"".join(
        [
            encode_frame(Opcode.TEXT, "hé".encode()[:2], mask=True, fin=False),
            encode_frame(Opcode.PING, b"p", mask=True),
            encode_frame(Opcode.CONT, "hé".encode()[2:], mask=True),
            encode_frame(Opcode.BINARY, b"x" * 300, mask=True),
        ]
    )
    decoder = FrameDecoder(expect_masked=True)
    out = [m for i in range(len(raw)) for m in decoder.feed(raw[i : i + 1])]
    assert out == [Message(Opcode.PING, b"p"), Message(Opcode.TEXT, "hé".encode()), Message(Opcode.BINARY, b"x" * 300)]


def test_big_frame_in_small_chunks_is_linear() -> None:
    """16 MiB in 8 KiB chunks: 2048 feeds; a decoder that copies its buffer per feed would move 16 GiB."""
    payload = os.urandom(16 << 20)
    raw = encode_frame(Opcode.BINARY, payload, mask=True)
    decoder = FrameDecoder(expect_masked=True)
    view = memoryview(raw)
    start = time.perf_counter()
    out: list[Message] = []
    for pos in range(0, len(raw), 8192):
        out += decoder.feed(view[pos : pos + 8192])
    elapsed = time.perf_counter() - start
    assert out == [Message(Opcode.BINARY, payload)]
    assert decoder.buffered == 0
    assert elapsed < 5, f"{elapsed:.2f} s"


def test_buffered_counts_partial_frames_and_fragments() -> None:
    decoder = FrameDecoder(expect_masked=False)
    assert decoder.feed(encode_frame(Opcode.BINARY, b"abc", mask=False, fin=False)) == []
    assert decoder.buffered == 3
    assert decoder.feed(encode_frame(Opcode.CONT, b"defg", mask=False)[:4]) == []
    assert decoder.buffered == 5
    assert decoder.feed(b"fg") == [Message(Opcode.BINARY, b"abcdefg")]
    assert decoder.buffered == 0


# -- decoding: violations -------------------------------------------------------------------------


def frame(b0: int, payload: bytes = b"", *, key: bytes | None = None, length: int | None = None) -> bytes:
    """A raw frame with an arbitrary first byte (FIN, RSV, opcode) and an optional fake length."""
    n = len(payload) if length is None else length
    mask_bit = 0x80 if key is not None else 0
    if n < 126:
        head = bytes((b0, mask_bit | n))
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mask_bit | 127, n)
    if key is None:
        return head + payload
    return head + key + apply_mask(payload, key)


K = b"\x11\x22\x33\x44"
VIOLATIONS = {
    "rsv1": (frame(0xC2, b"x", key=K), 1002),
    "rsv2": (frame(0xA2, b"x", key=K), 1002),
    "rsv3": (frame(0x92, b"x", key=K), 1002),
    "opcode 3": (frame(0x83, b"x", key=K), 1002),
    "opcode 11": (frame(0x8B, b"", key=K), 1002),
    "ping over 125": (frame(0x89, b"p" * 126, key=K), 1002),
    "close over 125": (frame(0x88, b"\x03\xe8" + b"r" * 124, key=K), 1002),
    "fragmented ping": (frame(0x09, b"p", key=K), 1002),
    "cont without message": (frame(0x80, b"x", key=K), 1002),
    "new message inside fragmented one": (frame(0x02, b"a", key=K) + frame(0x82, b"b", key=K), 1002),
    "unmasked client frame": (frame(0x82, b"x"), 1002),
    "top bit of 64-bit length": (struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + K, 1002),
    "close with 1-byte payload": (frame(0x88, b"\x03", key=K), 1002),
    "close code 1005": (frame(0x88, struct.pack("!H", 1005), key=K), 1002),
    "close code 999": (frame(0x88, struct.pack("!H", 999), key=K), 1002),
    "close reason not utf-8": (frame(0x88, b"\x03\xe8\xff", key=K), 1007),
    "text not utf-8": (frame(0x81, b"\xc3\x28", key=K), 1007),
    "fragmented text not utf-8": (frame(0x01, b"\xe2\x82", key=K) + frame(0x80, b"(", key=K), 1007),
    "too big from header": (frame(0x82, length=(64 << 20) + 1, key=K)[:14], 1009),
    "fragments too big together": (frame(0x02, b"a" * 1000, key=K) + frame(0x80, length=64 << 20, key=K)[:14], 1009),
}


@pytest.mark.parametrize("name", VIOLATIONS)
def test_violations_raise_with_close_code(name: str) -> None:
    raw, code = VIOLATIONS[name]
    for cuts in ([], list(range(len(raw)))):  # all at once, and byte by byte
        decoder = FrameDecoder(expect_masked=True)
        with pytest.raises(WebSocketError) as info:
            feed_all(decoder, raw, cuts)
        assert info.value.code == code, info.value
        assert isinstance(info.value, RemoteProtocolError)
        assert info.value.message


def test_client_side_refuses_masked_frames() -> None:
    with pytest.raises(WebSocketError) as info:
        FrameDecoder(expect_masked=False).feed(encode_frame(Opcode.BINARY, b"x", mask=True))
    assert info.value.code == 1002


def test_max_message_checked_from_the_header_alone() -> None:
    decoder = FrameDecoder(expect_masked=False, max_message=1000)
    assert decoder.feed(encode_frame(Opcode.BINARY, b"a" * 1000, mask=False)) == [Message(Opcode.BINARY, b"a" * 1000)]
    with pytest.raises(WebSocketError) as info:
        decoder.feed(encode_header(Opcode.BINARY, 1 << 40))  # 10 bytes announcing 1 TiB: no payload yet
    assert info.value.code == 1009
    decoder = FrameDecoder(expect_masked=False, max_message=1000)
    decoder.feed(encode_frame(Opcode.BINARY, b"a" * 600, mask=False, fin=False))
    with pytest.raises(WebSocketError) as info:
        decoder.feed(encode_header(Opcode.CONT, 401))
    assert info.value.code == 1009
    assert decoder.buffered == 600 + 4  # the fragment so far and the offending header, no payload


def test_data_after_close_is_ignored() -> None:
    decoder = FrameDecoder(expect_masked=False)
    out = decoder.feed(encode_frame(Opcode.CLOSE, encode_close(1001, "away"), mask=False) + b"\x00\x01junk")
    assert out == [Message(Opcode.CLOSE, encode_close(1001, "away"))]
    assert decoder.closed
    assert decoder.feed(frame(0xC3, b"anything")) == []
    assert decoder.buffered == 0


# -- HTTP upgrade ---------------------------------------------------------------------------------

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def request(*lines: str, start: str = "GET /ws?x=1 HTTP/1.1") -> bytes:
    return ("\r\n".join([start, *lines]) + "\r\n\r\n").encode()


GOOD = [
    "Host: example.com",
    "Upgrade: websocket",
    "Connection: Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
]


def test_parse_upgrade_request() -> None:
    req = parse_upgrade_request(request(*GOOD, "X-Extra: a", "x-extra: b"))
    assert req == UpgradeRequest("GET", "/ws?x=1", req.headers, KEY)
    assert req.headers["host"] == "example.com"
    assert req.headers["x-extra"] == "a, b"
    response = build_upgrade_response(req)
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert response.endswith(b"\r\n\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    check_upgrade_response(response, KEY)


def test_upgrade_tokens_are_lists_and_case_insensitive() -> None:
    req = parse_upgrade_request(
        request(
            "host: h",
            "UPGRADE: WebSocket",
            "connection: keep-alive, Upgrade",
            f"sec-websocket-key:   {KEY}  ",
            "Sec-WebSocket-Version: 13",
        )
    )
    assert req.key == KEY


@pytest.mark.parametrize(
    ("lines", "start", "status"),
    [
        (GOOD, "POST /ws HTTP/1.1", 405),
        (["Host: h"], "GET / HTTP/1.1", 426),
        ([line for line in GOOD if not line.startswith("Upgrade")], "GET / HTTP/1.1", 426),
        ([*GOOD[:1], "Upgrade: h2c", *GOOD[2:]], "GET / HTTP/1.1", 400),
        ([*GOOD[:2], "Connection: keep-alive", *GOOD[3:]], "GET / HTTP/1.1", 400),
        ([line for line in GOOD if not line.startswith("Connection")], "GET / HTTP/1.1", 400),
        ([*GOOD[:4], "Sec-WebSocket-Version: 8"], "GET / HTTP/1.1", 426),
        (GOOD[:4], "GET / HTTP/1.1", 426),
        ([*GOOD[:3], *GOOD[4:]], "GET / HTTP/1.1", 400),
        ([*GOOD[:3], "Sec-WebSocket-Key: c2hvcnQ=", *GOOD[4:]], "GET / HTTP/1.1", 400),
        ([*GOOD[:3], "Sec-WebSocket-Key: not base64!!!!!!!!!!!", *GOOD[4:]], "GET / HTTP/1.1", 400),
        (GOOD[1:], "GET / HTTP/1.1", 400),
        (GOOD, "GET / HTTP/1.0", 400),
        (GOOD, "GET /", 400),
        (GOOD, "GET http://h/ HTTP/1.1", 400),
        ([*GOOD, "bad header line"], "GET / HTTP/1.1", 400),
        ([*GOOD, " folded: continuation"], "GET / HTTP/1.1", 400),
    ],
)
def test_bad_upgrade_requests(lines: list[str], start: str, status: int) -> None:
    with pytest.raises(HttpError) as info:
        parse_upgrade_request(request(*lines, start=start))
    assert info.value.status == status
    assert isinstance(info.value, RemoteProtocolError)
    response = info.value.response()
    assert response.startswith(f"HTTP/1.1 {status} ".encode())
    connection = [line for line in response.split(b"\r\n") if line.startswith(b"Connection: ")]
    assert len(connection) == 1 and b"close" in connection[0]
    if status == 426 and any(line.startswith("Upgrade") for line in lines):
        assert b"Sec-WebSocket-Version: 13\r\n" in response
    if status == 405:
        assert b"Allow: GET\r\n" in response


@given(st.lists(st.sampled_from([*GOOD, "GET / HTTP/1.1", "Upgrade: x\ny", "\n", "é", ":", " ", "\x00"]), max_size=8))
def test_any_head_parses_or_gets_a_clean_http_error(lines: list[str]) -> None:
    raw = "\r\n".join(lines).encode() + b"\r\n\r\n"
    try:
        parse_upgrade_request(raw)
    except HttpError as exc:
        assert "\r" not in exc.reason and "\n" not in exc.reason  # usable as a reason phrase too
        assert exc.response().startswith(f"HTTP/1.1 {exc.status} ".encode())


def test_find_head_end() -> None:
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: h\r\n") == -1
    head = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    assert find_head_end(head + b"\x82\x00") == len(head)
    assert find_head_end(bytearray(head)) == len(head)
    assert find_head_end(b"x" * 100, limit=200) == -1
    with pytest.raises(HttpError) as info:
        find_head_end(b"x" * 200, limit=200)
    assert info.value.status == 431
    with pytest.raises(RemoteProtocolError):
        find_head_end(b"x" * 200 + b"\r\n\r\n", limit=200)


def test_build_http_response() -> None:
    response = build_http_response(404, "Not Found", b"nope", extra_headers={"X-A": "1"})
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 404 Not Found",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: 4",
        b"Connection: close",
        b"X-A: 1",
    ]
    assert body == b"nope"
    with pytest.raises(LocalProtocolError):
        build_http_response(200, "OK", extra_headers={"X-A": "1\r\nSet-Cookie: x"})


def test_upgrade_request_round_trip() -> None:
    key = new_client_key()
    raw = build_upgrade_request("[::1]:8888", "/ws?k=v", key, {"X-Tether": "1"})
    assert raw.startswith(b"GET /ws?k=v HTTP/1.1\r\nHost: [::1]:8888\r\n")
    req = parse_upgrade_request(raw)
    assert (req.path, req.key, req.headers["x-tether"]) == ("/ws?k=v", key, "1")
    check_upgrade_response(build_upgrade_response(req), key)


@pytest.mark.parametrize(
    ("response", "error", "status"),
    [
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", HttpError, 404),
        (b"HTTP/1.1 200 OK\r\n\r\n", HttpError, 200),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
            WebSocketError,
            None,
        ),
        (
            f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key(KEY)}\r\n\r\n".encode(),
            WebSocketError,
            None,
        ),
        (
            f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept_key(KEY)}\r\n\r\n".encode(),
            WebSocketError,
            None,
        ),
        (
            f"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Accept: {accept_key(KEY)}\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n".encode(),
            WebSocketError,
            None,
        ),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", RemoteProtocolError, None),
        ("HTTP/1.1 4²6 Upgrade Required\r\n\r\n".encode("latin-1"), RemoteProtocolError, None),  # was ValueError
    ],
)
def test_check_upgrade_response_refuses(response: bytes, error: type[Exception], status: int | None) -> None:
    with pytest.raises(error) as info:
        check_upgrade_response(response, KEY)
    if status is not None:
        assert isinstance(info.value, HttpError)
        assert info.value.status == status
        assert f"HTTP/1.1 {status}" in str(info.value)


# -- a tornado server (independent implementation) ------------------------------------------------


def echo_handler() -> type:
    """A tornado handler that echoes every message; a few commands exercise pings, text and
    server-side closes. (Defined on demand: the codec tests above run without tornado.)"""
    import tornado.websocket

    class EchoHandler(tornado.websocket.WebSocketHandler):
        events: queue.Queue[tuple[str, Any]]

        def initialize(self, events: queue.Queue[tuple[str, Any]]) -> None:
            self.events = events

        def open(self, *args: str, **kwargs: str) -> None:
            self.events.put(("open", dict(self.request.headers)))

        def on_message(self, message: str | bytes) -> None:
            if message == b"ping-me":
                self.ping(b"are you there")
            elif message == b"text-me":
                self.write_message("héllo")
            elif message == b"close-me":
                self.close(4000, "bye")
            elif message == b"last-words":
                self.write_message(b"last words", binary=True)
                self.close(4000, "bye")
            else:
                self.write_message(message, binary=isinstance(message, bytes))

        def on_pong(self, data: bytes) -> None:
            self.write_message(b"pong:" + data, binary=True)

        def on_close(self) -> None:
            self.events.put(("close", self.close_code))

    return EchoHandler


class TornadoServer:
    """tornado on its own asyncio loop in a thread: plain and TLS listeners on 127.0.0.1."""

    def __init__(self, ssl_options: ssl.SSLContext | None) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._ssl_options = ssl_options
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = self.tls_port = 0
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="tornado", daemon=True)
        self._thread.start()
        assert self._ready.wait(WAIT)

    async def _main(self) -> None:
        import tornado.httpserver
        import tornado.testing
        import tornado.web

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = tornado.web.Application([(r"/echo", echo_handler(), {"events": self.events})])
        servers = []
        sock, self.port = tornado.testing.bind_unused_port()
        servers.append(tornado.httpserver.HTTPServer(app))
        servers[-1].add_sockets([sock])
        if self._ssl_options is not None:
            sock, self.tls_port = tornado.testing.bind_unused_port()
            servers.append(tornado.httpserver.HTTPServer(app, ssl_options=self._ssl_options))
            servers[-1].add_sockets([sock])
        self._ready.set()
        await self._stop.wait()
        for server in servers:
            server.stop()
            await server.close_all_connections()

    def next_event(self, kind: str) -> Any:
        while True:
            got, value = self.events.get(timeout=WAIT)
            if got == kind:
                return value

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path] | None:
    """A throwaway self-signed certificate for 127.0.0.1 (None without the openssl command)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tornado_server(tls_files: tuple[Path, Path] | None) -> Iterator[TornadoServer]:
    pytest.importorskip("tornado")
    ctx = None
    if tls_files is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*map(str, tls_files))
    server = TornadoServer(ctx)
    yield server
    server.close()


@pytest.fixture
def server(tornado_server: TornadoServer) -> TornadoServer:
    while not tornado_server.events.empty():  # events left by an earlier test
        tornado_server.events.get_nowait()
    return tornado_server


def test_ws_connect_echoes_through_tornado(server: TornadoServer) -> None:
    with ws_connect(f"ws://127.0.0.1:{server.port}/echo", headers={"X-Tether-Test": "yes"}) as conn:
        headers = server.next_event("open")
        assert headers["X-Tether-Test"] == "yes"
        assert conn.fileno() >= 0
        for size in (0, 1, 125, 126, 65536, 70000, 3 << 20):
            payload = os.urandom(size)
            conn.send(payload)
            assert conn.recv() == payload
        conn.send(b"ping-me")
        assert conn.recv() == b"pong:are you there"  # we answered tornado's ping with its payload
        conn.send(b"text-me")
        assert conn.recv() == "héllo".encode()
        conn.send(bytearray(b"abc"))
        conn.send(memoryview(b"xxdefxx")[2:5])
        assert (conn.recv(), conn.recv()) == (b"abc", b"def")
    assert server.next_event("close") == 1000
    conn.close()  # idempotent


def test_server_close_ends_recv(server: TornadoServer) -> None:
    conn = ws_connect(f"ws://127.0.0.1:{server.port}/echo")
    conn.send(b"close-me")
    assert conn.recv() is None
    assert (conn.close_code, conn.close_reason) == (4000, "bye")
    assert conn.recv() is None
    assert server.next_event("close") == 4000  # tornado got our echo of its code
    conn.close()


def test_send_after_close_raises(server: TornadoServer) -> None:
    conn = ws_connect(f"ws://127.0.0.1:{server.port}/echo")
    conn.close(4001, "done")
    assert server.next_event("close") == 4001
    assert conn.close_code == 4001  # tornado echoed our code
    with pytest.raises(ConnectionClosed):
        conn.send(b"late")
    assert conn.recv() is None


def test_ws_connect_errors(server: TornadoServer) -> None:
    with pytest.raises(HttpError) as info:
        ws_connect(f"ws://127.0.0.1:{server.port}/nowhere")
    assert info.value.status == 404
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(ConnectFailed):
        ws_connect(f"ws://127.0.0.1:{port}/", timeout=2)
    with pytest.raises(ValueError, match="ws://"):
        ws_connect(f"http://127.0.0.1:{server.port}/echo")


def pump_through(sock: socket.socket, payload: bytes) -> bytes:
    """Write ``payload`` from a thread while reading as many bytes back."""
    writer = threading.Thread(target=sock.sendall, args=(payload,))
    writer.start()
    try:
        return recv_exact(sock, len(payload))
    finally:
        writer.join(WAIT)


def bridge_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("ws-bridge-")}


def assert_bridges_finish() -> None:
    """Every bridge thread ends once its connection has closed (no thread or socket left behind)."""
    for thread in threading.enumerate():
        if thread.name.startswith("ws-bridge-"):
            thread.join(WAIT)
            assert not thread.is_alive(), thread.name


def test_bridge_round_trip_and_close(server: TornadoServer) -> None:
    sock = ws_open_socket(f"ws://127.0.0.1:{server.port}/echo")
    assert sock.type == socket.SOCK_STREAM
    assert {"ws-bridge-up", "ws-bridge-down"} <= bridge_threads()
    payload = os.urandom(5 << 20)
    assert pump_through(sock, payload) == payload
    sock.sendall(b"hello")
    assert recv_exact(sock, 5) == b"hello"
    sock.close()
    assert server.next_event("close") == 1000
    assert_bridges_finish()


def test_bridge_sees_eof_when_the_server_closes(server: TornadoServer) -> None:
    sock = ws_bridge(ws_connect(f"ws://127.0.0.1:{server.port}/echo"))
    sock.sendall(b"last-words")
    sock.settimeout(WAIT)
    assert recv_exact(sock, 10) == b"last words"  # what came before the CLOSE still arrives
    assert sock.recv(100) == b""
    assert server.next_event("close") == 4000
    assert_bridges_finish()
    with pytest.raises(OSError):  # the bridge shut its end: writes fail instead of vanishing
        for _ in range(100):
            sock.sendall(b"x" * 65536)
    sock.close()


def test_bridge_socket_supports_sendfile_and_fd_passing(server: TornadoServer, tmp_path: Path) -> None:
    sock = ws_open_socket(f"ws://127.0.0.1:{server.port}/echo")
    data = os.urandom(300_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    with path.open("rb") as f:
        assert sock.sendfile(f) == len(data)
    assert recv_exact(sock, len(data)) == data
    # Hand the socket over an AF_UNIX channel (what the device server does with its workers).
    a, b = socket.socketpair()
    with a, b:
        socket.send_fds(a, [b"fd"], [sock.fileno()])
        _, fds, _, _ = socket.recv_fds(b, 16, 1)
    sock.close()
    passed = socket.socket(fileno=fds[0])
    passed.sendmsg([b"via ", b"sendmsg"])
    assert recv_exact(passed, 11) == b"via sendmsg"
    buf = bytearray(3)
    passed.sendall(b"xyz")
    assert passed.recv_into(buf) == 3 and buf == b"xyz"
    passed.close()
    assert server.next_event("close") == 1000
    assert_bridges_finish()


@pytest.fixture
def client_tls(tls_files: tuple[Path, Path] | None) -> ssl.SSLContext:
    if tls_files is None:
        pytest.skip("no openssl command to make a test certificate")
    return ssl.create_default_context(cafile=str(tls_files[0]))


def test_wss_echo_and_bridge(server: TornadoServer, client_tls: ssl.SSLContext) -> None:
    url = f"wss://127.0.0.1:{server.tls_port}/echo"
    with ws_connect(url, ssl_context=client_tls) as conn:
        for size in (0, 1, 70000, 1 << 20):
            payload = os.urandom(size)
            conn.send(payload)
            assert conn.recv() == payload
        conn.send(b"ping-me")
        assert conn.recv() == b"pong:are you there"
    assert server.next_event("close") == 1000
    sock = ws_bridge(ws_connect(url, ssl_context=client_tls))
    payload = os.urandom(3 << 20)
    assert pump_through(sock, payload) == payload  # reads and writes at once from two threads
    sock.close()
    assert server.next_event("close") == 1000
    assert_bridges_finish()


def test_wss_verifies_the_certificate(server: TornadoServer, client_tls: ssl.SSLContext) -> None:
    with pytest.raises(ConnectFailed, match="TLS"):
        ws_connect(f"wss://127.0.0.1:{server.tls_port}/echo", timeout=5)  # default CAs: self-signed refused


# -- our server, tornado's client -----------------------------------------------------------------


class MiniServer:
    """A thread-per-connection WebSocket echo server built from this module's pieces.

    ``/greet`` sends its 101 and a first message in one write (the client must keep the bytes that
    follow the head). Every connection's end lands in ``closes``.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closes: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._accept, name="mini-ws", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            head = bytearray()
            try:
                while (end := find_head_end(head)) < 0:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                req = parse_upgrade_request(head[:end])
            except HttpError as exc:
                sock.sendall(exc.response())
                return
            greeting = b""
            if req.path == "/greet":
                greeting = encode_frame(Opcode.BINARY, b"welcome", mask=False)
            sock.sendall(build_upgrade_response(req) + greeting)
            conn = WebSocketConnection(sock, client=False, unused=bytes(head[end:]))
            try:
                while (msg := conn.recv()) is not None:
                    conn.send(msg)
                self.closes.put(conn.close_code)
            except WebSocketError as exc:  # the peer broke the protocol: we sent CLOSE with this code
                self.closes.put(exc.code)
            finally:
                conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()


@pytest.fixture
def mini() -> Iterator[MiniServer]:
    server = MiniServer()
    yield server
    server.close()


def run_async(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro_fn(), WAIT))


def test_tornado_client_against_our_server(mini: MiniServer) -> None:
    tornado_websocket = pytest.importorskip("tornado.websocket")

    async def talk() -> list[Any]:
        conn = await tornado_websocket.websocket_connect(f"ws://127.0.0.1:{mini.port}/echo")
        got = []
        for payload in (b"", b"x", os.urandom(70000), os.urandom(3 << 20)):
            await conn.write_message(payload, binary=True)
            got.append(await conn.read_message() == payload)
        await conn.write_message("text é")  # echoed as binary by our server
        got.append(await conn.read_message())
        pong: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        conn.on_pong = pong.set_result  # type: ignore[method-assign]
        conn.ping(b"hi")
        got.append(await pong)  # our server answered tornado's ping
        await conn.write_message(b"after ping", binary=True)
        got.append(await conn.read_message())
        conn.close(1000, "done")
        got.append(await conn.read_message())  # None once the close handshake completes
        got.append(conn.close_code)
        return got

    assert run_async(talk) == [True, True, True, True, "text é".encode(), b"hi", b"after ping", None, 1000]
    assert mini.closes.get(timeout=WAIT) == 1000


def test_bytes_after_the_101_reach_the_first_recv(mini: MiniServer) -> None:
    with ws_connect(f"ws://127.0.0.1:{mini.port}/greet") as conn:
        assert conn.recv() == b"welcome"
        conn.send(b"more")
        assert conn.recv() == b"more"
    assert mini.closes.get(timeout=WAIT) == 1000


def test_our_client_and_server_bridge(mini: MiniServer) -> None:
    sock = ws_open_socket(f"ws://127.0.0.1:{mini.port}/echo")
    payload = os.urandom(2 << 20)
    assert pump_through(sock, payload) == payload
    sock.shutdown(socket.SHUT_WR)  # our CLOSE goes out; the echo server answers and the bridge ends
    sock.settimeout(WAIT)
    assert sock.recv(10) == b""
    sock.close()
    assert mini.closes.get(timeout=WAIT) == 1000
    assert_bridges_finish()


def test_our_server_sends_close_on_protocol_errors(mini: MiniServer) -> None:
    with socket.create_connection(("127.0.0.1", mini.port), timeout=WAIT) as sock:
        key = new_client_key()
        sock.sendall(build_upgrade_request(f"127.0.0.1:{mini.port}", "/echo", key))
        head = bytearray()
        while (end := find_head_end(head)) < 0:
            head += sock.recv(4096)
        check_upgrade_response(head[:end], key)
        sock.sendall(encode_frame(Opcode.BINARY, b"unmasked", mask=False))
        rest = bytes(head[end:])
        while (chunk := sock.recv(4096)) != b"":
            rest += chunk
    decoder = FrameDecoder(expect_masked=False)
    assert decoder.feed(rest) == [Message(Opcode.CLOSE, encode_close(1002, "client frames must be masked"))]
    assert mini.closes.get(timeout=WAIT) == 1002


@pytest.mark.parametrize(
    ("headers", "status", "expect_header"),
    [
        ({}, 426, ("Upgrade", "websocket")),
        ({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "8"},
         426, ("Sec-WebSocket-Version", "13")),
        ({"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}, 400, None),
    ],
)  # fmt: skip
def test_bad_upgrades_get_http_errors(
    mini: MiniServer, headers: dict[str, str], status: int, expect_header: tuple[str, str] | None
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", mini.port, timeout=WAIT)
    try:
        conn.request("GET", "/echo", headers=headers)
        response = conn.getresponse()
        assert response.status == status
        if expect_header is not None:
            assert response.getheader(expect_header[0]) == expect_header[1]
        assert response.read()
    finally:
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", mini.port, timeout=WAIT)
    with contextlib.closing(conn):
        conn.request("POST", "/echo", body=b"x")
        assert conn.getresponse().status == 405
