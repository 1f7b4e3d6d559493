"""Shared fixtures: a tracker on loopback port 0, a raw TVM-style peer, and waiting on conditions."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tether.protocol import RPC_TRACKER_MAGIC
from tether.tracker import TrackerConfig, TrackerThread


def wait_until(
    predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)  # polling a condition with a deadline, not synchronising by sleep


class RawPeer:
    """A tracker peer that frames exactly like TVM's Python code: length and body in two sends."""

    def __init__(self, host: str, port: int, handshake: bool = True, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if handshake:
            self.sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
            assert self.recv_exact(4) == struct.pack("<i", RPC_TRACKER_MAGIC)

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def send_json(self, value: Any) -> None:
        data = json.dumps(value).encode()
        self.sock.sendall(struct.pack("<i", len(data)))
        self.sock.sendall(data)

    def recv_json(self) -> Any:
        (n,) = struct.unpack("<i", self.recv_exact(4))
        return json.loads(self.recv_exact(n))

    def call(self, value: Any) -> Any:
        self.send_json(value)
        return self.recv_json()

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the other side closes (or resets) without sending anything more."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def tracker() -> Iterator[TrackerThread]:
    with TrackerThread(TrackerConfig(host="127.0.0.1", port=0)) as t:
        yield t


@pytest.fixture
def peer(tracker: TrackerThread) -> Callable[..., RawPeer]:
    peers: list[RawPeer] = []

    def make(**kwargs: Any) -> RawPeer:
        p = RawPeer(tracker.host, tracker.port, **kwargs)
        peers.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in peers:
        p.close()


class CliProcess:
    """A ``python -m tether ...`` child whose output lines are read by a thread, waited on with deadlines."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        import os
        import queue
        import subprocess
        import sys
        import threading

        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tether", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, needle: str, timeout: float = 15.0) -> str:
        import queue

        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no line containing {needle!r} within {timeout} s; saw {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if needle in line:
                return line

    def wait_eof(self, timeout: float = 15.0) -> list[str]:
        """Wait until every process holding the output pipe (the child and whatever it started) is gone;
        returns (and keeps in ``seen``) every line not read yet."""
        import queue

        self._reader.join(timeout)
        if self._reader.is_alive():
            pytest.fail(f"the output stayed open for {timeout} s: something the process started still runs")
        rest = []
        while True:
            try:
                rest.append(self.lines.get_nowait())
            except queue.Empty:
                break
        self.seen.extend(rest)
        return rest

    def listening(self, timeout: float = 15.0) -> tuple[str, int]:
        line = self.wait_line("listening on ", timeout)
        host, _, port = line.split("listening on ", 1)[1].rpartition(":")
        return host.strip("[]"), int(port)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by pid, SIGKILL if it does not exit in time; returns the exit code."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._reader.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def cli() -> Iterator[Callable[..., CliProcess]]:
    procs: list[CliProcess] = []

    def spawn(*args: str, env: dict[str, str] | None = None) -> CliProcess:
        p = CliProcess(*args, env=env)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        p.stop()


@pytest.fixture
def device_server(tmp_path: Any) -> Iterator[Callable[..., Any]]:
    """Start in-process tether servers (their session workers are real processes); stopped afterwards."""
    from tether.device.server import DeviceServer, ServerConfig

    servers: list[DeviceServer] = []

    def start(**kwargs: Any) -> DeviceServer:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        kwargs.setdefault("preload", [])
        kwargs.setdefault("work_dir", str(tmp_path / f"server{len(servers)}"))
        server = DeviceServer(ServerConfig(**kwargs))
        servers.append(server)
        server.start()
        if server.config.tracker:
            assert server.registered.wait(10), "the server did not register with the tracker"
        return server

    yield start
    for server in servers:
        server.stop()
