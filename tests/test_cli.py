"""The ``tether`` command as a user runs it: real processes, real sockets."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from tether.client.tracker import TrackerClient
from tether.protocol import Request

from .conftest import CliProcess


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_tracker_prints_address_and_hint_then_stops_on_sigterm(cli: Callable[..., CliProcess]) -> None:
    proc = cli("tracker", "--port", "0")
    host, port = proc.listening()
    assert host == "127.0.0.1" and port > 0
    proc.wait_line("--host 0.0.0.0")
    with TrackerClient.connect(host, port) as client:
        assert client.ping() > 0
    assert proc.stop() == 0


def test_port_range_skips_busy_ports(cli: Callable[..., CliProcess]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        base = probe.getsockname()[1]
        probe.listen()
        proc = cli("tracker", "--port", str(base), "--port-end", str(base + 50))
        _, port = proc.listening()
        assert base < port < base + 50


def test_no_free_port_is_a_clear_error_naming_the_range() -> None:
    with socket.socket() as probe, socket.socket() as next_one:
        probe.bind(("127.0.0.1", 0))
        probe.listen()
        port = probe.getsockname()[1]
        with contextlib.suppress(OSError):  # taken already: in use either way
            next_one.bind(("127.0.0.1", port + 1))
            next_one.listen()
        done = run_cli("tracker", "--port", str(port), "--port-end", str(port + 2))
        single = run_cli("proxy", "--port", str(port), "--port-end", str(port), "--no-web")
    assert done.returncode == 2 and single.returncode == 2
    assert done.stderr == f"tether tracker: ports {port}..{port + 1} (2 of them) on 127.0.0.1 are all in use\n"
    assert single.stderr == f"tether proxy: port {port} on 127.0.0.1 is in use\n"


def test_query_table_and_json(cli: Callable[..., CliProcess]) -> None:
    proc = cli("tracker", "--port", "0")
    host, port = proc.listening()
    with TrackerClient.connect(host, port) as server, TrackerClient.connect(host, port) as proxy:
        server.update_info({"key": "server:127.0.0.1:5555", "addr": [None, 9091]})
        server.put("127.0.0.1:5555", 9091, "127.0.0.1:5555:0.1")
        proxy.update_info({"key": "server:proxy[android]", "addr": [None, 9090]})
        proxy.put("android", 9090, "android:0.1")
        proxy.put("android", 9090, "android:0.2")
        with TrackerClient.connect(host, port) as waiter:
            waiter.send(Request("gpu", "carol", 2))
            waiter.ping()  # the request is queued before the query reads it
            text = run_cli("query", "--host", host, "--port", str(port))
            data = run_cli("query", "--json", "--host", host, "--port", str(port))
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "Server List" in out and "Queue Status" in out and "Waiting" in out
    queue_section = out.split("Queue Status", 1)[1].split("\n\n", 1)[0]
    rows = {line.split()[0]: line.split() for line in queue_section.splitlines() if line and not line.startswith("-")}
    assert rows["127.0.0.1:5555"][1:4] == ["1", "1", "0"]  # TVM's query shows total 0 and hides it
    assert rows["android"][1:4] == ["2", "2", "0"]  # proxied: TVM's query hides it too
    assert rows["gpu"][1:4] == ["0", "0", "1"]
    assert "no server is registered with key 'gpu'" in out
    status = json.loads(data.stdout)
    assert status["tether_version"]
    assert {k["key"]: k["total"] for k in status["keys"]} == {"127.0.0.1:5555": 1, "android": 2, "gpu": 0}
    assert status["waiters"][0]["user"] == "carol" and status["waiters"][0]["priority"] == 2


def test_query_honours_tvm_environment_variables(cli: Callable[..., CliProcess]) -> None:
    proc = cli("tracker", "--port", "0")
    _, port = proc.listening()
    done = run_cli("query", env={"TVM_TRACKER_HOST": "127.0.0.1", "TVM_TRACKER_PORT": str(port)})
    assert done.returncode == 0 and f"127.0.0.1:{port}" in done.stdout


def test_query_unreachable_tracker_fails_fast() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connection refused
        start = time.monotonic()
        done = run_cli("query", "--port", str(port))
    assert done.returncode == 2
    assert "cannot read the tracker" in done.stderr
    assert time.monotonic() - start < 10


def test_query_silent_peer_times_out() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog) but never answers
        start = time.monotonic()
        done = run_cli("query", "--port", str(silent.getsockname()[1]), "--timeout", "1")
    assert done.returncode == 2
    assert time.monotonic() - start < 10


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.startswith("tether ")
    assert "tracker" in run_cli("--help").stdout
