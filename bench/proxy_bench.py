"""tether's proxy against TVM 0.27's and a minimal asyncio relay, with two directly connected sockets as
the floor, in one run.

    python bench/proxy_bench.py [--quick] [--json out.json] [--tether-flags=...]
    python bench/proxy_bench.py --serve-asyncio-relay     (the asyncio relay alone; the bench starts it so)

Every proxy, tracker and peer runs in its own process, started in a new session and stopped by pid: its
process group, then each descendant by pid (TVM's ``rpc_proxy`` and ``rpc_tracker`` run the real thing in a
PopenWorker child). The proxies: TVM's ``python -m tvm.exec.rpc_proxy`` (it cannot bind port 0: a random
port range, its port read from its log), tether's ``python -m tether proxy`` (``listening on``; its
column reads "n/a" with a note if the command fails) and, as a reference point, "asyncio relay": this file
run with ``--serve-asyncio-relay`` (``serve_asyncio_relay``), an asyncio.Protocol proxy of about 100 lines,
plain mode only, that relays with ``transport.write`` to the peer, with back-pressure (a transport over
1 MiB unsent pauses reading from its peer, under 256 KiB resumes it) and TCP_NODELAY (the issue cites one
at ~1,760 MiB/s where direct made ~3,577). The trackers: ``python -m tvm.exec.rpc_tracker`` and
``python -m tether tracker``. The floor ("direct"): a listening socket and a connected one, no proxy.

The four targets share one harness. Through a proxy, both peers greet it (``<i`` 0xFF271, ``<i`` key
length, ``server:K`` or ``client:K``, a fresh random K per pair) and read its answer (0xFF271, the other's
key) before any data; then the proxy relays bytes verbatim. This process is the "client" peer; the "server"
peer's socket is handed to a child process (no GIL between sender and receiver) that, on a 13-byte command,
sinks N bytes into one preallocated 1 MiB buffer (``recv_into``) and answers one byte, or echoes fixed-size
messages. Every socket has TCP_NODELAY.

Measured:

1. one-way throughput (MiB/s): 256 MiB in 1 MiB ``sendall`` chunks, client peer to server peer, timed
   from the first byte sent to the receiver's one-byte answer; best of 3, every run reported. The targets
   take turns (shuffled each round) after a 16 MiB warm-up each. Each proxy's best and median are also
   given as a fraction of direct's in the same run (``throughput_of_direct`` in the JSON).
2. small-message round trip (us): a 64-byte message echoed by the server peer; 5000 timed round trips
   after 200 warm-up ones, in 5 shuffled rounds; p50, p99 and the best round's p50. Then the same with
   each target's processes (this one, the peer, the proxy tree) pinned to one CPU for its turns: their
   CPU work and context switches without the idle-CPU wake-ups that make a VM's numbers bimodal.
3. memory under a slow reader (MB = 10^6 bytes): the receiver sleeps 2 s before it reads anything while
   a thread here sends 256 MiB as fast as the proxy takes it; then the receiver drains it all. The RSS of
   the proxy's process tree (the proxy pid and all its descendants) is sampled every 50 ms throughout:
   the baseline before, the peak growth, and the growth 1 s after the transfer finished (what it never
   gave back). Each proxy is fresh (this runs first).
4. event-loop stalls next to a tracker: the proxy in tracker mode (``--tracker``), 9 "servers" connected
   as ``server:<key>`` (the proxy offers them to the tracker); a client asks the tracker for one (tracker
   protocol: REQUEST, reply ``[0, [host, port, matchkey]]``), connects to the proxy as
   ``client:<matchkey>``, and the server socket that gets the success answer (``select``) becomes the echo
   peer; 8 servers stay idle. Then 64-byte round trips back to back for 10 s, every one timed: p50, max,
   how many took over 5 ms and over 20 ms, the worst stall (max - p50) and the period of the stalls over
   20 ms. TVM's proxy against TVM's tracker and against tether's, tether's proxy against tether's and
   against TVM's; the floor does the same ping-pong over its direct pair (the machine's own noise); the
   asyncio relay has no tracker mode ("n/a"). TVM's proxy asks its tracker every 2 s, blocking its event
   loop; against TVM's tracker each call waits about 40 ms on Nagle and delayed ACKs (both sides write
   length and JSON separately, without TCP_NODELAY).
5. for information: the time a client waits for the proxy's answer when its server is already there
   (TVM's and tether's; "n/a" for the asyncio relay), and each proxy tree's RSS after the plain-mode runs.

Prints a table (metric | direct | TVM 0.27 proxy | asyncio relay | tether proxy | tether/TVM |
tether/asyncio | target) and writes every number to bench/results/proxy-<timestamp>.json. About 1.5-2
minutes on 2 cores; ``--quick`` about 1.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import secrets
import select
import shlex
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
from benchlib import Proc, pct, pinned, retry, start_server, stop_group, timed_run, write_report

HOST = "127.0.0.1"
MIB = 1 << 20
MB = 1e6
RPC_MAGIC = 0xFF271  # a peer's greeting, and the proxy's "paired" answer
TRACKER_MAGIC = 0x2F271
TRACKER_SUCCESS, TRACKER_REQUEST, TRACKER_SUMMARY = 0, 4, 6
STALL_MS = 5.0
BIG_STALL_MS = 20.0
TARGETS = ("direct", "tvm", "asyncio", "tether")
PROXIES = ("tvm", "asyncio", "tether")  # plain mode; tracker mode (4) and pairing (5): TVM's and tether's
LABELS = {"direct": "direct", "tvm": "TVM 0.27 proxy", "asyncio": "asyncio relay", "tether": "tether proxy"}
SERVE_RELAY = "--serve-asyncio-relay"
COMMAND = struct.Struct("<cQI")  # op, size, pause in ms

#: The server peer, in its own process: argv[1] is the number of the socket it inherited. Commands:
#: "S" sinks ``size`` bytes into one 1 MiB buffer (after sleeping ``pause`` ms) and answers b"k"; "E"
#: answers b"k", then echoes ``size``-byte messages until one starts with "q". It exits when the
#: connection closes.
PEER = r"""
import socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = memoryview(bytearray(1 << 20))
head = memoryview(bytearray(13))

def recv_exact(view):
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError
        got += n

try:
    while True:
        recv_exact(head)
        op = bytes(head[:1])
        size = int.from_bytes(head[1:9], "little")
        pause_ms = int.from_bytes(head[9:13], "little")
        if pause_ms:
            time.sleep(pause_ms / 1000)
        if op == b"S":
            left = size
            while left:
                n = sock.recv_into(buf, min(left, len(buf)))
                if not n:
                    raise EOFError
                left -= n
            sock.sendall(b"k")
        elif op == b"E":
            sock.sendall(b"k")
            msg = buf[:size]
            while True:
                recv_exact(msg)
                sock.sendall(msg)
                if msg[0] == 113:
                    break
        else:
            raise SystemExit("unknown command %r" % op)
except (EOFError, OSError):
    pass
"""

# -- processes -----------------------------------------------------------------------------------


def wait_port(port: int, timeout: float = 30) -> None:
    """Until something accepts connections on ``port`` (TVM's servers log their port before they listen)."""
    retry(lambda: socket.create_connection((HOST, port), timeout=1).close(), timeout, OSError)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_tvm_proxy(tracker: int | None = None) -> Proc:
    base = random.randint(20000, 30000)  # TVM's proxy cannot bind port 0; below the ephemeral range
    argv = [sys.executable, "-m", "tvm.exec.rpc_proxy", "--host", HOST, "--port", str(base)]
    argv += ["--port-end", str(base + 100), "--web-port", str(free_port())]
    if tracker is not None:
        argv += ["--tracker", f"{HOST}:{tracker}"]
    proxy = start_server("TVM proxy", argv)
    try:
        wait_port(proxy.port)
        time.sleep(0.2)  # its event loop thread starts after it listens (with a backlog of 1)
    except OSError:
        stop_group(proxy.proc)
        raise
    return proxy


#: Extra flags for ``tether proxy`` (``--tether-flags``), e.g. ``--no-splice``.
TETHER_FLAGS: list[str] = []


def start_tether_proxy(tracker: int | None = None) -> Proc:
    argv = [sys.executable, "-m", "tether", "proxy", "--host", HOST, "--port", "0", "--web-port", "0", *TETHER_FLAGS]
    if tracker is not None:
        argv += ["--tracker", f"{HOST}:{tracker}"]
    return start_server("tether proxy", argv)


def start_asyncio_relay() -> Proc:
    return start_server("asyncio relay", [sys.executable, str(Path(__file__).resolve()), SERVE_RELAY])


def start_proxy(target: str, tracker: int | None = None) -> Proc:
    if target == "asyncio":
        return start_asyncio_relay()  # plain mode only
    return start_tvm_proxy(tracker) if target == "tvm" else start_tether_proxy(tracker)


def start_tracker(kind: str) -> Proc:
    if kind == "tether":
        return start_server(
            "tether tracker", [sys.executable, "-m", "tether", "tracker", "--host", HOST, "--port", "0"]
        )
    base = random.randint(20000, 30000)
    argv = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port", str(base)]
    tracker = start_server("TVM tracker", [*argv, "--port-end", str(base + 100)])
    try:
        wait_port(tracker.port)
    except OSError:
        stop_group(tracker.proc)
        raise
    return tracker


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return int(total)


# -- the asyncio relay (a reference point) --------------------------------------------------------


def serve_asyncio_relay() -> None:
    """A minimal asyncio.Protocol proxy, plain mode only: ``python bench/proxy_bench.py --serve-asyncio-relay``.

    TVM's handshake: a peer sends ``<i`` 0xFF271, ``<i`` length, ``server:K``/``client:K``; once both halves
    of K are there each gets 0xFF271, the length and the other's key, then bytes go verbatim to the peer with
    ``transport.write``. Back-pressure: when a transport holds over 1 MiB unsent, its protocol's
    ``pause_writing`` pauses reading from the peer; ``resume_writing`` (under 256 KiB) resumes it."""
    import asyncio

    waiting: dict[tuple[str, str], list[Relay]] = {}  # (role, K): greeted peers without their other half

    class Relay(asyncio.Protocol):
        def __init__(self) -> None:
            self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
            self.peer: Relay | None = None
            self.head = bytearray()  # the greeting, then any bytes that come before the pairing
            self.slot: tuple[str, str] | None = None
            self.eof = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport.set_write_buffer_limits(high=MIB, low=MIB // 4)

        def data_received(self, data: bytes) -> None:
            if self.peer is not None:
                self.peer.transport.write(data)
                return
            self.head += data
            if self.slot is not None:  # greeted, not paired: hold at most ~1 MiB
                if len(self.head) >= MIB:
                    self.transport.pause_reading()
                return
            if len(self.head) < 8:
                return
            magic, size = struct.unpack_from("<ii", self.head)
            if magic != RPC_MAGIC or not 0 < size <= 4096:
                self.transport.abort()
                return
            if len(self.head) < 8 + size:
                return
            role, _, key = bytes(self.head[8 : 8 + size]).decode(errors="replace").partition(":")
            other_role = {"server": "client", "client": "server"}.get(role)
            if other_role is None:
                self.transport.abort()
                return
            del self.head[: 8 + size]
            self.slot = (role, key)
            others = waiting.get((other_role, key))
            if others:
                other = others.pop(0)
                if not others:
                    del waiting[(other_role, key)]
                self.pair(other)
            else:
                waiting.setdefault(self.slot, []).append(self)

        def pair(self, other: Relay) -> None:
            self.peer, other.peer = other, self
            for a, b in ((self, other), (other, self)):
                key = f"{b.slot[0]}:{b.slot[1]}".encode()  # type: ignore[index]
                a.transport.write(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
            for a, b in ((self, other), (other, self)):
                a.transport.resume_reading()
                if a.head:
                    b.transport.write(bytes(a.head))
                    a.head.clear()

        def pause_writing(self) -> None:
            if self.peer is not None:
                self.peer.transport.pause_reading()

        def resume_writing(self) -> None:
            if self.peer is not None:
                self.peer.transport.resume_reading()

        def eof_received(self) -> bool:
            if self.peer is None:
                return False  # closes
            self.eof = True
            self.peer.transport.write_eof()  # after what it still holds
            if self.peer.eof:
                self.transport.close()
                self.peer.transport.close()
            return True

        def connection_lost(self, exc: Exception | None) -> None:
            queue = waiting.get(self.slot, []) if self.slot and self.peer is None else []
            if self in queue:
                queue.remove(self)
                if not queue:
                    del waiting[self.slot]  # type: ignore[arg-type]
            if self.peer is not None:
                self.peer.transport.close()  # after what it still holds

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(Relay, HOST, 0, backlog=128)
        print(f"listening on {HOST}:{server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    asyncio.run(serve())


# -- sockets and peers ---------------------------------------------------------------------------


def nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("connection closed")
        got += k
    return bytes(buf)


def greet(port: int, key: str) -> socket.socket:
    """Connect to a proxy as ``server:K``/``client:K`` (the answer is read by ``read_answer``)."""
    sock = nodelay(socket.create_connection((HOST, port), timeout=30))
    data = key.encode()
    sock.sendall(struct.pack("<ii", RPC_MAGIC, len(data)) + data)
    return sock


def read_answer(sock: socket.socket) -> str:
    """The proxy's answer: 0xFF271, then the other peer's key; raises on any other code."""
    sock.settimeout(10)
    (code,) = struct.unpack("<i", recv_exact(sock, 4))
    if code != RPC_MAGIC:
        raise RuntimeError(f"the proxy answered {code:#x}, not {RPC_MAGIC:#x} (paired)")
    (size,) = struct.unpack("<i", recv_exact(sock, 4))
    key = recv_exact(sock, size).decode()
    sock.settimeout(None)
    return key


def proxy_pair(port: int) -> tuple[socket.socket, socket.socket, float]:
    """(client, server, seconds the client waited for its answer), paired through the proxy."""
    key = secrets.token_hex(8)
    server = greet(port, f"server:{key}")
    try:
        t0 = time.perf_counter()
        client = greet(port, f"client:{key}")
    except BaseException:
        server.close()
        raise
    try:
        got = read_answer(client)
        waited = time.perf_counter() - t0
        if got != f"server:{key}" or read_answer(server) != f"client:{key}":
            raise RuntimeError(f"paired with the wrong key {got!r}")
    except BaseException:
        client.close()
        server.close()
        raise
    return client, server, waited


def direct_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server((HOST, 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return nodelay(client), nodelay(server)


def spawn_peer(server: socket.socket) -> subprocess.Popen[bytes]:
    """Hand the server peer's socket to a child process (our copy is closed)."""
    fd = server.fileno()
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, str(fd)],
        pass_fds=(fd,),
        start_new_session=True,
        cwd=tempfile.gettempdir(),
    )
    server.close()
    return peer


@dataclass(eq=False)
class Link:
    """The client peer's socket here, the server peer in its child process."""

    sock: socket.socket
    peer: subprocess.Popen[bytes]
    others: list[socket.socket] = field(default_factory=list)  # idle servers (tracker mode)

    def close(self) -> None:
        for sock in (self.sock, *self.others):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        try:
            self.peer.wait(5)
        except subprocess.TimeoutExpired:
            stop_group(self.peer)


def open_link(port: int | None) -> Link:
    """A pair through the proxy on ``port``, or a direct one (None)."""
    if port is None:
        client, server = direct_pair()
    else:
        client, server, _ = proxy_pair(port)
    return Link(client, spawn_peer(server))


@contextlib.contextmanager
def watchdog(sock: socket.socket, seconds: float, what: str) -> Iterator[None]:
    """Shut the socket down if the block takes longer than ``seconds`` (a stuck proxy must not hang the bench)."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except OSError as exc:
        if fired.is_set():
            raise TimeoutError(f"{what}: not done within {seconds:.0f} s") from exc
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise TimeoutError(f"{what}: not done within {seconds:.0f} s")


# -- the measurements ----------------------------------------------------------------------------


def send_bulk(sock: socket.socket, chunk: memoryview, nbytes: int, pause_ms: int = 0) -> float:
    """Seconds from the first byte sent to the receiver's answer for ``nbytes`` in ``chunk``-sized sendalls."""
    t0 = time.perf_counter()
    sock.sendall(COMMAND.pack(b"S", nbytes, pause_ms))
    for _ in range(nbytes // len(chunk)):
        sock.sendall(chunk)
    if recv_exact(sock, 1) != b"k":
        raise RuntimeError("the receiver answered something else")
    return time.perf_counter() - t0


def ping_pong(
    sock: socket.socket, *, count: int = 0, seconds: float = 0.0, size: int = 64
) -> tuple[list[float], list[float]]:
    """Round trips of ``size``-byte messages: ``count`` of them, or as many as fit in ``seconds``.
    Returns each one's seconds and its start (seconds from the first)."""
    sock.sendall(COMMAND.pack(b"E", size, 0))
    if recv_exact(sock, 1) != b"k":  # the command alone: TVM's proxy holds back a second small write ~40 ms
        raise RuntimeError("the echoing peer answered something else")
    msg = b"x" * size
    got = memoryview(bytearray(size))
    rtts: list[float] = []
    starts: list[float] = []
    clock = time.perf_counter
    begin = clock()
    end = begin + seconds
    i = 0
    while (i < count) if count else (clock() < end):
        t0 = clock()
        sock.sendall(msg)
        n = sock.recv_into(got)
        while n < size:
            k = sock.recv_into(got[n:])
            if not k:
                raise ConnectionError("connection closed")
            n += k
        t1 = clock()
        rtts.append(t1 - t0)
        starts.append(t0 - begin)
        i += 1
    sock.sendall(b"q" * size)  # ends the echo loop (untimed)
    recv_exact(sock, size)
    return rtts, starts


def bench_throughput(links: dict[str, Link], args: argparse.Namespace) -> dict[str, Any]:
    """The targets in turn, shuffled each round, after one untimed 16 MiB transfer each."""
    chunk = memoryview(os.urandom(MIB))
    nbytes = args.mib * MIB
    runs: dict[str, list[float]] = {name: [] for name in links}
    errors: dict[str, str] = {}
    for name, link in links.items():
        try:
            with watchdog(link.sock, 60, f"{name} warm-up"):
                send_bulk(link.sock, chunk, 16 * MIB)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    for _ in range(args.reps):
        order = [name for name in links if name not in errors]
        random.shuffle(order)
        for name in order:
            try:
                with watchdog(links[name].sock, 120, f"{name} {args.mib} MiB"):
                    seconds = send_bulk(links[name].sock, chunk, nbytes)
                runs[name].append(args.mib / seconds)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
    out: dict[str, Any] = {name: {"error": msg} for name, msg in errors.items()}
    for name, mib_s in runs.items():
        if name not in errors and mib_s:
            out[name] = {"best_mib_s": max(mib_s), "median_mib_s": statistics.median(mib_s), "runs_mib_s": mib_s}
    return out


def bench_round_trips(
    links: dict[str, Link], args: argparse.Namespace, pids: dict[str, list[int]], cpu: int | None = None
) -> dict[str, Any]:
    """64-byte round trips: ``--warmup`` each, then ``--round-trips`` in ``--rounds`` shuffled rounds; with
    ``cpu``, each target's processes (``pids``, with this one and its peer) pinned to it for its turns."""
    samples: dict[str, list[float]] = {name: [] for name in links}
    round_p50: dict[str, list[float]] = {name: [] for name in links}
    errors: dict[str, str] = {}
    per_round = max(1, args.round_trips // args.rounds)

    def run(name: str, count: int) -> list[float]:
        try:
            link = links[name]
            with (
                pinned([os.getpid(), link.peer.pid, *pids.get(name, [])], cpu),
                watchdog(link.sock, 60, f"{name} round trips"),
            ):
                return ping_pong(link.sock, count=count)[0]
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            return []

    for name in links:
        run(name, args.warmup)
    for _ in range(args.rounds):
        order = [name for name in links if name not in errors]
        random.shuffle(order)
        for name in order:
            got = run(name, per_round)
            if got:
                samples[name] += got
                round_p50[name].append(statistics.median(got) * 1e6)
    out: dict[str, Any] = {name: {"error": msg} for name, msg in errors.items()}
    for name, xs in samples.items():
        if name not in errors and xs:
            us = [x * 1e6 for x in xs]
            out[name] = {
                "p50_us": pct(us, 50),
                "p90_us": pct(us, 90),
                "p99_us": pct(us, 99),
                "max_us": max(us),
                "best_round_p50_us": min(round_p50[name]),
                "round_p50_us": round_p50[name],
                "n": len(us),
            }
    return out


def bench_pairing(port: int, pairs: int) -> dict[str, Any]:
    """Seconds a client waits for the answer when its server is already waiting (``pairs`` fresh pairs)."""
    waits = []
    for _ in range(pairs):
        client, server, waited = proxy_pair(port)
        waits.append(waited * 1e3)
        client.close()
        server.close()
    return {"p50_ms": pct(waits, 50), "max_ms": max(waits), "min_ms": min(waits), "n": len(waits)}


def bench_slow_reader(proxy: Proc, args: argparse.Namespace) -> dict[str, Any]:
    """The receiver sleeps ``--pause`` s before it reads; the proxy tree's RSS sampled every 50 ms."""
    link = open_link(proxy.port)
    try:
        time.sleep(0.3)
        before = []
        for _ in range(5):
            before.append(tree_rss(proxy.pid))
            time.sleep(0.05)
        baseline = statistics.median(before)
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        t0 = time.perf_counter()

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    samples.append((time.perf_counter() - t0, tree_rss(proxy.pid)))
                stop.wait(0.05)

        result: dict[str, Any] = {}

        def send() -> None:
            try:
                result["transfer_s"] = send_bulk(
                    link.sock, memoryview(os.urandom(MIB)), args.mib * MIB, int(args.pause * 1000)
                )
            except Exception as exc:
                result["error"] = f"{type(exc).__name__}: {exc}"

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        sender = threading.Thread(target=send, daemon=True)
        with watchdog(link.sock, 180, "slow reader"):
            sender.start()
            sender.join()
        done_at = time.perf_counter() - t0
        time.sleep(args.settle)
        stop.set()
        sampler.join()
        if "error" in result:
            return result
        growth = [(t, (rss - baseline) / MB) for t, rss in samples]
        peak_at, peak = max(growth, key=lambda x: x[1])
        return {
            "baseline_mb": baseline / MB,
            "peak_growth_mb": peak,
            "peak_at_s": peak_at,
            "growth_at_end_mb": min(growth, key=lambda x: abs(x[0] - done_at))[1],
            "growth_after_mb": growth[-1][1],
            "transfer_s": result["transfer_s"],
            "settle_s": args.settle,
            "samples_mb": [(round(t, 3), round(g, 2)) for t, g in growth],
        }
    finally:
        link.close()


def tracker_call(sock: socket.socket, message: list[Any]) -> Any:
    data = json.dumps(message).encode()
    sock.sendall(struct.pack("<i", len(data)) + data)
    (size,) = struct.unpack("<i", recv_exact(sock, 4))
    return json.loads(recv_exact(sock, size))


def tracker_connect(port: int) -> socket.socket:
    sock = nodelay(socket.create_connection((HOST, port), timeout=30))
    sock.sendall(struct.pack("<i", TRACKER_MAGIC))
    (magic,) = struct.unpack("<i", recv_exact(sock, 4))
    if magic != TRACKER_MAGIC:
        raise RuntimeError(f"port {port} is not a tracker (magic {magic:#x})")
    return sock


def wait_free(tracker: socket.socket, key: str, count: int, timeout: float = 30) -> None:
    """Until the tracker lists ``count`` free servers of ``key``."""
    deadline = time.monotonic() + timeout
    while True:
        reply = tracker_call(tracker, [TRACKER_SUMMARY])
        free = reply[1]["queue_info"].get(key, {}).get("free", 0) if reply[0] == TRACKER_SUCCESS else 0
        if free >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the tracker lists {free} free servers of {key!r}, not {count}, after {timeout} s")
        time.sleep(0.01)


def tracker_link(proxy: Proc, tracker_port: int, key: str, idle: int) -> Link:
    """``idle + 1`` servers on the proxy; a client asks the tracker for one and connects as its matchkey."""
    servers: list[socket.socket] = []
    try:
        with tracker_connect(tracker_port) as tracker:
            for i in range(idle + 1):  # one at a time: TVM's proxy listens with a backlog of 1
                servers.append(greet(proxy.port, f"server:{key}"))
                wait_free(tracker, key, i + 1)
            reply = tracker_call(tracker, [TRACKER_REQUEST, key, "bench", 0])
        if reply[0] != TRACKER_SUCCESS:
            raise RuntimeError(f"the tracker answered the request with {reply!r}")
        _host, port, matchkey = reply[1]
        if port != proxy.port:
            raise RuntimeError(f"the tracker sent the client to port {port}, not the proxy's {proxy.port}")
        client = greet(proxy.port, f"client:{matchkey}")
        read_answer(client)
        ready, _, _ = select.select(servers, [], [], 10)
        if len(ready) != 1:
            raise RuntimeError(f"{len(ready)} servers got an answer, not 1")
        server = ready[0]
        read_answer(server)
        servers.remove(server)
        return Link(client, spawn_peer(server), servers)
    except BaseException:
        for sock in servers:
            sock.close()
        raise


def stall_stats(rtts: list[float], starts: list[float]) -> dict[str, Any]:
    ms = [x * 1e3 for x in rtts]
    p50 = pct(ms, 50)
    over = [(round(t, 3), round(m, 2)) for t, m in zip(starts, ms, strict=True) if m > STALL_MS]
    big = [(t, m) for t, m in over if m > BIG_STALL_MS]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(big) if b[0] - a[0] > 0.5]
    return {
        "p50_us": p50 * 1e3,
        "p99_us": pct(ms, 99) * 1e3,
        "max_ms": max(ms),
        "max_stall_ms": max(ms) - p50,
        "over_5ms": len(over),
        "over_20ms": len(big),
        "over_5ms_at_s_ms": over[:200],
        "stall_period_s": statistics.median(gaps) if gaps else None,
        "round_trips": len(ms),
        "seconds": starts[-1] + rtts[-1] if rtts else 0.0,
    }


def proxy_status(proxy: Proc) -> dict[str, Any] | None:
    """tether's proxy's own account (GET /status on its web port), or None for a proxy without one."""
    for line in proxy.log:
        match = re.search(r"websocket on ws://[^ ]*:(\d+)/ws", line)
        if match:
            with socket.create_connection((HOST, int(match.group(1))), timeout=5) as sock:
                sock.sendall(b"GET /status HTTP/1.1\r\nHost: bench\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            return dict(json.loads(data.split(b"\r\n\r\n", 1)[1]))
    return None


def stall_case(name: str, link: Link, seconds: float) -> dict[str, Any]:
    with watchdog(link.sock, seconds + 60, "ping-pong"):
        ping_pong(link.sock, count=200)
        rtts, starts = ping_pong(link.sock, seconds=seconds)
    r = stall_stats(rtts, starts)
    print(
        f"  {name}: p50 {r['p50_us']:.1f} us, max {r['max_ms']:.1f} ms, {r['over_5ms']} over {STALL_MS:g} ms, "
        f"{r['over_20ms']} over {BIG_STALL_MS:g} ms"
        + (f" (every {r['stall_period_s']:.2f} s)" if r["stall_period_s"] else ""),
        flush=True,
    )
    return r


# -- phases --------------------------------------------------------------------------------------


def phase_plain(report: dict[str, Any], args: argparse.Namespace, notes: dict[str, str]) -> None:
    """1, 2, 3, 5: both proxies in plain mode, up together; memory first, on the fresh proxies."""
    proxies: dict[str, Proc] = {}
    links: dict[str, Link] = {}
    try:
        for target in PROXIES:
            try:
                proxies[target] = start_proxy(target)
                print(
                    f"  {proxies[target].name} on port {proxies[target].port} (pid {proxies[target].pid})", flush=True
                )
            except Exception as exc:
                notes[target] = f"{LABELS[target]} not available: {str(exc)[:300]}"
                print(f"  {notes[target]}", flush=True)
        report["rss_start_mb"] = {t: tree_rss(p.pid) / MB for t, p in proxies.items()}

        print("== 3. memory under a slow reader", flush=True)
        mem: dict[str, Any] = {}
        for target, proxy in proxies.items():
            try:
                mem[target] = m = bench_slow_reader(proxy, args)
            except Exception as exc:
                mem[target] = {"error": f"{type(exc).__name__}: {exc}"}
            m = mem[target]
            if "error" in m:
                print(f"  {target}: {m['error']}", flush=True)
            else:
                print(
                    f"  {target}: baseline {m['baseline_mb']:.1f} MB, peak +{m['peak_growth_mb']:.1f} MB at "
                    f"{m['peak_at_s']:.2f} s, +{m['growth_after_mb']:.1f} MB {args.settle:g} s after "
                    f"(transfer {m['transfer_s']:.2f} s)",
                    flush=True,
                )
        report["slow_reader"] = mem

        print("== 5. pairing", flush=True)
        pairing: dict[str, Any] = {}
        for target, proxy in proxies.items():
            if target == "asyncio":
                continue  # a reference for the data path only
            try:
                pairing[target] = bench_pairing(proxy.port, args.pairs)
                print(f"  {target}: client's wait p50 {pairing[target]['p50_ms']:.2f} ms", flush=True)
            except Exception as exc:
                pairing[target] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"  {target}: {pairing[target]['error']}", flush=True)
        report["pairing"] = pairing

        links["direct"] = open_link(None)
        for target, proxy in proxies.items():
            try:
                links[target] = open_link(proxy.port)
            except Exception as exc:
                notes[target] = f"{LABELS[target]}: no pair: {type(exc).__name__}: {exc}"
                print(f"  {notes[target]}", flush=True)

        print(f"== 1. one-way {args.mib} MiB", flush=True)
        report["throughput"] = tp = bench_throughput(links, args)
        for name, r in tp.items():
            runs = ", ".join(f"{x:.0f}" for x in r.get("runs_mib_s", []))
            print(f"  {name}: " + (r["error"] if "error" in r else f"best {r['best_mib_s']:.0f} MiB/s ({runs})"))
        floor = tp.get("direct", {})
        if "best_mib_s" in floor:  # each proxy against the floor of this same run
            for r in tp.values():
                if "best_mib_s" in r:
                    r["best_of_direct"] = r["best_mib_s"] / floor["best_mib_s"]
                    r["median_of_direct"] = r["median_mib_s"] / floor["median_mib_s"]
            report["throughput_of_direct"] = {n: r.get("best_of_direct") for n, r in tp.items() if n != "direct"}
            print(
                "  of direct (best, median): "
                + ", ".join(
                    f"{n} {r['best_of_direct']:.2f} {r['median_of_direct']:.2f}"
                    for n, r in tp.items()
                    if n != "direct" and "best_of_direct" in r
                ),
                flush=True,
            )

        print("== 2. 64 B round trips", flush=True)
        pids = {t: [p.pid] for t, p in proxies.items()}
        cpu = max(os.sched_getaffinity(0))
        for section, label, pin in (("round_trip", "", None), ("round_trip_one_cpu", f", on CPU {cpu} only", cpu)):
            report[section] = rt = bench_round_trips(links, args, pids, pin)
            for name, r in rt.items():
                print(
                    f"  {name}{label}: "
                    + (r["error"] if "error" in r else f"p50 {r['p50_us']:.1f} us, p99 {r['p99_us']:.1f} us"),
                    flush=True,
                )
        report["rss_end_mb"] = {t: tree_rss(p.pid) / MB for t, p in proxies.items()}
    finally:
        for link in links.values():
            link.close()
        for proxy in proxies.values():
            stop_group(proxy.proc)


def phase_tracker(report: dict[str, Any], args: argparse.Namespace, notes: dict[str, str]) -> None:
    """4: each proxy in tracker mode against each tracker; the floor's ping-pong for the machine's noise."""
    print(f"== 4. round trips for {args.stall_seconds:g} s, proxies in tracker mode", flush=True)
    out: dict[str, Any] = {}
    link = open_link(None)
    try:
        out["direct"] = stall_case("direct", link, args.stall_seconds)
    finally:
        link.close()
    trackers: dict[str, Proc] = {}
    try:
        for kind in ("tvm", "tether"):
            try:
                trackers[kind] = start_tracker(kind)
            except Exception as exc:
                notes[f"{kind}_tracker"] = f"{kind} tracker not available: {str(exc)[:300]}"
                print(f"  {notes[f'{kind}_tracker']}", flush=True)
        cases = [("tvm", "tvm"), ("tvm", "tether"), ("tether", "tether"), ("tether", "tvm")]
        for index, (proxy_kind, tracker_kind) in enumerate(cases):
            name = f"{proxy_kind}_proxy_{tracker_kind}_tracker"
            if tracker_kind not in trackers or (proxy_kind == "tether" and "tether" in notes):
                out[name] = {"error": "not available"}
                continue
            try:
                proxy = start_proxy(proxy_kind, trackers[tracker_kind].port)
            except Exception as exc:
                out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"  {name}: {out[name]['error']}", flush=True)
                continue
            try:
                link = tracker_link(proxy, trackers[tracker_kind].port, f"benchkey{index}", args.idle_servers)
                try:
                    out[name] = stall_case(name, link, args.stall_seconds)
                    status = proxy_status(proxy)
                    if status is not None:
                        lag = out[name]["loop_lag"] = status["loop_lag"]
                        print(
                            f"    its own event loop (a timer every 50 ms since start): max lateness "
                            f"{lag['max_ms']:.1f} ms, {lag['over_5ms']} of {lag['probes']} over 5 ms",
                            flush=True,
                        )
                finally:
                    link.close()
            except Exception as exc:
                out[name] = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "proxy_log": list(proxy.log)[-40:],
                    "tracker_log": list(trackers[tracker_kind].log)[-10:],
                }
                print(f"  {name}: {out[name]['error']}", flush=True)
            finally:
                stop_group(proxy.proc)
    finally:
        for tracker in trackers.values():
            stop_group(tracker.proc)
    report["stalls"] = out


def machine_info() -> dict[str, Any]:
    import tornado
    import tvm

    import tether

    return benchlib.machine_info(tvm=tvm.__version__, tornado=tornado.version, tether=tether.__version__)


def run(args: argparse.Namespace) -> dict[str, Any]:
    notes: dict[str, str] = {}
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(),
        "notes": notes,
    }
    print("== plain mode", flush=True)
    phase_plain(report, args, notes)
    phase_tracker(report, args, notes)
    report["machine"]["load_average_end"] = os.getloadavg()
    return report


# -- the table -----------------------------------------------------------------------------------

Cell = float | str | None


@dataclass
class Row:
    metric: str
    direct: Cell
    tvm: Cell
    asyncio: Cell
    tether: Cell
    ratio: str = ""  # tether/TVM
    ratio_asyncio: str = ""  # tether/asyncio relay
    target: str = ""


def _get(section: dict[str, Any], name: str, key: str) -> Cell:
    r = section.get(name)
    if r is None:
        return "n/a"
    if "error" in r:
        return "n/a" if r["error"] == "not available" else "error"
    value = r.get(key)
    return "-" if value is None else value


def _ratio(tether: Cell, tvm: Cell) -> str:
    if isinstance(tether, float | int) and isinstance(tvm, float | int) and tvm:
        return f"{tether / tvm:.2f}x"
    return ""


def _target(value: Cell, ok: Any, text: str) -> str:
    if not isinstance(value, float | int):
        return f"{text}: not measured"
    return f"{text}: {'met' if ok(value) else 'MISSED'}"


def rows(report: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    out: list[Row] = []
    tp, rt, mem, pair, st = (
        report.get(k, {}) for k in ("throughput", "round_trip", "slow_reader", "pairing", "stalls")
    )

    def line(
        metric: str, section: dict[str, Any], key: str, target: tuple[Any, str] | None = None, ratio: bool = True
    ) -> None:
        d, v, a, t = (_get(section, name, key) for name in TARGETS)
        ratios = (_ratio(t, v), _ratio(t, a)) if ratio else ("", "")
        out.append(Row(metric, d, v, a, t, *ratios, _target(t, *target) if target else ""))

    line(f"1. one-way {args.mib} MiB, MiB/s, best of {args.reps}", tp, "best_mib_s", (lambda x: x >= 1700, ">= 1700"))
    line("   median MiB/s", tp, "median_mib_s")
    line("   best, fraction of direct's best (same run)", tp, "best_of_direct", ratio=False)
    out[-1].target = "(the issue's asyncio relay: 1760/3577 = 0.49)"
    line("   median, fraction of direct's median", tp, "median_of_direct", ratio=False)

    def runs(name: str) -> Cell:
        r = tp.get(name, {})
        return " ".join(f"{x:.0f}" for x in r["runs_mib_s"]) if "runs_mib_s" in r else "n/a"

    out.append(Row("   every run, MiB/s", *(runs(name) for name in TARGETS)))
    direct_p50 = _get(rt, "direct", "p50_us")
    limit = 1.5 * direct_p50 if isinstance(direct_p50, float) else 0.0
    line("2. 64 B round trip p50 us", rt, "p50_us", (lambda x: x <= limit, "<= 1.5x direct"))
    line("   p99 us", rt, "p99_us")
    line("   best round's p50 us", rt, "best_round_p50_us")
    rt1 = report.get("round_trip_one_cpu", {})
    direct_one = _get(rt1, "direct", "p50_us")
    tether_one = _get(rt1, "tether", "p50_us")
    line("   p50 us, all on one CPU (no idle-CPU wake-ups)", rt1, "p50_us")
    if isinstance(direct_one, float) and isinstance(tether_one, float):
        out[-1].target = f"(one CPU: {tether_one / direct_one:.2f}x direct)"
    line("   p99 us, all on one CPU", rt1, "p99_us")
    line("3. slow reader: proxy tree RSS before, MB", mem, "baseline_mb")
    line(
        f"   peak growth MB ({args.mib} MiB, reader paused {args.pause:g} s)",
        mem,
        "peak_growth_mb",
        (lambda x: x < 16, "< 16 MB"),
    )
    line("   growth when the transfer finished, MB", mem, "growth_at_end_mb")
    line(f"   growth {args.settle:g} s later (never returned), MB", mem, "growth_after_mb")
    line("   transfer incl. the pause, s", mem, "transfer_s")
    # 4: the floor in the direct column, each proxy with its own tracker, then with the other one's
    own = {
        "direct": st.get("direct"),
        "tvm": st.get("tvm_proxy_tvm_tracker"),
        "tether": st.get("tether_proxy_tether_tracker"),
    }  # the asyncio relay has no tracker mode: "n/a"
    other = {"tvm": st.get("tvm_proxy_tether_tracker"), "tether": st.get("tether_proxy_tvm_tracker")}
    own_section = {k: v for k, v in own.items() if v is not None}
    other_section = {k: v for k, v in other.items() if v is not None}
    secs = f"{args.stall_seconds:g} s"
    line(f"4. tracker mode, {secs} of 64 B round trips: p50 us", own_section, "p50_us")
    line("   max ms", own_section, "max_ms")
    line(f"   round trips over {STALL_MS:g} ms", own_section, "over_5ms", ratio=False)
    line(f"   round trips over {BIG_STALL_MS:g} ms", own_section, "over_20ms", ratio=False)
    line("   max stall = max - p50, ms", own_section, "max_stall_ms", (lambda x: x <= STALL_MS, "<= 5 ms"))
    line(f"   period of the stalls over {BIG_STALL_MS:g} ms, s", own_section, "stall_period_s", ratio=False)
    lags = {
        k: {"max_ms": v["loop_lag"]["max_ms"], "over": v["loop_lag"]["over_5ms"]}
        for k, v in own_section.items()
        if isinstance(v, dict) and "loop_lag" in v
    }
    line(
        "   the proxy's own loop: max timer lateness ms",
        lags,
        "max_ms",
        (lambda x: x <= STALL_MS, "<= 5 ms"),
        ratio=False,
    )
    line("   the proxy's own loop: timers over 5 ms late", lags, "over", ratio=False)
    line("   with the other's tracker: max ms", other_section, "max_ms")
    line(f"   with the other's tracker: round trips over {STALL_MS:g} ms", other_section, "over_5ms", ratio=False)
    line(f"   with the other's tracker: round trips over {BIG_STALL_MS:g} ms", other_section, "over_20ms", ratio=False)
    line(
        "   with the other's tracker: max stall ms", other_section, "max_stall_ms", (lambda x: x <= STALL_MS, "<= 5 ms")
    )
    line("5. pairing: client's wait for the answer p50 ms", pair, "p50_ms")
    line("   max ms", pair, "max_ms")
    rss = {t: {"mb": v} for t, v in report.get("rss_end_mb", {}).items()}
    line("   proxy tree RSS after the plain-mode runs, MB", rss, "mb")
    return out


def print_table(table: list[Row]) -> None:
    def cell(v: Cell) -> str:
        if v is None:
            return "-"
        if isinstance(v, str):
            return v
        if isinstance(v, int):
            return str(v)
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}"

    width = max(len(r.metric) for r in table)
    cols = [max(len(LABELS[c]), *(len(cell(getattr(r, c))) for r in table)) for c in TARGETS]
    head = " ".join(f"{LABELS[c]:>{w}s}" for c, w in zip(TARGETS, cols, strict=True))
    print()
    print(f"{'metric':{width}s} {head} {'tether/TVM':>10s} {'tether/asyncio':>14s}  target")
    for r in table:
        cells = " ".join(f"{cell(getattr(r, c)):>{w}s}" for c, w in zip(TARGETS, cols, strict=True))
        print(f"{r.metric:{width}s} {cells} {r.ratio:>10s} {r.ratio_asyncio:>14s}  {r.target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, 5 s of ping-pong (about a minute)")
    parser.add_argument("--mib", type=int, default=256, help="one-way and slow-reader transfer size (default 256)")
    parser.add_argument("--reps", type=int, default=3, help="timed one-way transfers per target (default 3)")
    parser.add_argument("--round-trips", type=int, default=5000, help="timed 64 B round trips (default 5000)")
    parser.add_argument("--warmup", type=int, default=200, help="untimed round trips first (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the round trips are split into (default 5)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds the slow reader waits (default 2)")
    parser.add_argument("--settle", type=float, default=1.0, help="RSS sampled this long after it (default 1)")
    parser.add_argument("--stall-seconds", type=float, default=10.0, help="ping-pong per tracker case (default 10)")
    parser.add_argument("--idle-servers", type=int, default=8, help="idle servers on the proxy (default 8)")
    parser.add_argument("--pairs", type=int, default=20, help="pairings timed per proxy (default 20)")
    parser.add_argument(
        "--tether-flags", default="", help='extra flags for "tether proxy", in one string: --tether-flags=--no-splice'
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default bench/results/)")
    parser.add_argument(SERVE_RELAY, action="store_true", help="run the asyncio relay (a target) and nothing else")
    args = parser.parse_args(argv)
    if args.serve_asyncio_relay:
        serve_asyncio_relay()
        return 0
    TETHER_FLAGS[:] = shlex.split(args.tether_flags)
    if args.quick:
        args.reps, args.round_trips, args.rounds, args.stall_seconds, args.pairs = 2, 2000, 4, 5.0, 10
        args.settle = 0.5
    report = timed_run(run, args)
    table = rows(report, args)
    report["table"] = [vars(r) for r in table]
    print_table(table)
    for note in report["notes"].values():
        print(f"note: {note}")
    write_report(report, args.json, "proxy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
