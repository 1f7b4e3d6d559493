"""Synthetic tracker load, run in its own process: peers that frame exactly like TVM's Python code.

Every message goes out as two sends (length, then body) on a socket without TCP_NODELAY, as
``tvm.rpc.base.sendjson`` does. Usage (prints one JSON object)::

    python bench/loadgen.py [--one-send] grants HOST PORT KEY CLIENTS SERVERS SECONDS [TRACKER_PID]
        (with LOADGEN_SERVER_TOKEN / LOADGEN_CLIENT_TOKEN=name:secret, each connection authenticates first;
        with LOADGEN_TLS_CA=ca.pem, each connection is TLS, checked against that CA)
    python bench/loadgen.py burst HOST PORT CONNECTS IN_FLIGHT
    python bench/loadgen.py register HOST PORT KEY SERVERS   # then waits for "close" on stdin
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MAGIC = struct.pack("<i", 0x2F271)
_len = struct.Struct("<i")


SPLIT = True  # frame like TVM: length and body in two sends


def tvm_send(sock: socket.socket, value: Any) -> None:
    body = json.dumps(value).encode()
    if SPLIT:
        sock.sendall(_len.pack(len(body)))  # two sends, as TVM does
        sock.sendall(body)
    else:
        sock.sendall(_len.pack(len(body)) + body)


def handshake(sock: socket.socket) -> None:
    sock.sendall(MAGIC)
    got = b""
    while len(got) < 4:
        chunk = sock.recv(4 - len(got))
        if not chunk:
            raise ConnectionError("tracker closed during handshake")
        got += chunk
    if got != MAGIC:
        raise ConnectionError("not a tracker")


class Peer:
    """One non-blocking connection: buffered frame parsing, a callback per reply."""

    __slots__ = ("buf", "on_reply", "sock")

    def __init__(self, sock: socket.socket, on_reply: Callable[[Peer, bytes], None]) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.on_reply = on_reply

    def readable(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("tracker closed a connection")
        pending = getattr(self.sock, "pending", None)  # TLS: decrypted bytes the selector cannot see
        while pending is not None and pending():
            data += self.sock.recv(65536)
        buf = self.buf
        buf += data
        while len(buf) >= 4:
            (n,) = _len.unpack_from(buf, 0)
            if len(buf) < 4 + n:
                break
            body = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            self.on_reply(self, body)


def connect(host: str, port: int, token: str | None = None) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    ca = os.environ.get("LOADGEN_TLS_CA")
    if ca:  # a tracker's TLS port: every connection does its TLS handshake first
        import ssl

        sock = ssl.create_default_context(cafile=ca).wrap_socket(sock, server_hostname=host)
    handshake(sock)
    if token:
        authenticate(sock, token)
    return sock


def authenticate(sock: socket.socket, token: str) -> None:
    """tether's AUTH exchange (a tracker with --auth-file), once per connection, as tether's client does."""
    from tether.protocol.auth import Initiator, parse_token

    def call(step: dict[str, Any]) -> Any:
        body = json.dumps([104, step]).encode()
        sock.sendall(_len.pack(len(body)) + body)
        head = _recv(sock, 4)
        reply = json.loads(_recv(sock, _len.unpack(head)[0]))
        if reply[0] != 0:
            raise ConnectionError(f"authentication refused: {reply}")
        return reply[1]

    exchange = Initiator(parse_token(token), "tracker")
    challenge = call(exchange.hello())
    exchange.finish(call(exchange.answer(challenge)))


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("tracker closed the connection")
        buf += chunk
    return buf


def _cpu_s(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _frame_parts(value: Any) -> tuple[bytes, bytes]:
    body = json.dumps(value).encode()
    return _len.pack(len(body)), body


def grants(  # noqa: PLR0917 - mirrors the command line
    host: str, port: int, key: str, nclients: int, nservers: int, seconds: float, tracker_pid: int | None = None
) -> dict[str, Any]:
    """C clients loop REQUEST -> grant; the granted server PUTs a fresh matchkey at once.

    Frames are prepared ahead where they do not change, so that this process is not the bottleneck;
    they still go out exactly as TVM's peers send them. ``tracker_pid`` lets the tracker's CPU time be
    read at the edges of the measured window.
    """
    sel = selectors.DefaultSelector()
    servers: dict[bytes, Peer] = {}  # matchkey -> server peer
    counter = [0]
    sent_at: dict[Peer, float] = {}
    latencies: list[float] = []
    measuring = [False]
    done = [0]
    request_parts = _frame_parts([4, key, "", 1])
    put_prefix = json.dumps([3, key, [9090, "@"], None]).encode().split(b'"@"')

    def send(sock: socket.socket, parts: tuple[bytes, bytes]) -> None:
        if SPLIT:
            sock.sendall(parts[0])
            sock.sendall(parts[1])
        else:
            sock.sendall(parts[0] + parts[1])

    def on_server_reply(peer: Peer, body: bytes) -> None:
        if body != b"0":
            raise RuntimeError(f"PUT failed: {body!r}")

    def put(peer: Peer) -> None:
        counter[0] += 1
        matchkey = f"{key}:{counter[0]}".encode()
        servers[matchkey] = peer
        body = put_prefix[0] + b'"' + matchkey + b'"' + put_prefix[1]
        send(peer.sock, (_len.pack(len(body)), body))

    def request(peer: Peer) -> None:
        sent_at[peer] = time.perf_counter()
        send(peer.sock, request_parts)

    def on_grant(peer: Peer, body: bytes) -> None:
        now = time.perf_counter()
        matchkey = body.rsplit(b'"', 2)[1]  # [0, ["host", port, "matchkey"]]
        if measuring[0]:
            latencies.append(now - sent_at[peer])
            done[0] += 1
        put(servers.pop(matchkey))
        request(peer)

    server_peers = []
    server_token, client_token = os.environ.get("LOADGEN_SERVER_TOKEN"), os.environ.get("LOADGEN_CLIENT_TOKEN")
    for i in range(nservers):
        sock = connect(host, port, server_token)
        tvm_send(sock, [5, {"key": f"server:{key}", "addr": [None, 9090 + i]}])
        server_peers.append(Peer(sock, on_server_reply))
    client_peers = [Peer(connect(host, port, client_token), on_grant) for _ in range(nclients)]
    for peer in server_peers + client_peers:
        peer.sock.setblocking(True)
        sel.register(peer.sock, selectors.EVENT_READ, peer)
    for peer in server_peers:
        put(peer)
    for peer in client_peers:
        request(peer)
    warmup_end = time.perf_counter() + min(0.5, seconds / 4)
    end = warmup_end + seconds
    t_measure = warmup_end
    cpu0 = 0.0
    while True:
        now = time.perf_counter()
        if not measuring[0] and now >= warmup_end:
            measuring[0] = True
            t_measure = now
            cpu0 = _cpu_s(tracker_pid)
        if now >= end:
            break
        for sk, _ in sel.select(timeout=0.05):
            sk.data.readable()
    elapsed = time.perf_counter() - t_measure
    cpu = _cpu_s(tracker_pid) - cpu0
    for peer in server_peers + client_peers:
        sel.unregister(peer.sock)
        peer.sock.close()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3 if latencies else float("nan")

    return {
        "grants": done[0],
        "seconds": elapsed,
        "grants_per_s": done[0] / elapsed,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "tracker_cpu_us_per_grant": cpu / max(done[0], 1) * 1e6,
        "tracker_cpu_share": cpu / elapsed,
    }


def burst(host: str, port: int, connects: int, in_flight: int) -> dict[str, Any]:
    """``connects`` connections, at most ``in_flight`` at once; each does the magic exchange and closes."""
    failures: list[str] = []
    lock = threading.Lock()

    def one(_: int) -> float:
        start = time.perf_counter()
        try:
            sock = socket.create_connection((host, port), timeout=3)
            try:
                sock.settimeout(3)
                handshake(sock)
            finally:
                sock.close()
        except OSError as exc:
            with lock:
                failures.append(type(exc).__name__)
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        times = sorted(pool.map(one, range(connects)))
    return {
        "connects": connects,
        "failed": len(failures),
        "seconds": time.perf_counter() - start,
        "p50_ms": times[len(times) // 2] * 1e3,
        "max_ms": times[-1] * 1e3,
    }


def register(host: str, port: int, key: str, nservers: int, in_flight: int = 32) -> None:
    """Register ``nservers`` servers (magic, wait for the echo, UPDATE_INFO, PUT), at most ``in_flight``
    registrations under way at once; report; close them all when stdin says "close".

    Unlike the grant load, these peers write each frame in one send with TCP_NODELAY and ACK at once
    (TCP_QUICKACK): with TVM's framing every registration costs ~90 ms of delayed ACKs on TVM's tracker,
    and the number would measure that, not the tracker's capacity.
    """
    start = time.perf_counter()
    socks: list[socket.socket] = []
    expect: dict[socket.socket, int] = {}  # bytes still expected: the magic echo, then two "0" replies
    index: dict[socket.socket, int] = {}
    sel = selectors.DefaultSelector()

    def frame(value: Any) -> bytes:
        body = json.dumps(value).encode()
        return _len.pack(len(body)) + body

    def drain(sock: socket.socket) -> None:
        data = sock.recv(4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        if not data:
            raise ConnectionError("tracker closed a server connection")
        before = expect[sock]
        expect[sock] -= len(data)
        if before > 10 >= expect[sock]:  # the magic echo is in: register, as TVM's server does
            addr_port = 10000 + index[sock] % 50000
            sock.sendall(frame([5, {"key": f"server:{key}", "addr": [None, addr_port]}]))
            sock.sendall(frame([3, key, [addr_port, f"{key}:{index[sock]}"], None]))
        if expect[sock] <= 0:
            del expect[sock]
            sel.unregister(sock)

    while len(socks) < nservers or expect:
        while len(socks) < nservers and len(expect) < in_flight:
            sock = socket.create_connection((host, port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            sock.sendall(MAGIC)
            index[sock] = len(socks)
            socks.append(sock)
            expect[sock] = 4 + 5 + 5  # magic, [len]"0", [len]"0"
            sel.register(sock, selectors.EVENT_READ)
        events = sel.select(timeout=30)
        if not events:
            raise TimeoutError(f"no progress in 30 s with {len(expect)} registrations under way")
        for sk, _ in events:
            drain(sk.fileobj)  # type: ignore[arg-type]
    print(json.dumps({"servers": nservers, "register_s": time.perf_counter() - start}), flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    for sock in socks:
        sock.close()
    print(json.dumps({"close_s": time.perf_counter() - start}), flush=True)


def waiters(host: str, port: int, key: str, nwaiters: int, nconns: int) -> None:
    """``nwaiters`` plain REQUESTs for ``key`` (which nobody serves), spread over ``nconns`` connections
    (both trackers serve several requests per connection); report; close them all when stdin says so."""
    start = time.perf_counter()
    socks = []
    for c in range(nconns):
        sock = socket.create_connection((host, port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handshake(sock)
        count = nwaiters // nconns + (1 if c < nwaiters % nconns else 0)
        frames = []
        for i in range(count):
            body = json.dumps([4, key, f"user{(c + i) % 50}", 1]).encode()
            frames.append(_len.pack(len(body)) + body)
        sock.sendall(b"".join(frames))
        socks.append(sock)
    print(json.dumps({"waiters": nwaiters, "send_s": time.perf_counter() - start}), flush=True)
    sys.stdin.readline()
    for sock in socks:
        sock.close()
    print(json.dumps({"closed": len(socks)}), flush=True)


def main(argv: list[str]) -> None:
    global SPLIT  # noqa: PLW0603 - a process-wide mode, set once from the command line
    if argv[0] == "--one-send":
        SPLIT = False
        argv = argv[1:]
    mode, host, port = argv[0], argv[1], int(argv[2])
    if mode == "grants":
        pid = int(argv[7]) if len(argv) > 7 else None
        result = grants(host, port, argv[3], int(argv[4]), int(argv[5]), float(argv[6]), pid)
    elif mode == "burst":
        result = burst(host, port, int(argv[3]), int(argv[4]))
    elif mode == "register":
        register(host, port, argv[3], int(argv[4]), int(argv[5]) if len(argv) > 5 else 32)
        return
    elif mode == "waiters":
        waiters(host, port, argv[3], int(argv[4]), int(argv[5]))
        return
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
