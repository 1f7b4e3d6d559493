"""The resource attacks on the tracker and the proxy, measured on loopback: what one peer can make them hold.

    python bench/bounds_bench.py [--only NAME ...] [--json out.json]

Each scenario starts its own ``python -m tether tracker`` (and proxy) from whatever ``tether`` is on the path,
so the same script measures the code before and after the bounds (``PYTHONPATH=old/src python
bench/bounds_bench.py``). Scenarios:

- ``silent``: 200 sockets that never send the magic and 200 that send it and then nothing; how many the
  tracker closed within 70 s, and when (median).
- ``per_peer``: 1,000 connections from 127.0.0.1, each sending the magic: how many are answered.
- ``fds``: a tracker limited to 1,024 descriptors, 1,100 silent sockets from four loopback addresses, then
  a PING on a new connection from a fifth: answered or not (30 s), and how fast.
- ``waiters``: 200,000 REQUESTs for a key nobody serves, from one connection with no user (as TVM's
  client sends them), then from 200 connections with a different user per request: how many wait, and
  the tracker's RSS before and after.
- ``slots``: 100,000 PUTs from one connection, then 250 each from 400 connections: how many slots are
  free, and the RSS.
- ``priority``: two requests at priority 1e300 from one user, then one at 1000 from another, then two
  free slots: who gets the second.
- ``proxy``: 300 fake servers parked at a proxy in tracker mode: how many wait, and how many slots the
  tracker shows.

The numbers are the attacks' cost, not timings to compare: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MAGIC = struct.pack("<i", 0x2F271)
RPC_MAGIC = struct.pack("<i", 0xFF271)
HOST = "127.0.0.1"


def frame(value: Any) -> bytes:
    body = json.dumps(value).encode()
    return struct.pack("<i", len(body)) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def recv_value(sock: socket.socket) -> Any:
    (n,) = struct.unpack("<i", recv_exact(sock, 4))
    return json.loads(recv_exact(sock, n))


def greeted(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.sendall(MAGIC)
    if recv_exact(sock, 4) != MAGIC:
        raise RuntimeError("not a tracker")
    return sock


def call(sock: socket.socket, value: Any) -> Any:
    sock.sendall(frame(value))
    return recv_value(sock)


@contextlib.contextmanager
def tracker(*args: str, nofile: int | None = None) -> Iterator[tuple[int, int]]:
    """A tracker process: (port, pid)."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        [sys.executable, "-m", "tether", "tracker", "--port", "0", "--silent", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # asyncio logs EMFILE once per connection it tries to accept: thousands
        text=True,
        preexec_fn=limit,  # noqa: PLW1509 - only setrlimit, before exec
    )
    try:
        assert proc.stdout is not None
        port = 0
        for line in proc.stdout:
            if "listening on " in line:
                port = int(line.rsplit(":", 1)[1])
                break
        if not port:
            raise RuntimeError(f"tracker exited with {proc.wait()}")
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def queue_info(port: int, key: str) -> dict[str, int]:
    with contextlib.closing(greeted(port, 60)) as sock:
        info = call(sock, [6])[1]["queue_info"].get(key, {"free": 0, "pending": 0})
    return {"free": int(info["free"]), "pending": int(info["pending"])}


def flood(sock: socket.socket, frames: list[bytes]) -> None:
    """Send ``frames`` on ``sock`` while a thread reads the replies; return once a final hello PING is
    answered (``[0, {"tether": ...}]``, unlike any other reply; replies come in order of the tracker's making:
    every frame before it has been handled)."""
    done = threading.Event()

    def drain() -> None:
        try:
            while True:
                (n,) = struct.unpack("<i", recv_exact(sock, 4))
                if recv_exact(sock, n).startswith(b"[0, {"):
                    done.set()
                    return
        except OSError:
            done.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with contextlib.suppress(OSError):
        sock.sendall(b"".join(frames) + frame([1, {"hello": True}]))
    done.wait(300)


def wait_closed(socks: list[socket.socket], seconds: float) -> list[float]:
    """Seconds after which each socket was closed by the tracker (those still open are left out)."""
    import selectors

    start = time.monotonic()
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed: list[float] = []
    while len(closed) < len(socks) and time.monotonic() - start < seconds:
        for key, _ in sel.select(0.5):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                closed.append(round(time.monotonic() - start, 1))
    return closed


# -- the scenarios -------------------------------------------------------------------------------------


def silent() -> dict[str, Any]:
    with tracker() as (port, _):
        mute = [socket.create_connection((HOST, port), timeout=10) for _ in range(200)]
        t_mute = wait_closed(mute, 20)
        quiet = [greeted(port) for _ in range(200)]
        t_quiet = wait_closed(quiet, 75)
        for s in mute + quiet:
            s.close()
    return {
        "no magic: closed of 200 within 20 s": len(t_mute),
        "no magic: median s to close": statistics.median(t_mute) if t_mute else None,
        "magic then silence: closed of 200 within 75 s": len(t_quiet),
        "magic then silence: median s to close": statistics.median(t_quiet) if t_quiet else None,
    }


def per_peer() -> dict[str, Any]:
    with tracker() as (port, _):
        socks = []
        answered = 0
        for _ in range(1000):
            s = socket.create_connection((HOST, port), timeout=5)
            socks.append(s)
            try:
                s.sendall(MAGIC)
                if recv_exact(s, 4) == MAGIC:
                    answered += 1
            except OSError:
                pass
        for s in socks:
            s.close()
    return {"answered of 1,000 from one address": answered}


def _loopback_addresses(n: int) -> list[str]:
    """127.0.0.1 .. 127.0.0.n where the system routes them to loopback (Linux does), else 127.0.0.1 alone."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
    except OSError:
        return [HOST]
    return [f"127.0.0.{i}" for i in range(1, n + 1)]


def fds() -> dict[str, Any]:
    *attackers, newcomer = _loopback_addresses(5)  # four attacking addresses (each under any per-address limit)
    if not attackers:
        attackers = [newcomer]
    with tracker(nofile=1024) as (port, _):
        socks = [
            socket.create_connection((HOST, port), timeout=10, source_address=(attackers[i % len(attackers)], 0))
            for i in range(1100)
        ]
        start = time.monotonic()
        try:
            with contextlib.closing(socket.create_connection((HOST, port), 30, (newcomer, 0))) as s:
                s.sendall(MAGIC)
                ok = recv_exact(s, 4) == MAGIC and call(s, [1]) == 0
        except OSError:
            ok = False
        took = time.monotonic() - start
        for s in socks:
            s.close()
    return {"new peer answered (30 s)": ok, "after s": round(took, 2), "attacking addresses": len(attackers)}


def waiters() -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tracker() as (port, pid):
        out["RSS before, MB"] = rss_mb(pid)
        with contextlib.closing(greeted(port)) as s:
            flood(s, [frame([4, "nobody", "", 1])] * 200_000)
            out["one connection, no user: waiting of 200,000"] = queue_info(port, "nobody")["pending"]
            out["RSS, MB"] = rss_mb(pid)
    with tracker() as (port, pid):
        socks = [greeted(port) for _ in range(200)]
        threads = []
        for c, s in enumerate(socks):
            frames = [frame([4, "nobody", f"u{c}-{i}", 1]) for i in range(1000)]
            threads.append(threading.Thread(target=flood, args=(s, frames)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["200 connections, a user per request: waiting of 200,000"] = queue_info(port, "nobody")["pending"]
        out["RSS after them, MB"] = rss_mb(pid)
        for s in socks:
            s.close()
    return out


def slots() -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tracker() as (port, pid):
        out["RSS before, MB"] = rss_mb(pid)
        with contextlib.closing(greeted(port)) as s:
            flood(s, [frame([3, "fake", [9000, f"fake:{i}"], None]) for i in range(100_000)])
            out["one connection: free of 100,000 PUT"] = queue_info(port, "fake")["free"]
            out["RSS, MB"] = rss_mb(pid)
    with tracker() as (port, pid):
        socks = [greeted(port) for _ in range(400)]
        for c, s in enumerate(socks):
            flood(s, [frame([3, "fake", [9000, f"fake:{c}:{i}"], None]) for i in range(250)])
        out["400 connections: free of 100,000 PUT"] = queue_info(port, "fake")["free"]
        out["RSS after them, MB"] = rss_mb(pid)
        for s in socks:
            s.close()
    return out


def priority() -> dict[str, Any]:
    with tracker() as (port, _):
        attacker, victim, server = greeted(port), greeted(port), greeted(port)
        for s in (attacker, victim, server):
            s.settimeout(5)
        attacker.sendall(frame([4, "k", "mallory", 1e300]) * 2)
        while queue_info(port, "k")["pending"] < 2:
            time.sleep(0.01)  # a bench polling the tracker's state, not a test synchronising
        victim.sendall(frame([4, "k", "victor", 1000]))
        while queue_info(port, "k")["pending"] < 3:
            time.sleep(0.01)
        with contextlib.closing(greeted(port)) as q:
            waiting = call(q, [6, {"detail": True}])[1]["tether"]["keys"]["k"]["waiters"]
        assert call(server, [3, "k", [9000, "k:1"], None]) == 0
        assert call(server, [3, "k", [9000, "k:2"], None]) == 0
        second = "victor"
        try:
            victim_reply = recv_value(victim)
        except TimeoutError:
            victim_reply = None
            second = "mallory"
        for s in (attacker, victim, server):
            s.close()
    return {
        "priorities as queued": [w["priority"] for w in waiting],
        "second slot went to": second,
        "victim's reply": victim_reply,
    }


def proxy() -> dict[str, Any]:
    with tracker() as (port, _):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tether", "proxy", "--port", "0", "--no-web", "--tracker", f"{HOST}:{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert proc.stdout is not None
            pport = 0
            for line in proc.stdout:
                if "listening on " in line:
                    pport = int(line.rsplit(":", 1)[1])
                    break
            key = b"server:fake"
            socks = []
            refused = 0
            for _ in range(300):
                s = socket.create_connection((HOST, pport), timeout=10)
                s.sendall(RPC_MAGIC + struct.pack("<i", len(key)) + key)
                socks.append(s)
            for s in socks:
                s.settimeout(0.2)
                with contextlib.suppress(TimeoutError):
                    if s.recv(4):
                        refused += 1
            deadline = time.monotonic() + 10
            free = 0
            while time.monotonic() < deadline:
                free = queue_info(port, "fake")["free"]
                if free >= 300 - refused:
                    break
                time.sleep(0.1)  # the proxy offers them in rounds: a bench polling
            for s in socks:
                s.close()
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"refused of 300": refused, "slots at the tracker": free}


SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "silent": silent,
    "per_peer": per_peer,
    "fds": fds,
    "waiters": waiters,
    "slots": slots,
    "priority": priority,
    "proxy": proxy,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    import tether

    results: dict[str, Any] = {"tether": tether.__version__, "from": os.path.dirname(tether.__file__)}
    for name in args.only or list(SCENARIOS):
        print(f"{name} ...", flush=True)
        results[name] = SCENARIOS[name]()
        print(f"  {json.dumps(results[name])}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
