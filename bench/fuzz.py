"""Fuzz every parser in tether: mutated valid inputs in-process, then a sample over real sockets.

    python bench/fuzz.py [--inputs 1000000] [--seed 1] [--target NAME ...] [--jobs N] [--live 300]
                         [--deadline 1.0] [--json PATH] [--list] [--replay NAME:HEX]

Inputs are valid seeds (tracker messages, TVM handshakes, native session frames, WebSocket frames, HTTP
heads) mutated with the standard library's ``random``: bit flips, byte edits, truncation, splicing of two
seeds, length fields set to their extremes, and, for JSON, structure-aware edits (deep nesting, huge
numbers, NaN and Infinity, lone surrogates, non-UTF-8 bytes, wrong types). Every input goes through the
parsers exactly as tether's servers and clients feed them (sans-I/O; streams split at random points, the
handshake read ``needed()`` bytes at a time), and through the state that follows them (the tracker's core,
the proxy's matcher).

Per target it counts inputs, **crashes** (any exception but the documented ones, mostly tether's
``RemoteProtocolError`` family; also a failed invariant, such as a SUMMARY that is not JSON), **hangs**
(an input that took longer than ``--deadline``; one stuck for ``--kill-after`` seconds stops the run
with its reproducer) and **memory** (RSS before and after, and what tracemalloc sees left after a final
batch of inputs).

``--live N`` then starts a tether tracker, a device server registered with it and a proxy, each its own
process on loopback port 0, and sends each of them N inputs over real sockets (tracker frames, handshakes,
native session frames after a real grant, HTTP and WebSocket to the proxy's web port), closing its side
after each: a connection the server does not close within the deadline is a hang, a traceback in the
server's log or in an error frame is a crash. Then 64 peers ask the tracker for keys of a frame's 1 MiB
each and leave (its RSS says what it keeps of them). After all that, each server must still serve an honest
request (a grant and a session through the tracker, a pair through the proxy over TCP and WebSocket).

Exit status 1 when anything crashed or hung: each finding is printed with its target and the input in
hex; ``--replay NAME:HEX`` runs that one input again (the tracker and handshake targets keep state across
inputs, so a finding may need its run: ``--seed S --target NAME --inputs N``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import faulthandler
import gc
import itertools
import json
import logging
import multiprocessing
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.errors import AuthError, BadHeader, ConfigError, RemoteProtocolError, TetherError
from tether.protocol.constants import MAX_TRACKER_FRAME_BYTES, MAX_TRACKER_REPLY_BYTES, RPC_MAGIC, HandshakeCode
from tether.protocol.framing import FrameDecoder, HandshakeDecoder, HandshakeReplyDecoder
from tether.protocol.keys import parse_peer_key, proxied_keys, server_key_name
from tether.protocol.session import (
    FIXED_HEADER,
    MAX_PAYLOAD_BYTES,
    FrameKind,
    HotOp,
    TensorDesc,
    decode_run_call,
    decode_run_reply,
    encode_call,
    encode_reply,
    encode_run_call,
    encode_run_reply,
    parse_fixed_header,
    parse_json_header,
    tensor_descs,
    unpack_fixed_header,
)
from tether.protocol.tracker import (
    MAGIC_BYTES,
    Put,
    SessionEvent,
    TrackerClientStream,
    TrackerServerStream,
    UpdateInfo,
    decode_message,
    parse_request_reply,
)
from tether.protocol.websocket import (
    FrameDecoder as WsDecoder,
)
from tether.protocol.websocket import (
    HttpError,
    Opcode,
    accept_key,
    build_upgrade_response,
    check_upgrade_response,
    encode_close,
    encode_frame,
    find_head_end,
    parse_close,
    parse_upgrade_request,
    parse_ws_url,
)

# ------------------------------------------------------------------------------------------------
# mutation
# ------------------------------------------------------------------------------------------------

INT32_EDGES = (0, 1, -1, 2, 3, 4, 5, 125, 126, 127, 128, 255, 256, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               1 << 20, (1 << 20) + 1, 64 * 1024, 64 * 1024 + 1, 0x7FFFFFFF, -0x80000000, 0x7FFFFFFE, -2)  # fmt: skip
UINT64_EDGES = (0, 1, 125, 126, 127, 0xFFFF, 0x10000, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0D, 0x0A, 0x20, 0x3A, 0x22, 0x5C, 0x7B, 0x5B, 0xC3, 0xED)
BAD_UTF8 = (b"\xff", b"\xc3", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xe2\x82", b"\x80")


def mutate_bytes(r: random.Random, data: bytes, pool: Sequence[bytes] = (), rounds: int = 0) -> bytes:
    """``data`` after 1 to 8 byte-level edits; ``pool`` supplies other inputs to splice with."""
    buf = bytearray(data)
    for _ in range(rounds or r.choice((1, 1, 1, 2, 2, 3, 4, 8))):
        n = len(buf)
        op = r.randrange(13)
        if op == 0 and n:  # flip a bit
            i = r.randrange(n)
            buf[i] ^= 1 << r.randrange(8)
        elif op == 1 and n:  # an interesting byte
            buf[r.randrange(n)] = r.choice(INTERESTING_BYTES)
        elif op == 2 and n:  # a random byte
            buf[r.randrange(n)] = r.randrange(256)
        elif op == 3:  # insert random bytes
            i = r.randrange(n + 1)
            buf[i:i] = r.randbytes(r.choice((1, 1, 2, 4, 16, 64)))
        elif op == 4 and n:  # delete a range
            i = r.randrange(n)
            del buf[i : i + r.choice((1, 1, 2, 4, 16, n))]
        elif op == 5 and n:  # duplicate a range
            i = r.randrange(n)
            j = min(n, i + r.choice((1, 4, 16, 256)))
            buf[j:j] = buf[i:j] * r.choice((1, 2, 16))
        elif op == 6 and n:  # truncate
            del buf[r.randrange(n) :]
        elif op == 7:  # append junk
            buf += r.randbytes(r.choice((1, 3, 8, 100)))
        elif op == 8 and pool:  # splice with another input
            other = r.choice(pool)
            i, j = r.randrange(n + 1), r.randrange(len(other) + 1)
            buf[i:] = other[j:]
        elif op == 9 and n >= 4:  # an int32 LE extreme at a random offset
            i = r.randrange(n - 3)
            buf[i : i + 4] = struct.pack("<i", r.choice(INT32_EDGES))
        elif op == 10 and n >= 8:  # a uint64 BE extreme (WebSocket's 64-bit length)
            i = r.randrange(n - 7)
            buf[i : i + 8] = struct.pack("!Q", r.choice(UINT64_EDGES))
        elif op == 11:  # invalid UTF-8
            i = r.randrange(n + 1)
            buf[i:i] = r.choice(BAD_UTF8)
        elif op == 12 and n >= 2:  # a uint16 BE extreme
            i = r.randrange(n - 1)
            buf[i : i + 2] = struct.pack("!H", r.choice((0, 1, 125, 126, 127, 1000, 1005, 1006, 2999, 5000, 0xFFFF)))
    return bytes(buf)


class Raw(str):
    """JSON text written verbatim by :func:`dump_json` (NaN, huge numbers, deep nesting, bad escapes)."""

    __slots__ = ()


def _deep(r: random.Random) -> Raw:
    depth = r.choice((20, 200, 900, 990, 1000, 1100, 5000, 100_000))
    if r.random() < 0.5:
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


_NASTY_STRINGS = ("", " ", "\t", "\x00", "\r\n", ":", "é", "日本", "\u3000", "\x85", "\u2028", "\ud800", "\udfff",
                  "²", "³", "¹", "٣", "\uff11\uff12", " 9090 ", "9090", "65536", "-1", "0x10", "1_000", "nan", "inf", "-inf",
                  "1e999", "NaN", "server:", "client:", "server:k", "server:proxy[a,b]", "server:proxy[", "tether",
                  "tvm", "start", "end", "k", "k:1", "fuzz", "-timeout=nan", " -tether=1", "\\", '"', "%s%n",
                  "127.0.0.1", "::1", "[::1]")  # fmt: skip
_NASTY_RAW = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-400", "-0", "0.0", "-0.0", "1E+2", "1e308",
              "2.5e-324", '"\\ud800"', '"\\udfff"', '"x\\ud83d"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\uDBFF"',
              "[]", "{}", "[null]", '{"": null}', "true", "false", "null", '"\\u00b2"')  # fmt: skip


def nasty(r: random.Random) -> Any:
    """A value that has broken parsers before."""
    pick = r.randrange(10)
    if pick == 0:
        return _deep(r)
    if pick == 1:
        digits = r.choice((10, 19, 20, 39, 309, 310, 400, 4300, 4301, 6000))
        return Raw(r.choice(("", "-")) + "9" * digits)
    if pick == 2:
        return r.choice(INT32_EDGES + UINT64_EDGES + (1 << 64, -(1 << 63), 10**400))
    if pick == 3:
        return r.choice((1.5, -0.5, 0.0, 1e308, -1e308, 5e-324, 1e-9, 1e9, 1e10, 2.0**53 + 1))
    if pick == 4:
        return r.choice((True, False, None))
    if pick in (5, 6):
        return r.choice(_NASTY_STRINGS)
    if pick == 7:
        return "x" * r.choice((64, 257, 1000, 70_000))
    if pick == 8:
        return r.choice(([], {}, [None], {"": None}, [0] * r.choice((1, 100, 3000)), {str(i): i for i in range(200)}))
    return Raw(r.choice(_NASTY_RAW))


def dump_json(value: Any, ascii_only: bool = False) -> str:
    """``value`` as JSON text; :class:`Raw` parts verbatim (also as object keys: not JSON then)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, str) or value is None or isinstance(value, bool | int):
        return json.dumps(value, ensure_ascii=ascii_only)
    if isinstance(value, float):
        return json.dumps(value)  # NaN and Infinity as Python writes them
    if isinstance(value, list):
        return "[" + ", ".join(dump_json(v, ascii_only) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(
                f"{k if isinstance(k, Raw) else json.dumps(str(k), ensure_ascii=ascii_only)}: {dump_json(v, ascii_only)}"
                for k, v in value.items()
            )
            + "}"
        )
    raise TypeError(type(value))


def _slots(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, index or key) in ``value``, breadth first, Raw parts excluded."""
    out: list[tuple[Any, Any]] = []
    todo = [value]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            for i, v in enumerate(node):
                out.append((node, i))
                todo.append(v)
        elif isinstance(node, dict):
            for k, v in node.items():
                out.append((node, k))
                todo.append(v)
    return out


def mutate_json(r: random.Random, seed: Any, rounds: int = 0) -> tuple[Any, list[Raw]]:
    """A copy of ``seed`` with 1 to 4 structural edits, and the :class:`Raw` parts it holds."""
    holder = [copy.deepcopy(seed)]
    raws: list[Raw] = []

    def bad() -> Any:
        value = nasty(r)
        if isinstance(value, Raw):
            raws.append(value)
        return value

    for _ in range(rounds or r.choice((1, 1, 1, 2, 3, 4))):
        parent, key = r.choice(_slots(holder))
        old = parent[key]
        op = r.randrange(9)
        if op <= 2:
            parent[key] = bad()
        elif op == 3 and parent is not holder:
            del parent[key]
        elif op == 4:
            if isinstance(old, list):
                old.insert(r.randrange(len(old) + 1), bad())
            elif isinstance(old, dict):
                old[r.choice((*_NASTY_STRINGS, "id", "key", "addr", "tether", "labels", "detail"))] = bad()
            else:
                parent[key] = [old]
        elif op == 5:  # the same value as another type
            if isinstance(old, bool) or old is None:
                parent[key] = r.choice((0, 1, "true", [], {}))
            elif isinstance(old, int | float):
                as_float = float(old) if abs(old) < 1e300 else 1e300
                parent[key] = r.choice((str(old), as_float, -old, [old], int(old) * 10 ** r.choice((3, 12, 30)), True))
            elif isinstance(old, str):
                parent[key] = r.choice((len(old), [old], {old: old}, old.encode("utf-8", "surrogatepass").hex(), None))
            elif isinstance(old, list):
                parent[key] = dict(enumerate(old)) if old else {}
            elif isinstance(old, dict):
                parent[key] = list(old.values())
        elif op == 6 and isinstance(old, str) and not isinstance(old, Raw):  # edit inside a string
            i = r.randrange(len(old) + 1)
            parent[key] = old[:i] + r.choice(_NASTY_STRINGS) + old[i + r.choice((0, 0, 1, 5)) :]
        elif op == 7 and isinstance(parent, dict):  # a nasty key (or not a string at all)
            if r.random() < 0.2:
                new_key: str = Raw(r.choice(("1", "null", "[]", '"\\ud800"', '"k"')))
                raws.append(Raw(new_key))
            else:
                new_key = r.choice(_NASTY_STRINGS)
            parent[new_key] = parent.pop(key)
        elif op == 8 and isinstance(parent, list) and parent is not holder:  # one more neighbour
            parent.insert(key, old if r.random() < 0.5 else bad())
        else:
            parent[key] = bad()
    return holder[0], raws


def json_bytes(r: random.Random, seed: Any, p_valid: float = 0.15) -> bytes:
    """``seed`` as JSON bytes: as is, mutated, or (rarely) garbage."""
    x = r.random()
    ascii_only = r.random() < 0.3
    if x < p_valid:
        text = json.dumps(seed, ensure_ascii=ascii_only)
    elif x < 0.97:
        value, raws = mutate_json(r, seed)
        text = json.dumps(value, ensure_ascii=ascii_only)  # Raw parts as strings, then put back verbatim
        for raw in raws:
            text = text.replace(json.dumps(raw, ensure_ascii=ascii_only), raw, 1)
    else:
        text = dump_json(nasty(r)) or "0"
    return text.encode("utf-8", "surrogatepass")


def mutate_text(r: random.Random, text: str, extras: Sequence[str] = ()) -> str:
    """Token and character edits of a line of text (keys, URLs, header values)."""
    for _ in range(r.choice((1, 1, 2, 3))):
        op = r.randrange(6)
        i = r.randrange(len(text) + 1)
        if op <= 1:
            text = text[:i] + r.choice(_NASTY_STRINGS + tuple(extras)) + text[i:]
        elif op == 2:
            text = text[:i] + text[i + r.choice((1, 2, 8, 100)) :]
        elif op == 3:
            text = text[:i]
        elif op == 4:
            text = text[:i] + text[i : i + 8] * r.choice((2, 100, 5000)) + text[i + 8 :]
        else:
            text = text[:i] + r.choice(extras or _NASTY_STRINGS) + text[i:]
    return text


def chunks(data: bytes, r: random.Random) -> list[bytes]:
    """``data`` split the way reads may split it: whole, byte by byte, or at a few random points."""
    n = len(data)
    mode = r.randrange(4)
    if mode == 0 or n < 2:
        return [data]
    if mode == 1 and n <= 200:
        return [data[i : i + 1] for i in range(n)]
    points = sorted({0, n, *(r.randrange(n) for _ in range(r.choice((1, 2, 3, 8))))})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def input_rng(data: bytes) -> random.Random:
    """The chunking of one input depends on the input alone, so a reproducer replays exactly."""
    return random.Random(zlib.crc32(data) ^ len(data))


def i32(value: int) -> bytes:
    return struct.pack("<i", value)


def length_prefixed(r: random.Random, payload: bytes, p_right: float = 0.92) -> bytes:
    """``[int32 LE length][payload]``, the length usually right, else an extreme or off by one."""
    if r.random() < p_right:
        n = len(payload)
    else:
        n = r.choice((*INT32_EDGES, len(payload) + 1, len(payload) - 1, len(payload) * 2))
    return i32(max(-(1 << 31), min(n, (1 << 31) - 1))) + payload


# ------------------------------------------------------------------------------------------------
# seeds
# ------------------------------------------------------------------------------------------------

_TETHER_INFO = {"protocols": ["tether", "tvm"], "labels": {"soc": "x"}, "heartbeat": 2.0, "slots": 2,
                "device": {"os": "linux", "cores": 8}, "version": "0.1"}  # fmt: skip
TRACKER_MESSAGES: list[Any] = [
    [1],
    [1, {"hello": True}],
    [2, "tracker:stop"],
    [3, "k", [9090, "k:abc"], None],
    [3, "k", [9090, "k:abc"], "10.0.0.1", {"protocols": ["tether", "tvm"], "labels": {"soc": "x"}}],
    [3, "k", ["9090", "k:1"]],
    [4, "k", "", 1],
    [
        4,
        "k",
        "alice",
        2,
        {
            "id": "r1",
            "protocol": "tether",
            "labels": {"soc": "x"},
            "timeout": 0.5,
            "user": "alice",
            "unservable_after": 0.2,
        },
    ],
    [4, "k", None, 1.5, {"protocol": "tvm"}],
    [5, {"key": "server:k", "addr": [None, 9090]}],
    [5, {"key": "server:k", "addr": ["127.0.0.1", 9090], "tether": _TETHER_INFO}],
    [5, {"key": "server:proxy[k,j]", "addr": [None, 9091]}],
    [5, {"key": "client:x"}],
    [6],
    [6, {"detail": True}],
    [6, {"detail": True, "key": "k"}],
    [7],
    [101, "r1"],
    [102, {"event": "start", "matchkey": "k:abc", "peer": "1.2.3.4:5"}],
    [102, {"event": "end", "matchkey": "k:1"}],
    [102, {"event": "end", "matchkey": "k:1", "outcome": "failed", "detail": "worker killed"}],
    [105, {"poll": True}],
    [105, {"canary": 1, "ok": True, "detail": "onnxruntime 1 ms"}],
    [106, {"op": "cordon", "server": "127.0.0.1:9090", "reason": "firmware"}],
    [106, {"op": "release", "server": "127.0.0.1:9090"}],
    [106, {"op": "drain", "server": "127.0.0.1:9090/k"}],
    [103, "k:abc"],
    [104, {"auth": 1, "name": "alice", "nonce": "ab" * 32}],
    [104, {"proof": "cd" * 32}],
]
#: steps of the authentication exchange (tether.protocol.auth), as a responder receives them
AUTH_STEPS: list[Any] = [
    {"auth": 1, "name": "alice", "nonce": "ab" * 32},
    {"auth": 1, "name": "nobody", "nonce": "00" * 32},
    {"proof": "cd" * 32},
    {"proof": ""},
    {"error": "off"},
    {"ok": True, "proof": "ef" * 32, "name": "alice", "role": "user"},
]
TRACKER_REPLIES: list[Any] = [
    0,
    -1,
    [0, ["127.0.0.1", 9090, "k:1"]],
    [0, ["127.0.0.1", "9090", "k:1"], {"id": "r1", "server": {"key": "server:k", "addr": ["h", 1]}}],
    [-1, {"id": "r1", "error": "timeout", "message": "no free server"}],
    [0, {"tether": "0.1"}],
    [0, {"queue_info": {"k": {"free": 1, "pending": 0}}, "server_info": [{"key": "server:k", "addr": ["h", 1]}]}],
    ["k:1", "k:2"],
]
KEYS = ("client:fuzz", "client:fuzz -tether=1", "client:fuzz -timeout=10", "client: -timeout=10", "server:fuzz",
        "client:k:abc -tether=1 -timeout=0.5", "server:proxy[a,b]", "client:127.0.0.1:5555", "client:日本 -tether=1",
        "server:fuzz -tether=1", "client:fuzz:0", "")  # fmt: skip
KEY_EXTRAS = (" -timeout=nan", " -timeout=1e999", " -timeout=-1", " -timeout=²", " -timeout=1_0", " -timeout=0x1",
              " -", " -=", " x", " -tether=0", " -tether=", "\t", "\u3000", "\x1c", "\x85", "client:", "server:")  # fmt: skip

_TENSOR = {"name": "x", "dtype": "float32", "shape": [2, 2], "nbytes": 16}
SESSION_FRAMES: list[tuple[int, dict[str, Any], bytes]] = [
    (1, {"op": "ping"}, b""),
    (1, {"op": "info"}, b""),
    (1, {"op": "listdir", "path": "."}, b""),
    (1, {"op": "upload", "path": "a.bin", "sha256": "0" * 64}, b"abc"),
    (1, {"op": "upload", "path": "a.bin"}, b"abc"),
    (1, {"op": "download", "path": "a.bin"}, b""),
    (1, {"op": "remove", "path": "a.bin"}, b""),
    (1, {"op": "put", "tensors": [_TENSOR]}, bytes(16)),
    (1, {"op": "fill", "shape": [2, 3], "dtype": "float32", "mode": "random"}, b""),
    (1, {"op": "get", "handle": "t1"}, b""),
    (1, {"op": "free", "handles": ["t1"]}, b""),
    (1, {"op": "load_model", "path": "m.json", "backend": "reference", "options": {}}, b""),
    (1, {"op": "run", "model": "m1", "inputs": {"x": "t1"}, "timeout": 5}, b""),
    (1, {"op": "benchmark", "model": "m1", "number": 1, "repeat": 1, "timeout": 5}, b""),
    (1, {"op": "fetch", "files": [{"path": "a", "sha256": "0" * 64}]}, b""),
    (1, {"op": "unload", "model": "m1"}, b""),
    (2, {"tensors": [_TENSOR]}, bytes(16)),
    (2, {}, b""),
    (3, {"type": "RunTimeout", "message": "m", "traceback": ""}, b""),
]
HTTP_REQUESTS = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8888\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "GET /ws?x=1 HTTP/1.1\r\nhost: h\r\nupgrade: WebSocket\r\nconnection: keep-alive, Upgrade\r\n"
    "sec-websocket-key: AAAAAAAAAAAAAAAAAAAAAA==\r\nsec-websocket-version: 13\r\nOrigin: http://x\r\n\r\n",
    "GET /status HTTP/1.1\r\nHost: x\r\n\r\n",
    "GET / HTTP/1.0\r\n\r\n",
    "POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
)
HTTP_EXTRAS = ("\r\n", "\n", "\r", ": ", ":", " ", "\t", "Upgrade: websocket\r\n", "Connection: close\r\n",
               "Sec-WebSocket-Version: 8\r\n", "Sec-WebSocket-Key: ¹²³\r\n", "Sec-WebSocket-Key: AAAA\r\n",
               "Host:\r\n", " folded\r\n", "X" * 20000, "\x00", "\xff", "GET", "HTTP/1.1", "HTTP/2", "/ws", "%00",
               "Sec-WebSocket-Extensions: permessage-deflate\r\n")  # fmt: skip
CLIENT_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
HTTP_RESPONSES = (
    f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Accept: {accept_key(CLIENT_KEY)}\r\n\r\n",
    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    "HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n\r\n",
)
WS_URLS = ("ws://127.0.0.1:8888/ws", "wss://[::1]:443/ws?x=1", "ws://host/", "ws://h:0/ws#", "WSS://example.com")


def gen_auth_steps(r: random.Random) -> bytes:
    """A hello and a proof (sometimes more, sometimes fewer) as length-prefixed steps."""
    steps = [r.choice(AUTH_STEPS[:2]), r.choice(AUTH_STEPS[2:])][: r.choice((1, 2, 2, 2))]
    steps += [r.choice(AUTH_STEPS)] * r.choice((0, 0, 1))
    data = b"".join(length_prefixed(r, json_bytes(r, step)) for step in steps)
    return mutate_bytes(r, data) if r.random() < 0.2 else data


def gen_tracker_payload(r: random.Random) -> bytes:
    return json_bytes(r, r.choice(TRACKER_MESSAGES))


def gen_tracker_frames(r: random.Random) -> bytes:
    data = b"".join(length_prefixed(r, gen_tracker_payload(r)) for _ in range(r.choice((1, 1, 2, 3, 6))))
    return mutate_bytes(r, data) if r.random() < 0.2 else data


def gen_tracker_stream(r: random.Random) -> bytes:
    magic = MAGIC_BYTES if r.random() < 0.97 else mutate_bytes(r, MAGIC_BYTES)
    return magic + gen_tracker_frames(r)


def gen_tracker_replies(r: random.Random) -> bytes:
    magic = MAGIC_BYTES if r.random() < 0.97 else mutate_bytes(r, MAGIC_BYTES)
    frames = b"".join(length_prefixed(r, json_bytes(r, r.choice(TRACKER_REPLIES))) for _ in range(r.choice((1, 2))))
    data = magic + frames
    return mutate_bytes(r, data) if r.random() < 0.15 else data


def gen_key(r: random.Random) -> bytes:
    key = r.choice(KEYS)
    if r.random() < 0.8:
        key = mutate_text(r, key, KEY_EXTRAS)
    raw = key.encode("utf-8", "surrogatepass")
    return mutate_bytes(r, raw) if r.random() < 0.1 else raw


def gen_handshake(r: random.Random) -> bytes:
    magic = i32(RPC_MAGIC) if r.random() < 0.95 else i32(r.choice((*INT32_EDGES, RPC_MAGIC + 1)))
    data = magic + length_prefixed(r, gen_key(r))
    if r.random() < 0.2:
        data += r.choice((b"TQ\x01", bytes(20), r.randbytes(8)))  # the session's first bytes, right behind
    return mutate_bytes(r, data) if r.random() < 0.15 else data


def gen_handshake_reply(r: random.Random) -> bytes:
    code = r.choice((*HandshakeCode, *INT32_EDGES)) if r.random() < 0.3 else HandshakeCode.SUCCESS
    data = i32(code) + length_prefixed(r, gen_key(r).replace(b"client:", b"server:", 1))
    return mutate_bytes(r, data) if r.random() < 0.15 else data


def session_frame(r: random.Random, kind: int, header: dict[str, Any], payload: bytes) -> bytes:
    body = json_bytes(r, header, p_valid=0.2)
    frame_id = r.choice((1, 2, 0, 0xFFFFFFFF))
    header_len, payload_len = len(body), len(payload)
    x = r.random()
    if x < 0.08:
        header_len = (
            r.choice((0, 1, 2, 1 << 20, (1 << 20) + 1, 0xFFFFFFFF, header_len + 1, header_len - 1)) & 0xFFFFFFFF
        )
    elif x < 0.16:
        payload_len = r.choice((*UINT64_EDGES, 16 << 30, (16 << 30) + 1, payload_len + 1))
    magic, version = b"TQ", 1
    if r.random() < 0.03:
        magic, version, kind = r.choice((b"TQ", b"tq", b"\x00\x00")), r.choice((0, 1, 2, 255)), r.randrange(256)
    return FIXED_HEADER.pack(magic, version, kind, frame_id, header_len, payload_len) + body + payload


def binary_frame(r: random.Random) -> bytes:
    """A CALL or REPLY (binary header: ping, run), its header fields sometimes cut or flipped."""
    frame_id = r.choice((1, 2, 0, 0xFFFFFFFF))
    pick = r.randrange(5)
    if pick == 0:
        return encode_call(HotOp.PING, frame_id)
    if pick == 1:
        inline = [TensorDesc("x", "float32", (2, 3))] if r.random() < 0.5 else []
        fields = encode_run_call(
            "m1", {"y": "t1"}, inline, fill=r.choice((None, "random")), seed=r.choice((None, 7)), keep=r.random() < 0.5
        )
        assert fields is not None
        payload = bytes(24) if inline else b""
        if r.random() < 0.5:
            fields = mutate_bytes(r, fields)
        return encode_call(HotOp.RUN, frame_id, fields[:4000], len(payload)) + payload
    if pick == 2:
        fields = encode_run_reply({"run_s": 0.5, "tensors": [_TENSOR]}) or b""
        return encode_reply(HotOp.RUN, frame_id, fields, 16) + bytes(16)
    kind = r.choice((FrameKind.CALL, FrameKind.REPLY))
    body = bytes(r.randrange(256) for _ in range(r.choice((1, 2, 9, 30))))
    header_len = r.choice((len(body), 0, 4096, 4097, 0xFFFFFFFF))
    return FIXED_HEADER.pack(b"TQ", 1, kind, frame_id, header_len, 0) + body


def gen_session(r: random.Random) -> bytes:
    frames = []
    for _ in range(r.choice((1, 1, 2, 3))):
        frames.append(binary_frame(r) if r.random() < 0.3 else session_frame(r, *r.choice(SESSION_FRAMES)))
    data = b"".join(frames)
    return mutate_bytes(r, data) if r.random() < 0.15 else data


def _ws_frames(r: random.Random, masked: bool) -> bytes:
    handshake = i32(RPC_MAGIC) + length_prefixed(r, b"client:fuzz -tether=1", 1.0)
    frames = []
    for _ in range(r.choice((1, 2, 3, 5))):
        pick = r.randrange(8)
        if pick == 0:
            frames.append(encode_frame(Opcode.TEXT, r.choice(("hello", "日本", "")).encode(), mask=masked))
        elif pick == 1:
            frames.append(encode_frame(Opcode.BINARY, handshake, mask=masked))
        elif pick == 2:  # fragmented, with a PING in between
            frames += [
                encode_frame(Opcode.BINARY, handshake[:4], mask=masked, fin=False),
                encode_frame(Opcode.PING, b"p", mask=masked),
                encode_frame(Opcode.CONT, handshake[4:], mask=masked),
            ]
        elif pick == 3:
            frames.append(
                encode_frame(Opcode.CLOSE, encode_close(r.choice((1000, 1001, 3000, 4999)), "bye"), mask=masked)
            )
        elif pick == 4:
            frames.append(encode_frame(Opcode.PING, r.randbytes(r.choice((0, 4, 125))), mask=masked))
        elif pick == 5:
            frames.append(encode_frame(Opcode.BINARY, r.randbytes(r.choice((0, 125, 126, 300, 70_000))), mask=masked))
        elif pick == 6:
            frames.append(encode_frame(Opcode.PONG, b"", mask=masked))
        else:
            frames.append(encode_frame(Opcode.BINARY, handshake[:4], mask=masked))
            frames.append(encode_frame(Opcode.BINARY, handshake[4:8], mask=masked))
    data = b"".join(frames)
    if r.random() < 0.25:  # header bits: FIN, RSV, opcode, MASK, the 7-bit length
        buf = bytearray(data)
        buf[0] = r.randrange(256) if r.random() < 0.5 else buf[0] ^ (1 << r.randrange(8))
        if len(buf) > 1 and r.random() < 0.5:
            buf[1] = (buf[1] & 0x80) | r.choice((0, 1, 125, 126, 127))
        data = bytes(buf)
    return mutate_bytes(r, data) if r.random() < 0.5 else data


def gen_ws_masked(r: random.Random) -> bytes:
    return _ws_frames(r, True)


def gen_ws_unmasked(r: random.Random) -> bytes:
    return _ws_frames(r, False)


def _http_text(r: random.Random, seeds: Sequence[str]) -> bytes:
    text = r.choice(seeds)
    lines = text.split("\r\n")
    for _ in range(r.choice((0, 1, 1, 2, 3))):
        op = r.randrange(5)
        i = r.randrange(len(lines))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[r.randrange(len(lines))])
        elif op == 2:
            lines[i] = mutate_text(r, lines[i], HTTP_EXTRAS)
        elif op == 3:
            lines[i] = lines[i].upper() if r.random() < 0.5 else lines[i].lower()
        else:
            lines.insert(max(1, i), r.choice(HTTP_EXTRAS).rstrip("\r\n"))
    raw = "\r\n".join(lines).encode("utf-8", "surrogatepass")
    return mutate_bytes(r, raw) if r.random() < 0.2 else raw


def gen_http_request(r: random.Random) -> bytes:
    head = _http_text(r, HTTP_REQUESTS)
    return head + _ws_frames(r, True) if r.random() < 0.4 else head


def gen_http_response(r: random.Random) -> bytes:
    return _http_text(r, HTTP_RESPONSES)


def gen_ws_url(r: random.Random) -> bytes:
    return mutate_text(
        r, r.choice(WS_URLS), (":", "::", "@", "#", "?", "[", "]", "%", "65536", "-1", "user:pw@")
    ).encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------------------------
# targets: how tether's code reads each input
# ------------------------------------------------------------------------------------------------

Runner = Callable[[bytes], None]


@dataclass(frozen=True)
class Target:
    name: str
    what: str
    generate: Callable[[random.Random], bytes]
    make: Callable[[], Runner]  #: a runner with its own state (one per process)
    allowed: tuple[type[BaseException], ...] = (RemoteProtocolError,)


class _Link:
    """The tracker core's view of a connection: replies counted, not kept."""

    __slots__ = ("closed", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sent += len(data)

    def close(self) -> None:
        self.closed = True


def make_tracker_frames() -> Runner:
    def run(data: bytes) -> None:
        r = input_rng(data)
        limit = r.choice((MAX_TRACKER_FRAME_BYTES, MAX_TRACKER_FRAME_BYTES, 64, 1))
        decoder = FrameDecoder(limit)
        for chunk in chunks(data, r):
            for payload in decoder.feed(chunk):
                assert 1 <= len(payload) <= limit, f"a payload of {len(payload)} bytes passed a limit of {limit}"

    return run


def make_tracker_messages() -> Runner:
    def run(data: bytes) -> None:
        decode_message(data)

    return run


def make_tracker_server() -> Runner:
    """The tracker's driver: the stream decoder, then each message through the core, as ``server.py`` does;
    every input is a new connection next to an honest server with free slots. SUMMARY must stay JSON."""
    from tether.tracker.config import TrackerConfig
    from tether.tracker.core import TrackerCore

    now = [1000.0]
    core = TrackerCore(TrackerConfig(stop_key="tracker:stop"), clock=lambda: now[0], wall=lambda: 0.0)
    honest = core.connect(_Link(), "127.0.0.1", 1)
    core.receive(
        honest, UpdateInfo({"key": "server:k", "addr": [None, 9090], "tether": {"protocols": ["tvm", "tether"]}})
    )
    puts = [0]

    def run(data: bytes) -> None:
        now[0] += 0.37
        for matchkey in list(honest.held):  # its sessions end, as a tether server reports them
            core.receive(honest, SessionEvent("end", matchkey))
        while len(honest.slots) < 2:
            puts[0] += 1
            core.receive(honest, Put("k", 9090, f"k:{puts[0]}"))
        r = input_rng(data)
        stream = TrackerServerStream()
        conn = core.connect(_Link(), "10.0.0.2", 5555)
        try:
            for chunk in chunks(data, r):
                for msg in stream.receive_data(chunk):
                    core.receive(conn, msg)
                    if conn.is_closed():
                        return
                stream.data_to_send()
        except RemoteProtocolError:
            pass
        finally:
            json.loads(core.summary_json(True))  # SUMMARY is assembled from pieces of text: it must stay JSON
            if r.random() < 0.25:
                json.loads(core.summary_json(True, "k"))
                json.loads(core.summary_json(False))
            core.disconnect(conn)
            core.on_timer()

    return run


def make_tracker_server_auth() -> Runner:
    """The tracker with an auth file: every message of an unauthenticated peer (and AUTH steps) through
    the access rules and the core, as ``server.py`` drives them."""
    from tether.protocol.auth import Keyring
    from tether.tracker.access import Access
    from tether.tracker.config import TrackerConfig
    from tether.tracker.core import TrackerCore

    now = [1000.0]
    keyring = Keyring.parse("alice user alice-secret-0123456789\ndev server dev-secret-0123456789abc\n")
    access = Access(keyring, ())
    core = TrackerCore(TrackerConfig(stop_key="tracker:stop"), clock=lambda: now[0], wall=lambda: 0.0, access=access)

    def run(data: bytes) -> None:
        now[0] += 0.37
        r = input_rng(data)
        stream = TrackerServerStream()
        conn = core.connect(_Link(), "10.0.0.2" if r.random() < 0.5 else "127.0.0.1", 5555)
        try:
            for chunk in chunks(data, r):
                for msg in stream.receive_data(chunk):
                    core.receive(conn, msg)
                    if conn.is_closed():
                        return
                stream.data_to_send()
        except (RemoteProtocolError, AuthError):
            pass
        finally:
            json.loads(core.summary_json(True))
            core.disconnect(conn)
            core.on_timer()

    return run


def make_auth_steps() -> Runner:
    """A responder (device server, proxy) reading an initiator's steps: length, JSON, hello, proof."""
    from tether.protocol.auth import Keyring, Responder, decode_step, step_length

    keyring = Keyring.parse("alice user alice-secret-0123456789\n")

    def run(data: bytes) -> None:
        exchange = Responder(keyring, "server")
        buf = bytearray()
        r = input_rng(data)
        for chunk in chunks(data, r):
            buf += chunk
            while len(buf) >= 4:
                length = step_length(bytes(buf[:4]))
                if len(buf) < 4 + length:
                    break
                step = decode_step(bytes(buf[4 : 4 + length]))
                del buf[: 4 + length]
                if exchange.claimed is None:
                    exchange.challenge(step)
                else:
                    exchange.verify(step)
                    return

    return run


def make_tracker_client() -> Runner:
    def run(data: bytes) -> None:
        r = input_rng(data)
        stream = TrackerClientStream(r.choice((MAX_TRACKER_REPLY_BYTES, 1 << 20)))
        for chunk in chunks(data, r):
            for value in stream.receive_data(chunk):
                with contextlib.suppress(RemoteProtocolError):
                    parse_request_reply(value)

    return run


def _check_key(key: str) -> None:
    """What the device server and the proxy do with a handshake key (the matcher's part is separate)."""
    with contextlib.suppress(RemoteProtocolError):
        peer = parse_peer_key(key)
        _ = peer.is_tether, peer.role, peer.name
        peer.session_timeout  # noqa: B018 - the server's validation
    server_key_name(key)
    proxied_keys(key)


def make_handshake() -> Runner:
    """The device server (exact reads of ``needed()``), the proxy's TCP port (reads of at most ``needed()``)
    and its WebSocket path (any chunks), then the key through both kinds of the proxy's matcher."""
    from tether.proxy.matcher import Matcher, Pair, Wait, lenient_key

    counter = [0]

    def matchkey(name: str) -> str:
        counter[0] += 1
        return f"{name}:{counter[0]}"

    plain = Matcher(timeout_client=5.0, timeout_server=5.0)
    tracked = Matcher(tracker_mode=True)
    # the honest server's matchkey is fuzz:0 (a client can name it); every other one is fresh
    tracked.new_matchkey = lambda name: (
        "fuzz:0" if name == "fuzz" and not tracked.waiting(honest[1]) else matchkey(name)
    )
    honest = [object(), object()]
    plain.arrive(honest[0], "server:fuzz", 0.0)
    tracked.arrive(honest[1], "server:fuzz", 0.0)

    def run(data: bytes) -> None:
        r = input_rng(data)
        decoder = HandshakeDecoder()
        key: str | None = None
        mode = r.randrange(3)
        try:
            if mode == 2:
                for chunk in chunks(data, r):
                    key = decoder.feed(chunk)
                    if key is not None:
                        break
            else:
                pos = 0
                while key is None and pos < len(data):
                    need = decoder.needed()
                    assert need > 0, f"needed() is {need} before the key is complete"
                    take = need if mode == 0 else r.randint(1, need)
                    key = decoder.feed(data[pos : pos + take])
                    pos += take
                if key is not None and mode == 0:
                    assert decoder.unused == b"", "an exact read consumed bytes past the handshake"
        except RemoteProtocolError:
            return
        if key is None:
            return
        _check_key(key)
        lenient_key(key)
        peer = object()
        for i, matcher in enumerate((plain, tracked)):
            decision = matcher.arrive(peer, key, 1.0)
            if isinstance(decision, Wait):
                matcher.key_of(peer)
                matcher.leave(peer)
            elif isinstance(decision, Pair):
                matcher.arrive(honest[i], "server:fuzz", 1.0)

    return run


def make_handshake_reply() -> Runner:
    def run(data: bytes) -> None:
        r = input_rng(data)
        decoder = HandshakeReplyDecoder()
        for chunk in chunks(data, r):
            reply = decoder.feed(chunk)
            if reply is not None:
                _ = HandshakeCode(reply.code).name
                if reply.key is not None:
                    _check_key(reply.key)
                return

    return run


def make_session() -> Runner:
    """Frames as the worker (requests) and the client (responses, errors) read them through ``Channel``."""
    from tether.device.worker import NativeSession, _positive_seconds
    from tether.errors import remote_error

    def run(data: bytes) -> None:
        r = input_rng(data)
        max_payload = r.choice((MAX_PAYLOAD_BYTES, 64 << 20, 0))
        view = memoryview(data)
        pos, size = 0, FIXED_HEADER.size
        while len(data) - pos >= size:
            try:
                head = parse_fixed_header(view[pos : pos + size], max_payload)
            except RemoteProtocolError as exc:  # the hot parser must refuse it the same way
                try:
                    unpack_fixed_header(view, pos, max_payload)
                except type(exc):
                    raise
                raise AssertionError("unpack_fixed_header accepted a header parse_fixed_header refused") from None
            if unpack_fixed_header(view, pos, max_payload) != (head.kind, head.id, head.header_len, head.payload_len):
                raise AssertionError("the two fixed-header parsers disagree")
            pos += size
            if len(data) - pos < head.header_len:
                return
            if head.kind in (FrameKind.CALL, FrameKind.REPLY):
                raw = bytes(view[pos : pos + head.header_len])
                with contextlib.suppress(RemoteProtocolError):
                    if raw[0] == HotOp.RUN:
                        if head.kind == FrameKind.CALL:
                            tensor_descs(decode_run_call(raw).get("tensors"), head.payload_len)
                        else:
                            tensor_descs(decode_run_reply(raw, False).get("tensors"), head.payload_len)
                pos += head.header_len + head.payload_len
                continue
            try:
                header = parse_json_header(view[pos : pos + head.header_len])
            except BadHeader:
                pos += head.header_len + head.payload_len
                continue
            pos += head.header_len
            with contextlib.suppress(RemoteProtocolError):
                if head.kind == FrameKind.REQUEST:
                    op = header.get("op")
                    if isinstance(op, str) and op in NativeSession.TIMED_OPS:
                        _positive_seconds(header.get("timeout"), "timeout")
                    if op == "put":
                        tensor_descs(header.get("tensors"), head.payload_len)
                elif head.kind == FrameKind.ERROR:
                    remote_error(
                        str(header.get("type", "Error")),
                        str(header.get("message", "")),
                        str(header.get("traceback", "")),
                    )
                else:
                    tensor_descs(header.get("tensors"), head.payload_len)
            _ = FrameKind(head.kind).name
            pos += head.payload_len

    return run


def _make_ws(masked: bool) -> Callable[[], Runner]:
    def make() -> Runner:
        def run(data: bytes) -> None:
            r = input_rng(data)
            limit = r.choice((64 << 20, 64 * 1024 + 64, 300, 125, 0))
            decoder = WsDecoder(expect_masked=masked, max_message=limit)
            for chunk in chunks(data, r):
                for msg in decoder.feed(chunk):
                    if msg.opcode == Opcode.CLOSE:
                        parse_close(msg.data)
                    elif msg.opcode == Opcode.TEXT:
                        msg.data.decode("utf-8")
                    if msg.opcode not in (Opcode.CLOSE, Opcode.PING, Opcode.PONG):
                        assert len(msg.data) <= limit, f"a message of {len(msg.data)} bytes passed a limit of {limit}"
            if r.random() < 0.2:
                with contextlib.suppress(RemoteProtocolError):
                    parse_close(data[:127])

        return run

    return make


def make_http_request() -> Runner:
    """The proxy's web port: the head accumulated read by read (16 KiB limit), its path, and for ``/ws``
    the upgrade; every refusal must be able to write its response."""
    from tether.proxy.server import _HTTP_HEAD_LIMIT, _request_path

    def run(data: bytes) -> None:
        r = input_rng(data)
        buf = bytearray()
        end = -1
        try:
            for chunk in chunks(data, r):
                buf += chunk
                end = find_head_end(buf, _HTTP_HEAD_LIMIT)
                if end >= 0:
                    break
        except HttpError as exc:
            exc.response()
            return
        if end < 0:
            return
        head = bytes(buf[:end])
        path = _request_path(head)
        try:
            req = parse_upgrade_request(head)
        except HttpError as exc:
            exc.response()
            return
        build_upgrade_response(req)
        if path == "/ws":
            WsDecoder(expect_masked=True, max_message=1 << 16).feed(buf[end:])

    return run


def make_http_response() -> Runner:
    """The client's side of the upgrade (``ws_connect``): the head read up to its end, then checked."""

    def run(data: bytes) -> None:
        r = input_rng(data)
        buf = bytearray()
        for chunk in chunks(data, r):
            buf += chunk
            end = find_head_end(buf)
            if end >= 0:
                check_upgrade_response(buf[:end], CLIENT_KEY)
                return

    return run


def make_hostport() -> Runner:
    """``HOST:PORT`` as the CLI reads ``--tracker`` and the like (documented: ConfigError)."""
    from tether.aio.net import parse_hostport

    def run(data: bytes) -> None:
        text = data.decode("utf-8", "surrogateescape")
        parse_hostport(text, 9190 if len(data) % 2 else None)

    return run


def gen_hostport(r: random.Random) -> bytes:
    text = r.choice(("127.0.0.1:9190", "[::1]:9190", "host", "[fe80::1%eth0]:1", "h:0"))
    return mutate_text(r, text, (":", "[", "]", "²", "٣", "65536", "-1", " ", "")).encode("utf-8", "surrogatepass")


def make_ws_url() -> Runner:
    def run(data: bytes) -> None:
        parse_ws_url(data.decode("utf-8", "surrogateescape"))

    return run


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("tracker_frames", "tracker frame decoder (framing.FrameDecoder)", gen_tracker_frames, make_tracker_frames),
        Target("tracker_messages", "tracker message JSON (tracker.decode_message)", gen_tracker_payload,
               make_tracker_messages),
        Target("tracker_server", "tracker connection: magic, frames, messages, core, SUMMARY", gen_tracker_stream,
               make_tracker_server),
        Target("tracker_server_auth", "tracker with an auth file: access rules, AUTH steps, core", gen_tracker_stream,
               make_tracker_server_auth, (RemoteProtocolError, AuthError)),
        Target("auth_steps", "authentication steps as a device server or proxy reads them", gen_auth_steps,
               make_auth_steps, (RemoteProtocolError, AuthError)),
        Target("tracker_client", "tracker replies: magic echo, frames, REQUEST replies", gen_tracker_replies,
               make_tracker_client),
        Target("handshake", "TVM handshake as the device server and proxy read it, key, matcher", gen_handshake,
               make_handshake),
        Target("handshake_reply", "handshake reply as clients and proxied servers read it", gen_handshake_reply,
               make_handshake_reply),
        Target("session", "native session frames: fixed header, JSON header, tensors", gen_session, make_session),
        Target("ws_server", "WebSocket frames from a client (masked)", gen_ws_masked, _make_ws(True)),
        Target("ws_client", "WebSocket frames from a server (unmasked)", gen_ws_unmasked, _make_ws(False)),
        Target("http_request", "the proxy's HTTP head and WebSocket upgrade", gen_http_request, make_http_request),
        Target("http_response", "the client's check of the upgrade response", gen_http_response, make_http_response),
        Target("ws_url", "ws:// URLs (documented: ValueError)", gen_ws_url, make_ws_url, (ValueError,)),
        Target("hostport", "HOST:PORT flags (documented: ConfigError)", gen_hostport, make_hostport, (ConfigError,)),
    )
}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# running a target
# ------------------------------------------------------------------------------------------------


@dataclass
class Finding:
    target: str
    kind: str  # "crash" or "hang"
    what: str  # exception and where, or the time taken
    data: bytes
    count: int = 1
    trace: str = ""

    def reproducer(self) -> str:
        return f"{self.target}:{self.data.hex()}"

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "what": self.what, "count": self.count,
                "input_hex": self.data.hex(), "trace": self.trace}  # fmt: skip


@dataclass
class Result:
    target: str
    inputs: int = 0
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    slowest_s: float = 0.0
    slowest_input: bytes = b""  # its first 4 KiB
    slowest_bytes: int = 0
    rss_growth_kib: int = 0
    traced_growth_bytes: int = 0
    traced_inputs: int = 0
    findings: dict[str, Finding] = field(default_factory=dict)

    def merge(self, other: Result) -> None:
        self.inputs += other.inputs
        self.crashes += other.crashes
        self.hangs += other.hangs
        self.seconds = max(self.seconds, other.seconds)
        if other.slowest_s > self.slowest_s:
            self.slowest_s, self.slowest_input = other.slowest_s, other.slowest_input
            self.slowest_bytes = other.slowest_bytes
        self.rss_growth_kib = max(self.rss_growth_kib, other.rss_growth_kib)
        self.traced_growth_bytes = max(self.traced_growth_bytes, other.traced_growth_bytes)
        self.traced_inputs = max(self.traced_inputs, other.traced_inputs)
        for sig, finding in other.findings.items():
            if sig in self.findings:
                self.findings[sig].count += finding.count
            else:
                self.findings[sig] = finding

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "inputs": self.inputs,
            "crashes": self.crashes,
            "hangs": self.hangs,
            "seconds": round(self.seconds, 3),
            "slowest_ms": round(self.slowest_s * 1e3, 3),
            "slowest_input_hex": self.slowest_input.hex() + ("..." if self.slowest_bytes > 4096 else ""),
            "slowest_input_bytes": self.slowest_bytes,
            "rss_growth_kib": self.rss_growth_kib,
            "traced_growth_bytes": self.traced_growth_bytes,
            "traced_inputs": self.traced_inputs,
            "findings": [f.to_json() for f in self.findings.values()],
        }


def rss_kib(pid: int | str = "self") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _where(exc: BaseException) -> str:
    """``Type at file:line`` of the innermost frame in tether (else the innermost at all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "tether" in f.filename and "fuzz.py" not in f.filename] or frames
    place = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
    return f"{type(exc).__name__} at {place}"


class _ErrorLog(logging.Handler):
    """A tether logger's ERROR (``logger.exception``) is a crash even when the code caught the exception."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_error_log = _ErrorLog()


def quiet_tether_logs() -> None:
    log = logging.getLogger("tether")
    if _error_log not in log.handlers:
        log.addHandler(_error_log)
        log.propagate = False  # warnings about bad input are the point here, not news


class _Watchdog:
    """Stops the process with a reproducer when one input runs for ``kill_after`` seconds (a real hang:
    the loop never gets back to measure it). A Python thread needs the GIL; faulthandler backs it up."""

    def __init__(self, kill_after: float) -> None:
        self.kill_after = kill_after
        self.current: tuple[str, bytes, float] | None = None
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="fuzz-watchdog", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.kill_after / 4)):
            current = self.current
            if current is not None and time.monotonic() - current[2] > self.kill_after:
                name, data, _ = current
                print(f"\nHANG: {name} has run one input for over {self.kill_after:g} s; reproducer:", file=sys.stderr)
                print(f"  python bench/fuzz.py --replay {name}:{data.hex()}", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(all_threads=True)
                os._exit(3)

    def stop(self) -> None:
        self._stop.set()


def run_target(
    name: str,
    inputs: int,
    seed: int | str,
    *,
    deadline_s: float = 1.0,
    traced_inputs: int = 2000,
    kill_after: float = 30.0,
    max_findings: int = 20,
) -> Result:
    """Generate and run ``inputs`` inputs of target ``name`` (the last ``traced_inputs`` of them under
    tracemalloc); the same ``seed`` gives the same inputs."""
    quiet_tether_logs()
    target = TARGETS[name]
    run = target.make()
    rng = random.Random(f"{seed}:{name}")
    result = Result(name)
    watchdog = _Watchdog(kill_after)
    traced = min(traced_inputs, inputs)
    rss_before = rss_kib()
    started = time.perf_counter()
    traced_base = 0
    data = b""
    try:
        for i in range(inputs):
            if i == inputs - traced:
                _clear_caches()
                gc.collect()
                tracemalloc.start()
                traced_base = tracemalloc.get_traced_memory()[0]
            if i % 64 == 0:  # if even the watchdog cannot run (a C loop holding the GIL)
                faulthandler.dump_traceback_later(kill_after * 4, exit=True)
            data = target.generate(rng)
            t0 = time.perf_counter()
            watchdog.current = (name, data, time.monotonic())
            failure = _attempt(run, data, target.allowed)
            took = time.perf_counter() - t0
            if took > deadline_s and failure is None:  # a busy machine, or the input? Twice more: the fastest
                for _ in range(2):
                    t0 = time.perf_counter()
                    _attempt(run, data, target.allowed)
                    took = min(took, time.perf_counter() - t0)
            watchdog.current = None
            result.inputs += 1
            if took > result.slowest_s:  # its first 4 KiB: what is kept must not weigh on the traced memory
                result.slowest_s, result.slowest_input, result.slowest_bytes = took, data[:4096], len(data)
            if _error_log.records:
                record = _error_log.records[0]
                _error_log.records.clear()
                what = f"logged {record.levelname}: {record.getMessage()[:120]}"
                _record(result, "crash", what, data, max_findings=max_findings)
            if failure is not None:
                trace = "".join(traceback.format_exception(failure, limit=-8))[-4000:]
                _record(result, "crash", _where(failure), data, trace=trace, max_findings=max_findings)
            elif took > deadline_s:
                what = f"took {took:.2f} s (deadline {deadline_s:g} s)"
                _record(result, "hang", what, data, max_findings=max_findings)
    finally:
        faulthandler.cancel_dump_traceback_later()
        watchdog.stop()
        if tracemalloc.is_tracing():
            data = b""  # the last input is not growth
            watchdog.current = None
            _clear_caches()
            gc.collect()
            result.traced_growth_bytes = tracemalloc.get_traced_memory()[0] - traced_base
            result.traced_inputs = traced
            tracemalloc.stop()
    result.seconds = time.perf_counter() - started
    result.rss_growth_kib = rss_kib() - rss_before
    return result


def _clear_caches() -> None:
    """The standard library's own bounded caches (urlsplit keeps 128 URLs) are not growth of tether's."""
    import urllib.parse

    clear = getattr(urllib.parse.urlsplit, "cache_clear", None)  # 3.11 and later
    if clear is not None:
        clear()


def _attempt(run: Runner, data: bytes, allowed: tuple[type[BaseException], ...]) -> Exception | None:
    """Run one input: None, or the exception that is not one of ``allowed``."""
    try:
        run(data)
    except allowed:
        pass
    except Exception as exc:  # anything else is what we are looking for
        return exc
    return None


def _record(result: Result, kind: str, what: str, data: bytes, *, trace: str = "", max_findings: int = 20) -> None:
    if kind == "crash":
        result.crashes += 1
    else:
        result.hangs += 1
    sig = f"{kind}: {what}" if kind == "crash" else "hang"
    found = result.findings.get(sig)
    if found is not None:
        found.count += 1
        if len(data) < len(found.data):  # keep the shortest reproducer
            found.data, found.trace = data, trace or found.trace
    elif len(result.findings) < max_findings:
        result.findings[sig] = Finding(result.target, kind, what, data, 1, trace)


def replay(name: str, data: bytes) -> int:
    """Run one input through a fresh runner; print what happens."""
    quiet_tether_logs()
    target = TARGETS[name]
    t0 = time.perf_counter()
    try:
        target.make()(data)
    except target.allowed as exc:
        print(f"{name}: documented error after {time.perf_counter() - t0:.3f} s: {type(exc).__name__}: {exc}")
        return 0
    except Exception:
        traceback.print_exc()
        return 1
    print(f"{name}: accepted after {time.perf_counter() - t0:.3f} s")
    return 0


def _job(args: tuple[str, int, str, float, int, float]) -> Result:
    name, n, seed, deadline, traced, kill_after = args
    return run_target(name, n, seed, deadline_s=deadline, traced_inputs=traced, kill_after=kill_after)


def run_all(
    names: Sequence[str],
    total: int,
    seed: int,
    *,
    jobs: int = 1,
    deadline_s: float = 1.0,
    traced_inputs: int = 2000,
    kill_after: float = 30.0,
    progress: bool = False,
) -> dict[str, Result]:
    """``total`` inputs spread over ``names``, each target's share cut in ``jobs`` slices (other seeds)."""
    per = max(1, total // max(1, len(names)))
    tasks = []
    for name in names:
        slices = max(1, min(jobs, per // 1000))
        for k in range(slices):
            n = per // slices + (1 if k < per % slices else 0)
            tasks.append((name, n, f"{seed}/{k}", deadline_s, traced_inputs // slices, kill_after))
    results = {name: Result(name) for name in names}
    if jobs <= 1:
        for task in tasks:
            res = _job(task)
            results[task[0]].merge(res)
            if progress:
                _progress(res)
        return results
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs, maxtasksperchild=1) as pool:
        for res in pool.imap_unordered(_job, tasks):
            results[res.target].merge(res)
            if progress:
                _progress(res)
    return results


def _progress(res: Result) -> None:
    print(f"  {res.target}: {res.inputs} inputs in {res.seconds:.1f} s, {res.crashes} crashes, {res.hangs} hangs",
          flush=True)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# live: real servers, real sockets
# ------------------------------------------------------------------------------------------------


class ServerProcess:
    """``python -m tether ...`` (or this script's ``--serve-device``) in its own process group; its output
    is read for as long as it runs; a ``Traceback`` in it is kept with the lines that follow."""

    def __init__(self, name: str, argv: list[str], timeout: float = 60.0) -> None:
        self.name = name
        import tether

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        src = str(Path(tether.__file__).resolve().parents[1])  # the servers run the code fuzzed here
        env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
            env=env,
        )
        self.lines = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=100)
        self.tracebacks: list[str] = []
        self._open_trace: list[str] | None = None
        self.port = 0
        self.web_port = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"{name}-log", daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout) or not self.port:
            self.stop()
            raise RuntimeError(f"{name} did not start within {timeout} s: " + " | ".join(self.tail))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self.lines += 1
            self.tail.append(line)
            if "Traceback" in line and len(self.tracebacks) < 20:
                self._open_trace = [line]
                self.tracebacks.append("")
            elif self._open_trace is not None:
                self._open_trace.append(line)
                self.tracebacks[-1] = "\n".join(self._open_trace)
                if len(self._open_trace) > 40 or (line and not line.startswith((" ", "Traceback"))):
                    self._open_trace = None
            if line.startswith("websocket on ws://"):
                self.web_port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
            elif line.startswith("listening on ") and not self.port:
                self.port = int(line.rsplit(":", 1)[1])
            if self.port and (self.web_port or self.name != "proxy"):
                self._ready.set()
        self._ready.set()

    @property
    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to its process group (its pid), SIGKILL if it lingers."""
        for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait_s)
        self._reader.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def serve_device(argv: list[str]) -> int:
    """``--serve-device TRACKER_PORT KEY WORK_DIR``: a device server with a 64 MiB payload limit (fuzzed
    ``fill`` shapes must not allocate gigabytes), tether clients only, nothing preloaded."""
    from tether.device.server import DeviceServer, ServerConfig

    tracker_port, key, work_dir = int(argv[0]), argv[1], argv[2]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig(
        host="127.0.0.1", port=0, key=key, tracker=("127.0.0.1", tracker_port), work_dir=work_dir, slots=2,
        preload=[], serve_tvm=False, max_payload=64 << 20, cache_bytes=0, handshake_timeout_s=5.0,
    )  # fmt: skip
    server = DeviceServer(config)
    server.start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"listening on 127.0.0.1:{server.port}", flush=True)
    try:
        while not done.wait(3600):
            pass
    finally:
        server.stop()
    return 0


@dataclass
class LiveServers:
    tracker: ServerProcess
    device: ServerProcess
    proxy: ServerProcess
    work_dir: str

    @property
    def all(self) -> list[ServerProcess]:
        return [self.tracker, self.device, self.proxy]


@contextlib.contextmanager
def live_servers(key: str = "fuzz") -> Iterator[LiveServers]:
    """A tracker, a device server registered with it (key ``key``) and a plain proxy, each a process."""
    py = sys.executable
    started: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="tether-fuzz-") as work_dir:
        try:
            tracker = ServerProcess("tracker", [py, "-m", "tether", "tracker", "--host", "127.0.0.1", "--port", "0"])
            started.append(tracker)
            device = ServerProcess(
                "device server", [py, str(Path(__file__).resolve()), "--serve-device", str(tracker.port), key, work_dir]
            )
            started.append(device)
            proxy = ServerProcess(
                "proxy",
                [py, "-m", "tether", "proxy", "--host", "127.0.0.1", "--port", "0", "--web-port", "0",
                 "--timeout-client", "30", "--timeout-server", "30"],
            )  # fmt: skip
            started.append(proxy)
            _wait_registered(tracker.port, key)
            yield LiveServers(tracker, device, proxy, work_dir)
        finally:
            for server in reversed(started):
                server.stop()


def _wait_registered(port: int, key: str, timeout: float = 30.0) -> None:
    """Until the tracker lists a free server of ``key`` (a deadline, not a sleep: each query waits)."""
    from tether.client.query import query_tracker

    deadline = time.monotonic() + timeout
    while True:
        status = query_tracker("127.0.0.1", port, timeout=5.0)
        if any(row.key == key and row.free for row in status.keys):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no server of key {key!r} registered within {timeout} s")
        threading.Event().wait(0.05)  # polling with a deadline


def _exchange(port: int, data: bytes, deadline_s: float, prefix: bytes = b"") -> tuple[bytes, bool]:
    """Connect, send ``prefix + data``, close our side, read until the server closes: (reply, closed in time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=deadline_s) as sock:
        return _send_and_drain(sock, prefix + data, deadline_s)


def _send_and_drain(sock: socket.socket, data: bytes, deadline_s: float) -> tuple[bytes, bool]:
    deadline = time.monotonic() + deadline_s
    reply = bytearray()
    try:
        sock.settimeout(deadline_s)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:  # the server closed on the first bad bytes, before we were done: fine
        pass
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(reply), False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return bytes(reply), False
        except OSError:
            return bytes(reply), True
        if not chunk:
            return bytes(reply), True
        if len(reply) < 1 << 20:
            reply += chunk


def _error_frames(reply: bytes) -> list[dict[str, Any]]:
    """The ERROR frames' headers in a native session's replies (as far as they parse)."""
    out = []
    pos, size = 0, FIXED_HEADER.size
    while len(reply) - pos >= size:
        try:
            head = parse_fixed_header(reply[pos : pos + size])
            if head.kind == FrameKind.REPLY:  # a binary answer (a fuzzed ping that was whole): no JSON
                pos += size + head.header_len + head.payload_len
                continue
            header = parse_json_header(reply[pos + size : pos + size + head.header_len])
        except RemoteProtocolError:
            break
        if head.kind == FrameKind.ERROR:
            out.append(header)
        pos += size + head.header_len + head.payload_len
    return out


#: Error frames whose traceback is the point: a backend's own failure on a model
_TRACEBACK_EXPECTED = frozenset({"ModelLoadError", "ModelRunError"})


def live_target_names() -> list[str]:
    return ["live_tracker", "live_device", "live_session", "live_proxy", "live_proxy_ws"]


def run_live(
    servers: LiveServers,
    name: str,
    inputs: int,
    seed: int | str,
    *,
    deadline_s: float = 2.0,
    key: str = "fuzz",
    max_findings: int = 20,
) -> Result:
    """``inputs`` inputs of one live target over sockets; a connection the server leaves open past the
    deadline after our side closed is a hang, an error frame with a Python traceback a crash."""
    from tether.client.tracker import TrackerClient
    from tether.protocol.framing import encode_handshake

    rng = random.Random(f"{seed}:{name}")
    result = Result(name)
    started = time.perf_counter()
    tracker_client: TrackerClient | None = None
    try:
        for _ in range(inputs):
            prefix = b""
            if name == "live_tracker":
                port, data = servers.tracker.port, gen_tracker_stream(rng)
            elif name == "live_device":
                port, data = servers.device.port, gen_handshake(rng)
            elif name == "live_proxy":
                port, data = servers.proxy.port, gen_handshake(rng)
            elif name == "live_proxy_ws":
                port, data = servers.proxy.web_port, gen_http_request(rng)
            elif name == "live_session":
                if tracker_client is None:
                    tracker_client = TrackerClient.connect("127.0.0.1", servers.tracker.port, 10.0)
                data = gen_session(rng)
                try:
                    grant = tracker_client.request_grant(key, timeout=30.0, protocol="tether")
                except TetherError as exc:  # the device server stopped serving: the findings so far stand
                    _record(result, "crash", f"no grant of {key!r}: {type(exc).__name__}: {exc}", data)
                    break
                port = grant.port
                prefix = encode_handshake(f"client:{grant.matchkey} -tether=1")
            else:
                raise ValueError(f"unknown live target {name!r}")
            t0 = time.perf_counter()
            try:
                reply, closed = _exchange(port, data, deadline_s * (3 if prefix else 1), prefix)
            except OSError as exc:
                _record(result, "crash", f"could not connect: {exc}", data, max_findings=max_findings)
                result.inputs += 1
                continue
            took = time.perf_counter() - t0
            result.inputs += 1
            if took > result.slowest_s:
                result.slowest_s, result.slowest_input, result.slowest_bytes = took, data[:4096], len(data)
            if not closed:
                what = f"connection still open {took:.1f} s after our side closed"
                _record(result, "hang", what, data, max_findings=max_findings)
            if prefix:
                hello = HandshakeReplyDecoder()
                if hello.feed(reply) is None:
                    continue  # no session (the matchkey went stale): nothing more to check
                for frame in _error_frames(hello.unused):
                    trace = str(frame.get("traceback") or "")
                    if trace and frame.get("type") not in _TRACEBACK_EXPECTED:
                        what = f"error frame {frame.get('type')}: {str(frame.get('message'))[:100]}"
                        _record(result, "crash", what, data, trace=trace[-4000:], max_findings=max_findings)
    finally:
        if tracker_client is not None:
            tracker_client.close()
    result.seconds = time.perf_counter() - started
    return result


def honest_checks(servers: LiveServers, key: str = "fuzz", timeout: float = 30.0) -> dict[str, str]:
    """Each server still serves: "ok", or what went wrong."""
    import tether
    from tether.aio.ws import ws_open_socket
    from tether.client.query import query_tracker
    from tether.protocol.framing import encode_handshake

    out: dict[str, str] = {}
    try:
        status = query_tracker("127.0.0.1", servers.tracker.port, timeout=timeout)
        assert any(row.key == key for row in status.keys), f"key {key!r} missing from {status.keys}"
        out["tracker query"] = "ok"
    except Exception as exc:
        out["tracker query"] = f"{type(exc).__name__}: {exc}"
    try:
        with (
            tether.connect_tracker("127.0.0.1", servers.tracker.port) as tracker,
            tracker.request(key, timeout=timeout) as session,
        ):
            session.upload(b"honest", "honest.txt")
            assert session.download("honest.txt") == b"honest"
        out["tracker grant + device session"] = "ok"
    except Exception as exc:
        out["tracker grant + device session"] = f"{type(exc).__name__}: {exc}"
    try:
        reply_len = 8 + len(b"client:honest")  # SUCCESS, the length and the other side's key
        with socket.create_connection(("127.0.0.1", servers.proxy.port), timeout=timeout) as server_side:
            server_side.sendall(encode_handshake("server:honest"))
            assert servers.proxy.web_port, "the proxy did not say its web port"
            with ws_open_socket(f"ws://127.0.0.1:{servers.proxy.web_port}/ws", timeout) as client_side:
                client_side.settimeout(timeout)
                client_side.sendall(encode_handshake("client:honest"))
                got = _recv_exact(client_side, 8 + len(b"server:honest"))
                assert got[:4] == i32(HandshakeCode.SUCCESS), got
                assert _recv_exact(server_side, reply_len)[:4] == i32(HandshakeCode.SUCCESS)
                client_side.sendall(b"ping")
                assert _recv_exact(server_side, 4) == b"ping"
                server_side.sendall(b"pong")
                assert _recv_exact(client_side, 4) == b"pong"
        out["proxy pair tcp + websocket"] = "ok"
    except Exception as exc:
        out["proxy pair tcp + websocket"] = f"{type(exc).__name__}: {exc}"
    for server in servers.all:
        out[f"{server.name} alive"] = "ok" if server.alive() else f"exited with {server.proc.returncode}"
    return out


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def fuzz_live(inputs: int, seed: int | str, *, deadline_s: float = 2.0, names: Sequence[str] | None = None,
              progress: bool = False) -> tuple[dict[str, Result], dict[str, str], dict[str, Any]]:  # fmt: skip
    """Start the servers, run every live target, then the honest checks; (results, checks, server report)."""
    results: dict[str, Result] = {}
    with live_servers() as servers:
        rss_before = {s.name: s.rss_kib for s in servers.all}
        for name in names or live_target_names():
            results[name] = res = run_live(servers, name, inputs, seed, deadline_s=deadline_s)
            if progress:
                _progress(res)
        rss_fuzzed = {s.name: s.rss_kib for s in servers.all}
        probe = idle_key_probe(servers.tracker)
        checks = honest_checks(servers)
        report: dict[str, Any] = {
            s.name: {
                "rss_kib_before": rss_before[s.name],
                "rss_kib_after_fuzz": rss_fuzzed[s.name],
                "rss_kib_after": s.rss_kib,
                "log_lines": s.lines,
                "tracebacks": list(s.tracebacks),
            }
            for s in servers.all
        }
        report["tracker"]["idle_key_probe"] = probe
    return results, checks, report


def idle_key_probe(tracker: ServerProcess, peers: int = 64, key_bytes: int = (1 << 20) - 64) -> dict[str, int]:
    """What a tracker keeps of peers gone: ``peers`` connections each ask for a key of ``key_bytes`` (as long
    as a frame allows) and leave; its RSS before and after (it lists idle keys for a while, up to a bound)."""
    before = tracker.rss_kib
    for i in range(peers):
        key = f"idle-{i:04d}-".ljust(key_bytes, "k")
        payload = json.dumps([4, key, "", 1]).encode()
        frame = MAGIC_BYTES + struct.pack("<i", len(payload)) + payload
        _exchange(tracker.port, frame, 5.0)
    return {"peers": peers, "key_bytes": key_bytes, "rss_kib_before": before, "rss_kib_after": tracker.rss_kib}


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-device"]:
        return serve_device(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=1_000_000, help="in-process inputs in all (default 1,000,000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target", action="append", default=[], help="only this target (repeatable; see --list)")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="processes (default: CPUs)")
    parser.add_argument("--live", type=int, default=300, help="inputs per live target over sockets (0: none)")
    parser.add_argument("--deadline", type=float, default=1.0, help="seconds one input may take (default 1)")
    parser.add_argument("--kill-after", type=float, default=30.0, help="seconds after which a stuck input ends the run")
    parser.add_argument("--traced", type=int, default=2000, help="last inputs per target run under tracemalloc")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--replay", default=None, metavar="NAME:HEX", help="run one input again")
    args = parser.parse_args(argv)

    if args.list:
        for t in TARGETS.values():
            print(f"{t.name:18} {t.what}")
        for name in live_target_names():
            print(f"{name:18} over sockets")
        return 0
    if args.replay:
        name, _, hexdata = args.replay.partition(":")
        return replay(name, bytes.fromhex(hexdata))
    unknown = [t for t in args.target if t not in TARGETS and t not in live_target_names()]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; --list shows them")
    local = [t for t in TARGETS if not args.target or t in args.target]
    live = [t for t in live_target_names() if not args.target or t in args.target]

    started = time.perf_counter()
    print(f"fuzzing {len(local)} target(s) in-process, {args.inputs} inputs, seed {args.seed}, {args.jobs} job(s)")
    results = run_all(local, args.inputs, args.seed, jobs=args.jobs, deadline_s=args.deadline,
                      traced_inputs=args.traced, kill_after=args.kill_after, progress=True) if local and args.inputs > 0 else {}  # fmt: skip
    checks: dict[str, str] = {}
    servers: dict[str, Any] = {}
    if args.live > 0 and live:
        print(f"live: {len(live)} target(s) over loopback, {args.live} inputs each")
        live_results, checks, servers = fuzz_live(args.live, args.seed, deadline_s=max(2.0, 2 * args.deadline),
                                                  names=live, progress=True)  # fmt: skip
        results.update(live_results)
    total_s = time.perf_counter() - started

    print(f"\n{'target':18} {'inputs':>9} {'crashes':>8} {'hangs':>6} {'slowest':>9} {'rss+':>8} {'traced+':>10}  s")
    for res in results.values():
        traced = f"{res.traced_growth_bytes}B/{res.traced_inputs}" if res.traced_inputs else "-"
        print(f"{res.target:18} {res.inputs:>9} {res.crashes:>8} {res.hangs:>6} {res.slowest_s * 1e3:>7.1f}ms "
              f"{res.rss_growth_kib:>6}Ki {traced:>10}  {res.seconds:.0f}")  # fmt: skip
    total_inputs = sum(r.inputs for r in results.values())
    crashes = sum(r.crashes for r in results.values())
    hangs = sum(r.hangs for r in results.values())
    print(f"{'total':18} {total_inputs:>9} {crashes:>8} {hangs:>6}   in {total_s:.0f} s")
    for name, server in servers.items():
        print(f"{name}: RSS {server['rss_kib_before']} -> {server['rss_kib_after_fuzz']} KiB after the fuzz, "
              f"{server['log_lines']} log lines, {len(server['tracebacks'])} traceback(s)")  # fmt: skip
        if "idle_key_probe" in server:
            p = server["idle_key_probe"]
            print(f"  {p['peers']} peers asked for keys of {p['key_bytes']} bytes and left: RSS "
                  f"{p['rss_kib_before']} -> {p['rss_kib_after']} KiB")  # fmt: skip
        for trace in server["tracebacks"]:
            print("  " + trace.replace("\n", "\n  "))
    for what, verdict in checks.items():
        print(f"honest {what}: {verdict}")
    failed = crashes + hangs + sum(len(s["tracebacks"]) for s in servers.values())
    failed += sum(1 for v in checks.values() if v != "ok")
    for res in results.values():
        for f in res.findings.values():
            print(f"\n{f.kind.upper()} in {f.target} ({f.count}x): {f.what}")
            if f.trace:
                print("  " + f.trace.strip().replace("\n", "\n  "))
            repro = f.reproducer()
            cut = " ... (cut: the whole input is in --json)" if len(repro) > 4000 else ""
            print(f"  reproducer: python bench/fuzz.py --replay {repro[:4000]}{cut}")
    if args.json is not None:
        report = {"seed": args.seed, "inputs": total_inputs, "crashes": crashes, "hangs": hangs, "total_s": total_s,
                  "jobs": args.jobs, "deadline_s": args.deadline, "targets": [r.to_json() for r in results.values()],
                  "servers": servers, "honest": checks}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
